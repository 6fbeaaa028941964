"""The query table: each query, uncached and from every cache, on one database.

For one database, every query of ``model.QUERIES`` is timed in each
:data:`VARIANTS` row.  A call always builds the statement afresh (as a view
does), executes it and fetches its objects or rows (``.scalars().all()``,
``.scalar_one()``, ``.all()``).

- *same session*: one Session for all the calls; the first call (a miss,
  untimed) loaded the objects, and they are still held, as in a request
  that already loaded them: they are in the Session's identity map.
- *new session*: a new Session per call, closed after it, as each new
  request has; the entry was stored by an earlier Session.
- *floor*: building the statement (with its caching option) and computing
  SQLAlchemy's cache key, ``stmt._generate_cache_key()``; nothing runs.  No
  cache look-up can cost less than that, because every cache keys on it.
- *local_session*, *memory*, *redis*, *redis near*: the add-on's regions
  (``ext:local_session``, ``memory``, ``ext:redis``, ``ext:redis`` with
  ``near = true``, whose hits are served from the process), through
  ``cached_query(session, statement, region)``, which is what
  ``request.cached_query`` runs: it reads a hit before ``Session.execute()``.
  One more row runs the ``ext:local_session`` hit through the ``FromCache``
  option and ``Session.execute()``.
- *memory miss*: the entry removed before each call (``Region.clear()``
  of a ``memory`` region holding that one entry), so that each call loads
  the rows, stores them and gives them to the Session: what a miss costs
  beside an uncached query.
- *bound*: the least any ``do_orm_execute`` cache can cost: a listener
  that returns a stored ``FrozenResult`` from a dictionary keyed by
  SQLAlchemy's cache key, nothing else (no region, no checks: not a usable
  cache).  The rest of the figure is ``Session.execute()`` itself.
- *dogpile example*: SQLAlchemy's ``examples/dogpile_caching`` with a
  ``dogpile.cache.memory`` or ``dogpile.cache.redis`` region (see
  ``dogpile_example.py``).

The rows of one query are timed together, interleaved (see ``timing.py``).
After that, each row runs one more call with the engine's statements
counted, and reads every attribute and child a page would show: a hit that
emitted SQL (a query, or a lazy load of something the cache did not bring)
is flagged in the table, since it was not a pure hit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import create_engine, event
from sqlalchemy.orm import sessionmaker

from pyramid_sessioncache import FromCache, SessionCache, cached_query

from . import model
from .timing import Budget, Timing, measure_many

#: (row id, label); a row id ending in ``_same``/``_new`` says which Session it uses.
VARIANTS = (
    ("uncached_same", "uncached, same session"),
    ("uncached_new", "uncached, new session"),
    ("floor", "floor: statement + cache key"),
    ("bound_same", "bound: Session.execute + dict hit"),
    ("local_same", "local_session hit, same session"),
    ("localoption_same", "  the same, by FromCache option"),
    ("memory_same", "memory hit, same session"),
    ("memory_new", "memory hit, new session"),
    ("miss_new", "memory miss, new session"),
    ("redis_same", "redis hit, same session"),
    ("redis_new", "redis hit, new session"),
    ("near_same", "redis near hit, same session"),
    ("near_new", "redis near hit, new session"),
    ("dogpile_memory_same", "dogpile example (memory), same"),
    ("dogpile_memory_new", "dogpile example (memory), new"),
    ("dogpile_redis_same", "dogpile example (redis), same"),
    ("dogpile_redis_new", "dogpile example (redis), new"),
)


class SQLCounter:
    """Counts the statements an engine sends to the database."""

    def __init__(self, engine) -> None:
        self.count = 0
        event.listen(engine, "before_cursor_execute", self._count)

    def _count(self, *args) -> None:
        self.count += 1


@dataclass
class DatabaseResults:
    """The figures of one database: ``timings[(variant, query)]`` (None: not run)."""

    name: str
    server_version: str
    timings: dict[tuple[str, str], Timing | None] = field(default_factory=dict)
    #: (variant, query) of the hit rows whose check call emitted SQL, with the count.
    emitted_sql: dict[tuple[str, str], int] = field(default_factory=dict)

    def get(self, variant: str, query: str) -> Timing | None:
        return self.timings.get((variant, query))


def run(name: str, server_version: str, url: str, sizes: model.Sizes, budget: Budget, redis_url, dogpile):
    """Create and fill the database at ``url``, then time every row; return :class:`DatabaseResults`.

    ``redis_url`` (or None) is a Redis server for the ``ext:redis`` rows;
    ``dogpile`` (or None) a loaded :class:`~benchmarks.dogpile_example.DogpileExample`.
    """
    engine = create_engine(url)
    try:
        model.create(engine, sizes)
        return _Runner(name, server_version, engine, sizes, budget, redis_url, dogpile).run()
    finally:
        engine.dispose()


class _Runner:
    def __init__(self, name, server_version, engine, sizes, budget, redis_url, dogpile) -> None:
        self.results = DatabaseResults(name, server_version)
        self.engine = engine
        self.sizes = sizes
        self.budget = budget
        self.sql = SQLCounter(engine)
        regions = {"local": {"type": "ext:local_session"}, "memory": {"type": "memory"}, "miss": {"type": "memory"}}
        if redis_url:
            regions["redis"] = {"type": "ext:redis", "url": redis_url}
            regions["near"] = {"type": "ext:redis", "url": redis_url, "near": True}
        self.cache = SessionCache(regions, secret="benchmark secret, not for production")
        if redis_url and not self.cache.region("near").near.wait_live(10):
            raise RuntimeError("the near cache did not subscribe to Redis's invalidations within 10 s")
        self.cached = sessionmaker(bind=engine, info=self.cache.session_info())
        self.plain = sessionmaker(bind=engine)
        self.redis = bool(redis_url)
        self.dogpile = dogpile
        self.dogpile_sessions = dogpile.sessionmaker(engine) if dogpile else None

    def run(self) -> DatabaseResults:
        try:
            return self._run()
        finally:
            self.cache.close()

    def _run(self) -> DatabaseResults:
        for query, (_title, build, fetch, touch) in model.QUERIES.items():
            with contextlib.ExitStack() as stack:
                rows = {}
                for variant, _label in VARIANTS:
                    row = self._row(variant, build, fetch, touch, stack)
                    if row is not None:
                        rows[variant] = row
                timings = measure_many({variant: call for variant, (call, _check) in rows.items()}, self.budget)
                for variant, _label in VARIANTS:
                    self.results.timings[(variant, query)] = timings.get(variant)
                for variant, (_call, check) in rows.items():
                    if check is None:
                        continue
                    self.sql.count = 0
                    check()
                    if self.sql.count and not variant.startswith(("uncached", "miss")):
                        self.results.emitted_sql[(variant, query)] = self.sql.count
        return self.results

    def _row(self, variant: str, build, fetch, touch, stack: contextlib.ExitStack):
        """``(timed call, check call)`` for one row, its cache filled; None when it cannot run."""
        sizes = self.sizes
        if variant == "floor":
            options_factory = _ours("memory")
            return lambda: build(sizes, options_factory())._generate_cache_key(), None
        kind, _, session = variant.rpartition("_")
        if kind == "uncached":
            factory, options_factory = self.plain, tuple
        elif kind in ("local", "memory", "redis", "near"):
            if kind in ("redis", "near") and not self.redis:
                return None
            factory, options_factory = _CachedQuery.factory(self.cached, kind), tuple
        elif kind == "miss":
            factory, options_factory = _CachedQuery.factory(self.cached, kind, self.cache.region(kind)), tuple
        elif kind == "localoption":
            factory, options_factory = self.cached, _ours("local")
        elif kind == "bound":
            factory, options_factory = _bound(self.plain), tuple
        else:  # dogpile_memory, dogpile_redis
            region = kind.split("_", 1)[1]
            if self.dogpile is None or region not in self.dogpile.regions:
                return None
            factory, options_factory = self.dogpile_sessions, _theirs(self.dogpile, region)

        def statement():
            return build(sizes, options_factory())

        if session == "same":
            same = stack.enter_context(factory())
            held = fetch(same, statement())  # the miss; its objects stay in the identity map
            touch(held)
            # The check call refers to ``held``, which keeps the objects alive until the end.
            return (lambda: fetch(same, statement())), (lambda: (held, touch(fetch(same, statement()))))

        def call(check=False):
            with factory() as new:
                result = fetch(new, statement())
                if check:
                    touch(result)

        call(check=True)  # the miss, stored by a Session of its own
        return call, lambda: call(check=True)


def _bound(sessionmaker):
    """A ``sessionmaker`` stand-in whose Sessions serve every query from a dictionary (the *bound* row)."""
    stored: dict = {}

    def serve(state):
        key = state.statement._generate_cache_key().key
        frozen = stored.get(key)
        if frozen is None:
            frozen = stored[key] = state.invoke_statement().freeze()
        return frozen()

    def new():
        session = sessionmaker()
        event.listen(session, "do_orm_execute", serve)
        return session

    return new


class _CachedQuery:
    """A Session stand-in whose ``execute(statement)`` is ``cached_query(session, statement, region)``."""

    def __init__(self, session, region: str, emptied=None) -> None:
        self.session = session
        self.region = region
        self.emptied = emptied

    @classmethod
    def factory(cls, sessionmaker, region: str, emptied=None):
        """Sessions of ``sessionmaker`` that run ``cached_query`` on ``region``; ``emptied`` (a region) is cleared first."""

        @contextlib.contextmanager
        def new():
            with sessionmaker() as session:
                yield cls(session, region, emptied)

        return new

    def execute(self, statement):
        if self.emptied is not None:
            self.emptied.clear()
        return cached_query(self.session, statement, self.region)


def _ours(region: str) -> Callable[[], tuple]:
    return lambda: (FromCache(region),)


def _theirs(dogpile, region: str) -> Callable[[], tuple]:
    return lambda: (dogpile.from_cache(region),)
