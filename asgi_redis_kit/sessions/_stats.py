"""SessionStats: the counters a session store keeps, for a metrics system to read."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass
class SessionStats:
    """Counters since the store was created: plain ints, incremented in place
    where each thing happens (the middleware and the store share one).

    ``loaded``: a cookie's session found in Redis (or the near cache);
    ``not_found``: a validly signed cookie whose session is gone (expired,
    revoked, logged out); ``created``: new sessions stored; ``saved``: writes
    of changed data to an existing session; ``touched``: idle-TTL refreshes
    of an unchanged one; ``regenerated``: new ids that continue a session
    (``regenerate()``, login); ``cleared``: ``clear()`` committed (logout);
    ``revoked``: sessions deleted by ``revoke_user``/``revoke_session``;
    ``unavailable``: requests answered 503 because Redis did not answer;
    ``websocket_closes``: websockets closed with 1013 for the same reason.
    Redis errors and timeouts are the backend's (``store.backend.calls``).
    """

    loaded: int = 0
    not_found: int = 0
    created: int = 0
    saved: int = 0
    touched: int = 0
    regenerated: int = 0
    cleared: int = 0
    revoked: int = 0
    unavailable: int = 0
    websocket_closes: int = 0

    def reset(self) -> None:
        for each in fields(self):
            setattr(self, each.name, 0)

    def as_dict(self) -> dict[str, Any]:
        return {each.name: getattr(self, each.name) for each in fields(self)}
