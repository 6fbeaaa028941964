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

import inspect
import weakref
from typing import Any, cast

from pyramid import threadlocal
from pyramid.interfaces import IRequestExtensions, IRequestFactory
from pyramid.threadlocal import get_current_request
from sqlalchemy.orm import scoped_session
from sqlalchemy.util import ScopedRegistry

from ..errors import SessionCacheError
from ..storage.backends import local_session
from .interfaces import IDBSessionFactory
from .transaction import (
    MANAGED_ENVIRON,
    TRANSACTION_MANAGER,
    forget_late,
    in_managed_transaction,
    joined,
    note_late,
    take_late,
)


def _request() -> Any:
    request = get_current_request()
    if request is None:
        raise SessionCacheError("pyramid_sessioncache.Session is scoped to a request, and no request is active")
    return request


#: The key of ``request.__dict__`` under which :data:`Session` keeps the request's Session.
_SCOPED = "pyramid_sessioncache.scoped_session"


class _OnTheRequest(ScopedRegistry):
    """:data:`Session`'s registry: the current request's Session, kept on the request itself.

    ``scoped_session``'s own registry is a dict by request, for the whole
    process: a request whose ``Session.remove()`` never ran (first asked
    for once the finished callbacks had run, by a pyramid_retry
    ``BeforeRetry`` subscriber; or after an earlier finished callback
    raised, which makes Pyramid skip the rest) stayed there for ever, with
    its Session and the connection that held.  Kept on the request, it
    goes with the request.  ``registry`` holds, weakly, the requests that
    hold one (what a test asks).
    """

    def __init__(self) -> None:
        super().__init__(_request_session, _request)
        self.registry: weakref.WeakSet[Any] = weakref.WeakSet()

    def __call__(self) -> Any:
        request = _request()
        found = request.__dict__.get(_SCOPED)
        if found is None:
            found = self.createfunc()
            self.set(found)
        return found

    def has(self) -> bool:
        request = get_current_request()
        return request is not None and _SCOPED in request.__dict__

    def set(self, obj: Any) -> None:
        request = _request()
        request.__dict__[_SCOPED] = obj
        self.registry.add(request)

    def clear(self) -> None:
        request = get_current_request()
        if request is not None:
            _forget(request)


def _forget(request: Any) -> Any:
    """Forget the Session :data:`Session` keeps on ``request``; return it, or None."""
    Session.registry.registry.discard(request)
    return request.__dict__.pop(_SCOPED, None)


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

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.registry = _OnTheRequest()

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
        request = get_current_request()
        if request is not None:
            _remove(request)


#: A ``scoped_session`` registry scoped to the current Pyramid request.
Session: scoped_session[Any] = RequestScopedSession(cast(Any, _request_session), scopefunc=_request)


def _remove(request: Any) -> None:
    """Forget the Session :data:`Session` keeps on ``request``, and drop its local cache (a finished callback)."""
    session = _forget(request)
    if session is not None:
        local_session.drop(session)


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


def request_begins(event: Any) -> None:
    """A request begins (a subscriber): close this thread's Sessions used after their request ended; note its environ."""
    close_late_sessions()
    note_managed_environ(event)


def close_late_sessions() -> None:
    """Close the Sessions of this thread begun again once their request ended (``transaction.note_late()``).

    Not those of a request still on Pyramid's stack (a finished callback
    of it invoking a subrequest), nor of one whose response is being
    streamed (the stream invoking one): they may still use their Session.
    """
    late = take_late()
    if not late:
        return
    current = {id(entry.get("request")) for entry in threadlocal.manager.stack}
    for session in late:
        request = session.info.get("request")
        if id(request) in current or _streaming(request):
            note_late(session)  # still in use: its request's, or its response's (see close_after_streaming())
        else:
            close(session)


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
    """The finished callback that closes ``session``: after every other (see :func:`_last`).

    Those run after it, and one that uses the Session (an audit log, say)
    would open it again, with a connection nobody returns to the pool
    until the thread's next request begins.  A subrequest's Session,
    joined to its parent's transaction, is closed as that transaction
    ends instead (``transaction.in_managed_transaction()``), unless it
    never joined it (``transaction.joined()``).
    """

    def close_unless_joined(request: Any) -> None:
        # A subrequest's, joined to its parent's transaction, is closed as that ends.
        if not (in_managed_transaction(session) and joined(session)):
            close(session)

    return _last(close_unless_joined)


def _last(callback: Any) -> Any:
    """``callback`` as a finished callback run after every other: those registered once it was, and those they add.

    It puts itself back at the end of the queue as long as callbacks it
    has not waited for yet remain (one may add another), not for those it
    waited for already: a callback that puts itself back too would wait
    for it for ever.
    """
    waited: dict[int, Any] = {}  # the callbacks themselves held, so that no other takes one's id

    def last(request: Any) -> None:
        remaining = {id(other): other for other in request.finished_callbacks}
        if not remaining.keys() <= waited.keys():
            waited.update(remaining)
            request.add_finished_callback(last)
            return
        callback(request)

    return last


#: The registry key saying that :func:`tween_factory` looks after streamed responses (set by the add-on's includeme).
TWEEN = "pyramid_sessioncache.tween"


def tween_factory(handler: Any, registry: Any) -> Any:
    """The add-on's tween: what a streamed response needs of ``request.dbsession`` once sent.

    The add-on's own is closed if the stream used it; an application's
    own drops its local cache (see :func:`close_after_streaming`).  A
    tween rather than a ``NewResponse`` subscriber, which would cost every
    request far more (zope.interface's subscriber look-up).
    """
    keeps_apps_dbsession(registry)  # one added since the add-on's configuration ran (see there)
    if not registry.get(TWEEN):
        return handler

    def streams(request: Any) -> Any:
        response = handler(request)
        close_after_streaming(request, response)
        return response

    return streams


def close_after_streaming(request: Any, response: Any) -> None:
    """Have ``request.dbsession`` closed once a streamed ``response`` is sent, if the stream used it.

    A response whose ``app_iter`` is not a list (a generator writing a
    CSV export row by row) is read by the server after the request
    finished and its Session was closed: a query there begins the
    Session's transaction again, outside any (even the first use of
    ``request.dbsession``), and its connection would stay checked out
    until the thread's next request.  Such an ``app_iter`` is wrapped so
    that, once the server has sent it (``close()``), the Session is closed
    if the stream used it; until then no other request of the thread (a
    subrequest the stream invokes) closes it.  A file the server sends
    itself (``wsgi.file_wrapper``) is left as it is.
    """
    app_iter = response.app_iter
    if isinstance(app_iter, (list, tuple)):
        return
    file_wrapper = request.environ.get("wsgi.file_wrapper")
    if isinstance(file_wrapper, type) and isinstance(app_iter, file_wrapper):
        return
    length = response.content_length  # setting app_iter forgets it
    wrapped = response.app_iter = _ClosingSession(app_iter, request)
    response.content_length = length
    request.__dict__[_STREAMING] = weakref.ref(wrapped)


#: The key of ``request.__dict__`` holding the streamed response's ``app_iter`` (weakly) while it is sent.
_STREAMING = "pyramid_sessioncache.streaming"


def _streaming(request: Any) -> bool:
    """Whether ``request``'s response is being streamed: its ``app_iter`` is alive and not done.

    Weakly: one the server dropped without closing it (wrapped again after
    the tween, by a lazy ``encode_content()``, and cut short) no longer
    keeps the Session from being closed as the thread's next request begins.
    """
    stream = getattr(request, "__dict__", {}).get(_STREAMING)
    return stream is not None and stream() is not None


class _ClosingSession:
    """An ``app_iter`` that closes its request's Session, once sent, if it was used after the request finished.

    Its own iterator, so that whoever iterates it and closes the iterator
    (webob's ``AppIterRange`` for a Range request) closes it; and done
    once it is exhausted too (a stream relaying another with ``yield
    from``, which closes nothing it exhausted).
    """

    def __init__(self, app_iter: Any, request: Any) -> None:
        self.app_iter = app_iter
        self.request: Any = request
        self._iterator: Any = None

    def __iter__(self) -> Any:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = iter(self.app_iter)
        try:
            return next(self._iterator)
        except StopIteration:
            self._done()
            raise

    def close(self) -> None:
        try:
            close_app_iter = getattr(self.app_iter, "close", None)
            if close_app_iter is not None:
                close_app_iter()
        finally:
            self._done()

    def _done(self) -> None:
        request, self.request = self.request, None
        if request is None:
            return
        request.__dict__.pop(_STREAMING, None)
        # The add-on's own, if the stream used it (begun again once the closer closed it,
        # in this thread or in another that read the stream): closed.
        session = request.__dict__.get("dbsession")
        ours = session is not None and TRANSACTION_MANAGER in session.info
        if ours and (forget_late(session) or session.in_transaction()):
            close(session)
        # An application's own (see drops_local_cache()): what the stream stored, dropped.
        own = request.__dict__.get(_DROPS)
        if own is not None:
            local_session.drop(own)


#: The registry key of the ``request.dbsession`` descriptor the add-on added, when it added one.
OWN_DBSESSION = "pyramid_sessioncache.own_dbsession"


def keeps_apps_dbsession(registry: Any) -> bool:
    """Whether the application defines its own ``request.dbsession``; if so, have it drop its local cache.

    A request method (reified or a property), or an attribute of its
    request class, which :func:`drops_local_cache` wraps.  Asked as the
    add-on's configuration runs, and again when the application is made
    (:func:`tween_factory`): an application may add its own after a
    ``config.commit()`` that followed the include (to read
    ``get_engine()``), or set its request class then; its own replaces
    the add-on's.
    """
    extensions = registry.queryUtility(IRequestExtensions)
    descriptors = {} if extensions is None else extensions.descriptors
    request_class = registry.queryUtility(IRequestFactory)
    on_class = isinstance(request_class, type) and inspect.getattr_static(request_class, "dbsession", None) is not None
    current = descriptors.get("dbsession")
    if current is not None and current is registry.get(OWN_DBSESSION):
        if not on_class:
            return False
        del descriptors["dbsession"]  # the request class's own, set after the add-on added its
        current = None
    if current is None and not on_class:
        return extensions is not None and "dbsession" in extensions.methods
    drops_local_cache(descriptors, request_class if on_class else None)
    return True


def drops_local_cache(descriptors: dict, request_class: Any = None) -> None:
    """Have the application's own ``request.dbsession`` drop its local cache as each request that makes it finishes.

    The add-on's own is closed then, which drops it.  An application's
    own may outlive its request (a thread-local ``scoped_session``
    registered with zope.sqlalchemy's ``keep_session=True``, whose
    read-only transactions zope.sqlalchemy never ends), and its
    ``ext:local_session`` entries with it: the next request of the thread
    was served them, however old.  The application's descriptor (a
    request method, reified or a property, or one its request class
    defines) is wrapped, so that a request that never makes its Session
    pays nothing; the drop comes after every other finished callback,
    which may use it, and again once a streamed response is sent (see
    :func:`close_after_streaming`).  Each request that makes it drops
    it, a subrequest too (its parent's next look-ups then miss).
    """
    original = descriptors.get("dbsession")
    if isinstance(original, _DropsLocalCache):
        return
    if original is None and request_class is not None:
        original = inspect.getattr_static(request_class, "dbsession", None)
    if original is not None and hasattr(original, "__get__"):
        descriptors["dbsession"] = _DropsLocalCache(original)


#: The key of ``request.__dict__`` holding the application's own Session a request made.
_DROPS = "pyramid_sessioncache.drops_local_cache"


class _DropsLocalCache:
    """The application's ``request.dbsession`` descriptor, wrapped: see :func:`drops_local_cache`."""

    def __init__(self, original: Any) -> None:
        self.original = original
        self.__doc__ = getattr(original, "__doc__", None)

    def __get__(self, request: Any, cls: Any = None) -> Any:
        if request is None:
            return self
        session = self.original.__get__(request, cls)
        if _DROPS not in request.__dict__:
            request.__dict__[_DROPS] = session
            request.add_finished_callback(_last(_drop_local_cache))
        return session


def _drop_local_cache(request: Any) -> None:
    session = request.__dict__.get(_DROPS)
    if session is not None:
        local_session.drop(session)


def close(session: Any) -> None:
    """Close ``session`` and forget its local cache (and that it was used after its request)."""
    session.close()
    local_session.drop(session)
    forget_late(session)
