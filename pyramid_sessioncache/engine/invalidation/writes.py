"""What a transaction wrote, and publishing it when the transaction commits."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import attributes

from .. import info
from ..cache import cache_of
from .reads import ALL_TABLES, mapper_tables, statement_tables, table_name


def _relationship_tables(prop: Any) -> set[str]:
    if prop.secondary is not None:
        return {table_name(prop.secondary)}
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


def dml_tables(orm_execute_state: Any) -> set[str]:
    """Return the tables an ORM ``insert()``/``update()``/``delete()`` execution writes."""
    names: set[str] = set()
    if orm_execute_state.is_update or orm_execute_state.is_delete or orm_execute_state.is_insert:
        names |= statement_tables(orm_execute_state.statement.table)
        if orm_execute_state.bind_mapper is not None:
            names |= mapper_tables(orm_execute_state.bind_mapper)
    return names


def written(session: Any) -> set[str]:
    """Return the set of tables the Session's current transaction wrote, marking that it wrote."""
    found = session.info.get(info.WRITTEN)
    if found is None:
        found = session.info[info.WRITTEN] = set()
    return found


def has_written(session: Any) -> bool:
    """Whether the Session's current transaction wrote anything."""
    return info.WRITTEN in session.info


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


def forget(session: Any) -> None:
    """Forget what the Session's transaction wrote (it rolled back)."""
    session.info.pop(info.WRITTEN, None)


def commit_written(session: Any) -> None:
    """Publish the writes of a committed transaction: bump the versions of its tables."""
    tables = session.info.pop(info.WRITTEN, None)
    if not tables:
        return
    cache = cache_of(session)
    if cache is None or cache.invalidation != "auto":
        return
    for region in cache.shared_regions:
        region.bump(sorted(tables))
        cache.stats.region(region.name).invalidations += 1
