"""The session store's use of the near cache: which ``NearCache``, which view,
what a local copy of a record holds, and which keys a command writes.

A local copy is the LOAD reply's raw fields (a tuple of bytes: nothing a request
can mutate) and the Redis deadline of the record, read with them; every load
decodes it afresh, so no two requests share a dict. Its PTTL is recomputed from
that deadline, never from the local cap; ``NearView`` drops the copy at that
deadline too (``load`` gives it the PTTL left of it), and at its ``max_ttl``: the
response cache takes any entry under a session's key as proof that it lives. The
absolute lifetime is checked by ``load`` on a local copy as on a reply.

Writes: ``StoreBase._batch`` invalidates, after it ran (or raised: it may have
run), the keys of every command in :data:`READS`'s complement -- so a new write
path cannot forget to. A read-only script added later must be listed in
``READS``, or it merely costs the copies of the keys it reads.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, NamedTuple

from ._scripts import INFO, LINK, LOAD, Command

logger = logging.getLogger("asgi_redis_kit.sessions")

# Commands that never write: their keys keep their local copies.
READS = frozenset({LOAD.sha, INFO.sha, LINK.sha, "SMEMBERS"})


class LocalRecord(NamedTuple):
    """A record as held by the near cache: the LOAD reply, immutable."""

    fields: tuple[bytes, ...]
    # loop.time() at which Redis expires the record (None: it has no TTL). Taken
    # before the LOAD was sent, so it is never later than Redis's own deadline.
    deadline: float | None


def written_keys(commands: Iterable[Command]) -> list[str]:
    """The keys of the commands that may write (all but :data:`READS`)."""
    keys: list[str] = []
    for command in commands:
        name = command[0]
        if name == "EVALSHA":
            # The sha as sent is bytes (see _scripts.script); compared as text, so
            # that no form of it can turn a read into a write that drops its copy.
            if as_key(command[1]) in READS:
                continue
            keys += (as_key(key) for key in command[3 : 3 + int(command[2])])
        elif name not in READS and len(command) > 1:
            keys.append(as_key(command[1]))
    return keys


def as_key(key: Any) -> str:
    return key.decode() if isinstance(key, bytes) else str(key)


def record_size(fields: tuple[bytes, ...]) -> int:
    # Bytes held plus a rough per-object overhead of the tuple and its items.
    return sum(len(item) + 40 for item in fields) + 100
