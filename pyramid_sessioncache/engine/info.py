"""The keys the add-on keeps in ``Session.info``, in one place.

A Session carries the add-on's state for the length of its transaction or
its life; every key starts with ``"sessioncache"`` (:func:`own_key`), so a
throw-away loader Session can be given a copy of the caller's ``info``
without them.
"""

from __future__ import annotations

from typing import Any

from ..storage.backends.local_session import INFO_KEY as LOCAL

__all__ = ["CACHE", "DECLARED", "LOADER", "LOCAL", "LOOKUPS", "SNAPSHOTS", "WRITTEN", "own_key"]

#: The :class:`~pyramid_sessioncache.SessionCache` a Session caches into.
CACHE = "sessioncache"
#: The Session's recent look-ups (a bounded deque of ``Lookup``).
LOOKUPS = "sessioncache.lookups"
#: The tables the current transaction wrote: a set, present as soon as it
#: wrote anything, even when which tables is unknown.
WRITTEN = "sessioncache.written"
#: The tables the current transaction declared written
#: (:func:`~pyramid_sessioncache.invalidate_tables`): published at commit.
DECLARED = "sessioncache.declared"
#: Whether the current transaction reads from the snapshot of its first
#: statement, per Connection, once its database transaction has begun
#: (see ``loader.reads_a_snapshot()``): dropped when the transaction ends.
SNAPSHOTS = "sessioncache.snapshots"
#: Flags the throw-away Sessions that load values to cache; the ORM hook
#: leaves their statements alone.
LOADER = "sessioncache.loader"


def own_key(key: Any) -> bool:
    """Whether ``key`` of a ``Session.info`` is one of the add-on's."""
    return isinstance(key, str) and key.startswith(CACHE)
