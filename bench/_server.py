"""The bench's own throwaway ``redis-server``: the test suite's RedisProcess (loopback
only, nothing on disk), always stopped, even on Ctrl-C or an error (``with`` block
plus an ``atexit`` safety net)."""

from __future__ import annotations

import atexit
import shutil
import subprocess
from types import TracebackType

from tests.support import RedisProcess, free_port, wait_for_port

__all__ = ["BenchRedis", "free_port", "redis_server_version", "wait_for_port"]


def redis_server_version() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        return "not installed"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    for part in out.stdout.split():
        if part.startswith("v="):
            return part[2:]
    return out.stdout.strip()


class BenchRedis(RedisProcess):
    """``with BenchRedis() as server: server.url``"""

    def __enter__(self) -> BenchRedis:
        atexit.register(self.close)
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
