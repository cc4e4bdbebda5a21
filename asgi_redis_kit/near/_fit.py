"""What ``near_cache=`` means for a client: which NearCache, or none and why.

Both the response cache and the session store read their ``near_cache=``
option with :func:`near_option` and ask :func:`near_for` before they put a
near layer in front of a client, so the two can never disagree about an
option or a client (and a new kind of unfit client is refused in one place).
"""

from __future__ import annotations

import logging

from redis.asyncio.cluster import RedisCluster

from asgi_redis_kit.near._near import NearCache


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


def near_option(near_cache: object) -> NearCache | None:
    """The ``NearCache`` that ``near_cache=`` names (``True``: the shared one)."""
    if near_cache is False:
        return None
    if near_cache is True:
        return NearCache.shared()
    if isinstance(near_cache, NearCache):
        return near_cache
    raise TypeError(f"near_cache must be True, False or a NearCache, got {near_cache!r}")


def near_for(near: NearCache | None, client: object, logger: logging.Logger) -> NearCache | None:
    """``near``, unless ``client`` cannot be kept coherent (then ``None``, said once)."""
    unfit = None if near is None else untracked_because(client)
    if unfit is not None:
        logger.log(unfit[0], "near_cache is ignored: %s", unfit[1])
        return None
    return near
