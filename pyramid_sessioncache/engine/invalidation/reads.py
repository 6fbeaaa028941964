"""What an entry read: the tables of a statement, of a loaded result, of a statement shape."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from sqlalchemy.orm import attributes
from sqlalchemy.sql import visitors
from sqlalchemy.sql.expression import TableClause

#: The pseudo-table every entry depends on: bumping it invalidates them all.
ALL_TABLES = "*"


def version_name(table: Any) -> str:
    """The name a table's version is kept under: its bare name, in lower case.

    Reads and writes must agree on it whatever spelled the table: a
    ``Table``, SQL text in any case, with or without a schema.  Tables of
    one name in two schemas share a version: a write to one invalidates
    what read the other, which costs misses, never stale data.
    """
    return (table if isinstance(table, str) else table.name).lower()


def _tables_under(element: Any) -> set[str]:
    names: set[str] = set()
    for node in visitors.iterate(element):
        if isinstance(node, TableClause):
            names.add(version_name(node))
        table = getattr(node, "table", None)
        while table is not None and not isinstance(table, TableClause):
            table = getattr(table, "element", None)
        if table is not None:
            names.add(version_name(table))
    return names


def statement_tables(statement: Any) -> frozenset[str]:
    """Return the names of the tables ``statement`` reads: FROMs, joins, subqueries, CTEs."""
    return frozenset(_tables_under(statement))


def mapper_tables(mapper: Any) -> set[str]:
    """Return the names of the tables a mapped class is stored in."""
    return {version_name(table) for table in mapper.tables}


def record_tables(value: Any) -> set[str]:
    """Return the tables behind the objects of a cached result and the relationships they hold."""
    names: set[str] = set()
    for cls, _, _ in value.classes:
        names |= mapper_tables(attributes.manager_of_class(cls).mapper)
    for cls, key in value.loaded_relationships():
        secondary = attributes.manager_of_class(cls).mapper.relationships[key].secondary
        if secondary is not None:
            names.add(version_name(secondary))
    return names


class ShapeTables:
    """What each statement shape was found to read, for the shapes seen most recently.

    A shape is a statement's structure, parameters aside
    (:attr:`~pyramid_sessioncache.engine.keys.EntryKey.shape`).  Knowing its
    tables before a query runs lets a miss read their versions first.
    Least recently used shapes are forgotten one at a time past ``size``.
    """

    def __init__(self, size: int = 2000) -> None:
        self.size = size
        self._tables: OrderedDict[str, tuple[str, ...]] = OrderedDict()

    def get(self, shape: str) -> tuple[str, ...] | None:
        """Return the sorted tables ``shape`` reads (with :data:`ALL_TABLES`), or None if not known."""
        tables = self._tables.get(shape)
        if tables is not None:
            self._tables.move_to_end(shape)
        return tables

    def learn(self, shape: str, tables: Iterable[str]) -> tuple[str, ...]:
        """Record that ``shape`` reads ``tables``; return what is now known of it."""
        known = tuple(sorted({ALL_TABLES, *tables}))
        self._tables[shape] = known
        self._tables.move_to_end(shape)
        while len(self._tables) > self.size:
            self._tables.popitem(last=False)
        return known

    def __len__(self) -> int:
        return len(self._tables)
