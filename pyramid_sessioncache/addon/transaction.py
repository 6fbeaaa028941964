"""How ``request.dbsession`` joins the request's transaction: zope.sqlalchemy, registered once.

``zope.sqlalchemy.register(session)`` adds seven listeners to every new
Session, which costs most of what making ``request.dbsession`` costs.
Here the same listeners are registered once, on the session factory
(:func:`register`), and each Session says which transaction manager it
joins in its ``info`` (:data:`TRANSACTION_MANAGER`, the request's
``request.tm``): a Session without one, such as one a script makes with
the same factory, is left alone.

A cache hit needs no connection: instead of beginning the Session's
transaction on a connection (see
:func:`pyramid_sessioncache.engine.lookup.join_without_connection`), a hit
joins the Session to the request's transaction (:func:`join`), as
zope.sqlalchemy does at ``after_begin``.  The Session's own transaction
then exists without a connection, so savepoints, ``abort()`` and the flush
at commit cover changes made to the objects of a hit exactly as they cover
a Session that ran a query; a request that only read from the cache checks
out no connection, and its transaction has nothing to commit.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from sqlalchemy import event
from transaction.interfaces import NoTransaction
from zope.sqlalchemy.datamanager import (
    _SESSION_STATE,
    STATUS_ACTIVE,
    ZopeTransactionEvents,
    join_transaction,
    mark_changed,
)

#: The ``info`` key of a Session holding the transaction manager it joins.
TRANSACTION_MANAGER = "pyramid_sessioncache.transaction_manager"
#: The ``info`` key of a Session made while pyramid_tm managed its request's
#: transaction: the WSGI environ of the request whose tween does (its own;
#: a subrequest's parent's), see ``request_ended()``.
MANAGED_ENVIRON = "pyramid_sessioncache.managed_environ"

_EVENTS = (
    "after_begin",
    "after_attach",
    "after_flush",
    "after_bulk_update",
    "after_bulk_delete",
    "before_commit",
    "do_orm_execute",
)


def manager_of(session: Any) -> Any:
    """Return the transaction manager ``session`` joins (its ``info``), or None."""
    return session.info.get(TRANSACTION_MANAGER)


class RequestTransactionEvents(ZopeTransactionEvents):
    """zope.sqlalchemy's listeners, for the transaction manager each Session names.

    The methods of :class:`zope.sqlalchemy.datamanager.ZopeTransactionEvents`,
    reading the transaction manager from the Session's ``info`` instead of
    the instance: one instance serves every Session of a factory, whatever
    request (and manager: ``tm.manager_hook``) it belongs to.  A Session
    that names no manager joins nothing.
    """

    def __init__(self) -> None:
        super().__init__(initial_state=STATUS_ACTIVE, transaction_manager=None, keep_session=False)

    def after_begin(self, session: Any, transaction: Any, connection: Any) -> None:
        self.join_transaction(session)

    def after_attach(self, session: Any, instance: Any) -> None:
        self.join_transaction(session)

    def after_flush(self, session: Any, flush_context: Any) -> None:
        self.mark_changed(session)

    def after_bulk_update(self, update_context: Any) -> None:
        self.mark_changed(update_context.session)

    def after_bulk_delete(self, delete_context: Any) -> None:
        self.mark_changed(delete_context.session)

    def before_commit(self, session: Any) -> None:
        manager = manager_of(session)
        if manager is not None:  # zope.sqlalchemy's own check, with its own message
            ZopeTransactionEvents(transaction_manager=manager).before_commit(session)

    def do_orm_execute(self, execute_state: Any) -> None:
        if execute_state.is_orm_statement and (
            execute_state.is_update or execute_state.is_insert or execute_state.is_delete
        ):
            self.mark_changed(execute_state.session)

    def mark_changed(self, session: Any) -> None:
        """Mark ``session`` as changed in its transaction manager's transaction (see zope.sqlalchemy)."""
        manager = manager_of(session)
        if manager is not None:
            mark_changed(session, manager, self.keep_session)

    def join_transaction(self, session: Any) -> None:
        """Join ``session`` to its transaction manager's transaction (see zope.sqlalchemy).

        Once pyramid_tm has ended its request's transaction
        (``request_ended()``), only a transaction in progress (an
        application's ``with transaction.manager:``) is joined: a read in
        a finished callback would begin a transaction of the thread's
        manager that nobody ends, holding the Session, its request and a
        connection until the thread's next request.  It runs outside any,
        and the add-on closes the Session after the last finished callback;
        used after that (a pyramid_retry ``BeforeRetry`` subscriber, a
        streamed response), it is closed as the thread's next request
        begins (``note_late()``).
        """
        manager = manager_of(session)
        if manager is None:
            return
        if request_ended(session) and not in_progress(manager):
            note_late(session)
            return
        join_transaction(session, self.initial_state, manager, self.keep_session)


#: The Sessions of this thread begun again once their request ended (see ``note_late()``).
_late = threading.local()


def note_late(session: Any) -> None:
    """Remember ``session``, begun again once its request ended, to be closed as the thread's next request begins.

    Nothing ends its transaction otherwise: its connection stayed checked
    out until the garbage collector found the request.  zope.sqlalchemy
    would join it to the thread's implicit transaction, which the next
    ``begin()`` aborts: closed as the next request (a retried request's
    next attempt) begins, it gives its connection back as soon, and
    begins no transaction of the manager (an explicit one would refuse
    the next ``begin()``).  Remembered weakly: one nothing else holds is
    the collector's.  See ``session.close_late_sessions()``.
    """
    sessions = getattr(_late, "sessions", None)
    if sessions is None:
        sessions = _late.sessions = weakref.WeakSet()
    sessions.add(session)


def forget_late(session: Any) -> bool:
    """Forget ``session`` if ``note_late()`` noted it in this thread; return whether it had."""
    sessions = getattr(_late, "sessions", None)
    if sessions is None or session not in sessions:
        return False
    sessions.discard(session)
    return True


def take_late() -> list[Any]:
    """Return the Sessions of this thread ``note_late()`` noted, and forget them."""
    sessions = getattr(_late, "sessions", None)
    if not sessions:
        return []
    taken = list(sessions)
    sessions.clear()
    return taken


def request_ended(session: Any) -> bool:
    """Whether pyramid_tm has ended the transaction of the request ``session`` was made for.

    pyramid_tm removes ``tm.active`` from the request's environ as it
    commits or aborts.  A Session made outside pyramid_tm's tween (a
    script's request; a request pyramid_tm's ``activate_hook`` declined)
    is never "ended": it joins whatever transaction its manager has, as
    zope.sqlalchemy does.
    """
    environ = session.info.get(MANAGED_ENVIRON)
    return environ is not None and "tm.active" not in environ


def in_managed_transaction(session: Any) -> bool:
    """Whether the pyramid_tm transaction ``session`` was made in is still running.

    So is a subrequest's (``invoke_subrequest(..., use_tweens=False)``)
    as its subrequest finishes: it joined its parent's transaction, which
    ends later.  zope.sqlalchemy closes it then, after committing the
    changes it had not flushed (those made to the objects of a hit);
    closed as the subrequest finished, it lost them.
    """
    environ = session.info.get(MANAGED_ENVIRON)
    return environ is not None and "tm.active" in environ


def joined(session: Any) -> bool:
    """Whether ``session`` is joined to a transaction that has not ended (zope.sqlalchemy closes it when it does).

    zope.sqlalchemy keeps a joined Session's state in the private
    ``_SESSION_STATE`` (zope.sqlalchemy 1.x to 3.x), set as it joins and
    removed as the transaction ends: there is no public question.  A
    Session whose join failed (``NoTransaction`` from a subrequest's own
    explicit manager) has a connection and no transaction to close it.
    """
    return _SESSION_STATE.get(session) is not None


def in_progress(manager: Any) -> bool:
    """Whether ``manager`` has a transaction in progress, without beginning one.

    ``get()`` of a manager in explicit mode raises ``NoTransaction`` when
    it has none, where an implicit one begins one: the question is asked
    in explicit mode (``explicit`` is per thread for the thread's manager).
    A manager without that mode is taken to have one.
    """
    explicit = getattr(manager, "explicit", None)
    if explicit is None:
        return True
    try:
        manager.explicit = True
        manager.get()
        return True
    except NoTransaction:
        return False
    finally:
        manager.explicit = explicit


def join(session: Any) -> None:
    """Join ``session`` to the transaction of the manager it names, without a connection.

    What a cache hit calls instead of beginning the Session's transaction
    on a connection (see the module docstring): zope.sqlalchemy's join,
    which begins the Session's transaction (in SQLAlchemy 2, one that
    checks out no connection until a statement needs it).  Does nothing
    for a Session that names no transaction manager, or that has joined.
    """
    EVENTS.join_transaction(session)


def mark_changed_as_registered(session: Any, manager: Any) -> None:
    """Mark ``session`` changed in its transaction, joining it the way the Session joins by itself.

    A Session that names its manager (:data:`TRANSACTION_MANAGER`) joins
    that one's transaction; one registered with ``zope.sqlalchemy.register()``
    (the application's own ``request.dbsession``) joins through that
    registration's "developer interface", with its manager and its
    ``keep_session``: zope.sqlalchemy's plain ``mark_changed()`` would
    join with ``keep_session=False``, and the Session of an application that
    asked to keep it would be closed at commit, its objects detached.  Any
    other joins ``manager``'s transaction, as the plain one does.
    """
    if manager_of(session) is not None:
        EVENTS.mark_changed(session)
        return
    for listener in session.dispatch.after_flush:
        registered = getattr(listener, "__self__", None)
        if isinstance(registered, ZopeTransactionEvents) and not isinstance(registered, RequestTransactionEvents):
            registered.mark_changed(session)
            return
    mark_changed(session, manager)


#: The one set of listeners: it holds no state of its own.
EVENTS = RequestTransactionEvents()


#: The session factories :func:`register` has registered :data:`EVENTS` on.
_REGISTERED: weakref.WeakSet[Any] = weakref.WeakSet()


def register(factory: Any) -> RequestTransactionEvents:
    """Register :data:`EVENTS` on ``factory`` (a ``sessionmaker``), once; return them.

    Sessions the factory makes then join the transaction manager named in
    their ``info`` under :data:`TRANSACTION_MANAGER`, and only those.
    Whether it was done is remembered here, not asked of
    ``event.contains()``: SQLAlchemy keys a factory's listeners by its
    ``id()`` and keeps the key after the factory is gone, so a new factory
    at the address of a dead one would seem to have them.
    """
    if factory not in _REGISTERED:
        for name in _EVENTS:
            event.listen(factory, name, getattr(EVENTS, name))
        _REGISTERED.add(factory)
    return EVENTS
