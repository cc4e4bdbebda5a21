"""The stand-in for a session whose load failed: it fails closed on first use.

A request that never touches its session is answered normally; one that does gets
the 503 of :class:`~asgi_redis_kit.errors.SessionStoreUnavailable` instead of an
anonymous session that would overwrite or fork the real one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NoReturn

from ..errors import SessionStoreUnavailable
from ._saving import CookieAction
from ._session import Session
from ._store import SessionStore


class UnavailableSession(Session):
    """Stands in for a session whose load failed (Redis down or too slow).

    A request that never touches its session is answered normally, cookie or not;
    the first use of this one -- ``request.session``, any read or write of the
    mapping, :meth:`incr`, :meth:`regenerate`, :meth:`clear`, :meth:`bind_user`,
    :attr:`user_id`... -- raises :class:`SessionStoreUnavailable` (a 503). It is
    never saved and never sets a cookie, so nothing stored is overwritten.
    """

    def __init__(self, store: SessionStore, *, retry_after: int) -> None:
        super().__init__(store, retry_after=retry_after)

    def _fail(self) -> NoReturn:
        self.accessed = True
        self._store_failed = True
        raise SessionStoreUnavailable(self._retry_after)

    def __repr__(self) -> str:
        return "<Session unavailable: the session store did not answer>"

    def _changed_since_save(self) -> bool:
        return False  # nothing can change it: every write raises

    def _changed_this_request(self) -> bool:
        return False

    # Starlette's request.session calls this: asking for the session is using it.
    def mark_accessed(self) -> None:
        self._fail()

    @property
    def is_new(self) -> bool:
        self._fail()

    @property
    def handle(self) -> str | None:
        self._fail()

    @property
    def user_id(self) -> str | None:
        self._fail()

    def regenerate(self) -> None:
        self._fail()

    def clear(self) -> None:
        self._fail()

    def bind_user(self, user_id: str) -> None:
        self._fail()

    async def incr(self, key: str, amount: int = 1) -> int:
        self._fail()

    def __getitem__(self, key: str) -> Any:
        self._fail()

    def __setitem__(self, key: str, value: Any) -> None:
        self._fail()

    def __delitem__(self, key: str) -> None:
        self._fail()

    def __contains__(self, key: object) -> bool:
        self._fail()

    def __iter__(self) -> Iterator[str]:
        self._fail()

    def __reversed__(self) -> Iterator[str]:
        self._fail()

    def __len__(self) -> int:
        self._fail()

    def __eq__(self, other: object) -> bool:
        self._fail()

    def __ne__(self, other: object) -> bool:
        self._fail()

    __hash__ = None  # type: ignore[assignment]

    def __or__(self, other: Any) -> Any:
        self._fail()

    def __ror__(self, other: Any) -> Any:
        self._fail()

    def __ior__(self, other: Any) -> Any:
        self._fail()

    def get(self, *args: Any) -> Any:
        self._fail()

    def keys(self) -> Any:
        self._fail()

    def values(self) -> Any:
        self._fail()

    def items(self) -> Any:
        self._fail()

    def pop(self, *args: Any) -> Any:
        self._fail()

    def popitem(self) -> tuple[str, Any]:
        self._fail()

    def setdefault(self, *args: Any) -> Any:
        self._fail()

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._fail()

    def copy(self) -> dict[str, Any]:
        self._fail()

    async def _save(self) -> CookieAction | None:
        return None  # never saved: there is nothing loaded to save over
