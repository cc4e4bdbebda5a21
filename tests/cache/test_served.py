"""The headers an entry is served with: the same on every serving but for its age."""

from __future__ import annotations

from asgi_redis_kit.cache._entry import Entry, served_headers


def _entry(per_user: bool = False) -> Entry:
    return Entry(
        status=200,
        headers=(
            (b"content-type", b"text/plain"),
            (b"Cache-Control", b"public, max-age=60, must-revalidate"),
            (b"ETag", b'"theirs"'),
            (b"vary", b"accept"),
        ),
        body=b"hello",
        etag='"ours"',
        stored_at=100.0,
        fresh_for=60.0,
        stale_while_revalidate=0.0,
        stale_if_error=0.0,
        versions=(0, 0),
        per_user=per_user,
    )


def test_each_serving_counts_its_own_age() -> None:
    entry = _entry()
    first = served_headers(entry, 110.5, state="HIT")
    second = served_headers(entry, 130.0, state="STALE", reason="revalidating")
    assert first == [
        (b"content-type", b"text/plain"),
        (b"vary", b"accept"),
        (b"etag", b'"ours"'),
        (b"cache-control", b"public, must-revalidate, max-age=49"),
        (b"age", b"10"),
        (b"content-length", b"5"),
        (b"x-cache", b"HIT"),
    ]
    assert second[3:5] == [
        (b"cache-control", b"public, must-revalidate, max-age=30"),
        (b"age", b"30"),
    ]
    assert second[-2:] == [(b"x-cache", b"STALE"), (b"x-cache-reason", b"revalidating")]
    # A 304 after a 200 of the same entry: only what a 304 repeats, no length.
    assert served_headers(entry, 110.0, state="HIT", not_modified=True) == [
        (b"vary", b"accept"),
        (b"etag", b'"ours"'),
        (b"cache-control", b"public, must-revalidate, max-age=50"),
        (b"age", b"10"),
        (b"x-cache", b"HIT"),
    ]


def test_a_per_user_entry_is_private() -> None:
    entry = _entry(per_user=True)
    headers = dict(served_headers(entry, 100.0, state="HIT"))
    assert headers[b"cache-control"] == b"private, must-revalidate, max-age=60"
    assert entry == _entry(per_user=True)  # what serving kept on it is not compared
