"""Real Redis Cluster and Sentinel deployments on loopback, for the scale-out tests.

Everything here is synchronous and bounded: each server gets its own temp dir,
no persistence (``--save "" --appendonly no``), loopback only, and every wait
has a deadline after which a :class:`ServerStartError` says what went wrong
(with the tail of the server's log). Failing to start is a failure, not a skip.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from tests.support import free_port, stop_process

HOST = "127.0.0.1"
START_TIMEOUT = 10.0


class ServerStartError(RuntimeError):
    """A server of the scale-out deployment did not come up in time."""


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ServerStartError(
            f"{name} is not installed; the scale-out tests need real Redis Cluster and "
            "Sentinel servers (apt-get install redis-server, or ./dev test)"
        )
    return path


def wait_for(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.05) -> None:
    """Poll ``check`` until it is true, or fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, redis.RedisError) as exc:
            last = exc
        time.sleep(interval)
    detail = f" (last error: {last!r})" if last is not None else ""
    raise ServerStartError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")


def sync_client(port: int) -> redis.Redis:
    client: redis.Redis = redis.Redis(
        host=HOST, port=port, socket_timeout=5, socket_connect_timeout=5, decode_responses=True
    )
    return client


class ServerProcess:
    """One ``redis-server`` (or ``redis-server --sentinel``) process on loopback."""

    def __init__(self, root: Path, name: str, args: list[str], *, sentinel: bool = False) -> None:
        self.name = name
        self.port = free_port()
        self.dir = root / name
        self.dir.mkdir()
        self.log = self.dir / "server.log"
        self.sentinel = sentinel
        self.extra = args
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        common = [
            "--port", str(self.port),
            "--bind", HOST,
            "--protected-mode", "no",
            "--dir", str(self.dir),
            "--logfile", str(self.log),
        ]  # fmt: skip
        if self.sentinel:
            # Sentinel rewrites its config file, so it needs one of its own.
            conf = self.dir / "sentinel.conf"
            conf.write_text("\n".join(self.extra) + "\n")
            return [_binary("redis-server"), str(conf), "--sentinel", *common]
        persistence = ["--save", "", "--appendonly", "no"]
        return [_binary("redis-server"), *common, *persistence, *self.extra]

    def start(self) -> ServerProcess:
        # Config errors are printed before --logfile applies: keep them too.
        with (self.dir / "stdout.log").open("ab") as output:
            self.proc = subprocess.Popen(self.command(), stdout=output, stderr=output)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"{self.name} (port {self.port}) exited with {self.proc.returncode}: "
                    f"{self.log_tail()}"
                )
            try:
                with socket.create_connection((HOST, self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        raise ServerStartError(
            f"{self.name} did not answer PING on port {self.port}: {self.log_tail()}"
        )

    def log_tail(self, lines: int = 15) -> str:
        text = ""
        for path in (self.dir / "stdout.log", self.log):
            if path.exists():
                text += path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:]) or "(no log)"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: a crash, no shutdown handshake with replicas or clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def client(self) -> redis.Redis:
        return sync_client(self.port)


class _Deployment:
    def __init__(self, prefix: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.servers: list[ServerProcess] = []

    def _add(self, name: str, args: list[str], *, sentinel: bool = False) -> ServerProcess:
        server = ServerProcess(self.root, name, args, sentinel=sentinel)
        self.servers.append(server)
        return server.start()

    def close(self) -> None:
        for server in reversed(self.servers):
            server.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class ClusterDeployment(_Deployment):
    """``masters`` cluster-enabled masters, joined by ``redis-cli --cluster create``."""

    def __init__(self, masters: int = 3) -> None:
        super().__init__("ark-cluster-")
        self.masters: list[ServerProcess] = []
        try:
            self._start(masters)
        except BaseException:
            self.close()  # no server outlives a failed start
            raise

    def _start(self, masters: int) -> None:
        for index in range(masters):
            # cluster-port is explicit: port + 10000 may not exist or be free.
            args = [
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(free_port()),
                "--cluster-node-timeout", "3000",
            ]  # fmt: skip
            self.masters.append(self._add(f"master{index}", args))
        create = [
            _binary("redis-cli"), "--cluster", "create",
            *(f"{HOST}:{m.port}" for m in self.masters),
            "--cluster-replicas", "0", "--cluster-yes",
        ]  # fmt: skip
        try:
            done = subprocess.run(create, capture_output=True, timeout=30, check=False)
        except subprocess.TimeoutExpired as exc:
            raise ServerStartError("redis-cli --cluster create did not finish in 30s") from exc
        if done.returncode != 0:
            raise ServerStartError(
                f"redis-cli --cluster create failed ({done.returncode}): "
                f"{done.stdout.decode(errors='replace')[-800:]}"
                f"{done.stderr.decode(errors='replace')[-800:]}"
            )
        for master in self.masters:
            wait_for(
                f"cluster_state:ok on {master.name}",
                lambda m=master: self._state_ok(m),  # type: ignore[misc]
                timeout=20,
            )

    def replica_takes_over(self, replica: int, elected_within: float = 15) -> None:
        """Wait for the replica on port ``replica`` to replace its dead master.

        Redis elects it in about 4 s here (node timeout 3 s, then the vote). On a
        loaded 2-core CI machine a vote can be lost, and the next attempt comes
        only after 4 node timeouts: past ``elected_within`` the replica is made
        to take over, as an operator would (CLUSTER FAILOVER TAKEOVER), because
        the tests are about what the clients do once a replica is the master,
        not about Redis's election. A replica that fails even that shows its log."""

        def promoted() -> bool:
            with sync_client(replica) as client:
                return bool(client.info("replication")["role"] == "master")

        try:
            wait_for("the replica to be elected", promoted, elected_within, 0.2)
            return
        except ServerStartError:
            pass
        server = next(s for s in self.servers if s.port == replica)
        with sync_client(replica) as client:
            client.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
        try:
            wait_for("the replica to take over", promoted, 15, 0.2)
        except ServerStartError as exc:
            raise ServerStartError(f"{exc}; its log:\n{server.log_tail(40)}") from None

    @staticmethod
    def _state_ok(master: ServerProcess) -> bool:
        with master.client() as client:
            info = client.execute_command("CLUSTER", "INFO")
            text = info if isinstance(info, str) else str(info)
            return "cluster_state:ok" in text and "cluster_slots_assigned:16384" in text

    @property
    def ports(self) -> list[int]:
        return [m.port for m in self.masters]

    def node_id(self, port: int) -> str:
        with sync_client(port) as client:
            node: str = client.execute_command("CLUSTER", "MYID")
            return node

    def owner_of(self, slot: int) -> int:
        """The port of the master serving ``slot``, according to the first node."""
        with sync_client(self.ports[0]) as client:
            for start, end, *nodes in client.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(nodes[0][1])
        raise AssertionError(f"slot {slot} is not served by any node")

    def keyslot(self, key: str | bytes) -> int:
        with sync_client(self.ports[0]) as client:
            slot: int = client.execute_command("CLUSTER", "KEYSLOT", key)
            return slot

    def all_keys(self) -> list[str]:
        """Every key on every master (test-only SCAN; the library never scans)."""
        keys: list[str] = []
        for port in self.ports:
            with sync_client(port) as client:
                keys.extend(client.scan_iter(count=1000))
        return keys

    def multi_key_commands(self, log: CommandLog) -> list[tuple[tuple[str, ...], list[int]]]:
        """Every recorded command naming two or more keys, with those keys' slots
        (keys found by ``COMMAND GETKEYS``, so scripts count by their KEYS)."""
        found: list[tuple[tuple[str, ...], list[int]]] = []
        with sync_client(self.ports[0]) as client:
            for _, args in log.commands:
                try:
                    keys = client.command_getkeys(*args)
                except ResponseError:
                    continue  # no key arguments (MULTI, PING, CLUSTER SLOTS...)
                if len(keys) > 1:
                    found.append((args, [self.keyslot(k) for k in keys]))
        return found

    def flushall(self) -> None:
        for port in self.ports:
            with sync_client(port) as client:
                client.flushall()

    def migrate_slot(self, slot: int, target: int) -> int:
        """Move ``slot`` and its keys to the master on port ``target`` in one go.
        Returns the port it came from."""
        migration = SlotMigration(self, slot, target)
        migration.begin()
        migration.move_keys()
        migration.finish()
        return migration.source

    @staticmethod
    def _owner_seen_by(port: int, slot: int) -> int | None:
        with sync_client(port) as client:
            for start, end, *nodes in client.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(nodes[0][1])
        return None


class SlotMigration:
    """Move one slot the way ``redis-cli --cluster reshard`` does, step by step,
    so a test can send requests between the steps:

    1. :meth:`begin` - target IMPORTING, source MIGRATING: keys still on the
       source are served there, missing ones get ``ASK`` to the target;
    2. :meth:`move_keys` - ``MIGRATE`` every key: the source now answers ``ASK``;
    3. :meth:`finish` - ``SETSLOT NODE`` on every master: stale clients get ``MOVED``.
    """

    def __init__(self, cluster: ClusterDeployment, slot: int, target: int) -> None:
        self.cluster = cluster
        self.slot = slot
        self.target = target
        self.source = cluster.owner_of(slot)
        if self.source == target:
            raise ValueError(f"slot {slot} is already on port {target}")
        self.source_id = cluster.node_id(self.source)
        self.target_id = cluster.node_id(target)
        self.moved = 0

    def begin(self) -> None:
        with sync_client(self.target) as dst, sync_client(self.source) as src:
            dst.execute_command("CLUSTER", "SETSLOT", self.slot, "IMPORTING", self.source_id)
            src.execute_command("CLUSTER", "SETSLOT", self.slot, "MIGRATING", self.target_id)

    def move_keys(self) -> int:
        with sync_client(self.source) as src:
            while True:
                keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", self.slot, 100)
                if not keys:
                    return self.moved
                src.execute_command("MIGRATE", HOST, self.target, "", 0, 5000, "KEYS", *keys)
                self.moved += len(keys)

    def finish(self) -> None:
        # Target first, then source, then the others (the reshard order).
        others = [p for p in self.cluster.ports if p not in (self.source, self.target)]
        for port in [self.target, self.source, *others]:
            with sync_client(port) as client:
                client.execute_command("CLUSTER", "SETSLOT", self.slot, "NODE", self.target_id)
        wait_for(
            f"every master to agree that slot {self.slot} is on {self.target}",
            lambda: all(
                self.cluster._owner_seen_by(p, self.slot) == self.target for p in self.cluster.ports
            ),
            timeout=10,
        )


class SentinelDeployment(_Deployment):
    """One master, one replica and ``sentinels`` Sentinels watching ``service``."""

    def __init__(self, service: str = "mymaster", sentinels: int = 1) -> None:
        super().__init__("ark-sentinel-")
        self.service = service
        self.sentinels: list[ServerProcess] = []
        try:
            self._start(service, sentinels)
        except BaseException:
            self.close()  # no server outlives a failed start
            raise

    def _start(self, service: str, sentinels: int) -> None:
        # No 5 s diskless-sync delay: the replica syncs as soon as it connects.
        fast_sync = ["--repl-diskless-sync-delay", "0"]
        self.master = self._add("master", fast_sync)
        self.replica = self._add(
            "replica", [*fast_sync, "--replicaof", HOST, str(self.master.port)]
        )
        wait_for(
            "the replica to finish its first sync",
            lambda: self.replica_caught_up(self.replica.port, self.master.port),
            timeout=15,
        )
        for index in range(sentinels):
            conf = [
                f"sentinel monitor {service} {HOST} {self.master.port} 1",
                f"sentinel down-after-milliseconds {service} 1000",
                f"sentinel failover-timeout {service} 5000",
                f"sentinel parallel-syncs {service} 1",
            ]
            self.sentinels.append(self._add(f"sentinel{index}", conf, sentinel=True))
        wait_for(
            "every sentinel to see the master and a healthy replica",
            self._sentinels_ready,
            timeout=20,
            interval=0.1,
        )

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [(HOST, s.port) for s in self.sentinels]

    def _sentinels_ready(self) -> bool:
        for sentinel in self.sentinels:
            with sentinel.client() as client:
                replicas = client.execute_command("SENTINEL", "REPLICAS", self.service)
                good = [
                    r
                    for r in map(_pairs, replicas)
                    if r.get("flags") == "slave" and r.get("master-link-status") == "ok"
                ]
                if not good:
                    return False
        return True

    def master_port(self) -> int:
        with self.sentinels[0].client() as client:
            addr = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
            return int(addr[1])

    def server(self, port: int) -> ServerProcess:
        return next(s for s in (self.master, self.replica) if s.port == port)

    @staticmethod
    def replica_caught_up(replica: int, master: int) -> bool:
        """The replica on ``replica`` is linked and has every byte ``master`` has sent."""
        with sync_client(master) as m, sync_client(replica) as r:
            want = int(m.info("replication")["master_repl_offset"])
            info = r.info("replication")
            return (
                info.get("role") == "slave"
                and info.get("master_link_status") == "up"
                and int(info.get("slave_repl_offset", -1)) >= want
            )

    def failover(self, *, wait_for_demotion: bool = True) -> tuple[int, int]:
        """Ask Sentinel to fail over now; wait until it names a new, writable
        master (and, with ``wait_for_demotion``, until the old master replicates
        it). Returns (old master port, new master port)."""
        old = self.master_port()
        other = self.replica.port if old == self.master.port else self.master.port

        def ask() -> bool:
            with self.sentinels[0].client() as client:
                try:
                    client.execute_command("SENTINEL", "FAILOVER", self.service)
                except ResponseError as exc:
                    # NOGOODSLAVE / INPROG: not ready yet, ask again.
                    if "NOGOODSLAVE" in str(exc) or "INPROG" in str(exc):
                        return False
                    raise
                return True

        wait_for("Sentinel to accept SENTINEL FAILOVER", ask, timeout=15, interval=0.2)
        wait_for(
            "Sentinel to name the promoted replica as master",
            lambda: self.master_port() == other,
            timeout=15,
            interval=0.1,
        )
        wait_for(
            "the promoted replica to accept writes",
            lambda: self._role(other) == ("master", None),
            timeout=15,
        )
        # Until Sentinel has demoted the old master, a client that still holds a
        # connection to it can write there, and those writes vanish when it
        # resyncs from the new master (Redis replication is asynchronous). The
        # failover is complete once the old master replicates the new one.
        if wait_for_demotion and self.server(old).running:
            wait_for(
                "Sentinel to turn the old master into a replica of the new one",
                lambda: self._role(old) == ("slave", other) and self.replica_caught_up(old, other),
                timeout=15,
                interval=0.1,
            )
        return old, other

    @staticmethod
    def _role(port: int) -> tuple[str, int | None]:
        with sync_client(port) as client:
            info = client.info("replication")
            master = info.get("master_port")
            return str(info["role"]), None if master is None else int(master)


def _pairs(flat: Any) -> dict[str, str]:
    if isinstance(flat, dict):
        return {str(k): str(v) for k, v in flat.items()}
    items = list(flat)
    return {str(items[i]): str(items[i + 1]) for i in range(0, len(items) - 1, 2)}


@dataclass
class CommandLog:
    """What a client sent to which node, and every error reply it got back.

    Attach with ``connection_class=log.connection_class()`` so cluster nodes and
    sentinel-managed pools are recorded alike; a pipeline's commands are
    recorded one by one.
    """

    commands: list[tuple[int, tuple[str, ...]]] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)
    round_trips: int = 0

    def clear(self) -> None:
        self.commands.clear()
        self.errors.clear()
        self.round_trips = 0

    def names(self) -> set[str]:
        return {args[0].upper() for _, args in self.commands if args}

    def error_kinds(self) -> set[str]:
        """``MovedError``, ``AskError``, ``ReadOnlyError``, ``CROSSSLOT``, ``CONNECTION``..."""
        return {message.split(" ", 1)[0] for _, message in self.errors}

    def bad_errors(self) -> list[tuple[int, str]]:
        """Errors a correct cluster-aware library never provokes: everything
        except redirections during resharding, NOSCRIPT before a script is first
        loaded, and the handshake of redis-py 8
        against Redis 7.0 (CLIENT SETINFO / MAINT_NOTIFICATIONS are newer)."""
        expected = {"MovedError", "AskError", "TryAgainError", "NoScriptError"}
        return [
            (port, message)
            for port, message in self.errors
            if message.split(" ", 1)[0] not in expected and "unknown subcommand" not in message
        ]

    def connection_class(self, base: type[Connection] = Connection) -> type[Connection]:
        log = self

        class RecordingConnection(base):  # type: ignore[valid-type,misc]
            def pack_command(self, *args: Any) -> list[bytes]:
                words = tuple(
                    a.decode(errors="replace") if isinstance(a, bytes) else str(a) for a in args
                )
                log.commands.append((int(self.port), words))
                packed: list[bytes] = super().pack_command(*args)
                return packed

            async def send_packed_command(self, *args: Any, **kwargs: Any) -> None:
                # One write to the socket: a pipeline is one, however long.
                log.round_trips += 1
                await super().send_packed_command(*args, **kwargs)

            async def read_response(self, *args: Any, **kwargs: Any) -> Any:
                try:
                    return await super().read_response(*args, **kwargs)
                except ResponseError as exc:
                    kind = type(exc).__name__
                    if type(exc) is ResponseError:
                        kind = str(exc).split(" ", 1)[0]  # CROSSSLOT, WRONGTYPE, ...
                    log.errors.append((int(self.port), f"{kind} {exc}"))
                    raise
                except RedisConnectionError as exc:
                    # A sentinel-managed connection turns READONLY into this.
                    log.errors.append((int(self.port), f"CONNECTION {exc}"))
                    raise

        return RecordingConnection


def hash_tag(key: str) -> str | None:
    """The part of ``key`` Redis Cluster hashes, if the key has a hash tag
    (the first ``{...}`` with something inside), else None."""
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    if end <= start + 1:
        return None
    return key[start + 1 : end]
