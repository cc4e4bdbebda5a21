"""Test helpers: real redis-server processes and a client that counts its commands."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import Connection


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisProcess:
    """A throwaway ``redis-server`` on a free loopback port that tests may stop,
    restart, pause (SIGSTOP) and resume. Nothing is persisted to disk."""

    def __init__(self, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            # A failure, not a skip: CI must not pass without a real Redis.
            raise RuntimeError(
                "redis-server is not installed and REDIS_URL is not set; "
                "run the tests with ./dev test, which installs it"
            )
        self.binary = binary
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="ark-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self.dir,
                "--protected-mode", "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisSpy:
    """Counts what a client sends: commands by name and socket round trips.

    A pipeline or transaction is one round trip however many commands it
    carries; that is the number the library promises to keep small.
    """

    def __init__(self) -> None:
        self.commands: Counter[str] = Counter()
        self.round_trips = 0

    def reset(self) -> None:
        self.commands.clear()
        self.round_trips = 0

    @property
    def total(self) -> int:
        return sum(self.commands.values())

    def connection_class(self) -> type[Connection]:
        spy = self

        class CountingConnection(Connection):
            def pack_command(self, *args: Any) -> list[bytes]:
                name = args[0]
                spy.commands[(name.decode() if isinstance(name, bytes) else str(name)).upper()] += 1
                return super().pack_command(*args)

            async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
                spy.round_trips += 1
                await super().send_packed_command(command, check_health)

        return CountingConnection


def counting_client(url: str, spy: RedisSpy, **kwargs: Any) -> Redis:
    """A client on ``url`` whose traffic ``spy`` counts. No handshake commands
    (CLIENT SETINFO) or health checks are sent, so only the library's own
    commands show up."""
    client: Redis = Redis.from_url(
        url,
        connection_class=spy.connection_class(),
        driver_info=None,
        **kwargs,
    )
    return client
