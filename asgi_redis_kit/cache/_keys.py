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
   lets requests that carry any of them bypass the cache, see ``_middleware``.)
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
9. every header named in ``vary=``.

A keyed header (forwarding, ``vary=`` or learned) is keyed on its *lines*:
how many there are, and each line's name as sent and value, length-prefixed
(:func:`header_lines`), never on a joined value. Starlette's
``request.headers.get`` returns the first line only, ``getlist`` every one,
and a line whose name is not lower-case is seen by neither; ``Accept-Language:``
(empty) then ``Accept-Language: de`` must not share the key of a plain ``de``
request. An absent header (no line) and an empty one (one empty line) differ.

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

Header values are keyed as the app sees them, byte for byte: no case
folding, no trimming, no respacing, no rewriting of ``q`` weights. A handler
that reads the raw value (``value.split(",")[0] in SUPPORTED``, a
case-sensitive ``== "pt-BR"``) decides differently on ``pt-br``, ``de ,en``
or ``de;q=1`` than on ``pt-BR``, ``de,en`` or ``de``, so any normalisation
would let one spelling's page be stored for the other's (as with the query).
Browsers send one spelling per setting, so this fragments nothing that
matters. The one exception is ``Accept-Encoding`` (:func:`vary_value`), where
each line's comma-separated tokens are trimmed, empty ones dropped, and the
rest sorted, each token kept byte for byte: its order means nothing (RFC 9110
section 12.5.3) and its readers ask whether a coding is listed (Starlette's
GZipMiddleware: ``"gzip" in value``, case-sensitively), which neither the
order nor the spaces around a comma can change. A value holding a quoted
string is kept as sent.

Redis key layout (``{...}`` is a Redis Cluster hash tag)::

    <prefix>{u:<url id>}:e:<key digest>   the entry (status, headers, body, ETag)
    <prefix>{u:<url id>}:l:<key digest>   its lease lock (stampede protection)
    <prefix>{u:<url id>}:y:<base digest>  the vary record: learned header names
    <prefix>{u:<url id>}:v                version of the URL: invalidate(url) bumps it
    <prefix>{n:<namespace id>}:g          namespace generation: clear() bumps it
    <prefix>{t:<tag id>}:v                version of a tag: invalidate_tags() bumps it

The URL id hashes namespace, the host's origin (:func:`canonical_origin`:
lower-case, IDNA-encoded, ports 80 and 443 dropped; the key itself keeps
the exact Host) and full path (not the query), so an entry
and its lock live in one slot, and invalidating a URL reaches every entry of
that path (every query string, HEAD/GET, per-user, every ``vary=`` or learned
variant, and routes with a custom ``key=``) with one INCR; the key digest in
these names is the variant's. Names chosen
by users (namespaces, tags) appear hashed, so a ``{`` or ``}`` in them can never
change the hash slot.
"""

from __future__ import annotations

import contextlib
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

KEY_VERSION = b"ark-cache-key-v2"

# Request headers a proxy sets and an app (or a library it uses) may build URLs,
# redirects or its idea of "secure" from: Werkzeug's ProxyFix and Django read
# X-Forwarded-Host/-Proto/-Port/-Prefix, Rack X-Forwarded-Scheme/-Ssl,
# gunicorn X-Forwarded-Protocol/-Ssl, nginx recipes X-Scheme, Apache
# X-Forwarded-Server, IIS/ARR X-Original-Host, Cloudflare CF-Visitor, older
# ProxyFix recipes X-Script-Name. Per-client ones (X-Forwarded-For, X-Real-IP)
# are not keyed: the key never names the client address either.
FORWARDING_HEADERS = (
    "forwarded",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-scheme",
    "x-forwarded-protocol",
    "x-forwarded-ssl",
    "x-forwarded-server",
    "x-original-host",
    "x-host",
    "x-scheme",
    "x-url-scheme",
    "front-end-https",
    "cf-visitor",
    "x-script-name",
)
_FORWARDING_NAMES = tuple(name.encode() for name in FORWARDING_HEADERS)
_MEMO_SIZE = 4096
# A Host header already in canonical form: lower-case DNS labels (or an IPv4
# address), or a bracketed IPv6 address, and an optional port without a leading zero.
_LABEL = rb"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
_CANONICAL_HOST = re.compile(
    rb"(?:" + _LABEL + rb"(?:\." + _LABEL + rb")*|\[(?P<ipv6>[0-9a-f:.]+)\])"
    rb"(?::(?P<port>[1-9][0-9]{0,4}))?"
)
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


def canonical_origin(host: str) -> str:
    """``host`` (``name[:port]``, from a Host header or a URL) as one origin is
    named in URL ids: lower-case, without a trailing dot, IDNA-encoded, and
    without port 80 or 443. Both are dropped whatever the scheme: behind a
    TLS-terminating proxy the app's scheme is not the client's, and a URL id
    that covers both ports of a host only ever invalidates more, never less."""
    text = host.strip().lower()
    name, port = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end != -1 and text[end + 1 : end + 2] == ":":
            name, port = text[: end + 1], text[end + 2 :]
    elif text.count(":") == 1:
        name, _, port = text.partition(":")
    if port.isdigit() and port.isascii():
        port = str(int(port))
    if port in ("80", "443"):
        port = ""
    name = name.rstrip(".")
    if not name.isascii():
        # Not a valid IDN: no Host header spells it otherwise, keep it as it is.
        with contextlib.suppress(UnicodeError):
            name = name.encode("idna").decode("ascii")
    return f"{name}:{port}" if port else name


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


def header_lines(scope: Scope) -> dict[bytes, tuple[tuple[bytes, bytes], ...]]:
    """Every request header line by lower-cased name: ``(name as sent, value)``
    in order. A keyed header is keyed on these lines, not on a joined value:
    Starlette's ``headers.get`` returns the first line only (and sees a line
    only if its name is already lower-case), ``getlist`` every line, so two
    requests share a key part only when every reader sees the same in both."""
    found: dict[bytes, tuple[tuple[bytes, bytes], ...]] = {}
    for key, value in scope.get("headers", ()):
        name = key.lower()
        found[name] = (*found.get(name, ()), (key, value))
    return found


def vary_value(name: bytes, value: bytes) -> bytes:
    """One line's ``value`` of request header ``name`` (lower-case) as it is
    keyed: as sent, except ``Accept-Encoding``'s tokens (see the module docstring)."""
    if name != b"accept-encoding" or b'"' in value:
        return value
    tokens = sorted(token.strip(_SPACE) for token in value.split(b","))
    return b",".join(token for token in tokens if token)


def _prefixed(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def _header_part(
    name: bytes, lines: Mapping[bytes, Sequence[tuple[bytes, bytes]]], *, normalise: bool
) -> bytes:
    """One header's key part: its line count, then each line's name as sent
    and value, length-prefixed (an absent header has no lines, an empty one a
    line with an empty value: they differ)."""
    found = lines.get(name, ())
    parts = [name, struct.pack(">I", len(found))]
    for sent, value in found:
        parts += [_prefixed(sent), _prefixed(vary_value(name, value) if normalise else value)]
    return b"".join(parts)


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
    # header lines (:func:`header_lines`), to derive another variant from.
    slot: str = field(default="", repr=False)
    headers: Mapping[bytes, Sequence[tuple[bytes, bytes]]] = field(
        default_factory=dict, repr=False, compare=False
    )

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
        lines = header_lines(scope)
        parts += [_header_part(name, lines, normalise=False) for name in _FORWARDING_NAMES]
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
        parts += [
            _header_part(name.encode("latin-1"), lines, normalise=True) for name in sorted(vary)
        ]
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
            headers=lines,
        )
        return key.varied(self._learned.get(digest, ()))
