"""What a view uses: ``request.cached_query`` and ``request.sessioncache``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Query
from transaction.interfaces import NoTransaction

from ..engine import entries, stats
from ..engine.cache import SessionCache
from ..engine.early import cached_query as engine_cached_query
from ..engine.invalidation import writes
from .interfaces import ISessionCache
from .transaction import mark_changed_as_registered


class RequestCache:
    """``request.sessioncache``: the application's cache, seen from a request.

    Its ``cache`` is the application's
    :class:`~pyramid_sessioncache.SessionCache`; the invalidation methods
    act on the request's ``dbsession`` for local regions.
    """

    def __init__(self, request: Any) -> None:
        self.request = request
        self.cache: SessionCache = request.registry.getUtility(ISessionCache)

    @property
    def lookups(self) -> list:
        """The cache look-ups of this request's ``dbsession`` so far (:class:`~pyramid_sessioncache.engine.stats.Lookup`)."""
        return list(stats.lookups(self.request.dbsession))

    def cache_parameters(self, query: Any, region: str | None = None, **kw: Any):
        """Return ``(beaker_cache, key)`` for ``query``, as :func:`~pyramid_sessioncache.cache_parameters`."""
        return entries.cache_parameters(query, self._session(query), region, cache=self.cache, **kw)

    def invalidate(self, query: Any, region: str | None = None, **kw: Any) -> None:
        """Forget the cached result of ``query`` in ``region`` (default: its option's, or the default).

        Forgotten now, and, from a shared region, again when the request's
        transaction commits: a request that read the rows in between may
        have stored them as they were before this one's changes.
        """
        self._again_at_commit(entries.invalidate(query, self._session(query), region, cache=self.cache, **kw))

    def invalidate_region(self, name: str | None = None) -> None:
        """Forget every entry of region ``name`` (default: the default region), now and at commit (see :meth:`invalidate`)."""
        self._again_at_commit(entries.invalidate_region(self.cache, name, self.request.dbsession))

    def mark_changed(self, *tables: Any) -> None:
        """Say that SQL the add-on cannot see wrote ``tables`` (all tables if none).

        ``tables``: table names, ``Table`` objects or mapped classes.

        Call it after ``text()`` DML or ``dbsession.connection().execute(...)``:
        it is zope.sqlalchemy's ``mark_changed()`` (so pyramid_tm commits the
        work; with the Session's own registration, see
        ``addon/transaction.py``'s ``mark_changed_as_registered()``)
        plus :func:`~pyramid_sessioncache.invalidate_tables` (so the
        entries that read those tables are invalid once it commits).
        """
        session = self.request.dbsession
        mark_changed_as_registered(session, self.request.tm)
        writes.invalidate_tables(session, *tables)

    def invalidate_all(self) -> None:
        """Forget every entry of every region, now and at commit (see :meth:`invalidate`)."""
        for name in self.cache.regions:
            self.invalidate_region(name)

    def _session(self, query: Any) -> Any:
        return in_request(self.request, query)[1]

    def _again_at_commit(self, forget: Callable[[], None] | None) -> None:
        if forget is None:
            return
        try:
            current = self.request.tm.get()
        except NoTransaction:  # an explicit manager between transactions: nothing left to commit
            return
        current.addAfterCommitHook(_forget_if_committed, (forget,))


def _forget_if_committed(committed: bool, forget: Callable[[], None]) -> None:
    if committed:
        forget()


def cached_query(
    request: Any, query: Any, region: str | None = None, cache_key: str | None = None, expire: int | None = None
) -> Any:
    """Run ``query`` through the cache region ``region``, on ``request.dbsession``.

    :func:`pyramid_sessioncache.cached_query` on the request's Session (a
    legacy ``Query`` keeps its own; one made without a Session gets the
    request's), into the application's cache
    (``request.sessioncache.cache``), whatever Session serves as
    ``request.dbsession``; ``region`` defaults to
    ``sessioncache.default_region``.  Raises
    :class:`~pyramid_sessioncache.UnknownRegionError` or
    :class:`~pyramid_sessioncache.NotCacheableError` before anything is executed.
    """
    query, session = in_request(request, query)
    return engine_cached_query(session, query, region, cache_key, expire, cache=request.sessioncache.cache)


def in_request(request: Any, query: Any) -> tuple[Any, Any]:
    """Return ``query`` and the Session it runs in: a legacy ``Query``'s own, else ``request.dbsession``.

    A ``Query`` made without a Session (``Query(Person)``) is bound to
    ``request.dbsession``, as a ``select()`` is: it is keyed for a
    Session's bind and connection, and there is no other to key it for.
    """
    if not isinstance(query, Query):
        return query, request.dbsession
    if query.session is None:
        query = query.with_session(request.dbsession)
    return query, query.session
