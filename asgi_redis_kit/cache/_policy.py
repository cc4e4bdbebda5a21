"""Cacheability rules: which requests may use the cache, which responses may be stored.

The rules are those of a shared cache (RFC 9111 section 3, Django's
``patch_vary_headers``/``learn_cache_key``, Varnish's built-in VCL), tightened
where a wrong answer would leak one user's response to another.

Requests (decided before anything is read; a bypassed request is neither served
from nor stored in the cache, and the response says ``X-Cache: BYPASS`` with
``X-Cache-Reason``):

* ``method``        - anything but GET and HEAD.
* ``body``          - a GET that carries a body (``Content-Length`` > 0 or
  ``Transfer-Encoding``): the key does not cover the body.
* ``authorization`` - an ``Authorization`` header, unless the route is
  ``public=True`` (RFC 9111 section 3.5).
* ``override``      - ``X-HTTP-Method-Override``, ``X-Method-Override``,
  ``X-HTTP-Method``, ``X-Original-URL`` or ``X-Rewrite-URL``: frameworks that
  honour them answer a different method or path than the one the key names.
  (Forwarding headers such as ``X-Forwarded-Host`` are keyed instead; see
  ``_keys``.)
* ``host``          - a ``Host`` outside ``allowed_hosts``, or one not already in
  canonical form (``_keys.canonical_host``: the key must name exactly what the
  app sees).
* ``cookie``        - the session cookie appears more than once (in one or
  several ``Cookie`` headers): SessionMiddleware uses the first value that
  verifies, other parsers the last, so no key can be trusted to name the
  session the handler will see.
* ``forwarded``     - a forwarding header (``_keys.FORWARDING_HEADERS``) while a
  proxy-headers middleware (uvicorn's ``ProxyHeadersMiddleware``, hypercorn's
  ``ProxyFixMiddleware``, look-alikes) runs *inside* the cache: it rewrites
  the scheme or host after the key was made, and only for trusted peers, so
  no key names what the app will see. Put it outside the cache instead.
* ``session``       - on a route with neither ``vary_on_session`` nor
  ``ignores_session``: the request carries the session cookie, or a session
  middleware outside the cache loaded a session that came from a cookie or holds
  data. Such a page is shared by everyone, and an empty (expired, garbage)
  session's page stored under the cookie-bearing key would reach live ones.
* ``backend``       - Redis is failing or the circuit breaker is open.

Responses (decided after the handler ran; the response is still sent, marked
``X-Cache: MISS`` with ``X-Cache-Reason`` naming why it was not stored):

* ``status``        - a status outside the cacheable set (default 200, 203, 204,
  300, 301, 404, 410).
* ``set-cookie``    - any ``Set-Cookie``: it belongs to one client.
* ``cache-control`` - ``private``, ``no-store`` or ``no-cache``.
* ``vary``          - ``Vary: *``: the answer may depend on anything about the
  request, so no stored answer fits another request. Any other header the
  ``Vary`` names is learned (:func:`learned_vary`, ``_keys``): the response is
  stored under a key holding that header's value, never served to a request
  whose value differs.
* ``session``       - the handler may have read the session, on a route without
  ``vary_on_session=True``: ``Vary: Cookie`` from a session middleware inside
  the cache, or a session that was asked for or holds data, in either
  middleware order. Reads through ``scope["session"]``, ``dict(...)`` or C code
  such as ``orjson.dumps`` cannot all be seen, so data within reach counts as
  read (``_session_rules.SessionRules.read`` has the rules per middleware);
  a route marked ``ignores_session=True`` counts only the reads that are seen.
  Also: a ``vary_on_session`` response whose key named no one while the
  session the handler saw is someone's (its cookie has a name the cache did not
  learn), and any response when the SessionMiddleware that handled the request
  reads another cookie than the key named.
* ``size``          - a body over ``max_size`` bytes.
* ``streaming``     - the app streamed its body (``more_body``); it passes
  through unbuffered.
* ``route``         - the endpoint that actually ran is not the ``@cached``
  endpoint the middleware matched (a routing surprise: never store it).
* ``error``         - the handler raised.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from starlette.types import Scope

from .._http import header_map

DEFAULT_CACHEABLE_STATUSES = frozenset({200, 203, 204, 300, 301, 404, 410})

OVERRIDE_HEADERS = (
    b"x-http-method-override",
    b"x-method-override",
    b"x-http-method",
    b"x-original-url",
    b"x-rewrite-url",
)

_OVERRIDE = frozenset(OVERRIDE_HEADERS)

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


def host_allowed(host: str, allowed: Sequence[str] | None) -> bool:
    """``allowed`` holds exact hosts (``example.com``, ``example.com:8000``) or
    ``*.example.com``, which matches subdomains only."""
    if allowed is None:
        return True
    bare = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    for pattern in allowed:
        pattern = pattern.lower()
        if pattern == "*" or host == pattern or bare == pattern:
            return True
        if pattern.startswith("*.") and bare.endswith(pattern[1:]):
            return True
    return False


def request_bypass_reason(
    scope: Scope,
    *,
    public: bool,
    host: str,
    allowed_hosts: Sequence[str] | None,
    headers: Mapping[bytes, bytes] | None = None,
) -> str | None:
    """``headers``: the request's ``header_map``, if the caller has it."""
    if scope["method"] not in ("GET", "HEAD"):
        return "method"
    if headers is None:
        headers = header_map(scope)
    length = headers.get(b"content-length")
    if b"transfer-encoding" in headers or (
        length is not None and length.strip() not in (b"0", b"")
    ):
        return "body"
    if not public and b"authorization" in headers:
        return "authorization"
    if not _OVERRIDE.isdisjoint(headers):
        return "override"
    if not host_allowed(host, allowed_hosts):
        return "host"
    return None


def header_tokens(values: Iterable[bytes]) -> list[str]:
    return [
        token.strip().lower()
        for value in values
        for token in value.decode("latin-1").split(",")
        if token.strip()
    ]


def cache_control_directives(values: Iterable[bytes]) -> list[str]:
    return [token.split("=", 1)[0].strip() for token in header_tokens(values)]


def response_vary(headers: Sequence[tuple[bytes, bytes]]) -> list[str]:
    """The request header names (lower-case) the response's ``Vary`` lists."""
    # One pass, no copy of the headers: it runs four times per stored response.
    return header_tokens(value for name, value in headers if name.lower() == b"vary")


def response_store_reason(
    status: int,
    headers: Sequence[tuple[bytes, bytes]],
    *,
    statuses: frozenset[int],
    vary_on_session: bool,
) -> str | None:
    if status not in statuses:
        return "status"
    names = [name.lower() for name, _ in headers]
    if b"set-cookie" in names:
        return "set-cookie"
    directives = cache_control_directives(
        value for name, value in headers if name.lower() == b"cache-control"
    )
    if {"private", "no-store", "no-cache"} & set(directives):
        return "cache-control"
    vary = response_vary(headers)
    if "*" in vary:
        return "vary"
    if "cookie" in vary and not vary_on_session:
        return "session"
    return None


def learned_vary(
    headers: Sequence[tuple[bytes, bytes]], keyed_headers: Iterable[str]
) -> tuple[str, ...]:
    """The request headers a storable response varies on that the key does not
    hold yet (``keyed_headers``), sorted: the cache learns them. ``Cookie`` is
    the session's (see ``session`` above), never learned."""
    vary = response_vary(headers)
    if not vary:
        return ()  # most responses: no set of the keyed names to build (~20 of them)
    keyed = {name.lower() for name in keyed_headers} | {"cookie", "*"}
    return tuple(sorted({name for name in vary if name not in keyed}))


def storable_headers(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The response headers minus hop-by-hop ones (RFC 9110 section 7.6.1), including
    any the ``Connection`` header names, and minus those we regenerate per answer."""
    connection = (value for name, value in headers if name.lower() == b"connection")
    dropped = set(HOP_BY_HOP) | {token.encode() for token in header_tokens(connection)}
    dropped |= {b"x-cache", b"x-cache-reason", b"age", b"content-length"}
    return [(name, value) for name, value in headers if name.lower() not in dropped]


def with_vary(
    headers: Sequence[tuple[bytes, bytes]], names: Iterable[str]
) -> list[tuple[bytes, bytes]]:
    """``headers`` whose ``Vary`` also names ``names`` (a route's ``vary=``), as
    Django's ``patch_vary_headers`` does: the key holds those headers, so a
    shared cache in front that is told our max-age must be told them too, or it
    keeps one variant for every value. Names it lists already (any case) are
    not repeated; ``Vary: *`` already covers everything."""
    listed = response_vary(headers)
    missing = [name for name in dict.fromkeys(names) if name.lower() not in listed]
    if not missing or "*" in listed:
        return list(headers)
    merged = ", ".join([*dict.fromkeys(listed), *missing]).encode("latin-1")
    kept = [(name, value) for name, value in headers if name.lower() != b"vary"]
    return [*kept, (b"vary", merged)]
