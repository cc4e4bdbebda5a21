"""One pass over a request's headers gives both readings the cache needs."""

from __future__ import annotations

from asgi_redis_kit._http import header_map
from asgi_redis_kit.cache._request import header_lines, joined_headers


def test_joined_lines_are_the_header_map() -> None:
    scope = {
        "type": "http",
        "headers": [
            (b"host", b"example.com"),
            (b"Accept", b"text/html"),
            (b"cookie", b"a=1"),
            (b"accept", b"*/*"),
            (b"x-empty", b""),
            (b"Cookie", b"b=2"),
        ],
    }
    joined = joined_headers(header_lines(scope))
    assert joined == header_map(scope)
    assert list(joined) == list(header_map(scope))  # the same order too
    assert joined[b"accept"] == b"text/html, */*"
