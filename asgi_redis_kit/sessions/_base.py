"""What every part of the session store shares: its settings, key names,
lifetimes and round trips to Redis (batches, ordered steps, NOSCRIPT recovery).

``SessionStore`` (``_store``) sets the settings; the user index (``_index``) and
the session operations build on the round trips here. With a near cache, every
batch drops the local copies of the keys it wrote (``_near``), in this one place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

from .._redis import Backend, RedisClient
from ..near import NearCache, NearView
from ._near import written_keys
from ._scripts import SCRIPTS, Command, operation_of
from ._stats import SessionStats


class StoreBase:
    """Key names, lifetimes and round trips of a session store (see ``SessionStore``)."""

    backend: Backend
    key_prefix: str
    idle_ms: int
    absolute_ms: int | None
    clock: Callable[[], float]
    near: NearCache | None
    stats: SessionStats

    def _near_view(self) -> NearView | None:
        """This loop's view of our keys in the near cache, if we use one."""
        if self.near is None:
            return None
        return self.near.view(self.backend.client, self.key_prefix)

    # -- keys and time ------------------------------------------------------------

    def session_key(self, session_id: str) -> str:
        return f"{self.key_prefix}{session_id}"

    def user_key(self, user_id: str) -> str:
        # Hash tag: the index is always one slot whatever the user id looks like.
        return f"{self.key_prefix}u:{{{user_id}}}"

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def ttl_ms(self, created_ms: int) -> int:
        """The TTL a session created at ``created_ms`` should get now (<= 0: over)."""
        if self.absolute_ms is None:
            return self.idle_ms
        return min(self.idle_ms, created_ms + self.absolute_ms - self.now_ms())

    def cookie_max_age(self, created_ms: int) -> int:
        """Seconds the browser should keep the cookie: as long as the session could
        live. With an absolute lifetime that is fixed at creation, so TTL refreshes
        need no new cookie; without one it is the idle timeout from now."""
        if self.absolute_ms is None:
            remaining = self.idle_ms
        else:
            remaining = created_ms + self.absolute_ms - self.now_ms()
        return max(1, -(-remaining // 1000))

    def touch_due(self, record_pttl: int, created_ms: int) -> bool:
        """Refresh the idle TTL at most once per tenth of the idle timeout -- or at
        once when the record's TTL is longer than the settings allow now: one
        stored under a longer ``idle_timeout`` gets the new one on its next request.
        (The same tenth of slack both ways: app servers' clocks differ a little.)"""
        allowed = self.ttl_ms(created_ms)
        slack = self.idle_ms // 10
        return record_pttl < allowed - slack or record_pttl > allowed + slack

    # -- batches ------------------------------------------------------------------

    async def _batch(self, *commands: Command) -> list[Any]:
        """Run ``commands`` in one round trip (on Cluster: one per node involved).

        On NOSCRIPT (a restarted or flushed Redis) load the scripts and send again
        the commands refused with it, which did not run; the others ran once.

        With a near cache, the local copies of the keys that the commands may
        write are dropped once they ran -- or raised: they may have run.
        """
        try:
            return await self._run(commands)
        finally:
            if self.near is not None:
                written = written_keys(commands)
                if written:
                    view = self._near_view()
                    if view is not None:
                        view.invalidate(written)

    async def _run(self, commands: tuple[Command, ...]) -> list[Any]:
        async with self.backend.call(operation_of(commands[0])) as client:
            results = await self._send(client, commands)
            refused = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
            if refused:
                for each in SCRIPTS:
                    await client.script_load(each.text)
                again = await self._send(client, tuple(commands[i] for i in refused))
                for i, result in zip(refused, again, strict=True):
                    results[i] = result
            for result in results:
                if isinstance(result, Exception):
                    raise result  # inside call(): OOM, READONLY, BUSY... become a 503
        return results

    async def _steps(self, *steps: list[Command]) -> list[list[Any]]:
        """Run ``steps`` so that each takes effect before the next one starts.

        A single server runs one connection's commands in order, so all the steps
        go in one round trip. On Cluster the steps' keys live on different nodes,
        which run what they get in any order: each step is its own round trip,
        sent once the previous one has succeeded.
        """
        if not self.backend.cluster:  # known once: not a client lookup per save
            flat = [command for step in steps for command in step]
            results = await self._batch(*flat) if flat else []
            split: list[list[Any]] = []
            for step in steps:
                split.append(results[: len(step)])
                results = results[len(step) :]
            return split
        return [await self._batch(*step) if step else [] for step in steps]

    async def _one(self, *command: Any) -> Any:
        (result,) = await self._batch(command)
        return result

    @staticmethod
    async def _send(client: RedisClient, commands: tuple[Command, ...]) -> list[Any]:
        if len(commands) == 1:
            # No pipeline for one command: redis-py's pipeline costs extra tasks and
            # event-loop turns per request (it shields the connection's release).
            try:
                return [await client.execute_command(*commands[0])]
            except ResponseError as exc:
                return [exc]
        # On RedisCluster a ClusterPipeline sends each node its commands in one
        # round trip. redis-py refuses pipe.evalsha() there, but routes an
        # EVALSHA given to execute_command by its key like any other command.
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies
