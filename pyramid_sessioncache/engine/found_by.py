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

from typing import Any

from sqlalchemy.engine import Result

from .. import _sqlalchemy

#: (statement class, the ids of its selected columns) -> (those columns, what each
#: result column is found by: see ``_sqlalchemy.column_objects()``).
_OBJECTS: dict[tuple, tuple[tuple, list[tuple] | None]] = {}
#: How many statement shapes :data:`_OBJECTS` keeps, and how many metadata a value keeps (one per statement shape).
_MAX_SHAPES = 2000
_MAX_PER_VALUE = 8


def keyed_like(result: Result, value: Any, statement: Any) -> Result:
    """Return ``result``, made from ``value``, whose columns are found as ``statement``'s uncached result finds them.

    ``value.found_by`` keeps the metadata made for each statement shape,
    so that a hit pays for a look-up only.
    """
    columns = _columns(statement)
    if columns is None:
        return result
    # By identity: each kept entry holds its columns, so no other object takes their ids.
    shape = (type(statement), *map(id, columns))
    kept = value.found_by
    found = kept.get(shape)
    if found is None:
        objects = _objects(statement, shape, columns)
        metadata = None if objects is None else _sqlalchemy.found_by(result, objects)
        if metadata is None:
            return result
        if len(kept) >= _MAX_PER_VALUE:
            kept.clear()
        found = kept[shape] = (columns, metadata)
    _sqlalchemy.set_metadata(result, found[1])
    return result


def _columns(statement: Any) -> tuple | None:
    """What ``statement`` selects, as given (its raw columns, or a ``TextualSelect``'s), or None."""
    columns = getattr(statement, "_raw_columns", None)
    if columns is None:
        columns = getattr(statement, "column_args", None)
        if columns is None:
            return None
    return tuple(columns)


def _objects(statement: Any, shape: tuple, columns: tuple) -> list[tuple] | None:
    found = _OBJECTS.get(shape)
    if found is None:
        found = (columns, _sqlalchemy.column_objects(statement))
        if len(_OBJECTS) >= _MAX_SHAPES:
            _OBJECTS.clear()
        _OBJECTS[shape] = found
    return found[1]
