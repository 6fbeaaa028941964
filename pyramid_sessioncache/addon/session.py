"""The request's SQLAlchemy Session and its end-of-request clean-up.

``request.dbsession`` is a Session per request, joined to the request's
transaction (``request.tm``) through zope.sqlalchemy, and closed when the
request finishes, error or not.  :data:`~pyramid_sessioncache.Session` is a ``scoped_session``
for code in the style of ``meta.Session``: scoped to the current request,
it hands out that request's ``dbsession`` (the application's own, when it
defines one), and forgets it when the request finishes; the add-on closes
only the Sessions it made.
"""

from __future__ import annotations

from typing import Any, cast

from pyramid import threadlocal
from pyramid.threadlocal import get_current_request
from sqlalchemy.orm import scoped_session

from ..errors import SessionCacheError
from ..storage.backends import local_session
from .interfaces import IDBSessionFactory
from .transaction import MANAGED_ENVIRON, TRANSACTION_MANAGER, in_managed_transaction, joined


def _request() -> Any:
    request = get_current_request()
    if request is None:
        raise SessionCacheError("pyramid_sessioncache.Session is scoped to a request, and no request is active")
    return request


def _request_session() -> Any:
    request = _request()
    request.add_finished_callback(_remove)
    return request.dbsession


def _made_elsewhere(what: str, arguments: Any) -> SessionCacheError:
    return SessionCacheError(
        f"pyramid_sessioncache.Session {what} ({', '.join(sorted(arguments))}): it hands out request.dbsession, "
        "made by the application's session factory: set those there (sqlalchemy.* settings, or the "
        "sessionmaker given to config.set_sessioncache_session_factory())"
    )


class RequestScopedSession(scoped_session):
    """A ``scoped_session`` whose Session is the current request's ``request.dbsession``.

    That Session is made by the application's session factory: code in
    the style of ``meta.Session`` that configures the registry's factory
    (``Session.configure(bind=engine)``) or passes arguments for a new
    Session (``Session(autoflush=False)``) would be ignored, and is told
    so, by name, instead of failing on the registry's internals.
    """

    def __call__(self, **kw: Any) -> Any:
        if kw:
            raise _made_elsewhere("takes no arguments", kw)
        return super().__call__()

    def configure(self, **kwargs: Any) -> None:
        """Refused: configure the application's session factory instead."""
        raise _made_elsewhere("has no factory to configure", kwargs)

    def remove(self) -> None:
        """Forget the current request's Session, and drop its local cache; called when the request finishes.

        Forgotten, not closed: the add-on's own ``request.dbsession`` is
        closed by its own finished callback, after the others (see
        ``dbsession()``); an application's own is the application's to
        end.  A test fixture's, shared by the requests of a test in a
        transaction the test aborts (pyramid-cookiecutter-starter's
        ``app.dbsession``), lost the rows the test had flushed when it was
        closed here.
        """
        if self.registry.has():
            local_session.drop(self.registry())
        self.registry.clear()


#: A ``scoped_session`` registry scoped to the current Pyramid request.
Session: scoped_session[Any] = RequestScopedSession(cast(Any, _request_session), scopefunc=_request)


def _remove(request: Any) -> None:
    Session.remove()


def dbsession(request: Any) -> Any:
    """Return a new Session for ``request``, joined to ``request.tm``.

    It joins through listeners registered once on the factory (see
    ``transaction.py``), not seven of its own, so that it costs little
    until used.  Registered as the reified request property
    ``request.dbsession`` unless the application registers its own.
    """
    factory = request.registry.queryUtility(IDBSessionFactory)
    if factory is None or factory.kw.get("bind") is None:
        raise SessionCacheError("request.dbsession needs an engine: set sqlalchemy.url in the settings")
    # The factory's listeners (transaction.py) join it to request.tm.
    info = {"request": request, TRANSACTION_MANAGER: request.tm}
    # Made after pyramid_tm ended (first used by a finished callback), it
    # is no longer in the environ: the request said so as it began.
    managed = managed_environ(request) or request.environ.get(MANAGED_ENVIRON)
    if managed is not None:  # within pyramid_tm's tween: joins nothing once it has ended
        info[MANAGED_ENVIRON] = managed
    session = factory(info=info)
    request.add_finished_callback(_closer(session))
    return session


def managed_environ(request: Any) -> dict | None:
    """The WSGI environ of the request whose pyramid_tm tween manages ``request``'s transaction, or None.

    Its own (pyramid_tm marks it ``tm.active``); a subrequest's
    (``invoke_subrequest(..., use_tweens=False)``) is its parent's, the
    nearest enclosing request on Pyramid's stack of current requests
    (``pyramid.threadlocal.manager``) that pyramid_tm marked.
    """
    environ = request.environ
    if "tm.active" in environ:
        return environ
    for current in reversed(threadlocal.manager.stack):
        enclosing = current.get("request")
        if enclosing is not None and enclosing is not request:
            outer = getattr(enclosing, "environ", None)
            if outer is not None and "tm.active" in outer:
                return outer
    return None


def note_managed_environ(event: Any) -> None:
    """Note in a new request's environ the environ of the request whose pyramid_tm tween manages it (a subscriber).

    ``NewRequest`` is sent under every tween, pyramid_tm's included: a
    Session first made after pyramid_tm ended the request's transaction
    (by a finished callback) reads it there, as pyramid_tm took its own
    mark away.  None for a request pyramid_tm does not manage.
    """
    request = event.request
    request.environ[MANAGED_ENVIRON] = managed_environ(request)


def _closer(session: Any) -> Any:
    """The finished callback that closes ``session``: after those registered once it was made.

    Those run after it, and one that uses the Session (an audit log, say)
    would open it again, with a connection nobody returns to the pool
    until the thread's next transaction begins.  It puts itself back at
    the end of the queue as long as callbacks it has not waited for yet
    remain (one may add another, which may use the Session), not for
    those it waited for already: a callback that puts itself back too
    would wait for it for ever.  A subrequest's Session, joined to its
    parent's transaction, is closed as that transaction ends instead
    (``transaction.in_managed_transaction()``), unless it never joined it
    (``transaction.joined()``).
    """
    waited: dict[int, Any] = {}  # the callbacks themselves held, so that no other takes one's id

    def close_last(request: Any) -> None:
        remaining = {id(callback): callback for callback in request.finished_callbacks}
        if not remaining.keys() <= waited.keys():
            waited.update(remaining)
            request.add_finished_callback(close_last)
            return
        # A subrequest's, joined to its parent's transaction, is closed as that ends.
        if not (in_managed_transaction(session) and joined(session)):
            close(session)

    return close_last


def close(session: Any) -> None:
    """Close ``session`` and forget its local cache."""
    session.close()
    local_session.drop(session)
