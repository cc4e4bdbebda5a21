"""Which Redis clients a near cache can keep coherent, and why not the others.

Both the response cache and the session store ask :func:`untracked_because`
before they put a near layer in front of a client, so the two can never
disagree about a client (and a new kind of unfit client is refused in one
place).
"""

from __future__ import annotations

import logging

from redis.asyncio.cluster import RedisCluster


def untracked_because(client: object) -> tuple[int, str] | None:
    """Why ``client``'s reads cannot be kept coherent by CLIENT TRACKING, with
    the logging level to say it at (``None``: they can). The demo's memory://
    is expected (INFO); a replica-reading client is a setting to fix (WARNING)."""
    pool = getattr(client, "connection_pool", None)
    classes = (type(client), getattr(pool, "connection_class", type(None)))
    if any(cls.__module__.split(".")[0] == "fakeredis" for cls in classes):
        return logging.INFO, "an in-process memory:// (fakeredis) Redis has no CLIENT TRACKING"
    if isinstance(client, RedisCluster) and (
        client.read_from_replicas or client.load_balancing_strategy
    ):
        # Tracking follows the primaries: a replica that has not applied a write
        # yet answers with the old value after its invalidation came, and nothing
        # would ever invalidate the copy made from that answer.
        return logging.WARNING, (
            "this Redis Cluster client reads from replicas, whose answers can be "
            "older than the invalidations the near cache relies on"
        )
    return None
