"""Objects a query's eager rows refresh though its result does not reach them.

A joined or subquery eager load reads the related rows of every parent
row.  The ORM fills a relationship the parent lacks from them; one that a
parent the Session held had loaded already, it leaves as it is, yet it
still refreshes every object those rows hold (an expired attribute of one
is loaded again).  Where that relationship is stale (another program added
a related row since it was loaded, or it was loaded under other criteria),
the rows hold an object it lacks.  A local hit checks the objects its
result reaches (``values.reached()``): it would serve that one as it is,
expired, where the query refreshes it.

The ORM's ``refresh`` event names, for each object it found in the Session
and filled in partly, the attributes it loads (``to_load``); a relationship
loaded before is not among them.  While a local entry loads
(:func:`watching`), a listener notes whether such an object had one loaded
that the query reads from rows (``found`` of :class:`Watch`).  Such an entry is
kept with the objects the Session held then, and what each had expired
(``values.session_snapshot()``); a hit on it requires the same objects,
none expired since (``values.holds_as_snapshot()``): whatever objects the
rows held are then as the query left them.  (An attribute unloaded without being marked
expired, by ``session.expire(obj, [key])``, drops the Session's entries:
see ``hook.py``.)  A Session of more than ``values.MAX_SCANNED`` objects
is not scanned: the entry is not kept.

The listener is installed once per process (:func:`install`); outside a
watched load it costs one look-up in the Session's ``info`` for each object
a query fills in partly.  Objects a query loads anew send ``load``, not
``refresh``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Mapper, Session

from .. import _sqlalchemy

#: The :class:`Watch` of the local load running on each Session, by ``Session.hash_key``: empty
#: most of the time, when the listener returns at once.  A Session is used by one thread at a time.
_WATCHES: dict[int, Watch] = {}


class Watch:
    """What :func:`watching` found: ``found`` once the rows may have held an object the result does not reach."""

    __slots__ = ("found", "keys")

    def __init__(self, keys: frozenset[str] | None) -> None:
        #: The relationships the query's options load from rows (None: maybe any).
        self.keys = keys
        self.found = False


def install() -> None:
    """Listen to the ``refresh`` event of every mapped class, once per process."""
    if not event.contains(Mapper, "refresh", _refreshed):
        event.listen(Mapper, "refresh", _refreshed, raw=True)


@contextmanager
def watching(session: Session, statement: Any) -> Iterator[Watch]:
    """Watch the loads ``statement`` runs on ``session`` (its eager loads' queries too) until the block ends.

    A load watched inside another (a listener's query) tells the outer
    one what it found: the outer entry holds what both refreshed.
    """
    watch = Watch(_sqlalchemy.row_eager_relationship_keys(statement))
    key = session.hash_key
    outer = _WATCHES.get(key)
    _WATCHES[key] = watch
    try:
        yield watch
    finally:
        if outer is None:
            del _WATCHES[key]
        else:
            _WATCHES[key] = outer
            outer.found = outer.found or watch.found


def _refreshed(state: Any, context: Any, to_load: Any) -> None:
    if not _WATCHES:
        return
    session = _sqlalchemy.query_session(context)
    if session is None:  # no query, no rows: a shared hit's objects, a composite built from its columns
        return
    watch = _WATCHES.get(session.hash_key)
    if watch is None or watch.found or to_load is None:  # None: every attribute (a refresh, populate_existing)
        return
    loaded = state.dict
    keys = watch.keys
    for prop in state.mapper.relationships:
        key = prop.key
        if key in loaded and key not in to_load and (keys is None or key in keys or prop.lazy in _sqlalchemy.ROW_EAGER):
            watch.found = True
            return
