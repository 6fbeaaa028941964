"""A cached Result's columns, found by the entities and columns of the statement that asked for it.

An uncached Result finds a column by its name and by what the statement
selected: ``row._mapping[Person]``, ``result.scalars(Person.name)``,
``row._mapping[person.c.id]``.  A stored result keeps the names only (the
objects hold the query that made them: see ``_sqlalchemy.detached()``,
and no pickle keeps them), so each Result a cache hands out is given the
objects of the statement it answers, which may be other objects than
those of the statement that stored it (a new ``aliased()`` each time).
"""

from __future__ import annotations

import operator
from typing import Any

from sqlalchemy.engine import Result

from .. import _sqlalchemy


def keyed_like(result: Result, value: Any, statement: Any) -> Result:
    """Return ``result``, made from ``value``, whose columns are found as ``statement``'s uncached result finds them.

    ``value.found_by`` keeps the metadata made for the last statement
    shape that read it, with that statement's columns: the next hit of a
    statement made from the same objects (its classes, attributes and
    columns) pays for a comparison only.  One per value, and nothing kept
    elsewhere: statements made of new objects on every request (a label,
    an ``aliased()``, a function) would otherwise keep all of them alive.
    """
    columns = _sqlalchemy.selected_columns(statement)
    if columns is None:
        return result
    kept = value.found_by
    if kept is not None and kept.kind is type(statement) and _same(kept.columns, columns):
        _sqlalchemy.set_metadata(result, kept.metadata)
        return result
    objects = _sqlalchemy.column_objects(statement)
    metadata = None if objects is None else _sqlalchemy.found_by(result, objects)
    if metadata is not None:
        value.found_by = Kept(type(statement), columns, metadata)
        _sqlalchemy.set_metadata(result, metadata)
    return result


class Kept:
    """The metadata made for a statement (its class and columns): not copied with the value that keeps it.

    It holds the statement's own objects, which do not deep-copy (an
    application's ``copy.deepcopy(session.info)``, local entries and all):
    a copy of the value makes it again when read.
    """

    __slots__ = ("kind", "columns", "metadata")

    def __init__(self, kind: type, columns: tuple, metadata: Any) -> None:
        self.kind = kind
        self.columns = columns
        self.metadata = metadata

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self) -> Any:
        return (_nothing, ())


def _nothing() -> None:
    return None


def _same(kept: tuple, columns: tuple) -> bool:
    # By identity: SQLAlchemy's annotated elements compare equal to what
    # they annotate (an ORM class's table to the Core table).
    return len(kept) == len(columns) and all(map(operator.is_, kept, columns))
