"""What a lookup found, as the request flow reads it: one :func:`classify`
for every step that looks at a :class:`~._storage.Lookup` (the first lookup,
the re-read after waiting for a leader here or in another process, the polls
while another process holds the lease).

The outcomes, a small tagged union:

* :class:`Fresh`: serve the entry (a hit);
* :class:`Stale`: the entry is past its freshness but inside a window that
  still lets it be used: ``"revalidate"`` (``stale_while_revalidate``: serve it
  and refresh in the background) or ``"error"`` (``stale_if_error``: run the
  app and serve it only if the app fails);
* :class:`Absent`: nothing usable; ``token`` is the lease the lookup took for
  the caller (it stores with it or releases it), ``locked`` says another
  holder has it;
* :class:`SessionGone`: a per-user entry whose session no longer exists
  (logged out, revoked, expired): none of its pages are served.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ._entry import Entry
from ._storage import Lookup


@dataclass(frozen=True, slots=True)
class Fresh:
    entry: Entry


@dataclass(frozen=True, slots=True)
class Stale:
    entry: Entry
    window: Literal["revalidate", "error"]


@dataclass(frozen=True, slots=True)
class Absent:
    token: str | None = None
    locked: bool = False


@dataclass(frozen=True, slots=True)
class SessionGone:
    # A lease the lookup may have taken anyway (the session store is another
    # server, asked concurrently): the caller releases it.
    token: str | None = None


Outcome = Fresh | Stale | Absent | SessionGone


def classify(found: Lookup, now: float) -> Outcome:
    """What ``found`` means at ``now``. A lookup takes a lease only when the
    entry key is absent, so an entry and a token never come together."""
    if found.session_gone:
        return SessionGone(found.token)
    entry = found.entry
    if entry is not None:
        if entry.is_fresh(now):
            return Fresh(entry)
        if entry.in_revalidate_window(now):
            return Stale(entry, "revalidate")
        if entry.in_error_window(now):
            return Stale(entry, "error")
    return Absent(found.token, found.locked)
