"""How the cache reads a request: its host, query, headers and cookies as the app sees them.

Everything here reads the ASGI scope and decides nothing about Redis names
(``_keys`` turns what is read here into key parts).

A keyed header (forwarding, ``vary=`` or learned) is keyed on its *lines*:
how many there are, and each line's name as sent and value, length-prefixed
(:func:`header_lines`), never on a joined value. Starlette's
``request.headers.get`` returns the first line only, ``getlist`` every one,
and a line whose name is not lower-case is seen by neither; ``Accept-Language:``
(empty) then ``Accept-Language: de`` must not share the key of a plain ``de``
request. An absent header (no line) and an empty one (one empty line) differ.


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

"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import struct
from collections.abc import Mapping, Sequence
from urllib.parse import unquote_plus

from starlette.types import Scope

from .._http import cookie_values

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
# A Host header already in canonical form: lower-case DNS labels (or an IPv4
# address), or a bracketed IPv6 address, and an optional port without a leading zero.
_LABEL = rb"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
_CANONICAL_HOST = re.compile(
    rb"(?:" + _LABEL + rb"(?:\." + _LABEL + rb")*|\[(?P<ipv6>[0-9a-f:.]+)\])"
    rb"(?::(?P<port>[1-9][0-9]{0,4}))?"
)
_SPACE = b" \t"


def header_values(scope: Scope, name: bytes) -> list[bytes]:
    return [value for key, value in scope.get("headers", ()) if key.lower() == name]


def header(scope: Scope, name: bytes) -> bytes | None:
    values = header_values(scope, name)
    return b", ".join(values) if values else None


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
    if type(found) is not bytes:  # the ASGI spec says bytes; anything else is not memoised
        return _canonical_value(found)
    try:
        return _hosts[found]
    except KeyError:
        pass
    host = _canonical_value(found)
    if len(found) <= _HOST_MEMO_BYTES:  # a long (hostile) value is judged, not kept
        if len(_hosts) >= _HOSTS_SIZE:
            _hosts.clear()
        _hosts[found] = host
    return host


# The verdict on each Host value seen: a site answers to a few, and a full memo
# (cache-busting Hosts) is emptied rather than grown.
_HOSTS_SIZE = 1024
_HOST_MEMO_BYTES = 260  # a DNS name (253) with a port
_hosts: dict[bytes, str | None] = {}


def _canonical_value(found: bytes) -> str | None:
    """``canonical_host`` for the one ``host`` header's value ``found``."""
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
        previous = found.get(name)
        found[name] = ((key, value),) if previous is None else (*previous, (key, value))
    return found


def joined_headers(
    lines: Mapping[bytes, Sequence[tuple[bytes, bytes]]],
) -> dict[bytes, bytes]:
    """``_http.header_map`` of the request whose :func:`header_lines` are
    ``lines`` (the same dict, in the same order), without another pass over
    its headers."""
    return {
        name: found[0][1] if len(found) == 1 else b", ".join([value for _, value in found])
        for name, found in lines.items()
    }


def vary_value(name: bytes, value: bytes) -> bytes:
    """One line's ``value`` of request header ``name`` (lower-case) as it is
    keyed: as sent, except ``Accept-Encoding``'s tokens (see the module docstring)."""
    if name != b"accept-encoding" or b'"' in value:
        return value
    tokens = sorted(token.strip(_SPACE) for token in value.split(b","))
    return b",".join(token for token in tokens if token)


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
