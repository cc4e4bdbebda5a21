"""The session cookie: signing the id, reading it back, building ``Set-Cookie``.

The cookie carries nothing but the session id signed with itsdangerous (HMAC-SHA256,
a salt of our own so a token signed for another purpose with the same secret is
rejected). There is no timestamp in it: expiry is decided by Redis and the
server-side creation time, so clock skew between app servers cannot reject a
valid cookie (itsdangerous issue #400 does not apply).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from typing import Literal

from itsdangerous import BadData, Signer
from itsdangerous.signer import HMACAlgorithm
from starlette.datastructures import Secret

# Re-exported for the cache, which imports it from here until it moves to _http too.
from .._http import cookie_values as cookie_values
from ..errors import CookieTooLarge

SALT = "asgi_redis_kit.session"
# secrets.token_urlsafe(32): 32 random bytes, 43 url-safe base64 characters.
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{43}")
# id (43) + "." + base64 HMAC-SHA256 (43); anything much longer is not ours, so we
# do not even spend an HMAC on it.
_MAX_COOKIE_VALUE = 128
# Verified cookie values remembered per signer (~200 bytes each).
_MAX_VERIFIED = 4096
# RFC 6265 cookie-name is an RFC 7230 token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Path and Domain must not smuggle another attribute or header.
_ATTRIBUTE_VALUE = re.compile(r"[\x21-\x3a\x3c-\x7e]+")
MAX_SET_COOKIE = 4096
# Used to size the longest header we could ever emit.
_LONGEST_VALUE = "x" * 87
_LONGEST_MAX_AGE = 10**10

SameSite = Literal["lax", "strict", "none"]


class _HMACSHA256(HMACAlgorithm):
    """itsdangerous' HMAC-SHA256, computed by OpenSSL in one call."""

    def __init__(self) -> None:
        super().__init__(hashlib.sha256)

    def get_signature(self, key: bytes, value: bytes) -> bytes:
        return hmac.digest(key, value, "sha256")


class _Signer(Signer):
    """itsdangerous' Signer, deriving each key once instead of on every cookie."""

    def __init__(self, secret_key: str | list[str]) -> None:
        super().__init__(
            secret_key, salt=SALT, digest_method=hashlib.sha256, algorithm=_HMACSHA256()
        )
        self._derived: dict[str | bytes | None, bytes] = {}

    def derive_key(self, secret_key: str | bytes | None = None) -> bytes:
        try:
            return self._derived[secret_key]
        except KeyError:
            key = self._derived[secret_key] = super().derive_key(secret_key)
            return key


class CookieSigner:
    """Signs session ids and verifies them with any of the configured keys.

    Parameters:
        secret_key: one key, or a list from oldest to newest (itsdangerous'
            order). The newest signs; all verify, so keys can be rotated without
            logging everyone out.
    """

    def __init__(self, secret_key: str | Secret | Sequence[str]) -> None:
        if isinstance(secret_key, Secret):
            secret_key = str(secret_key)
        keys = [secret_key] if isinstance(secret_key, str) else list(secret_key)
        if not keys or not all(isinstance(key, str) and key for key in keys):
            raise ValueError(
                "secret_key must be a non-empty string or a list of them (oldest first, "
                "newest last); generate one with `python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'`"
            )
        self._newest = _Signer(keys[-1])
        # Only built when rotating: verifying an old-key cookie costs one more HMAC.
        self._older = _Signer(keys[:-1]) if len(keys) > 1 else None
        # Cookies that verified, and what they gave: a browser sends the same cookie
        # on every request, and the HMAC through itsdangerous was ~7% of a visit
        # counter's CPU. Only valid values get in, so garbage cannot fill it.
        self._verified: dict[str, tuple[str, bool]] = {}

    def __repr__(self) -> str:
        return "<CookieSigner keys=hidden>"

    def sign(self, session_id: str) -> str:
        return self._newest.sign(session_id).decode("ascii")

    def unsign(self, value: str) -> tuple[str, bool] | None:
        """The session id in ``value`` and whether it must be re-signed with the
        newest key, or ``None`` when the value is not a valid cookie of ours."""
        known = self._verified.get(value)
        if known is not None:
            return known
        if len(value) > _MAX_COOKIE_VALUE or not value.isascii():
            return None
        resign = False
        try:
            raw = self._newest.unsign(value)
        except BadData:
            if self._older is None:
                return None
            try:
                raw = self._older.unsign(value)
            except BadData:
                return None
            resign = True
        session_id = raw.decode("ascii")
        if _SESSION_ID.fullmatch(session_id) is None:
            return None
        if len(self._verified) >= _MAX_VERIFIED:
            self._verified.clear()  # simple, and safe if threads share the signer
        verified = self._verified[value] = (session_id, resign)
        return verified


class CookieSettings:
    """The attributes of the session cookie, validated once at startup."""

    def __init__(
        self,
        *,
        cookie_name: str,
        same_site: SameSite,
        secure: bool | Literal["auto"],
        path: str,
        domain: str | None,
        partitioned: bool,
        host_prefix: bool,
        browser_session: bool,
    ) -> None:
        if not isinstance(browser_session, bool):
            raise TypeError(f"browser_session must be True or False, got {browser_session!r}")
        if not isinstance(cookie_name, str) or _TOKEN.fullmatch(cookie_name) is None:
            raise ValueError(f"cookie_name={cookie_name!r} is not a valid cookie name")
        if same_site not in ("lax", "strict", "none"):
            raise ValueError(f"same_site must be 'lax', 'strict' or 'none', got {same_site!r}")
        if secure not in (True, False, "auto"):
            raise ValueError(f"secure must be True, False or 'auto', got {secure!r}")
        if not path.startswith("/") or _ATTRIBUTE_VALUE.fullmatch(path) is None:
            raise ValueError(f"path={path!r} must start with '/' and contain no ';' or spaces")
        if domain is not None and _ATTRIBUTE_VALUE.fullmatch(domain) is None:
            raise ValueError(f"domain={domain!r} is not a valid cookie domain")
        if host_prefix:
            # Browsers drop __Host- cookies that are not Secure, have a Domain or
            # another Path; refuse such a config rather than fail silently in the field.
            if secure is False:
                raise ValueError("host_prefix=True needs a Secure cookie; drop secure=False")
            if domain is not None:
                raise ValueError(f"host_prefix=True forbids a Domain; drop domain={domain!r}")
            if path != "/":
                raise ValueError(f"host_prefix=True needs path='/', got path={path!r}")
            # A __Host- cookie is always Secure (browsers accept that on localhost too).
            secure = True
        if same_site == "none" and secure is False:
            raise ValueError("same_site='none' needs a Secure cookie; drop secure=False")
        if partitioned and secure is False:
            raise ValueError("partitioned=True needs a Secure cookie; drop secure=False")
        self.name = f"__Host-{cookie_name}" if host_prefix else cookie_name
        self.secure = secure
        attributes = [f"Path={path}"]
        if domain is not None:
            attributes.append(f"Domain={domain}")
        attributes += ["HttpOnly", f"SameSite={same_site.capitalize()}"]
        self._attributes = "; ".join(attributes)
        self._partitioned = partitioned
        # No Max-Age (nor Expires): the browser drops the cookie when it closes.
        self._lifetime = not browser_session
        longest = self.set_cookie(_LONGEST_VALUE, _LONGEST_MAX_AGE, scheme="https")
        if len(longest) > MAX_SET_COOKIE:
            raise CookieTooLarge(
                f"the session Set-Cookie header would be {len(longest)} bytes, over the "
                f"{MAX_SET_COOKIE} browsers accept; shorten cookie_name, path or domain"
            )

    def _tail(self, scheme: str) -> str:
        tail = self._attributes
        if self.secure is True or (self.secure == "auto" and scheme in ("https", "wss")):
            tail += "; Secure"
        if self._partitioned:
            tail += "; Partitioned"
        return tail

    def set_cookie(self, value: str, max_age: int, *, scheme: str) -> str:
        if not self._lifetime:
            return f"{self.name}={value}; {self._tail(scheme)}"
        return f"{self.name}={value}; Max-Age={max_age}; {self._tail(scheme)}"

    def expire_cookie(self, *, scheme: str) -> str:
        # Expires as well as Max-Age=0 for clients that only know Expires.
        return (
            f"{self.name}=; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT; {self._tail(scheme)}"
        )
