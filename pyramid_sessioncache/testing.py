"""Helpers for the tests of an application that caches with pyramid_sessioncache.

Counting SQL statements is how a test proves a hit; the cache's own
counters say which look-ups hit::

    from pyramid_sessioncache.testing import LookupCounter, SQLCounter, assert_lookups

    def test_the_list_is_cached(testapp, dbengine, app):
        testapp.get("/models")  # a miss: stored
        with SQLCounter(dbengine) as sql, LookupCounter(get_session_cache(app.registry)) as seen:
            testapp.get("/models")
        assert sql.count == 0
        assert (seen.hits, seen.misses) == (1, 0)

- :class:`SQLCounter`: the statements an engine sends.
- :class:`LookupCounter`: the hits and misses of an application's cache
  (any request, any Session), for WebTest tests where the request is out
  of reach.
- :func:`lookups` and :func:`assert_lookups`: the look-ups of one request
  (``request.sessioncache.lookups``) or one Session.
- :func:`clear`: empty the shared regions, so that a test does not start
  with the entries of the one before.

Nothing here imports Pyramid: the helpers work on any SQLAlchemy program
that uses the caching engine.  See the README's *Testing your app* for the
fixtures of a pyramid-cookiecutter-starter project.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

from .engine import stats
from .engine.cache import SessionCache
from .engine.entries import invalidate_all
from .engine.stats import Lookup, RegionStats

__all__ = ["LookupCounter", "SQLCounter", "assert_lookups", "clear", "lookups"]


class SQLCounter:
    """Count the SQL statements an engine (or a connection) sends to the database.

    :param bind: an ``Engine`` or ``Connection``; an engine's count includes
        every connection it hands out, the ones a test has already opened
        too.

    A context manager, counting from ``with`` to its end::

        with SQLCounter(engine) as sql:
            testapp.get("/")
        assert sql.count == 0, sql.statements

    or started and stopped by hand (a fixture's setup and teardown):
    :meth:`start`, :meth:`stop`, :meth:`reset`.  It listens to
    ``before_cursor_execute``, so a statement that fails counts too.

    Statements that only control transactions (``BEGIN``, ``COMMIT``,
    ``ROLLBACK``, ``SAVEPOINT``, ``RELEASE SAVEPOINT``, ``ROLLBACK TO``) are
    not counted: test fixtures add them, and a hit does not avoid them.
    ``transactions=True`` counts them too.
    """

    def __init__(self, bind: Any, transactions: bool = False) -> None:
        self.bind = bind
        self.transactions = transactions
        #: The SQL text of each statement sent, oldest first.
        self.statements: list[str] = []
        self._listening = False

    def __repr__(self) -> str:
        return f"<SQLCounter {self.count} statement(s)>"

    def __enter__(self) -> SQLCounter:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def __len__(self) -> int:
        return len(self.statements)

    @property
    def count(self) -> int:
        """How many statements were sent since the counter started or was reset."""
        return len(self.statements)

    def start(self) -> SQLCounter:
        """Start counting (again); returns the counter."""
        if not self._listening:
            event.listen(self.bind, "before_cursor_execute", self._record)
            self._listening = True
        return self

    def stop(self) -> None:
        """Stop counting; what was counted stays in :attr:`statements`."""
        if self._listening:
            event.remove(self.bind, "before_cursor_execute", self._record)
            self._listening = False

    def reset(self) -> None:
        """Forget the statements counted so far."""
        self.statements.clear()

    def _record(self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if self.transactions or not _TRANSACTION_CONTROL.match(statement):
            self.statements.append(statement)


_TRANSACTION_CONTROL = re.compile(
    r"\s*(BEGIN|COMMIT|END|ROLLBACK|SAVEPOINT|RELEASE|START\s+TRANSACTION)\b", re.IGNORECASE
)


class LookupCounter:
    """Count the hits and misses of a :class:`~pyramid_sessioncache.SessionCache` from now on.

    :param cache: the application's cache
        (``pyramid_sessioncache.get_session_cache(app.registry)``).

    It reads the cache's per-region counters, so it sees the look-ups of
    every request and every Session of the process: what a WebTest test
    needs, where the request object is out of reach.  Use it around the
    requests of one test::

        with LookupCounter(cache) as seen:
            testapp.get("/people")
        assert seen.hits == 1 and seen.misses == 0
        assert seen.region("short_term").hits == 1
    """

    def __init__(self, cache: SessionCache) -> None:
        self.cache = cache
        self._start: dict[str, RegionStats] = {}
        self._end: dict[str, RegionStats] | None = None
        self.reset()

    def __repr__(self) -> str:
        return f"<LookupCounter hits={self.hits} misses={self.misses}>"

    def __enter__(self) -> LookupCounter:
        self.reset()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._end = {name: self._now(name) for name in self.cache.regions}

    def reset(self) -> None:
        """Count from now on (after a ``with`` block too: it counts again until the next one ends)."""
        self._start = {name: self._now(name) for name in self.cache.regions}
        self._end = None

    def region(self, name: str) -> RegionStats:
        """Return the hits, misses, invalidations and stores of region ``name`` since the counter started.

        Until the ``with`` block ends, if it is used as a context manager.
        """
        now = self._now(name) if self._end is None else self._end.get(name, RegionStats())
        start = self._start.get(name, RegionStats())
        return RegionStats(
            now.hits - start.hits,
            now.misses - start.misses,
            now.invalidations - start.invalidations,
            now.stores - start.stores,
        )

    @property
    def hits(self) -> int:
        """Hits in every region since the counter started."""
        return sum(self.region(name).hits for name in self.cache.regions)

    @property
    def misses(self) -> int:
        """Misses in every region since the counter started."""
        return sum(self.region(name).misses for name in self.cache.regions)

    def _now(self, name: str) -> RegionStats:
        counters = self.cache.stats.region(name)
        return RegionStats(counters.hits, counters.misses, counters.invalidations, counters.stores)


def _session(source: Any) -> Session:
    if isinstance(source, Session):
        return source
    session = getattr(source, "dbsession", None)
    if not isinstance(session, Session):
        raise TypeError(f"expected a Session or a request with a dbsession, got {source!r}")
    return session


def lookups(source: Any, region: str | None = None) -> list[Lookup]:
    """Return the cache look-ups of a request or a Session, oldest first.

    :param source: a Pyramid request (the look-ups of its ``dbsession``,
        as ``request.sessioncache.lookups``) or a Session.
    :param region: only the look-ups of this region.

    Each is a :class:`~pyramid_sessioncache.engine.stats.Lookup`:
    ``(region, hit, key)``.  A Session remembers its last 500 look-ups,
    for its whole life: with the starter's test fixtures, one Session
    serves every request of a test, so the list covers them all.
    """
    found = list(stats.lookups(_session(source)))
    return found if region is None else [lookup for lookup in found if lookup.region == region]


def assert_lookups(source: Any, hits: int | None = None, misses: int | None = None, region: str | None = None) -> None:
    """Assert how many of the look-ups of a request or a Session hit and missed.

    Arguments as for :func:`lookups`; ``hits`` or ``misses`` left out are
    not checked.  The message of the ``AssertionError`` lists every
    look-up::

        view(app_request)
        assert_lookups(app_request, hits=1, misses=1, region="local_session")
    """
    found = lookups(source, region)
    seen = (sum(lookup.hit for lookup in found), sum(not lookup.hit for lookup in found))
    expected = (seen[0] if hits is None else hits, seen[1] if misses is None else misses)
    if seen != expected:
        listing = "\n".join(f"  {lookup.region}: {'hit' if lookup.hit else 'miss'} {lookup.key}" for lookup in found)
        where = f" in region {region!r}" if region else ""
        raise AssertionError(
            f"expected {expected[0]} hit(s) and {expected[1]} miss(es){where}, "
            f"got {seen[0]} and {seen[1]}:\n{listing or '  (no look-up)'}"
        )


def clear(cache: SessionCache) -> None:
    """Forget every entry of the shared regions of ``cache`` (a test fixture's set-up).

    A ``memory`` region lives as long as the application: with a
    session-scoped ``app`` fixture, a test would otherwise find the
    entries of the tests before it, and its SQL counts would depend on
    their order.  (``ext:local_session`` regions live on their Session.)
    """
    invalidate_all(cache)
