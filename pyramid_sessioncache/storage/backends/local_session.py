"""The ``ext:local_session`` Beaker namespace: cache storage on a Session.

Values are kept in the Session's ``info`` dictionary, so they live exactly
as long as the Session's current transaction (the engine's hook drops
them when the transaction ends) and can never be seen by another Session.
A hit therefore hands back the very objects of the Session's identity map.

This is the namespace of SQLAlchemy's old ``examples/beaker_caching``
(``local_session_caching.py``), kept compatible with its
``create_session_container(beaker_name, scoped_session)`` on today's Beaker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from beaker.container import AbstractDictionaryNSManager

from ...errors import SessionCacheError

#: Where a Session keeps its local cache: ``session.info[INFO_KEY]`` maps a
#: namespace name to a dictionary of entries.
INFO_KEY = "sessioncache.local"


class ScopedSessionNamespace(AbstractDictionaryNSManager):
    """A Beaker namespace that stores its entries on a SQLAlchemy Session.

    Beaker builds it with the namespace name and the region's options.  The
    Session is found, in this order, from ``session`` (a Session this
    namespace is bound to), then ``scoped_session`` (called to get the
    current Session).  Within pyramid_sessioncache the ORM hook binds the
    namespace to the Session that runs the query.

    Example, as in SQLAlchemy's old beaker_caching example::

        ScopedSessionNamespace.create_session_container("ext:local_session", Session)
        cache = beaker.cache.Cache("people", type="ext:local_session")
    """

    #: The ``scoped_session`` used when no Session is bound.
    scoped_session: Callable[[], Any] | None = None

    def __init__(self, namespace: str, session: Any = None, scoped_session: Any = None, **kw: Any):
        AbstractDictionaryNSManager.__init__(self, namespace)
        self.session = session
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
        return entries(session).setdefault(self.namespace, {})


def entries(session: Any) -> dict:
    """Return the dictionary of local namespaces kept on ``session``."""
    return session.info.setdefault(INFO_KEY, {})


def drop(session: Any) -> None:
    """Forget every ``ext:local_session`` entry kept on ``session``."""
    session.info.pop(INFO_KEY, None)
