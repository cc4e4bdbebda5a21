"""Without prometheus_client installed, the library, Metrics and the fleet work;
only the Prometheus exporters say what to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.example_app.servers import REPO


def test_the_library_works_without_prometheus_client() -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["prometheus_client"] = None  # as if not installed
        import asgi_redis_kit
        from asgi_redis_kit import Cache, Metrics, SessionStore
        metrics = Metrics()
        metrics.watch(Cache("memory://opt"), SessionStore("memory://opt"))
        metrics.caches[0].stats.hits += 2
        assert metrics.snapshot() == {"cache_lookups.hit": 2}, metrics.snapshot()
        assert "prometheus_client" not in {m for m in sys.modules if sys.modules[m]}
        try:
            metrics.asgi_app()
        except ImportError as exc:
            print(exc)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert 'pip install "asgi-redis-kit[metrics]"' in done.stdout
