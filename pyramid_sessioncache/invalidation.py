"""Explicit invalidation, and finding where a query's result is stored.

A query is named the way it runs: a legacy ``Query`` (which knows its
Session), or a ``select()`` with the Session given.  A ``Query`` and the
equivalent ``select()`` share their key, so either reaches the entry the
other stored.
"""

from __future__ import annotations

from typing import Any

from beaker.cache import Cache
from sqlalchemy.orm import Query, attributes
from sqlalchemy.sql import Executable, visitors
from sqlalchemy.sql.expression import TableClause

from . import _sqlalchemy
from .cache import ALL_TABLES, SessionCache, cache_of
from .errors import NoRegionsError, NotCacheableError
from .options import statement_option


def _statement(query: Any, session: Any) -> tuple[Any, Any, Any]:
    if isinstance(query, Query):
        statement, parameters = _sqlalchemy.query_statement(query)
        return statement, parameters, session or query.session
    if isinstance(query, Executable) and getattr(query, "is_select", False):
        if session is None:
            raise TypeError("a select() needs the Session it runs in: pass session=")
        return query, None, session
    raise NotCacheableError(f"expected a select() or a Query, got {query!r}")


def _cache(session: Any) -> SessionCache:
    cache = cache_of(session)
    if cache is None:
        raise NoRegionsError("this Session has no cache regions")
    return cache


def _locate(query, session, region, cache_key, parameters, execution_options):
    statement, query_parameters, session = _statement(query, session)
    option = statement_option(statement)
    cache = _cache(session)
    chosen = cache.region(region or (option.region if option else None))
    if cache_key is None and option is not None:
        cache_key = option.cache_key
    options = {**statement.get_execution_options(), **(execution_options or {})}
    bind = session.get_bind(clause=statement)
    key = cache.key(statement, parameters or query_parameters, options, bind, cache_key)
    if key is None:
        raise NotCacheableError(f"this statement has no cache key (it is never cached): {statement}")
    return cache, chosen, session, key.text


def cache_parameters(
    query: Any,
    session: Any = None,
    region: str | None = None,
    cache_key: str | None = None,
    parameters: Any = None,
    execution_options: Any = None,
) -> tuple[Cache, str]:
    """Return ``(beaker_cache, key)``: where ``query``'s result is stored.

    ``beaker_cache.get(key)`` then reads the stored value.  The region and
    ``cache_key`` default to those of the query's ``FromCache`` option, then
    to the default region.  For a ``select()``, pass the ``session``.

    Raises :class:`~pyramid_sessioncache.NotCacheableError` for a statement
    that cannot be keyed.
    """
    _, chosen, session, key = _locate(query, session, region, cache_key, parameters, execution_options)
    return chosen.cache_for(session), key


def invalidate(
    query: Any,
    session: Any = None,
    region: str | None = None,
    cache_key: str | None = None,
    parameters: Any = None,
    execution_options: Any = None,
) -> None:
    """Forget the cached result of ``query`` (arguments as for :func:`cache_parameters`)."""
    cache, chosen, session, key = _locate(query, session, region, cache_key, parameters, execution_options)
    chosen.remove(key, session)
    cache.stats.region(chosen.name).invalidations += 1


def invalidate_region(cache: SessionCache, name: str | None = None, session: Any = None) -> None:
    """Forget every entry of region ``name`` (of ``session``, for a local region)."""
    region = cache.region(name)
    region.clear(session)
    cache.stats.region(region.name).invalidations += 1


def invalidate_all(cache: SessionCache, session: Any = None) -> None:
    """Forget every entry of every region of ``cache``."""
    for name in cache.regions:
        invalidate_region(cache, name, session)


# Automatic invalidation ----------------------------------------------------
#
# Every shared entry records the tables its result read, and the version
# token each of those tables had *before* the query ran.  A hit reads the
# current tokens (one backend read: MGET on Redis) and is served only if
# none changed.  When a transaction that wrote to tables commits, each
# written table gets a new random token in every shared region, so every
# process sharing the backend stops serving entries that read it; nothing
# has to list or flush keys.  Reading the tokens before the query means a
# write that commits while the query runs leaves the entry already stale.

#: ``session.info`` key: the tables the current transaction wrote (a set,
#: present as soon as it wrote anything, even if which tables is unknown).
WRITTEN_KEY = "sessioncache.written"


def _table_name(table: Any) -> str:
    return table.fullname


def _tables_under(element: Any) -> set[str]:
    names: set[str] = set()
    for node in visitors.iterate(element):
        if isinstance(node, TableClause):
            names.add(_table_name(node))
        table = getattr(node, "table", None)
        while table is not None and not isinstance(table, TableClause):
            table = getattr(table, "element", None)
        if table is not None:
            names.add(_table_name(table))
    return names


def statement_tables(statement: Any) -> frozenset[str]:
    """Return the names of the tables ``statement`` reads: FROMs, joins, subqueries, CTEs."""
    return frozenset(_tables_under(statement))


def mapper_tables(mapper: Any) -> set[str]:
    """Return the names of the tables a mapped class is stored in."""
    return {_table_name(table) for table in mapper.tables}


def _relationship_tables(prop: Any) -> set[str]:
    if prop.secondary is not None:
        return {_table_name(prop.secondary)}
    return mapper_tables(prop.mapper) if prop.uselist else set()


def flushed_tables(session: Any) -> set[str]:
    """Return the tables a flush about to be written writes (call from ``after_flush``).

    Inserted and deleted objects write their mapper's tables, and deleted
    ones the association tables and one-to-many children they hold.  A
    changed object writes its tables if a column changed, and the tables
    behind any relationship whose membership changed.
    """
    names: set[str] = set()
    for obj in session.new:
        state = attributes.instance_state(obj)
        names |= mapper_tables(state.mapper)
        for prop in state.mapper.relationships:
            if state.attrs[prop.key].history.has_changes():
                names |= _relationship_tables(prop)
    for obj in session.deleted:
        mapper = attributes.instance_state(obj).mapper
        names |= mapper_tables(mapper)
        for prop in mapper.relationships:
            names |= _relationship_tables(prop)
    for obj in session.dirty:
        state = attributes.instance_state(obj)
        if session.is_modified(obj, include_collections=False):
            names |= mapper_tables(state.mapper)
        for prop in state.mapper.relationships:
            if state.attrs[prop.key].history.has_changes():
                names |= _relationship_tables(prop)
    return names


def written(session: Any) -> set[str]:
    """Return the set of tables the Session's current transaction wrote, marking that it wrote."""
    found = session.info.get(WRITTEN_KEY)
    if found is None:
        found = session.info[WRITTEN_KEY] = set()
    return found


def invalidate_tables(session: Any, *tables: str) -> None:
    """Invalidate the entries that read ``tables`` when ``session``'s transaction commits.

    For writes the add-on cannot see: SQL run through ``text()`` or
    ``session.connection()``.  With no table, every entry of every shared
    region.  Like zope.sqlalchemy's ``mark_changed()``, call it after such
    a write; in a Pyramid request, ``request.sessioncache.mark_changed()``
    does both.  A Session that has written reads around the shared regions
    until its transaction ends.
    """
    written(session).update(tables or (ALL_TABLES,))


def commit_written(session: Any) -> None:
    """Publish the writes of a committed transaction: bump the versions of its tables."""
    tables = session.info.pop(WRITTEN_KEY, None)
    if not tables:
        return
    cache = cache_of(session)
    if cache is None or cache.invalidation != "auto":
        return
    for region in cache.shared_regions:
        region.bump(sorted(tables))
        cache.stats.region(region.name).invalidations += 1


def record_tables(value: Any) -> set[str]:
    """Return the tables behind the objects of a cached result and the relationships they hold."""
    names: set[str] = set()
    for cls, _, _ in value.classes:
        names |= mapper_tables(attributes.manager_of_class(cls).mapper)
    for cls, key in value.loaded_relationships():
        secondary = attributes.manager_of_class(cls).mapper.relationships[key].secondary
        if secondary is not None:
            names.add(_table_name(secondary))
    return names
