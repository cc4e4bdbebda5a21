"""A session record in Redis: its keys and hash fields, its handle, and reading it back.

Keys (``key_prefix`` defaults to ``ark:s:``)::

    {prefix}{session_id}        hash, one per session
    {prefix}u:{{{user_id}}}     set of the ids of the sessions bound to a user

Fields of a session hash::

    d:<key>      ``session[key]`` as ``_codec`` encodes it (orjson for plain JSON values;
                 the prefix means no key can clash with metadata)
    m:created    creation time, integer milliseconds since the epoch
    m:user       the bound user id, when there is one
    m:i:<user>   a note: the id may be in that user's index (set before or with
                 every index add that the record outlives)
    m:prev       the handle of the session this one continues (see "successor")
    m:root       the handle of the first session of that line (a session without
                 it is the first of its own)

Every script touches exactly one key and no command ever spans two sessions, so
the scheme works unchanged on Redis Cluster; nothing here uses KEYS or SCAN.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from ._codec import decode

DATA = "d:"
CREATED = "m:created"
USER = "m:user"
NOTE = "m:i:"  # m:i:<user>: the record may be listed in that user's index
PREV = "m:prev"  # handle of the record this one continues (regenerate, same user)
ROOT = "m:root"  # handle of the first record of that line of successors


def handle_of(session_id: str) -> str:
    """A non-secret name for a session: safe to show, log and use in admin UIs."""
    return hashlib.sha256(session_id.encode()).hexdigest()[:32]


def as_text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class Record:
    """A session as loaded from Redis."""

    data: dict[str, Any]
    encoded: dict[str, bytes]
    created_ms: int
    user_id: str | None
    pttl_ms: int
    lineage: str = ""  # m:root: the handle of the first record of its line, if not itself


def decode_record(raw: list[Any], pttl: int) -> Record:
    """A record from its HGETALL reply and PTTL; ValueError (or the decoding
    errors of ``_codec``) when it is not one of ours."""
    data: dict[str, Any] = {}
    encoded: dict[str, bytes] = {}
    created_ms: int | None = None
    user_id: str | None = None
    lineage = ""
    pairs = iter(raw)
    for name, value in zip(pairs, pairs, strict=True):
        field = as_text(name)
        blob = value.encode() if isinstance(value, str) else value
        if field.startswith(DATA):
            data[field[2:]] = decode(blob)
            encoded[field[2:]] = blob
        elif field == CREATED:
            created_ms = int(blob)
        elif field == USER:
            user_id = blob.decode()
        elif field == ROOT:
            lineage = blob.decode()
    if created_ms is None:
        raise ValueError("no creation time")
    return Record(data, encoded, created_ms, user_id, pttl, lineage)
