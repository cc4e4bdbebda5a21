"""The example app as a real ``uvicorn`` process on a loopback port."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.support import free_port, stop_process

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 30.0


class AppServer:
    """``python -m example_app`` in a subprocess; ``close()`` always reaps it.

    Output goes to a temporary file rather than a pipe, so a chatty server can
    never block on a full pipe, and the log is there to quote when it fails.
    """

    def __init__(
        self,
        *,
        name: str,
        fastapi: bool = False,
        redis_url: str | None = None,
        secret: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "example_app", "--host", "127.0.0.1"]
        self.args += ["--port", str(self.port), "--name", name]
        if fastapi:
            self.args.append("--fastapi")
        self.env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "SESSION_SECRET"}}
        self.env["PYTHONUNBUFFERED"] = "1"
        if redis_url is not None:
            self.env["REDIS_URL"] = redis_url
        if secret is not None:
            self.env["SESSION_SECRET"] = secret
        self.env.update(env or {})
        self.log_file = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in close()
            prefix=f"example-app-{name}-", suffix=".log", delete=False
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def log(self) -> str:
        return Path(self.log_file.name).read_text(errors="replace")

    def start(self) -> AppServer:
        self.proc = subprocess.Popen(
            self.args, cwd=REPO, env=self.env, stdout=self.log_file, stderr=subprocess.STDOUT
        )
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT
        last_error = "no attempt"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"example app {self.name!r} exited with {self.proc.returncode}:\n{self.log()}"
                )
            try:
                response = httpx.get(f"{self.url}/healthz", timeout=2)
                if response.status_code == 200:
                    return
                last_error = f"HTTP {response.status_code}"
            except httpx.TransportError as exc:
                last_error = repr(exc)
            time.sleep(0.1)
        raise RuntimeError(
            f"example app {self.name!r} not ready after {READY_TIMEOUT} s ({last_error}):\n"
            f"{self.log()}"
        )

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc)
        self.proc = None
        self.log_file.close()
        Path(self.log_file.name).unlink(missing_ok=True)

    def __enter__(self) -> AppServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
