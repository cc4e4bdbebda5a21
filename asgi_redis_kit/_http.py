"""HTTP helpers shared by sessions and cache: reading request headers and cookies
from an ASGI scope, the same way in both."""

from __future__ import annotations

from starlette.types import Scope


def cookie_values(scope: Scope, name: str) -> list[str]:
    """Every value the client sent for cookie ``name``, in order.

    Browsers may send one name twice (a host-only and a domain cookie, or two
    paths); the caller tries them in order and uses the first that verifies.
    Bytes are decoded as latin-1 so any input decodes; non-ASCII never verifies.
    """
    found: list[str] = []
    for key, raw in scope.get("headers", ()):
        if key != b"cookie":
            continue
        for part in raw.decode("latin-1").split(";"):
            cookie_name, sep, value = part.strip().partition("=")
            if sep and cookie_name.strip() == name:
                found.append(value.strip().strip('"'))
    return found


def header_map(scope: Scope) -> dict[bytes, bytes]:
    """Every request header by lower-cased name, a repeated one's values joined
    with ", " (as the cache's ``header`` joins them): one pass over the headers
    for all the lookups a request needs."""
    found: dict[bytes, bytes] = {}
    for key, value in scope.get("headers", ()):
        name = key.lower()
        previous = found.get(name)
        found[name] = value if previous is None else previous + b", " + value
    return found
