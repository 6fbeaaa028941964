"""Turning ORM results into values a cache can keep, and back.

Two kinds of values:

- :class:`LocalResult`, for ``ext:local_session``: the frozen result itself,
  holding the very objects of the Session.  A hit hands them back.
- :class:`CachedRows`, for every shared region: plain data (column values,
  identities, which objects a relationship holds), never ORM objects, so
  no Session's pending state can leak into it, and unpickling is cheap.

A :class:`CachedRows` is taken from a *fresh* Session on the same
connection, so it holds what the database returned inside the current
transaction, not what the caller's Session has in memory.  A hit turns it
into objects of the caller's Session as a query would: an object already
in the identity map is reused and only its unloaded attributes are filled,
so pending changes are never overwritten; a new object is made persistent
and clean, and gets the ``load`` event (with ``context=None``, as
``Session.merge()`` does) so ``@reconstructor`` methods run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.engine import FrozenResult, Result
from sqlalchemy.orm import Session, attributes, instrumentation

from . import _sqlalchemy

#: ``session.info`` flag of the Sessions that load values to cache; the ORM
#: hook leaves their queries alone.
LOADER_FLAG = "sessioncache.loader"


class LocalResult(Sequence):
    """A result kept on its own Session: reading it returns the same objects.

    Indexing it gives what ``Query.all()`` gives: entities for a
    single-entity query, rows otherwise, so the old beaker_caching example's
    ``person10 is cache.get(key)[0]`` holds.
    """

    __slots__ = ("frozen", "_items")

    def __init__(self, frozen: FrozenResult) -> None:
        self.frozen = frozen
        rows = frozen().all()
        self._items = [row[0] for row in rows] if _sqlalchemy.is_single_entity(frozen) else rows

    def __getitem__(self, index):  # type: ignore[override]
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)

    def result(self) -> Result:
        """Return a new Result over the stored rows."""
        return self.frozen()


def _is_entity(value: Any) -> bool:
    return getattr(type(value), "_sa_class_manager", None) is not None


class CachedRows:
    """A result as plain data: rows, and the objects they refer to.

    ``objects`` is a list of ``(class, identity_key, columns, relationships)``;
    ``rows`` are tuples where the columns flagged in ``entity_columns``
    hold an index into ``objects`` (or None).  ``tables`` names the tables
    the result was read from and ``versions`` their version tokens when it
    was read (see ``invalidation.py``).
    """

    __slots__ = ("shell", "entity_columns", "objects", "rows", "tables", "versions")

    def __init__(self, shell, entity_columns, objects, rows, tables=(), versions=()):
        self.shell = shell
        self.entity_columns = entity_columns
        self.objects = objects
        self.rows = rows
        self.tables = tables
        self.versions = versions

    def __getstate__(self):
        return (self.shell, self.entity_columns, self.objects, self.rows, self.tables, self.versions)

    def __setstate__(self, state):
        self.shell, self.entity_columns, self.objects, self.rows, self.tables, self.versions = state

    @classmethod
    def from_result(cls, result: Result) -> CachedRows:
        """Snapshot ``result``, whose objects belong to a throw-away Session."""
        frozen = result.freeze()
        rows = [tuple(row) for row in frozen()]
        width = len(rows[0]) if rows else 0
        entity_columns = tuple(any(_is_entity(row[i]) for row in rows) for i in range(width))
        objects: list[tuple] = []
        index: dict[int, int] = {}

        def ref(obj: Any) -> int:
            position = index.get(id(obj))
            if position is None:
                position = index[id(obj)] = len(objects)
                objects.append(())  # reserved: children may refer back to it
                objects[position] = _record(obj, ref)
            return position

        plain_rows = [
            tuple(
                ref(value) if flag and value is not None else value
                for value, flag in zip(row, entity_columns, strict=False)
            )
            for row in rows
        ]
        return cls(frozen.with_new_rows([]), entity_columns, objects, plain_rows)

    def result(self, session: Session, load_options: tuple = ()) -> Result:
        """Return a Result whose objects belong to ``session``.

        ``load_options`` are the propagating loader options of the query,
        given to each new object as the ORM would.
        """
        objects = _hydrate(session, self.objects, load_options)
        flags = self.entity_columns
        rows = [
            tuple(
                objects[value] if flag and value is not None else value for value, flag in zip(row, flags, strict=False)
            )
            for row in self.rows
        ]
        return self.shell.with_new_rows(rows)()


def _record(obj: Any, ref) -> tuple:
    state = attributes.instance_state(obj)
    mapper = state.mapper
    loaded = state.dict
    columns = {prop.key: loaded[prop.key] for prop in mapper.column_attrs if prop.key in loaded}
    relationships = {}
    for prop in mapper.relationships:
        if prop.key not in loaded:
            continue
        value = loaded[prop.key]
        if value is None:
            relationships[prop.key] = None
        elif prop.uselist:
            members = value.values() if isinstance(value, dict) else value
            relationships[prop.key] = [ref(member) for member in members]
        else:
            relationships[prop.key] = ref(value)
    return (type(obj), state.key, columns, relationships)


def _hydrate(session: Session, records: list[tuple], load_options: tuple) -> list[Any]:
    identity_map = session.identity_map
    objects: list[Any] = []
    fill: list[tuple[Any, dict]] = []
    created = []
    for cls, identity_key, columns, relationships in records:
        obj = identity_map.get(identity_key)
        if obj is None:
            obj = _new_object(session, cls, identity_key, columns)
            if load_options:
                _sqlalchemy.propagate_options(attributes.instance_state(obj), load_options)
            created.append(obj)
            fill.append((obj, relationships))
        else:
            state = attributes.instance_state(obj)
            missing = [key for key in columns if key not in state.dict]
            if missing:
                for key in missing:
                    state.dict[key] = columns[key]
                _sqlalchemy.commit_loaded(state, missing)
            fill.append((obj, relationships))
        objects.append(obj)
    for obj, relationships in fill:
        loaded = attributes.instance_state(obj).dict
        for key, value in relationships.items():
            if key in loaded:
                continue  # loaded (and maybe changed) in this session: keep it
            if isinstance(value, list):
                value = [objects[i] for i in value]
            elif value is not None:
                value = objects[value]
            attributes.set_committed_value(obj, key, value)
    for obj in created:
        state = attributes.instance_state(obj)
        state.manager.dispatch.load(state, None)
        session.dispatch.loaded_as_persistent(session, state)
    return objects


def _new_object(session: Session, cls: type, identity_key: Any, columns: dict) -> Any:
    manager = instrumentation.manager_of_class(cls)
    obj = manager.new_instance()
    state = attributes.instance_state(obj)
    _sqlalchemy.add_loaded(session, state, identity_key)
    state.dict.update(columns)
    missing = [prop.key for prop in state.mapper.column_attrs if prop.key not in columns]
    if missing:
        _sqlalchemy.expire_missing(state, missing)
    return obj
