"""The ORM hook: look-up, store and hand back cached results.

One ``do_orm_execute`` listener on :class:`sqlalchemy.orm.Session` serves
every Session of the process; it does nothing for statements without a
:class:`~pyramid_sessioncache.FromCache` or matching
:class:`~pyramid_sessioncache.RelationshipCache` option, and finds the
regions of the Session that runs the statement in ``session.info`` (see
``cache.py``).  Other Session events drop the Session's local cache when
what it holds may no longer be what a query would return, and record the
tables a transaction writes (see ``invalidation.py``).
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import ORMExecuteState, Query, Session
from sqlalchemy.sql import Executable

from . import _sqlalchemy, invalidation, local, stats
from .cache import ALL_TABLES, SessionCache, cache_of
from .errors import NoRegionsError, NotCacheableError
from .keys import BYPASS_OPTIONS, EntryKey
from .options import FromCache, caching_option, statement_option
from .regions import Region
from .rows import LOADER_FLAG, CachedRows, LocalResult

try:
    from zope.sqlalchemy.datamanager import ZopeTransactionEvents
except ImportError:  # pragma: no cover - a dependency; the engine does not need it
    _ZOPE_DO_ORM_EXECUTE = None
else:
    _ZOPE_DO_ORM_EXECUTE = getattr(ZopeTransactionEvents, "do_orm_execute", None)

log = logging.getLogger(__name__)

#: ``session.info`` key of a loader Session: the tables its statements read.
LOADER_TABLES = "sessioncache.loader.tables"
#: Isolation levels whose snapshot may predate the versions a query reads.
SNAPSHOT_LEVELS = frozenset({"REPEATABLE READ", "SERIALIZABLE", "SNAPSHOT"})


def install() -> None:
    """Install the add-on's Session and mapper listeners (once per process)."""
    if event.contains(Session, "do_orm_execute", _do_orm_execute):
        return
    event.listen(Session, "do_orm_execute", _do_orm_execute)
    event.listen(Session, "after_flush", _flushed)
    event.listen(Session, "after_commit", invalidation.commit_written)
    event.listen(Session, "after_transaction_end", _transaction_ended)
    event.listen(Session, "after_soft_rollback", _drop_local)


def _drop_local(session: Session, *args: Any) -> None:
    local.drop(session)


def _flushed(session: Session, flush_context: Any) -> None:
    invalidation.written(session).update(invalidation.flushed_tables(session))
    _drop_local(session)


def _transaction_ended(session: Session, transaction: Any) -> None:
    _drop_local(session)
    if transaction.parent is None:
        # Committed writes were published by after_commit; these are rolled back.
        session.info.pop(invalidation.WRITTEN_KEY, None)


def _bypassed(options: Any) -> bool:
    # Streamed results cannot be kept, and populate_existing asks for fresh rows.
    if not BYPASS_OPTIONS.isdisjoint(options) and any(options.get(name) for name in BYPASS_OPTIONS):
        return True
    return "_sa_orm_load_options" in options and _sqlalchemy.legacy_bypass(options)


def _write(state: ORMExecuteState) -> None:
    session = state.session
    if statement_option(state.statement, relationships=True) is not None:
        raise NotCacheableError(f"only SELECT statements can be cached, not {type(state.statement).__name__}")
    tables = invalidation.written(session)
    if state.is_update or state.is_delete or state.is_insert:
        tables |= invalidation.statement_tables(state.statement.table)
        if state.bind_mapper is not None:
            tables |= invalidation.mapper_tables(state.bind_mapper)
    _drop_local(session)


def _do_orm_execute(state: ORMExecuteState) -> Any:
    statement = state.statement
    if not statement.is_select:
        # A write through the Session may change what any cached query of
        # this Session returns; text() may be anything, so it counts too.
        _write(state)
        return None
    session = state.session
    if LOADER_FLAG in session.info:
        session.info[LOADER_TABLES] |= invalidation.statement_tables(statement)
        return None
    option = caching_option(statement)
    if option is None:
        return None
    if not _sqlalchemy.later_listeners(state):
        return _cached(state, option)
    # The application's listeners that come after this one may still change
    # the statement (with_loader_criteria per tenant, say): run them now, so
    # that what is keyed and stored is what would run.  They have run, so
    # the ORM must not run them again after this listener: return a result.
    result = _sqlalchemy.run_later_listeners(state)
    if result is None:
        option = caching_option(state.statement)  # they may have changed it
        result = None if option is None else _cached(state, option)
    return state.invoke_statement() if result is None else result


def _cached(state: ORMExecuteState, option: FromCache) -> Any:
    """Return the result of ``state``'s statement from ``option``'s region, or None to run it uncached."""
    statement = state.statement
    session = state.session
    if option.relationships_only and state.lazy_loaded_from is None:
        return None  # an eager load (selectin, subquery): the parent's entry holds it
    cache = _cache_of(session)
    region = cache.region(option.region)
    if _sqlalchemy.is_column_load(statement):
        return None
    options = _sqlalchemy.execution_options(state)
    key = _entry_key(cache, region, session, statement, state.parameters, options, state.bind_arguments, option)
    if key is None:
        return None
    if region.is_local:
        value, hit = region.get_or_create(
            key.text,
            lambda: LocalResult(state.invoke_statement().freeze()),
            session,
            option.expire,
            valid=_current_in(session),
        )
        result = value.result()
    else:
        value, hit = _shared(state, cache, region, key, option.expire)
        result = _objects_of(session, region, key.text, value, statement)
    _record(cache, session, region, hit, key)
    return result


def cached_query(
    session: Session, query: Any, region: str | None = None, cache_key: str | None = None, expire: int | None = None
) -> Any:
    """Run ``query`` through the cache region ``region`` of ``session``.

    :param query: a 2.0 ``select()``, executed on ``session`` and returned
        as its ``Result`` (``.scalars()``, ``.one()``, ``.all()``); or a
        legacy ``Query`` (of ``session``), returned with the caching option
        applied (``.one()``, ``.all()``, iteration).
    :param region: a configured region name; default: the cache's default region.
    :param cache_key: a readable prefix for the entry's key.
    :param expire: seconds to keep a new entry, instead of the region's.

    The same as ``session.execute(query.options(FromCache(region, ...)))``,
    except that a hit is served before the Session's execution machinery
    runs, which costs as much as a local look-up itself.  Raises :class:`~pyramid_sessioncache.UnknownRegionError`
    for an unknown region, :class:`~pyramid_sessioncache.NoRegionsError` for
    a Session that caches nowhere and
    :class:`~pyramid_sessioncache.NotCacheableError` for anything but a
    SELECT, before anything is executed.
    """
    cache = _cache_of(session)
    name = region or cache.default_region
    found = cache.region(name)
    given = statement_option(query)
    if given is not None:
        raise NotCacheableError(
            f"cached_query() got a statement that has a caching option already, {given!r}: "
            "name the region in one place, the statement's option or cached_query()"
        )
    option = FromCache(name, cache_key, expire)
    if isinstance(query, Query):
        return query.options(option)
    if isinstance(query, Executable) and getattr(query, "is_select", False):
        result = _early_hit(session, cache, found, query, option)
        return session.execute(query.options(option)) if result is None else result
    if isinstance(query, Executable):
        raise NotCacheableError(f"only SELECT statements can be cached, not {type(query).__name__}: {query}")
    raise NotCacheableError(f"cached_query() expects a select() or a Query, got {query!r}")


def _cache_of(session: Session) -> SessionCache:
    cache = cache_of(session)
    if cache is None:
        raise NoRegionsError(
            "this Session has no cache regions: make it with "
            "sessionmaker(info=session_cache.session_info()), or through pyramid_sessioncache"
        )
    return cache


def _entry_key(
    cache: SessionCache,
    region: Region,
    session: Session,
    statement: Any,
    parameters: Any,
    options: Any,
    bind_arguments: dict,
    option: FromCache,
) -> EntryKey | None:
    """Return the key of ``statement``'s entry in ``region``, or None when it must run uncached.

    Autoflushes first, as the query would: a look-up must not ignore the
    Session's pending inserts, updates and deletes.
    """
    if not region.enabled or _bypassed(options):
        return None
    _sqlalchemy.autoflush(session, options)
    if not region.is_local and invalidation.WRITTEN_KEY in session.info:
        # What this transaction wrote is in no shared entry: until it ends,
        # the Session reads around shared regions and stores nothing there.
        return None
    key = cache.key(statement, parameters, options, session.get_bind(**bind_arguments), option.cache_key)
    if key is None:
        log.debug("uncached: statement cannot be keyed (region %s)", region.name)
    return key


def _early_hit(session: Session, cache: SessionCache, region: Region, statement: Any, option: FromCache) -> Any:
    """Return a hit read before ``Session.execute()`` runs, or None to let the ORM path decide.

    The checks of :func:`_cached`, on what can be seen before an execution:
    the caller gives a statement alone, so no other listener may change it,
    and no Session-wide execution option may apply.  Anything but a plain
    hit (a miss, an entry to regenerate, a shape whose tables are not known
    yet) goes the ORM way.
    """
    if not all(map(_leaves_selects_alone, session.dispatch.do_orm_execute)):
        return None
    if getattr(session, "execution_options", None):
        return None
    bind_arguments = _sqlalchemy.bind_arguments(statement)
    key = _entry_key(cache, region, session, statement, None, statement.get_execution_options(), bind_arguments, option)
    if key is None:
        return None
    if region.is_local:
        value = region.peek(key.text, session, _current_in(session))
        if value is None:
            return None
        result = value.result()
    else:
        if cache.invalidation == "auto":
            tables = cache.tables_read.get(key.shape)
            if tables is None:
                return None
            value = region.peek(key.text, session, _versions_valid(region, tables), tables)
        else:  # entries have no versions to check, as in _shared()
            value = region.peek(key.text, session)
        if value is None:
            return None
        _begin(session, bind_arguments)
        result = _objects_of(session, region, key.text, value, statement)
    _record(cache, session, region, True, key)
    return result


def _record(cache: SessionCache, session: Session, region: Region, hit: bool, key: EntryKey) -> None:
    stats.record(cache.stats, session, region.name, hit, key.text)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("cache %s: region %s key %s", "hit" if hit else "miss", region.name, key.text)


def _leaves_selects_alone(listener: Any) -> bool:
    # This module's listener, and zope.sqlalchemy's, which only marks the
    # Session changed after ORM DML: neither changes a SELECT.
    return listener is _do_orm_execute or getattr(listener, "__func__", None) is _ZOPE_DO_ORM_EXECUTE


def _current_in(session: Session):
    return lambda value, versions: value.current(session)


def _objects_of(session: Session, region: Region, key: str, value: CachedRows, statement: Any) -> Any:
    """Return ``value`` as a Result of ``session``'s objects.

    A region hands back the same stored value until it changes (Redis
    too: see ``_beaker.SignedRedisNamespaceManager``); the objects built from
    it are remembered with the Session's local cache (and dropped with it),
    so hitting the same entry again in one Session costs what a local hit
    costs.
    """
    if not any(value.entity_columns):  # plain rows: nothing to build twice
        return value.result(session, _propagating(statement))
    built = local.entries(session).setdefault(region.namespace_name + ".objects", {})
    seen = built.get(key)
    if seen is None or seen[0] is not value:
        # First use in this Session (most requests have no second): just build.
        built[key] = (value, None)
        return value.result(session, _propagating(statement))
    if seen[1] is not None and seen[1].current(session):
        return seen[1].result()
    objects = LocalResult(value.result(session, _propagating(statement)).freeze())
    built[key] = (value, objects)
    return objects.result()


def _shared(state: ORMExecuteState, cache: SessionCache, region: Region, key: Any, expire: int | None):
    session = state.session
    _begin(session, state.bind_arguments)

    def connection() -> Any:
        return session.connection(bind_arguments=state.bind_arguments)

    if cache.invalidation != "auto":
        return region.get_or_create(key.text, lambda: _snapshot(state, connection()), session, expire)

    tables = cache.tables_read.get(key.shape)
    if tables is None:
        tables = _learn(cache, key.shape, invalidation.statement_tables(state.statement))
    verdict = {"store": True}

    def create() -> CachedRows:
        versions = region.versions(tables)  # before the query: see invalidation.py
        value = _snapshot(state, connection())
        if versions is None:  # the backend failed: nothing to tag the result with
            verdict["store"] = False
        elif not value.tables <= frozenset(tables):
            # Eager loads read tables the statement does not name; versions
            # were not read for them in time, so keep this one result only.
            _learn(cache, key.shape, value.tables.union(tables))
            verdict["store"] = False
        elif _snapshot_isolated(connection()):
            verdict["store"] = False
        value.tables, value.versions = tables, versions
        return value

    return region.get_or_create(
        key.text,
        create,
        session,
        expire,
        store=lambda value: verdict["store"],
        valid=_versions_valid(region, tables),
        tables=tables,
    )


def _versions_valid(region: Region, tables: tuple[str, ...]):
    # An entry is valid while the versions of the tables it read are those
    # it was stored with; ``now`` are those versions when the backend read
    # them with the entry (Redis).
    return lambda value, now: (
        (now if now is not None and value.tables == tables else region.versions(value.tables)) == value.versions
    )


def _begin(session: Session, bind_arguments: dict) -> None:
    if session.dispatch.after_begin:
        # Begin the Session's transaction on this bind as the query would
        # have: whatever joins on after_begin (zope.sqlalchemy, so that
        # pyramid_tm commits changes made to these objects) must see it.
        session.connection(bind_arguments=bind_arguments)


def _learn(cache: SessionCache, shape: str, tables: Any) -> tuple[str, ...]:
    known = tuple(sorted({ALL_TABLES, *tables}))
    if len(cache.tables_read) >= 2000:
        cache.tables_read.clear()
    cache.tables_read[shape] = known
    return known


def _snapshot_isolated(connection: Any) -> bool:
    # Under REPEATABLE READ or SERIALIZABLE a transaction reads from a
    # snapshot that can be older than the versions read just now; storing
    # its result could tag old rows with new versions.  pysqlite starts no
    # transaction for a SELECT, so SQLite reads the latest data regardless.
    if connection.dialect.name == "sqlite":
        return False
    level = connection.get_execution_options().get("isolation_level") or connection.default_isolation_level
    return str(level).upper() in SNAPSHOT_LEVELS


def _own_key(key: Any) -> bool:
    return isinstance(key, str) and key.startswith("sessioncache")


def _propagating(statement: Any) -> tuple:
    return tuple(opt for opt in _sqlalchemy.statement_options(statement) if opt.propagate_to_loaders)


def _snapshot(state: ORMExecuteState, connection: Any) -> CachedRows:
    """Run the statement in a fresh Session on the caller's connection.

    The fresh Session's objects hold exactly what the database returned in
    the caller's transaction, whatever the caller's Session has in memory.
    """
    # The statement has been through the caller's listeners: it runs
    # without them.  The relationship loads it makes go through those on the
    # Session class, with the caller's info as they would have seen it (the
    # add-on's own keys stay behind).
    info = {key: value for key, value in state.session.info.items() if not _own_key(key)}
    info.update({LOADER_FLAG: True, LOADER_TABLES: set()})
    loader = Session(bind=connection, info=info, autoflush=False, expire_on_commit=False)
    try:
        result = _sqlalchemy.execute_without_listeners(
            loader, state.statement, state.parameters, state.local_execution_options
        )
        value = CachedRows.from_result(result)
        read = loader.info[LOADER_TABLES] | invalidation.statement_tables(state.statement)
        value.tables = frozenset(read | invalidation.record_tables(value))
        return value
    finally:
        loader.close()
