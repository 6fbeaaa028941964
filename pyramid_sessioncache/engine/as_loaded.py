"""Objects as the database gave them, before ``load`` listeners changed them.

A ``load`` listener (a reconstructor too) may change what was loaded: it
decodes a column, counts a visit.  A hit builds objects from an entry and
sends them the ``load`` event, as a query does; an entry of what the
listeners had made would be changed twice (a decoded column decoded
again).  So a loader Session keeps, for the objects of classes with such
listeners, their values as loaded: a listener of ours (:func:`watch`),
first among the class's (and among those for every mapper, when there
are some), copies them before the others run, values that could be
changed in place included.  Columns a later query of the same load fills
in (a joined subclass's, with ``polymorphic_load="selectin"``) are kept
as the ``refresh`` event gives them, if nothing changed them since.

It is added to the classes that have such listeners once their mappers
are configured (:func:`install`), and to a class given one later the
first time an entry would hold objects of it: that entry, taken after the
listeners ran, is neither stored nor served.  Classes without listeners
get none (the ORM calls ``load`` listeners only on classes that have
some: most have none, and their loads cost nothing more).
"""

from __future__ import annotations

import copy
import pickle
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Mapper

from .. import _sqlalchemy, forks
from . import info, values

#: The loader's ``info`` key: InstanceState -> a copy of its ``__dict__`` before the ``load`` listeners ran.
AS_LOADED = "sessioncache.as_loaded"
#: The loader's ``info`` key: ``id(value) -> (value, its copy)``, of what :data:`AS_LOADED` holds copied.
COPIES = "sessioncache.as_loaded.copies"
#: The loader's ``info`` key: InstanceState -> {key: value as loaded} of the columns loaded into it after its ``load`` event.
REFRESHED = "sessioncache.as_loaded.refreshed"

_lock = forks.lock()


def install() -> None:
    """Watch every class with ``load`` listeners now, and after each configuration of mappers (once per process).

    After it, rather than as each mapper is configured: extensions add
    their listeners then (``Mutable`` in its own ``mapper_configured``).
    """
    if not event.contains(Mapper, "after_configured", _watch_listened):
        event.listen(Mapper, "after_configured", _watch_listened)
    _watch_listened()


def _watch_listened() -> None:
    for mapper in _sqlalchemy.mappers():
        if listened(mapper.class_manager):
            watch(mapper.class_manager)


def watch(manager: Any) -> bool:
    """Keep what loaders load of ``manager``'s class from now on; whether it was kept already.

    Our listener must run first: one the application inserts before it
    later (``insert=True``) puts it back in front.  A listener for every
    mapper (``event.listen(Mapper, "load", ...)``) runs before those of
    any one class: ours then joins those, in front of them.
    """
    if _first(manager):
        return True
    with _lock:
        cls = manager.class_
        if event.contains(cls, "load", _keep):
            event.remove(cls, "load", _keep)
        event.listen(cls, "load", _keep, raw=True, insert=True)
        if not event.contains(cls, "refresh", _refreshed):
            event.listen(cls, "refresh", _refreshed, raw=True, insert=True)
        if not _first(manager):
            if event.contains(Mapper, "load", _keep):
                event.remove(Mapper, "load", _keep)
            event.listen(Mapper, "load", _keep, raw=True, insert=True)
            if not event.contains(Mapper, "refresh", _refreshed):
                event.listen(Mapper, "refresh", _refreshed, raw=True, insert=True)
    return False


def _first(manager: Any) -> bool:
    for listener in manager.dispatch.load:
        return listener is _keep
    return False


def listened(manager: Any) -> bool:
    """Whether ``load`` listeners other than ours (a reconstructor too) act on the objects of ``manager``'s class."""
    return any(listener is not _keep for listener in manager.dispatch.load)


def values_of(state: Any) -> dict | None:
    """What ``state``'s object held as loaded by a loader Session, or None (not kept).

    With the columns loaded into it after its ``load`` event that nothing
    changed since (see ``_refreshed()``): one a listener or a
    ``refresh`` listener changed is left out, loaded again on access.
    """
    session = state.session
    if session is None:
        return None
    kept = session.info.get(AS_LOADED, {}).get(state)
    refreshed = session.info.get(REFRESHED, {}).get(state)
    if kept is None or not refreshed:
        return kept
    loaded = state.dict
    later = {key: loaded[key] for key, value in refreshed.items() if key in loaded and _same(loaded[key], value)}
    return {**later, **kept}


def _same(value: Any, other: Any) -> bool:
    if value is other:
        return True
    try:
        return type(value) is type(other) and bool(value == other)
    except Exception:  # an == that does not answer (an array's)
        return False


#: Stands for a value ``_refreshed()`` could not copy: never the same as any.
_CHANGED: Any = object()


def _keep(state: Any, context: Any) -> None:
    if context is not None:  # None: a hit's own load event
        session_info = context.session.info
        if session_info.get(info.LOADER):
            kept = session_info.get(AS_LOADED)
            if kept is None:
                kept = session_info[AS_LOADED] = {}
            if state not in kept:  # the first of ours to run (a class's own, and every mapper's)
                kept[state] = _copy(state, session_info.setdefault(COPIES, {}))


def _copy(state: Any, copies: dict[int, tuple[Any, Any]]) -> dict | None:
    """A copy of ``state``'s values, sharing none that could be changed in place; None when one cannot be copied.

    A listener may change a value in place (decode a field of a JSON
    ``dict``): a copy sharing it would hold what the listener made of it.
    ``copies`` (``id(value) -> (value, its copy)``) keeps one copy of a
    value, which a row may hold too (``select(Doc, Doc.data)``).
    """
    loaded = dict(state.dict)
    columns = state.mapper.column_attrs
    for key, value in loaded.items():
        if key in columns and values.may_change((value,)):
            found = copies.get(id(value))
            if found is None or found[0] is not value:
                try:
                    found = (value, _copied(value))
                except Exception:  # nothing tells its value as loaded from what a listener made of it
                    return None
                copies[id(value)] = found
            loaded[key] = found[1]
    return loaded


def _copied(value: Any) -> Any:
    """``value``, or a copy of it sharing nothing when it could be changed in place; raises when it cannot be copied."""
    if not values.may_change((value,)):
        return value
    try:
        return pickle.loads(pickle.dumps(value, pickle.HIGHEST_PROTOCOL))
    except Exception:
        return copy.deepcopy(value)


def _refreshed(state: Any, context: Any, keys: Any) -> None:
    # Columns a later query filled in (a joined subclass's, loaded by
    # polymorphic_load="selectin" after the load event; a deferred column
    # a listener read): kept as the database gave them (this runs first),
    # for values_of() to tell whether anything changed them since.
    session = _sqlalchemy.query_session(context)
    if session is not None:
        session_info = session.info
        if session_info.get(info.LOADER) and session_info.get(AS_LOADED, {}).get(state) is not None:
            if keys is None:  # every column loaded again: its load listeners' work undone
                session_info[AS_LOADED][state] = None
                return
            refreshed = session_info.setdefault(REFRESHED, {}).setdefault(state, {})
            loaded = state.dict
            for key in keys:
                if key in loaded and key not in refreshed:
                    try:
                        refreshed[key] = _copied(loaded[key])
                    except Exception:
                        refreshed[key] = _CHANGED


def copies_of(state: Any) -> dict[int, tuple[Any, Any]]:
    """The copies :func:`values_of` holds, of the values loaded with ``state``: ``id(value) -> (value, its copy)``."""
    session = state.session
    return {} if session is None else session.info.get(COPIES, {})
