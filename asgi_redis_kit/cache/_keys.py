"""Canonical cache keys.

A key names one stored response. It is built from the parts of the request
that may change the response, each encoded as ``<4-byte big-endian length><bytes>``
and hashed together with SHA-256. Length-prefixing means no choice of values
can make two different part lists produce the same byte string (``("ab", "c")``
and ``("a", "bc")`` differ), which naive joining with a separator cannot promise
once values may contain the separator.

The parts, in order:

1. ``KEY_VERSION`` - bumping it orphans every old entry after a format change.
2. namespace.
3. method class: ``GET`` for GET and HEAD (a HEAD is answered from the GET entry).
4. scheme (``scope["scheme"]``, already rewritten by a trusted proxy-headers
   middleware if one runs outside us) and host: the ``Host`` header exactly as
   the app reads it, which must already be canonical (see :func:`canonical_host`;
   any other Host bypasses the cache).
5. ``root_path`` and the routed path as the router saw it, or the value of the
   route's custom ``key=`` function instead of path and query.
6. the raw query string with its pairs in canonical order: sorted by decoded
   name, values of a repeated name kept in their original order (``?a=2&a=1``
   is not ``?a=1&a=2`` to a handler that reads ``getlist``), every pair byte
   for byte as the app sees it (see :func:`canonical_query`).
7. forwarding headers (:data:`FORWARDING_HEADERS`: ``Forwarded``,
   ``X-Forwarded-Host``/``-Proto``/``-Port``/``-Prefix`` and the other
   spellings proxies and frameworks use) - apps behind a proxy build URLs from
   them, so a request carrying a poisoned value gets its own entry and can
   never change what a plain request receives. (A proxy-headers middleware
   *inside* the cache rewrites the scope after we keyed it: the middleware then
   lets requests that carry any of them bypass the cache, see ``_exchange``.)
8. one bit: "the request carries the session cookie", so anonymous and
   cookie-bearing requests never share an entry, plus a hash of the session
   cookie's value when the route sets ``vary_on_session=True`` (per-user entries),
   and then every other cookie as well (:func:`other_cookies`): a per-user page
   may show any of them, so only requests whose other cookies read the same
   share it (with none, all of them still do).
   The cookie is read with ``asgi_redis_kit._http.cookie_values``, as
   SessionMiddleware reads it (every ``Cookie`` header, every value); a
   request naming it twice never gets this far: Starlette's parser would
   see another value than the session does.
   When the middleware can ask the session instead (a SessionMiddleware of
   ours outside the cache), the per-user part is the loaded session's handle,
   and a new or unknown session adds none: it is no session.
9. every header named in ``vary=``.

Those parts make the *base* key. A response can name more request headers in
its own ``Vary`` (GZipMiddleware adds ``Accept-Encoding``, CORSMiddleware
``Origin``): the cache learns them from the response, as RFC 9111 section 4.1
and Django's ``learn_cache_key`` do. The base key's *vary record* holds the
learned names (sorted, lower-case, comma-joined); the entry is stored under
the *variant* key, the digest of the base digest and, for each learned name,
the name and the request's value (length-prefixed parts, as above; no learned
names: the variant is the base). Names already in the base key (``Host``, the
forwarding headers, ``vary=``) are not learned again, ``Cookie`` keeps its
session meaning (``_policy``) and ``Vary: *`` is never stored. Learned names
only grow while the record lives: a response that varies on fewer headers is
stored under the longer key, which is as correct and never flip-flops.

A process remembers the names per base key (a bounded memo) and builds the
variant key at once; the lookup reads the record in the same round trip and,
when it names other headers than the key was built with, looks up again with
the key it names (a process that meets a URL for the first time pays that
round trip once).

Redis key layout (``{...}`` is a Redis Cluster hash tag)::

    <prefix>{u:<url id>}:e:<key digest>   the entry (status, headers, body, ETag)
    <prefix>{u:<url id>}:l:<key digest>   its lease lock (stampede protection)
    <prefix>{u:<url id>}:y:<base digest>  the vary record: learned header names
    <prefix>{u:<url id>}:v                version of the URL: invalidate(url) bumps it
    <prefix>{n:<namespace id>}:g          namespace generation: clear() bumps it
    <prefix>{t:<tag id>}:v                version of a tag: invalidate_tags() bumps it
    <prefix>{d:<value id>}:e / :l / :y / :v  a data-cache value (``Cache.set``,
                                          ``@cache.memoize``): entry, lease, record
                                          (its tag ids) and its own version

The URL id hashes namespace, the host's origin (:func:`canonical_origin`:
lower-case, IDNA-encoded, ports 80 and 443 dropped; the key itself keeps
the exact Host) and full path (not the query), so an entry
and its lock live in one slot, and invalidating a URL reaches every entry of
that path (every query string, HEAD/GET, per-user, every ``vary=`` or learned
variant, and routes with a custom ``key=``) with one version bump; the key digest in
these names is the variant's. Names chosen
by users (namespaces, tags) appear hashed, so a ``{`` or ``}`` in them can never
change the hash slot.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from starlette.types import Scope

from .._http import header_map
from ._request import (
    FORWARDING_HEADERS,
    canonical_origin,
    canonical_query,
    header_lines,
    other_cookies,
    session_cookie,
    vary_value,
)

KEY_VERSION = b"ark-cache-key-v2"
_FORWARDING_NAMES = tuple(name.encode() for name in FORWARDING_HEADERS)
_MEMO_SIZE = 4096
_NO_LINES = struct.pack(">I", 0)


def _framed(parts: Iterable[bytes]) -> bytes:
    """The parts as they are hashed: each length-prefixed, joined."""
    return b"".join([struct.pack(">I", len(part)) + part for part in parts])


def _digest(parts: Iterable[bytes]) -> str:
    # One hash call over the joined parts (the same digest as one update each):
    # a key has some twenty parts, and every update is a call into OpenSSL.
    return hashlib.sha256(_framed(parts)).hexdigest()


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _prefixed(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def _header_part(
    name: bytes, lines: Mapping[bytes, Sequence[tuple[bytes, bytes]]], *, normalise: bool
) -> bytes:
    """One header's key part: its line count, then each line's name as sent
    and value, length-prefixed (an absent header has no lines, an empty one a
    line with an empty value: they differ)."""
    found = lines.get(name, ())
    if not found:
        return name + _NO_LINES
    parts = [name, struct.pack(">I", len(found))]
    for sent, value in found:
        parts += [_prefixed(sent), _prefixed(vary_value(name, value) if normalise else value)]
    return b"".join(parts)


def tag_id(tag: str) -> str:
    """How a tag is named in Redis keys (and in a data entry's record)."""
    return _short(tag)


def tag_version_key(prefix: str, tag_id: str) -> str:
    return f"{prefix}{{t:{tag_id}}}:v"


def record_names(raw: bytes | str | None) -> tuple[str, ...]:
    """The header names a vary record holds (none when it is absent)."""
    if not raw:
        return ()
    text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    return tuple(sorted({name for name in text.split(",") if name}))


@dataclass(frozen=True, slots=True)
class CacheKey:
    """Every Redis key one request touches, derived once per request.

    ``base`` is the digest of the request's parts, ``learned`` the header names
    this key's variant covers beyond them (see the module docstring), and
    ``digest`` the variant's own digest, which names the entry and its lease."""

    digest: str
    entry: str
    lock: str
    url_version: str
    generation: str
    tag_versions: tuple[str, ...]
    base: str
    vary_record: str
    learned: tuple[str, ...] = ()
    # Where the entry's keys live (``<prefix>{u:<url id>}``), and the request's
    # header lines (:func:`header_lines`), to derive another variant from.
    slot: str = field(default="", repr=False)
    headers: Mapping[bytes, Sequence[tuple[bytes, bytes]]] = field(
        default_factory=dict, repr=False, compare=False
    )
    # A data-cache key (:meth:`KeyScheme.for_value`): its record names the hashes
    # of its tags, not headers, and a variant changes the tags, never the entry.
    # The key prefix, to name the tags' version keys; "" for a response's key.
    value_of: str = field(default="", repr=False)

    @property
    def version_keys(self) -> list[str]:
        return [self.generation, self.url_version, *self.tag_versions]

    @property
    def local_names(self) -> tuple[str, ...]:
        """What a lookup reads, in its order: the entry, the vary record, then
        the version keys."""
        return (self.entry, self.vary_record, self.generation, self.url_version, *self.tag_versions)

    @property
    def record_value(self) -> str:
        """What the vary record holds when it names exactly ``learned``."""
        return ",".join(self.learned)

    def varied(self, names: Sequence[str]) -> CacheKey:
        """This request's key for the variant keyed on ``names`` (sorted, lower-case)."""
        learned = tuple(names)
        if learned == self.learned:
            return self
        if self.value_of:
            return replace(
                self,
                learned=learned,
                tag_versions=tuple(tag_version_key(self.value_of, tag) for tag in learned),
            )
        digest = self.base
        if learned:
            parts = [self.base.encode(), b"vary"]
            for name in learned:
                raw = name.encode("latin-1")
                parts += [raw, _header_part(raw, self.headers, normalise=True)]
            digest = _digest(parts)
        return replace(
            self,
            digest=digest,
            entry=f"{self.slot}:e:{digest}",
            lock=f"{self.slot}:l:{digest}",
            learned=learned,
        )


_NO_FORWARDING = _framed([_header_part(name, {}, normalise=False) for name in _FORWARDING_NAMES])


class KeyScheme:
    """Turns requests, URLs, namespaces and tags into Redis key names."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        # Namespaces are few (configuration, not request data): hash each once.
        self._generations: dict[str, str] = {}
        # Hot URLs are few; a bounded memo, emptied when full, never grows with
        # cache-busting paths.
        self._url_ids: dict[tuple[str, str, str], str] = {}
        # The header names each base key's responses vary on, as far as this
        # process knows (bounded the same way); Redis's vary record decides.
        self._learned: dict[str, tuple[str, ...]] = {}
        # Hot values and tags are few too: their keys and ids, bounded the same way.
        self._values: dict[tuple[str, str], CacheKey] = {}
        self._tag_ids: dict[str, str] = {}

    def learn(self, key: CacheKey, names: Sequence[str]) -> CacheKey:
        """Remember that ``key``'s URL varies on ``names``; the variant key for them."""
        learned = tuple(names)
        if self._learned.get(key.base, ()) != learned:
            if len(self._learned) >= _MEMO_SIZE:
                self._learned.clear()
            self._learned[key.base] = learned
        return key.varied(learned)

    def url_id(self, namespace: str, host: str, path: str) -> str:
        """The id of ``path`` on ``host``'s origin (:func:`canonical_origin`), so
        ``invalidate(url)`` reaches it however the URL or the Host spells it."""
        name = (namespace, host, path)
        found = self._url_ids.get(name)
        if found is None:
            origin = canonical_origin(host)
            found = _digest([namespace.encode(), origin.encode(), path.encode()])[:32]
            if len(self._url_ids) >= _MEMO_SIZE:
                self._url_ids.clear()
            self._url_ids[name] = found
        return found

    def url_version(self, url_id: str) -> str:
        return f"{self.prefix}{{u:{url_id}}}:v"

    def generation(self, namespace: str) -> str:
        key = self._generations.get(namespace)
        if key is None:
            key = f"{self.prefix}{{n:{_short(namespace)}}}:g"
            if len(self._generations) < _MEMO_SIZE:
                self._generations[namespace] = key
        return key

    def tag_version(self, tag: str) -> str:
        return tag_version_key(self.prefix, tag_id(tag))

    def for_value(self, namespace: str, name: str, tags: Iterable[str] | None) -> CacheKey:
        """The key of the data cache's value ``name`` (``Cache.get``/``set``,
        ``@cache.memoize``) in ``namespace``, stored with ``tags`` (their ids,
        sorted, are its record; ``None``: the tags this process last saw it
        stored with, which the lookup's record confirms or corrects).

        Its keys share one slot; its *URL version* is the value's own version,
        which ``delete`` and ``set`` bump so a refill that read the value
        before them can never store over them; the namespace generation and
        the tag versions are the response cache's, so ``clear()`` and
        ``invalidate_tags()`` reach cached pages and data alike."""
        base = self._values.get((namespace, name))
        if base is None:
            base = self._value_key(namespace, name)
            if len(self._values) >= _MEMO_SIZE:
                self._values.clear()
            self._values[namespace, name] = base
        if tags is None:
            return base.varied(self._learned.get(base.digest, ()))
        return base.varied(tuple(sorted({self._tag_id(tag) for tag in tags})))

    def _tag_id(self, tag: str) -> str:
        found = self._tag_ids.get(tag)
        if found is None:
            found = tag_id(tag)
            if len(self._tag_ids) >= _MEMO_SIZE:
                self._tag_ids.clear()
            self._tag_ids[tag] = found
        return found

    def _value_key(self, namespace: str, name: str) -> CacheKey:
        """A value's key with no tags (the same every time: a memo keeps it)."""
        digest = _digest([b"value", namespace.encode(), name.encode()])
        slot = f"{self.prefix}{{d:{digest[:32]}}}"
        return CacheKey(
            digest=digest,
            entry=f"{slot}:e",
            lock=f"{slot}:l",
            url_version=f"{slot}:v",
            generation=self.generation(namespace),
            tag_versions=(),
            base=digest,
            vary_record=f"{slot}:y",
            slot=slot,
            value_of=self.prefix,
        )

    def for_request(
        self,
        scope: Scope,
        *,
        namespace: str,
        host: str,
        vary: Sequence[str],
        session_cookie_name: str,
        vary_on_session: bool,
        tags: Sequence[str],
        custom: bytes | None,
        headers: Mapping[bytes, bytes] | None = None,
        session: bytes | Literal["cookie"] | None = "cookie",
        lines: Mapping[bytes, Sequence[tuple[bytes, bytes]]] | None = None,
    ) -> CacheKey:
        """``headers``: the request's :func:`header_map`, if the caller has it.
        ``session``: the per-user part of a ``vary_on_session`` key: who the
        session middleware says the user is (``None``: no session), or
        ``"cookie"`` to hash the session cookie's raw value. ``lines``: the
        request's :func:`header_lines`, if the caller has them."""
        if headers is None:
            headers = header_map(scope)
        path: str = scope.get("path", "")
        root_path: str = scope.get("root_path", "")
        raw_query: bytes = scope.get("query_string", b"")
        query = canonical_query(raw_query) if raw_query else ""
        cookie = session_cookie(scope, session_cookie_name, headers)
        parts: list[bytes] = [
            KEY_VERSION,
            namespace.encode(),
            b"GET",  # GET and HEAD share an entry; other methods never get here
            str(scope.get("scheme", "http")).encode(),
            host.encode(),
            root_path.encode(),
        ]
        if custom is None:
            parts += [b"path", path.encode(), query.encode()]
        else:
            parts += [b"custom", custom]
        if lines is None:
            lines = header_lines(scope)
        # Most requests carry none of the forwarding headers: their parts are then
        # always the same bytes, framed once at import.
        forwarding = (
            _NO_FORWARDING
            if lines.keys().isdisjoint(_FORWARDING_NAMES)
            else _framed([_header_part(name, lines, normalise=False) for name in _FORWARDING_NAMES])
        )
        head = _framed(parts)
        parts = [b"cookie:1" if cookie is not None else b"cookie:0"]
        if vary_on_session:
            if session == "cookie":
                if cookie is not None:
                    parts.append(hashlib.sha256(cookie.encode("latin-1", "replace")).digest())
            elif session is not None:
                parts.append(b"session:" + session)
            # A per-user page may show any other cookie too (a CSRF double-submit
            # token, a theme): ``Vary: Cookie`` means the whole header.
            cookies = other_cookies(scope, session_cookie_name)
            parts += [b"cookies:%d" % len(cookies), *cookies]
        parts += [
            _header_part(name.encode("latin-1"), lines, normalise=True) for name in sorted(vary)
        ]
        digest = hashlib.sha256(head + forwarding + _framed(parts)).hexdigest()
        url_id = self.url_id(namespace, host, path)
        slot = f"{self.prefix}{{u:{url_id}}}"
        key = CacheKey(
            digest=digest,
            entry=f"{slot}:e:{digest}",
            lock=f"{slot}:l:{digest}",
            url_version=self.url_version(url_id),
            generation=self.generation(namespace),
            tag_versions=tuple(self.tag_version(tag) for tag in tags),
            base=digest,
            vary_record=f"{slot}:y:{digest}",
            slot=slot,
            headers=lines,
        )
        return key.varied(self._learned.get(digest, ()))
