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

    __slots__ = ("frozen", "_items", "_states")

    def __init__(self, frozen: FrozenResult) -> None:
        self.frozen = frozen
        rows = frozen().all()
        self._items = [row[0] for row in rows] if _sqlalchemy.is_single_entity(frozen) else rows
        self._states = tuple(attributes.instance_state(value) for row in rows for value in row if _is_entity(value))

    def current(self, session: Session) -> bool:
        """Whether every object is still in ``session``, none of it expired.

        Checked on each hit, rather than by listening to every expiry and
        expunge of every Session in the process.
        """
        session_id = session.hash_key
        for state in self._states:  # noqa: SIM110 - no generator: this runs on every local hit
            if state.session_id != session_id or state.expired_attributes:
                return False
        return True

    def __getitem__(self, index):  # type: ignore[override]
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)

    def result(self) -> Result:
        """Return a new Result over the stored rows."""
        return self.frozen()


def _is_entity(value: Any) -> bool:
    return getattr(type(value), "_sa_class_manager", None) is not None


class _NotLoaded:
    """Marks an attribute the loaded object did not have; pickles as itself."""

    def __reduce__(self) -> str:
        return "NOT_LOADED"

    def __repr__(self) -> str:
        return "NOT_LOADED"


NOT_LOADED = _NotLoaded()


class CachedRows:
    """A result as plain data: rows, and the objects they refer to.

    ``classes`` lists, per mapped class, ``(class, column_keys,
    relationship_keys)``; ``objects`` lists ``(class_index, identity_key,
    values, relationships, complete)``, the values and relationships aligned
    with their class's keys (:data:`NOT_LOADED` where the object had none,
    ``complete`` saying it had every column), a relationship holding an
    object index, a list of them, or None.
    ``rows`` are tuples where the columns flagged in ``entity_columns``
    hold an object index (or None).  ``tables`` names the tables the result
    was read from and ``versions`` their version tokens when it was read
    (see ``invalidation.py``).
    """

    __slots__ = ("shell", "entity_columns", "classes", "objects", "rows", "tables", "versions")

    def __init__(self, shell, entity_columns, classes, objects, rows, tables=(), versions=()):
        self.shell = shell
        self.entity_columns = entity_columns
        self.classes = classes
        self.objects = objects
        self.rows = rows
        self.tables = tables
        self.versions = versions

    def __getstate__(self):
        return tuple(getattr(self, name) for name in self.__slots__)

    def __setstate__(self, state):
        for name, value in zip(self.__slots__, state, strict=True):
            setattr(self, name, value)

    @classmethod
    def from_result(cls, result: Result) -> CachedRows:
        """Snapshot ``result``, whose objects belong to a throw-away Session."""
        frozen = result.freeze()
        rows = [tuple(row) for row in frozen()]
        width = len(rows[0]) if rows else 0
        entity_columns = tuple(any(_is_entity(row[i]) for row in rows) for i in range(width))
        snapshot = _Snapshot()
        plain_rows = [
            tuple(
                snapshot.ref(value) if flag and value is not None else value
                for value, flag in zip(row, entity_columns, strict=True)
            )
            for row in rows
        ]
        return cls(frozen.with_new_rows([]), entity_columns, snapshot.classes, snapshot.objects, plain_rows)

    def loaded_relationships(self) -> set[tuple[type, str]]:
        """Return ``(class, key)`` of every relationship some cached object holds."""
        found = set()
        for class_index, _, _, relationships, _ in self.objects:
            cls, _, keys = self.classes[class_index]
            found.update((cls, key) for key, value in zip(keys, relationships, strict=True) if value is not NOT_LOADED)
        return found

    def result(self, session: Session, load_options: tuple = ()) -> Result:
        """Return a Result whose objects belong to ``session``.

        ``load_options`` are the propagating loader options of the query,
        given to each new object as the ORM would.
        """
        flags = self.entity_columns
        if not any(flags):  # plain values only: the stored tuples serve as they are
            return self.shell.with_new_rows(self.rows)()
        objects = _hydrate(session, self.classes, self.objects, load_options)
        if flags == (True,):  # one entity per row, the commonest
            rows = [(None if index is None else objects[index],) for (index,) in self.rows]
        else:
            rows = [
                tuple(
                    objects[value] if flag and value is not None else value
                    for value, flag in zip(row, flags, strict=True)
                )
                for row in self.rows
            ]
        return self.shell.with_new_rows(rows)()


class _Snapshot:
    """Collects the objects of a result, each once, with their loaded state."""

    def __init__(self) -> None:
        self.classes: list[tuple] = []
        self.objects: list[tuple] = []
        self._class_index: dict[type, int] = {}
        self._index: dict[int, int] = {}

    def _layout(self, cls: type, mapper: Any) -> int:
        position = self._class_index.get(cls)
        if position is None:
            columns = tuple(prop.key for prop in mapper.column_attrs)
            relationships = tuple(prop.key for prop in mapper.relationships)
            position = self._class_index[cls] = len(self.classes)
            self.classes.append((cls, columns, relationships))
        return position

    def ref(self, obj: Any) -> int:
        """Return the index of ``obj``, recording it (and what it holds) the first time."""
        position = self._index.get(id(obj))
        if position is not None:
            return position
        position = self._index[id(obj)] = len(self.objects)
        self.objects.append(())  # reserved: what it holds may refer back to it
        state = attributes.instance_state(obj)
        class_index = self._layout(type(obj), state.mapper)
        _, columns, relationships = self.classes[class_index]
        loaded = state.dict
        values = tuple(loaded.get(key, NOT_LOADED) for key in columns)
        complete = all(key in loaded for key in columns)
        props = state.mapper.relationships
        held = tuple(
            self._held(loaded[key], props[key].uselist) if key in loaded else NOT_LOADED for key in relationships
        )
        self.objects[position] = (class_index, state.key, values, held, complete)
        return position

    def _held(self, value: Any, collection: bool) -> Any:
        if value is None:
            return None
        if not collection:
            return self.ref(value)
        members = value.values() if isinstance(value, dict) else value
        return [self.ref(member) for member in members]


class _Plan:
    """What hydrating objects of one class needs, worked out once per hit."""

    __slots__ = (
        "manager",
        "columns",
        "column_set",
        "relationships",
        "relationship_set",
        "impls",
        "expire",
        "load_event",
        "load_path",
    )

    def __init__(self, cls: type, columns: tuple, relationships: tuple) -> None:
        self.manager = manager = instrumentation.manager_of_class(cls)
        mapper = manager.mapper
        self.columns = columns
        self.column_set = frozenset(columns)
        self.relationships = relationships
        self.relationship_set = frozenset(relationships)
        self.impls = tuple(_sqlalchemy.attribute_impl(manager, key) for key in relationships)
        # Columns the class has now but the entry does not know (a model
        # changed since it was stored): expired, so they load on access.
        self.expire = [prop.key for prop in mapper.column_attrs if prop.key not in columns]
        self.load_event = bool(manager.dispatch.load)
        self.load_path = _sqlalchemy.load_path(mapper)


def _hydrate(session: Session, classes: list, records: list, load_options: tuple) -> list[Any]:
    plans = [_Plan(*layout) for layout in classes]
    notify = bool(session.dispatch.loaded_as_persistent) or any(plan.load_event for plan in plans)
    lookup = session.identity_map.get
    objects: list[Any] = []
    append = objects.append
    fill: list[tuple] = []
    created: list[Any] = []
    for class_index, identity_key, values, held, complete in records:
        plan = plans[class_index]
        obj = lookup(identity_key)
        if obj is None:
            obj = plan.manager.new_instance()
            state = attributes.instance_state(obj)
            _sqlalchemy.add_loaded(session, state, identity_key)
            loaded = obj.__dict__
            if plan.expire or not complete:
                missing = plan.expire.copy()
                for key, value in zip(plan.columns, values, strict=True):
                    if value is NOT_LOADED:
                        missing.append(key)
                    else:
                        loaded[key] = value
                _sqlalchemy.expire_missing(state, missing)
            else:
                loaded.update(zip(plan.columns, values, strict=True))
            if load_options:  # as the ORM gives them (see _sqlalchemy.propagate_options)
                state.load_options = load_options
                state.load_path = plan.load_path
            if notify:
                created.append((state, plan))
        else:
            loaded = obj.__dict__
            if not plan.column_set.issubset(loaded):  # expired or unloaded: fill as a query would
                unloaded = [
                    key
                    for key, value in zip(plan.columns, values, strict=True)
                    if key not in loaded and value is not NOT_LOADED
                ]
                for key, value in zip(plan.columns, values, strict=True):
                    if key in unloaded:
                        loaded[key] = value
                _sqlalchemy.commit_loaded(attributes.instance_state(obj), unloaded)
            if plan.relationship_set.issubset(loaded):
                append(obj)
                continue
            state = attributes.instance_state(obj)
        if held.count(NOT_LOADED) != len(held):  # it holds something: a relationship to set
            fill.append((state, loaded, plan.impls, held))
        append(obj)
    for state, loaded, impls, held in fill:
        for impl, value in zip(impls, held, strict=True):
            if value is NOT_LOADED or impl.key in loaded:
                continue  # not in the entry, or loaded (and maybe changed) in this session
            if value.__class__ is list:
                value = [objects[i] for i in value]
            elif value is not None:
                value = objects[value]
            impl.set_committed_value(state, loaded, value)
    for state, plan in created:
        if plan.load_event:
            state.manager.dispatch.load(state, None)
    if created and session.dispatch.loaded_as_persistent:
        for state, _ in created:
            session.dispatch.loaded_as_persistent(session, state)
    return objects
