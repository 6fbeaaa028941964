"""``SessionCache``: one application's caching set-up, as its Sessions see it.

A Session caches into the ``SessionCache`` found in its ``info``
(``session.info["sessioncache"]``); Sessions made by the Pyramid add-on find
it through the request they carry (``session.info["request"]``).  A Session
that carries neither is asked of the finders registered with
:func:`add_cache_finder` (the Pyramid add-on's: the current request's
application, for the Session that is its ``request.dbsession``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .. import _sqlalchemy, forks
from .._weak import members
from ..errors import InvalidOptionError
from ..storage.backends import local_session
from ..storage.options import checked
from ..storage.region import CacheRegions, Region
from . import info
from .cache_options import CACHE_OPTIONS
from .invalidation.reads import ALL_TABLES, ANY_TABLE, ShapeTables, declared_tables, version_name
from .invalidation.schema import also_changed
from .invalidation.versions import MANUAL
from .keys import EntryKey, KeyMaker
from .stats import Stats

#: Seconds ``SessionCache.listen()`` waits for ``LISTEN`` to be in place.
LISTEN_WAIT = 5.0


class SessionCache:
    """The regions of an application and the means to key queries into them.

    :param regions: a :class:`~pyramid_sessioncache.CacheRegions`, or
        a mapping of region name to Beaker options to build one from.
    :param default_region: the region used when a query names none; the
        first region by default.
    :param invalidation: ``"auto"`` (committed writes invalidate what read
        the written tables) or ``"manual"``.
    :param retry_after: seconds a region whose backend failed is skipped
        (its queries go to the database) before it is tried again; 5 by
        default, at most a day.
    :param secret: the key that signs values stored in Redis; required by
        ``ext:redis`` regions, the same in every process that shares them;
        at least 16 characters.
    :param writes_also: what a write to a table also changes that the
        schema does not say (a trigger of a database other than PostgreSQL
        and SQLite, whose triggers are read): table name ->
        the tables it also writes, e.g. ``{"order": ["audit_log"]}``.

    Every option is checked as the ini's ``sessioncache.*`` and ``cache.*``
    settings are (see ``cache_options.py`` and ``storage/options.py``): a
    bad value, or a region option its region type would ignore, raises
    :class:`~pyramid_sessioncache.InvalidOptionError`.  ``retry_after`` and
    ``secret`` belong to the regions: with ``regions`` a ready
    :class:`~pyramid_sessioncache.CacheRegions`, give them to it.

    Outside Pyramid, hand it to your Sessions::

        cache = SessionCache({"local_session": {"type": "ext:local_session"}})
        Session = scoped_session(sessionmaker(bind=engine, info=cache.session_info()))
    """

    def __init__(
        self,
        regions: CacheRegions | Mapping[str, Mapping[str, Any]],
        default_region: str | None = None,
        invalidation: str = "auto",
        retry_after: float | None = None,
        secret: str | bytes | None = None,
        writes_also: Mapping[str, Iterable[str]] | None = None,
    ):
        #: ``"auto"``: committed writes invalidate the entries that read the
        #: written tables; ``"manual"``: only explicit invalidation.
        self.invalidation = checked(CACHE_OPTIONS, "invalidation", invalidation)
        if default_region is not None:
            checked(CACHE_OPTIONS, "default_region", default_region)
        declared = {} if writes_also is None else checked(CACHE_OPTIONS, "writes_also", writes_also)
        if isinstance(regions, CacheRegions):
            for name, value in (("retry_after", retry_after), ("secret", secret)):
                if value is not None:
                    raise InvalidOptionError(name, value, "given with ready CacheRegions: give it to CacheRegions(...)")
            self.regions = regions
        else:
            if isinstance(secret, str):
                secret = secret.encode()
            self.regions = CacheRegions(regions, 5.0 if retry_after is None else retry_after, secret)
        self.default_region = default_region or next(iter(self.regions), None)
        if self.default_region is not None:
            self.regions[self.default_region]  # an unknown name raises here
        self.keys = KeyMaker()
        self.stats = Stats()
        #: What each statement shape was found to read.
        self.tables_read = ShapeTables()
        #: The statement shapes found to reach objects of a class mapped with
        #: ``always_refresh`` (an eager load, a subclass): they run uncached
        #: from then on, instead of loading a miss thrown away each time.
        self.refreshed_shapes: set[str] = set()
        #: Declared dependencies: version name -> what a write to it also changes.
        self.writes_also = _dependencies(declared)
        #: How many commits of the process published writes (automatic
        #: invalidation only), and other changes every Session may see (see
        #: :meth:`void_local_entries`): an ``ext:local_session`` entry
        #: stored before the latest is void (see ``lookup.py``).
        self.commits = 0
        self._commits_lock = forks.lock()
        #: The PostgreSQL listeners :meth:`listen` started.
        self.listeners: list[Any] = []
        from .hook import install  # here: the hook module needs this one

        install()
        _live.add(self)

    def __repr__(self) -> str:
        return f"<SessionCache regions={list(self.regions)} default={self.default_region!r}>"

    def region(self, name: str | None = None) -> Region:
        """Return the region called ``name`` (default: the default region).

        Raises :class:`~pyramid_sessioncache.UnknownRegionError`.
        """
        return self.regions[str(name or self.default_region)]

    def session_info(self) -> dict[str, Any]:
        """Return an ``info`` dictionary for ``sessionmaker(info=...)``."""
        return {info.CACHE: self}

    def key(
        self,
        statement: Any,
        parameters: Any,
        execution_options: Any,
        bind: Any,
        label: str | None = None,
        session: Any = None,
        state: str = "",
    ) -> EntryKey | None:
        """Return the cache key of ``statement``, or None when it cannot be keyed.

        ``bind`` is what the statement runs on; a ``session`` with binds
        per mapper or table (``Session(binds=...)``) adds the databases of
        those, which its eager loads read; ``state``, the settings of the
        connection (see ``connection_state.py``).
        """
        others = _sqlalchemy.entity_binds(session) if session is not None else ()
        return self.keys.key(statement, parameters, execution_options, bind, label, others, state)

    @property
    def shared_regions(self) -> list[Region]:
        """The regions whose entries outlive a Session."""
        return [region for region in self.regions.values() if not region.is_local]

    def invalidate_tables(self, *tables: Any) -> None:
        """Invalidate, now and in every process, the entries that read ``tables``.

        ``tables`` are table names, ``Table`` objects or mapped classes;
        anything else raises :class:`~pyramid_sessioncache.InvalidOptionError`.
        With no table, every entry of every shared region.  For writes made
        outside any Session (a migration, a cron job); inside a transaction,
        use :func:`pyramid_sessioncache.invalidate_tables` with the Session,
        so that it happens when the transaction commits.  With manual
        invalidation too (see :meth:`publish`).
        """
        self.publish(declared_tables(tables) or frozenset({ALL_TABLES}), declared=True)

    def listen(self, engine: Any, channel: str = "sessioncache") -> Any:
        """Hear every committed write of any client to ``engine``'s PostgreSQL database.

        Starts, and returns, a :class:`~pyramid_sessioncache.engine.invalidation.notify.Listener`
        that invalidates what read the tables written, in every cache of the
        process, and everything when it lost its connection (it may have
        missed writes).  Returns once ``LISTEN`` is in place (up to
        ``LISTEN_WAIT`` seconds; if it is not by then, everything is
        invalidated once it is).  The database needs the triggers first
        (``sessioncache-notify install``).  Stop it with :meth:`close`.
        """
        from .invalidation import notify, writes

        listener = notify.Listener(
            notify.dsn_of(engine),
            writes.publish,
            lambda: writes.publish({ALL_TABLES}),
            channel=channel,
        )
        # Wait for LISTEN before returning (before the application serves,
        # in Pyramid); if it is not in place by then, what commits meanwhile
        # is covered by invalidating everything once it is.
        self.listeners.append(listener.start(wait=LISTEN_WAIT))
        return listener

    def close(self) -> None:
        """Stop the listeners :meth:`listen` started, the near caches' listening threads (Redis regions), and the retries of kept table invalidations."""
        while self.listeners:
            self.listeners.pop().stop()
        for region in self.shared_regions:
            region.close()

    def publish(self, tables: frozenset[str], again: bool = False, declared: bool = False) -> None:
        """Invalidate the entries of the shared regions that read ``tables`` (version names), and every local entry.

        What ``writes_also`` declares a write to those tables changes is
        invalidated too, and what the schema says those change in turn
        (cascades and views of a trigger's table: see
        ``invalidation/schema.py``).  ``again``: the same commit published
        a second time (see ``invalidation/writes.py``), not counted in the
        statistics.  ``declared``: tables the application named
        (:meth:`invalidate_tables`, :func:`~pyramid_sessioncache.invalidate_tables`),
        the only ones invalidated with manual invalidation, whose entries
        record the version of every table only: every entry is void then.
        """
        # Local entries, whatever the invalidation: another Session's commit
        # changes what their queries read now, and their objects must not
        # outlive it (see local_session.drop_everywhere()).
        self.void_local_entries()
        if self.invalidation == "auto":
            names = sorted(also_changed(tables, self.writes_also) | {ANY_TABLE})
        elif declared:
            # The one version manual entries record; again once the database has
            # committed what a connection's transaction declared.
            names = list(MANUAL)
        else:
            return
        for region in self.shared_regions:
            region.bump(names)
            if not again:
                self.stats.region(region.name).invalidations += 1

    def void_local_entries(self) -> None:
        """Make every ``ext:local_session`` entry stored until now a miss, in every Session.

        Called at each commit that publishes writes, and when a write or
        rollback changes what every Session of an engine reads at once (one
        DBAPI connection shared by all: see ``invalidation/writes.py``).
        """
        with self._commits_lock:  # two threads' += could leave it at the older count
            self.commits += 1
        # Void entries would still keep their objects alive in their Sessions:
        # dropped now (after the count moved: see engine/hook.py).
        local_session.drop_everywhere()


_live: weakref.WeakSet[SessionCache] = weakref.WeakSet()


def live_caches() -> list[SessionCache]:
    """Every :class:`SessionCache` alive in this process: each hears of every committed write."""
    return members(_live)


def _dependencies(declared: Mapping[str, tuple[str, ...]]) -> dict[str, frozenset[str]]:
    # ``declared`` is checked (cache_options.py): table name -> table names, stripped.
    return {version_name(table): frozenset(map(version_name, also)) for table, also in declared.items()}


#: Called in turn with a Session that carries no cache; the first that
#: returns a :class:`SessionCache` gives the Session's.
_finders: list[Callable[[Any], SessionCache | None]] = []


def add_cache_finder(finder: Callable[[Any], SessionCache | None]) -> None:
    """Let ``finder(session)`` name the cache of Sessions that carry none in their ``info``.

    For frameworks: the Pyramid add-on registers one that returns the
    application's cache for the Session that is the current request's
    ``dbsession``.  A finder must not keep state of its own (two
    applications can share a process) and returns None when it does not
    know.  Registering the same finder twice is harmless.
    """
    if finder not in _finders:
        _finders.append(finder)


def cache_of(session: Any) -> SessionCache | None:
    """Return the :class:`SessionCache` a Session caches into, or None.

    In order: the cache of the request in ``session.info["request"]`` (its
    application's), ``session.info["sessioncache"]``, then what a finder
    registered with :func:`~pyramid_sessioncache.engine.cache.add_cache_finder`
    returns.  The request comes first: a session factory handed to two
    applications carries the cache of one of them in its ``info``, while a
    Session made for a request serves that request's application.
    """
    found = session.info
    helper = getattr(found.get("request"), "sessioncache", None)
    cache = getattr(helper, "cache", None)
    if cache is None:
        cache = found.get(info.CACHE)
        if cache is None:
            for finder in _finders:
                cache = finder(session)
                if cache is not None:
                    break
    return cache
