"""The stored form of one response, and the headers sent when serving it.

One Redis string per entry, framed as::

    b"ark1" | 4-byte big-endian length of the meta | meta (orjson) | body

The meta holds status, headers (latin-1 pairs), the ETag, when it was stored,
how long it is fresh, its stale windows, and the namespace/URL/tag versions it
was stored under. The body stays raw bytes (no base64, no pickle), so a hit
costs one ``orjson.loads`` of a small dict and a slice.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson

from ._policy import header_tokens

MAGIC = b"ark1"
_HEADER = struct.Struct(">I")

# Headers a 304 must repeat from the 200 it stands for (RFC 9110 section 15.4.5).
NOT_MODIFIED_HEADERS = frozenset(
    {b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary"}
)


def content_etag(body: bytes) -> str:
    """A strong validator from the body alone: identical on every worker and
    after restarts, unlike a random or time-based tag."""
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


@dataclass(frozen=True, slots=True)
class Entry:
    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    etag: str
    stored_at: float
    fresh_for: float
    stale_while_revalidate: float
    stale_if_error: float
    versions: tuple[int, ...]
    per_user: bool
    # What every serving of this entry sends alike, made on the first one
    # (an entry never changes, and a hot one is served many times).
    served_parts: _Served | None = field(default=None, init=False, compare=False, repr=False)

    @property
    def lifetime(self) -> float:
        """Seconds from ``stored_at`` that it is kept in Redis (before ``max_lifetime``)."""
        return self.fresh_for + max(self.stale_while_revalidate, self.stale_if_error)

    def age(self, now: float) -> float:
        return max(0.0, now - self.stored_at)

    def is_fresh(self, now: float) -> bool:
        return self.age(now) < self.fresh_for

    def in_revalidate_window(self, now: float) -> bool:
        return self.age(now) < self.fresh_for + self.stale_while_revalidate

    def in_error_window(self, now: float) -> bool:
        return self.age(now) < self.fresh_for + self.stale_if_error


def encode(entry: Entry) -> bytes:
    meta = orjson.dumps({**_meta(entry), "v": list(entry.versions)})
    return MAGIC + _HEADER.pack(len(meta)) + meta + entry.body


def encode_head(entry: Entry) -> bytes:
    """The meta of ``entry`` as :func:`encode` writes it, up to its versions
    (the last member), for a script that reads them to complete it."""
    return orjson.dumps(_meta(entry))[:-1]


def _meta(entry: Entry) -> dict[str, object]:
    return {
        "s": entry.status,
        "h": [[name.decode("latin-1"), value.decode("latin-1")] for name, value in entry.headers],
        "e": entry.etag,
        "t": entry.stored_at,
        "f": entry.fresh_for,
        "w": entry.stale_while_revalidate,
        "x": entry.stale_if_error,
        "p": entry.per_user,
    }


def decode(raw: bytes) -> Entry | None:
    """The entry, or None for anything we did not write (treated as a miss)."""
    try:
        if raw[:4] != MAGIC:
            return None
        (length,) = _HEADER.unpack_from(raw, 4)
        meta = orjson.loads(raw[8 : 8 + length])
        return Entry(
            status=int(meta["s"]),
            headers=tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in meta["h"]),
            body=raw[8 + length :],
            etag=str(meta["e"]),
            stored_at=float(meta["t"]),
            fresh_for=float(meta["f"]),
            stale_while_revalidate=float(meta["w"]),
            stale_if_error=float(meta["x"]),
            versions=tuple(int(v) for v in meta["v"]),
            per_user=bool(meta["p"]),
        )
    except (struct.error, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def etag_matches(if_none_match: bytes, etag: str) -> bool:
    """Weak comparison (RFC 9110 section 8.8.3.2), as If-None-Match requires."""
    tokens = [token.strip() for token in if_none_match.decode("latin-1").split(",")]
    if "*" in tokens:
        return True
    ours = etag.removeprefix("W/")
    return any(token.removeprefix("W/") == ours for token in tokens if token)


def cache_control(existing: Sequence[bytes], max_age: int, per_user: bool) -> bytes:
    """The app's directives with max-age replaced by what is left of the entry's
    freshness; ``private`` added (and ``public`` dropped) for per-user entries so shared caches
    downstream do not keep them."""
    return _cache_control_head(existing, per_user) + b"max-age=%d" % max_age


def _cache_control_head(existing: Sequence[bytes], per_user: bool) -> bytes:
    """``cache_control`` up to its max-age (with the separator, if any)."""
    kept = [
        token
        for token in header_tokens(existing)
        if token.split("=", 1)[0].strip() not in {"max-age", "s-maxage"}
        and not (per_user and token in {"public", "private"})
    ]
    if per_user:
        kept.insert(0, "private")
    return "".join(token + ", " for token in kept).encode("latin-1")


@dataclass(frozen=True, slots=True)
class _Served:
    """The parts of an entry's served headers that do not depend on when."""

    full: tuple[tuple[bytes, bytes], ...]  # the kept headers, then the ETag
    not_modified: tuple[tuple[bytes, bytes], ...]  # those a 304 repeats, then the ETag
    cache_control_head: bytes
    content_length: bytes | None

    @classmethod
    def of(cls, entry: Entry) -> _Served:
        existing_cc = [value for name, value in entry.headers if name.lower() == b"cache-control"]
        kept = [
            (name, value)
            for name, value in entry.headers
            if name.lower() not in {b"cache-control", b"etag"}
        ]
        etag = (b"etag", entry.etag.encode("latin-1"))
        return cls(
            full=(*kept, etag),
            not_modified=(
                *((name, value) for name, value in kept if name.lower() in NOT_MODIFIED_HEADERS),
                etag,
            ),
            cache_control_head=_cache_control_head(existing_cc, entry.per_user),
            content_length=(
                str(len(entry.body)).encode()
                if entry.status not in (204, 304) and entry.status >= 200
                else None
            ),
        )


def served_headers(
    entry: Entry,
    now: float,
    *,
    state: str,
    reason: str | None = None,
    not_modified: bool = False,
) -> list[tuple[bytes, bytes]]:
    served = entry.served_parts
    if served is None:
        served = _Served.of(entry)
        object.__setattr__(entry, "served_parts", served)  # frozen; the same value each time
    age = entry.age(now)
    remaining = max(0, int(entry.fresh_for - age))
    headers = list(served.not_modified if not_modified else served.full)
    headers.append((b"cache-control", served.cache_control_head + b"max-age=%d" % remaining))
    headers.append((b"age", str(int(age)).encode()))
    if not not_modified and served.content_length is not None:
        headers.append((b"content-length", served.content_length))
    headers.append((b"x-cache", state.encode()))
    if reason:
        headers.append((b"x-cache-reason", reason.encode()))
    return headers
