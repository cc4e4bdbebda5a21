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
7. forwarding headers (``X-Forwarded-Host``, ``X-Forwarded-Proto``,
   ``X-Forwarded-Prefix``, ``Forwarded``) - apps behind a proxy build URLs from
   them, so a request carrying a poisoned value gets its own entry and can never
   change what a plain request receives.
8. one bit: "the request carries the session cookie", so anonymous and
   cookie-bearing requests never share an entry, plus a hash of the session
   cookie's value when the route sets ``vary_on_session=True`` (per-user entries),
   and then every other cookie as well (:func:`other_cookies`): a per-user page
   may show any of them, so only requests whose other cookies read the same
   share it (with none, all of them still do).
   The cookie is read with SessionMiddleware's own ``cookie_values`` (every
   ``Cookie`` header, every value); a request naming it twice never gets this
   far: Starlette's parser would see another value than the session does.
   When the middleware can ask the session instead (a SessionMiddleware of
   ours outside the cache), the per-user part is the loaded session's handle,
   and a new or unknown session adds none: it is no session.
9. the values of every header named in ``vary=``; an absent header and an empty
   one are different parts.

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

Header values are normalised before they are keyed, so requests that mean
the same do not fragment the cache (:func:`vary_value`), for learned and
``vary=`` headers alike:

* ``Accept``, ``Accept-Charset``, ``Accept-Encoding``, ``Accept-Language``
  (case-insensitive lists): lower-cased; spaces around ``,``, ``;`` and ``=``
  and empty list items dropped; a ``q`` weight written canonically
  (``q=0.50`` is ``q=0.5``, ``q=1`` is dropped as the default). The tokens of
  ``Accept-Encoding`` are sorted (their order means nothing); the others keep
  their order, which is a preference a handler may read. A value holding a
  quoted string is only trimmed: a comma inside quotes is data.
* any other header: only trimmed of surrounding spaces (``Origin`` is echoed
  back by CORS; an unknown header's case and spacing may matter to the app).
* an absent header and an empty one stay different parts.

Redis key layout (``{...}`` is a Redis Cluster hash tag)::

    <prefix>{u:<url id>}:e:<key digest>   the entry (status, headers, body, ETag)
    <prefix>{u:<url id>}:l:<key digest>   its lease lock (stampede protection)
    <prefix>{u:<url id>}:y:<base digest>  the vary record: learned header names
    <prefix>{u:<url id>}:v                version of the URL: invalidate(url) bumps it
    <prefix>{n:<namespace id>}:g          namespace generation: clear() bumps it
    <prefix>{t:<tag id>}:v                version of a tag: invalidate_tags() bumps it

The URL id hashes namespace, host and full path (not the query), so an entry
and its lock live in one slot, and invalidating a URL reaches every entry of
that path (every query string, HEAD/GET, per-user, every ``vary=`` or learned
variant, and routes with a custom ``key=``) with one INCR; the key digest in
these names is the variant's. Names chosen
by users (namespaces, tags) appear hashed, so a ``{`` or ``}`` in them can never
change the hash slot.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal
from urllib.parse import unquote_plus

from starlette.types import Scope

from ..sessions._cookie import cookie_values

KEY_VERSION = b"ark-cache-key-v1"

FORWARDING_HEADERS = ("x-forwarded-host", "x-forwarded-proto", "x-forwarded-prefix", "forwarded")
_FORWARDING_NAMES = tuple(name.encode() for name in FORWARDING_HEADERS)
_MEMO_SIZE = 4096
# A Host header already in canonical form: lower-case DNS labels (or an IPv4
# address), or a bracketed IPv6 address, and an optional port without a leading zero.
_LABEL = rb"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
_CANONICAL_HOST = re.compile(
    rb"(?:" + _LABEL + rb"(?:\." + _LABEL + rb")*|\[(?P<ipv6>[0-9a-f:.]+)\])"
    rb"(?::(?P<port>[1-9][0-9]{0,4}))?"
)
# Request headers whose values are case-insensitive lists of tokens with parameters.
_TOKEN_LISTS = frozenset({b"accept", b"accept-charset", b"accept-encoding", b"accept-language"})
# ...of which the order of the tokens carries no meaning (RFC 9110 section 12.5.3).
_UNORDERED = frozenset({b"accept-encoding"})
_QVALUE = re.compile(rb"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")
_SPACE = b" \t"


def _digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(struct.pack(">I", len(part)))
        h.update(part)
    return h.hexdigest()


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def header_values(scope: Scope, name: bytes) -> list[bytes]:
    return [value for key, value in scope.get("headers", ()) if key.lower() == name]


def header(scope: Scope, name: bytes) -> bytes | None:
    values = header_values(scope, name)
    return b", ".join(values) if values else None


def header_map(scope: Scope) -> dict[bytes, bytes]:
    """Every request header by lower-cased name, a repeated one's values joined
    with ", " as :func:`header` joins them: one pass over the headers for all
    the lookups a request needs."""
    found: dict[bytes, bytes] = {}
    for key, value in scope.get("headers", ()):
        name = key.lower()
        previous = found.get(name)
        found[name] = value if previous is None else previous + b", " + value
    return found


def request_host(scope: Scope, headers: Mapping[bytes, bytes] | None = None) -> str:
    """A lenient reading of the request's host, for naming a URL to invalidate
    (keys are built from :func:`canonical_host` instead)."""
    host = header(scope, b"host") if headers is None else headers.get(b"host")
    if host is not None:
        return host.decode("latin-1").strip().lower().rstrip(".")
    server = scope.get("server")
    if server:
        return f"{server[0]}:{server[1]}".lower()
    return ""


def canonical_host(scope: Scope) -> str | None:
    """The host a cache key names, or ``None`` when the request's Host is not
    already in canonical form (the request then bypasses the cache).

    Starlette builds ``request.url`` and ``url_for`` from the first raw ``host``
    header when it parses, and from ``scope["server"]`` when it does not. A key
    that normalised the header (case, spaces, a trailing dot) would let one
    request with ``Host: example.com\\xa0`` store a page linking to the server's
    bind address under the key every plain ``example.com`` request hits. So a
    key names the Host only when the request has exactly one ``host`` header,
    lower-case ``name[:port]``, whose bytes are exactly what the app sees.
    Anything else -- control or non-ASCII bytes, whitespace, upper case, a
    trailing dot or empty label, a port with a leading zero or over 65535, a
    second Host header, a ``Host`` header name Starlette does not read -- is
    never keyed. Browsers always send the canonical form. Without a Host
    header the app uses ``scope["server"]``, and so does the key."""
    found: bytes | None = None
    for name, value in scope.get("headers", ()):
        if name.lower() != b"host":
            continue
        if found is not None or name != b"host":
            return None
        found = value
    if found is None:
        server = scope.get("server")
        return f"{server[0]}:{server[1]}".lower() if server else ""
    match = _CANONICAL_HOST.fullmatch(found)
    if match is None:
        return None
    port = match["port"]
    if port is not None and int(port) > 65535:
        return None
    ipv6 = match["ipv6"]
    if ipv6 is not None:
        try:
            ipaddress.IPv6Address(ipv6.decode("ascii"))
        except ValueError:
            return None
    return found.decode("ascii")


def canonical_query(query_string: bytes) -> str:
    """The raw query with its ``&``-separated pairs in a canonical order.

    Pairs stay byte for byte what the app sees (``%41`` and ``A`` are different
    keys: ``request.url`` shows the bytes it got, and a key that decoded them
    would let one spelling's page be served for another). They are ordered by
    decoded name, so two spellings of one name cannot swap which value a
    handler reads last; a repeated name keeps its values' relative order
    (``?a=2&a=1`` is not ``?a=1&a=2`` to a handler that reads ``getlist``).
    Reordering whole pairs brings no byte into a page that the other order
    lacks."""
    pairs = query_string.decode("latin-1").split("&")
    # sorted() is stable: repeated names keep their relative order.
    return "&".join(sorted(pairs, key=lambda pair: unquote_plus(pair.partition("=")[0])))


def vary_value(name: bytes, value: bytes) -> bytes:
    """``value`` of request header ``name`` (lower-case) as it is keyed: the
    normalisation the module docstring describes."""
    if name not in _TOKEN_LISTS or b'"' in value:
        return value.strip(_SPACE)
    tokens = [_token(item) for item in value.lower().split(b",")]
    tokens = [token for token in tokens if token]
    if name in _UNORDERED:
        tokens.sort()
    return b",".join(tokens)


def _token(item: bytes) -> bytes:
    """One list item: ``gzip ; q=0.50`` -> ``gzip;q=0.5``."""
    value, *parameters = (part.strip(_SPACE) for part in item.split(b";"))
    kept = [value]
    for parameter in parameters:
        name, equals, argument = (part.strip(_SPACE) for part in parameter.partition(b"="))
        if not name:
            continue
        if name == b"q" and _QVALUE.fullmatch(argument):
            argument = f"{float(argument):.3f}".rstrip("0").rstrip(".").encode()
            if argument == b"1":
                continue  # the default weight
        kept.append(name + equals + argument)
    return b";".join(kept) if value or len(kept) > 1 else b""


def _header_part(name: str, headers: Mapping[bytes, bytes]) -> bytes:
    """One header's key part; an absent header and an empty one differ."""
    raw = name.encode("latin-1")
    value = headers.get(raw)
    return raw + (b"\x00" if value is None else b"\x01" + vary_value(raw, value))


def record_names(raw: bytes | str | None) -> tuple[str, ...]:
    """The header names a vary record holds (none when it is absent)."""
    if not raw:
        return ()
    text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    return tuple(sorted({name for name in text.split(",") if name}))


def session_cookie(
    scope: Scope, cookie_name: str, headers: Mapping[bytes, bytes] | None = None
) -> str | None:
    """The session cookie's value (the first one if it is repeated, as
    SessionMiddleware reads it). ``headers`` is accepted for symmetry with the
    other readers; cookies are always read from every raw ``Cookie`` header."""
    values = cookie_values(scope, cookie_name)
    return values[0] if values else None


def other_cookies(scope: Scope, session_cookie_name: str) -> list[bytes]:
    """Every cookie but the session's, one key part per ``Cookie`` header line.

    A handler reads cookies through Starlette's parser: the first ``Cookie``
    line only, a repeated name's last value, a quoted value unquoted. So each
    line is kept apart, in order, and within a line the pairs are sorted by
    name with a repeated name's values in their original order (a stable sort),
    each pair the name and value trimmed as Starlette trims them (quotes kept:
    ``""x""`` and ``x`` differ to it). Two requests that read differently never
    share a part; the order of different names alone does not split them. The
    session cookie is left out, as ``cookie_values`` finds it: the key holds who
    the session is instead."""
    lines: list[bytes] = []
    for key, raw in scope.get("headers", ()):
        if key != b"cookie":
            continue
        pairs: list[tuple[str, str]] = []
        for chunk in raw.decode("latin-1").split(";"):
            name, sep, value = chunk.partition("=")
            if not sep:
                name, value = "", chunk  # Starlette's reading of a chunk without "="
            name, value = name.strip(), value.strip()
            if (sep and name == session_cookie_name) or not (name or value):
                continue
            pairs.append((name, value))
        pairs.sort(key=lambda pair: pair[0])
        lines.append(b"".join(_digest_part(f"{n}={v}".encode("latin-1")) for n, v in pairs))
    return lines


def _digest_part(part: bytes) -> bytes:
    return struct.pack(">I", len(part)) + part


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
    # headers, to derive another variant from.
    slot: str = field(default="", repr=False)
    headers: Mapping[bytes, bytes] = field(default_factory=dict, repr=False, compare=False)

    @property
    def version_keys(self) -> list[str]:
        return [self.generation, self.url_version, *self.tag_versions]

    @property
    def record_value(self) -> str:
        """What the vary record holds when it names exactly ``learned``."""
        return ",".join(self.learned)

    def varied(self, names: Sequence[str]) -> CacheKey:
        """This request's key for the variant keyed on ``names`` (sorted, lower-case)."""
        learned = tuple(names)
        if learned == self.learned:
            return self
        digest = self.base
        if learned:
            parts = [self.base.encode(), b"vary"]
            for name in learned:
                parts += [name.encode("latin-1"), _header_part(name, self.headers)]
            digest = _digest(parts)
        return replace(
            self,
            digest=digest,
            entry=f"{self.slot}:e:{digest}",
            lock=f"{self.slot}:l:{digest}",
            learned=learned,
        )


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

    def learn(self, key: CacheKey, names: Sequence[str]) -> CacheKey:
        """Remember that ``key``'s URL varies on ``names``; the variant key for them."""
        learned = tuple(names)
        if self._learned.get(key.base, ()) != learned:
            if len(self._learned) >= _MEMO_SIZE:
                self._learned.clear()
            self._learned[key.base] = learned
        return key.varied(learned)

    def url_id(self, namespace: str, host: str, path: str) -> str:
        name = (namespace, host, path)
        found = self._url_ids.get(name)
        if found is None:
            found = _digest([namespace.encode(), host.encode(), path.encode()])[:32]
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
        return f"{self.prefix}{{t:{_short(tag)}}}:v"

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
    ) -> CacheKey:
        """``headers``: the request's :func:`header_map`, if the caller has it.
        ``session``: the per-user part of a ``vary_on_session`` key: who the
        session middleware says the user is (``None``: no session), or
        ``"cookie"`` to hash the session cookie's raw value."""
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
        for forwarding in _FORWARDING_NAMES:
            value = headers.get(forwarding)
            parts.append(b"\x00" if value is None else b"\x01" + value)
        parts.append(b"cookie:1" if cookie is not None else b"cookie:0")
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
        parts += [_header_part(name, headers) for name in sorted(vary)]
        digest = _digest(parts)
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
            headers=headers,
        )
        return key.varied(self._learned.get(digest, ()))
