"""Configuration shared by the Starlette app and its FastAPI twin.

Both services of the two-service demo must agree on the cookie name, the cookie
path and the secret, or a cookie minted by one is rejected by the other; those
therefore live here as constants, and only what may differ per process (the
instance name, where Redis is) comes from the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

COOKIE_NAME = "ark_session"
COOKIE_PATH = "/"
# Used only when SESSION_SECRET is unset, so that `./dev serve` works on a fresh
# clone and two local services agree without setup. Never for production.
DEV_SECRET = "asgi-redis-kit example app: development secret, not for production"  # noqa: S105
# One in-process server name for every client this process makes, so the
# session and cache middlewares see the same embedded Redis.
EMBEDDED_REDIS_URL = "memory://example_app"
REPORT_TAG = "report"
REPORT_TTL = 30
RATE_TAG = "rate"
RATE_TTL = 30


def redact_url(url: str) -> str:
    """The Redis URL as it may be shown on a page or in a log: no password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literals need their brackets back
        host = f"[{host}]"
    netloc = f"{parts.username}:***@{host}" if parts.username else f":***@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclass(frozen=True)
class Settings:
    """What one process of the example app needs to know.

    Parameters:
        redis_url: where sessions and the cache live; ``memory://...`` is the
            embedded in-process Redis.
        secret_key: signs the session cookie; all services sharing sessions must
            use the same one.
        secret_is_default: True when ``secret_key`` is :data:`DEV_SECRET`.
        instance: shown on every page so the answering service is visible.
        report_delay: seconds the slow report takes to build (tests shorten it).
        metrics_interval: seconds between two flushes of this instance's counters
            into Redis (``METRICS_FLUSH_SECONDS``), for the fleet's /stats page.
        metrics_prefix: key prefix of the fleet's counters (``METRICS_KEY_PREFIX``):
            the instances that share it are one fleet on /stats.
    """

    redis_url: str = EMBEDDED_REDIS_URL
    secret_key: str = DEV_SECRET
    secret_is_default: bool = True
    instance: str = field(default_factory=lambda: f"pid {os.getpid()}")
    report_delay: float = 1.0
    metrics_interval: float = 5.0
    metrics_prefix: str = "ark:m:"

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, instance: str | None = None
    ) -> Settings:
        env = os.environ if environ is None else environ
        secret = env.get("SESSION_SECRET") or ""
        return cls(
            redis_url=env.get("REDIS_URL") or EMBEDDED_REDIS_URL,
            secret_key=secret or DEV_SECRET,
            secret_is_default=not secret,
            instance=instance or env.get("INSTANCE_NAME") or f"pid {os.getpid()}",
            metrics_interval=float(env.get("METRICS_FLUSH_SECONDS") or 5.0),
            metrics_prefix=env.get("METRICS_KEY_PREFIX") or "ark:m:",
        )

    @property
    def embedded(self) -> bool:
        return urlsplit(self.redis_url).scheme == "memory"

    @property
    def redis_label(self) -> str:
        if self.embedded:
            return "embedded in-process Redis"
        return redact_url(self.redis_url)

    def __repr__(self) -> str:
        # The secret and a password in the URL never show in a repr or a log.
        return (
            f"Settings(redis_url={self.redis_label!r}, instance={self.instance!r}, "
            f"secret_is_default={self.secret_is_default})"
        )
