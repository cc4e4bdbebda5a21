"""Peer comparison for asgi_redis_kit, run by hand (``./dev bench``), never by pytest.

See ``bench/README.md`` for what each scenario measures and how to read the numbers.
"""
