"""The ``ext:local_session`` Beaker namespace: cache storage on a Session.

Values are kept in the Session's ``info`` dictionary, so they live exactly
as long as the Session's current transaction (the engine's hook drops
them when the transaction ends) and can never be seen by another Session.
A hit therefore hands back the very objects of the Session's identity map.
A Session keeps at most ``max_items`` entries per namespace (the least
recently used go first), so a request that runs a flood of distinct
queries cannot hold on to all their objects.

This is the namespace of SQLAlchemy's old ``examples/beaker_caching``
(``local_session_caching.py``), kept compatible with its
``create_session_container(beaker_name, scoped_session)`` on today's Beaker.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from beaker.container import AbstractDictionaryNSManager

from ... import forks
from ..._weak import members
from ...errors import SessionCacheError

#: Entries a Session keeps per ``ext:local_session`` region unless
#: ``max_items`` says otherwise: enough for any page, few enough that a
#: long transaction of distinct queries (a batch job) does not make every
#: garbage collection walk thousands of results.
DEFAULT_MAX_ITEMS = 1000

#: Where a Session keeps its local cache: ``session.info[INFO_KEY]`` maps a
#: namespace name to a dictionary of entries.
INFO_KEY = "sessioncache.local"


class SessionEntries(OrderedDict):
    """The entries of one namespace on one Session: at most ``max_items``, least recently used out first.

    One Session is used by one thread at a time: no lock.  A reader that
    serves a hit calls ``move_to_end(key)``.
    """

    def __init__(self, max_items: int = DEFAULT_MAX_ITEMS) -> None:
        super().__init__()
        self.max_items = max_items

    def __setitem__(self, key: Any, value: Any) -> None:
        OrderedDict.__setitem__(self, key, value)
        self.move_to_end(key)
        if len(self) > self.max_items:
            self.popitem(last=False)


class ScopedSessionNamespace(AbstractDictionaryNSManager):
    """A Beaker namespace that stores its entries on a SQLAlchemy Session.

    Beaker builds it with the namespace name and the region's options.  The
    Session is found, in this order, from ``session`` (a Session this
    namespace is bound to), then ``scoped_session`` (called to get the
    current Session).  Within pyramid_sessioncache the ORM hook binds the
    namespace to the Session that runs the query.  A Session keeps at most
    ``max_items`` entries in the namespace, the least recently used out first.

    Example, as in SQLAlchemy's old beaker_caching example::

        ScopedSessionNamespace.create_session_container("ext:local_session", Session)
        cache = beaker.cache.Cache("people", type="ext:local_session")
    """

    #: The ``scoped_session`` used when no Session is bound.
    scoped_session: Callable[[], Any] | None = None

    def __init__(
        self,
        namespace: str,
        session: Any = None,
        scoped_session: Any = None,
        max_items: int = DEFAULT_MAX_ITEMS,
        **kw: Any,
    ):
        AbstractDictionaryNSManager.__init__(self, namespace)
        self.session = session
        self.max_items = max_items
        if scoped_session is not None:
            self.scoped_session = scoped_session

    @classmethod
    def create_session_container(cls, beaker_name: str, scoped_session: Callable[[], Any]) -> type:
        """Register the Beaker cache type ``beaker_name``, storing on ``scoped_session()``.

        Returns the namespace class registered, a subclass of this one.
        Works on Beaker >= 1.13, whose ``beaker.cache.clsmap`` no longer
        accepts item assignment.
        """
        from ..._beaker import register_backend

        container = type(
            "ScopedSessionNamespace_" + beaker_name.replace(":", "_"),
            (cls,),
            {"scoped_session": staticmethod(scoped_session)},
        )
        register_backend(beaker_name, container)
        return container

    @property
    def dictionary(self) -> dict:
        """The entries of this namespace on the current Session."""
        session = self.session
        if session is None:
            if self.scoped_session is None:
                raise SessionCacheError(
                    f"the ext:local_session namespace {self.namespace!r} has no Session: "
                    "bind one with ScopedSessionNamespace.create_session_container("
                    "name, scoped_session), or use the namespace through a cached query"
                )
            session = self.scoped_session()
        return namespace_entries(session, self.namespace, self.max_items)


class Kept(dict):
    """The local namespaces kept on one Session: namespace name -> its entries.

    ``drops`` counts the times another thread emptied it (see
    :func:`drop_everywhere`), which never changes the Session's ``info``
    itself: the Session's own thread may be reading that.
    """

    __slots__ = ("drops",)

    def __init__(self) -> None:
        super().__init__()
        self.drops = 0


#: The Sessions that have kept entries (see :func:`drop_everywhere`).
_keeping: weakref.WeakSet[Any] = weakref.WeakSet()
#: Held to drop every Session's entries, and to mark one's (see :func:`mark`);
#: a process forked while another thread held it finds it released.  Re-entrant:
#: a garbage collection while it is held may finalize a lost Session's
#: connection, whose unpublished writes its pool check-in publishes, which
#: drops every Session's entries again, in the same thread.
_dropping = forks.rlock()


def entries(session: Any) -> Kept:
    """Return the local namespaces kept on ``session``, made on first use."""
    found = session.info.get(INFO_KEY)
    if found is None:
        found = session.info[INFO_KEY] = Kept()
        _keeping.add(session)
    return found


def namespace_entries(session: Any, namespace: str, max_items: int = DEFAULT_MAX_ITEMS) -> SessionEntries:
    """Return the entries of ``namespace`` kept on ``session`` (at most ``max_items``), made on first use."""
    namespaces = entries(session)
    found = namespaces.get(namespace)
    if found is None:
        found = namespaces[namespace] = SessionEntries(max_items)
    return found


def drop(session: Any) -> None:
    """Forget every ``ext:local_session`` entry kept on ``session``: from the thread using it."""
    session.info.pop(INFO_KEY, None)


def drop_everywhere() -> None:
    """Forget the entries every Session of the process keeps, whatever thread uses it.

    An entry holds its objects, and so keeps them in their Session's
    identity map after the application let them go.  Once a commit makes
    the entry void, such an object is stale: a later query of the Session,
    cached or not, would find it there and, as the ORM does with the
    objects it holds, not overwrite it with the rows it reads.  Without the
    entry it would be gone, and read afresh.  Another thread may be reading
    or filling a Session's entries meanwhile: it keeps what it holds, and
    what it stores after a drop began it drops itself (see :func:`mark`).
    """
    with _dropping:
        for session in members(_keeping):
            found = session.info.get(INFO_KEY)
            if found is not None:
                found.drops += 1
                found.clear()


def mark(session: Any) -> tuple[Kept, int]:
    """A mark of ``session``'s entries as they are now, for :func:`dropped_since`."""
    with _dropping:  # never between a drop's count and its emptying
        found = entries(session)
        return found, found.drops


def dropped_since(session: Any, marked: tuple[Kept, int]) -> bool:
    """Whether ``session``'s entries were dropped, here or by another thread, since :func:`mark` gave ``marked``.

    What the Session stored since may hold objects a void entry kept alive,
    as they were.  A drop after this answer empties what was stored before it.
    """
    found, drops = marked
    return session.info.get(INFO_KEY) is not found or found.drops != drops
