"""Turning a shared entry back into objects of the caller's Session, as a query would.

An object already in the identity map is reused and only its unloaded
attributes are filled, so pending changes are never overwritten; a new
object is made persistent and clean, and gets the ``load`` event (with
``context=None``, as ``Session.merge()`` does) so ``@reconstructor``
methods run.  Relationships the entry holds are set once every object of
the result exists, since they may refer to each other.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Result
from sqlalchemy.orm import MANYTOONE, Session, attributes, instrumentation
from sqlalchemy.orm.exc import UnmappedColumnError

from .. import _sqlalchemy
from .values import NOT_LOADED, CachedRows, current, private_copy, reached


def result(value: CachedRows, session: Session, load_options: tuple = (), instances: list | None = None) -> Result:
    """Return ``value`` as a Result whose objects belong to ``session``.

    ``load_options`` are the propagating loader options of the query,
    given to each new object as the ORM would.  ``instances``: the objects
    ``value`` was just made from, which the Session may take as they are
    (see :func:`adopted`).  The Result demands ``.unique()`` when the
    query's did.  Values that could be changed in place reach the caller
    as copies of its own (see ``CachedRows.changeable()``).
    """
    return hydrated(value, session, load_options, instances)[0]


def hydrated(
    value: CachedRows, session: Session, load_options: tuple = (), instances: list | None = None
) -> tuple[Result, list]:
    """:func:`result`, and the objects of ``session`` it made ``value.objects`` into, in their order."""
    entities = any(value.entity_columns)
    rows, records = _own_copies(value, objects=entities)
    if not entities:
        return _result(value, rows), []
    objects = None if instances is None else adopted(value, session, instances, load_options)
    if objects is None:
        objects = objects_of(session, value.classes, records, load_options)
    return result_over(value, objects, rows), objects


def result_over(value: CachedRows, objects: list, rows: list | None = None) -> Result:
    """Return ``value`` as a Result of ``objects``, the Session's objects that ``value.objects`` stand for.

    ``rows``: ``value.rows`` with their changeable values copied, when
    already copied (see :func:`hydrated`).
    """
    if rows is None:
        rows = _own_copies(value, objects=False)[0]
    flags = value.entity_columns
    if flags == (True,):  # one entity per row, the commonest
        rows = [(None if index is None else objects[index],) for (index,) in rows]
    else:
        rows = [
            tuple(objects[item] if flag and item is not None else item for item, flag in zip(row, flags, strict=True))
            for row in rows
        ]
    return _result(value, rows)


def _result(value: CachedRows, rows: list) -> Result:
    result = value.shell.with_new_rows(rows)()
    return _sqlalchemy.require_unique(result) if value.requires_unique else result


class HeldObjects:
    """The objects a hit of a shared entry made in a Session, held weakly, for the Session's next hit of it.

    Held strongly, they would stay in the Session's identity map after the
    application let them go, and once another transaction changed their
    rows, the Session's later queries (cached or not) would find them
    there, stale: the ORM does not overwrite what it holds.  Held weakly
    (their states keep no object), they serve the next hit only while
    something else keeps them, as the identity map itself does.
    """

    __slots__ = ("_states", "_reached", "_row_states")

    def __init__(self, value: CachedRows, objects: list, follows: frozenset[str] | None = None) -> None:
        self._states = [attributes.instance_state(obj) for obj in objects]
        self._reached = reached(self._states, follows)  # follows: see values.reached()
        #: One entity per row (the commonest): each row's state, to make rows in one pass.
        self._row_states = (
            [_NO_STATE if index is None else self._states[index] for (index,) in value.rows]
            if value.entity_columns == (True,)
            else None
        )

    def result(self, value: CachedRows, session: Session) -> Result | None:
        """``value`` as a Result of the objects, if each is alive and current in ``session``; else None.

        Current as a local entry's objects must be (``LocalResult.current()``).
        """
        # Taken (held) before they are checked: one that died has no Session
        # any more (its state's weakref callback).
        if self._row_states is None:
            objects = [state.obj() for state in self._states]
            return result_over(value, objects) if current(self._reached, session) else None
        rows = [(state.obj(),) for state in self._row_states]
        return _result(value, rows) if current(self._reached, session) else None


class _NoState:
    """Stands for the state of no object: the row of an outer join that found none."""

    @staticmethod
    def obj() -> None:
        return None


_NO_STATE = _NoState()


def adopted(value: CachedRows, session: Session, instances: list, load_options: tuple) -> list[Any] | None:
    """Make the objects a miss loaded (``instances``, detached) objects of ``session``; None when it cannot.

    A miss loads its rows in a Session of its own (``loader.py``) and
    snapshots them into ``value``: when the caller's Session holds none of
    their identities, those very objects, detached when the loader closed,
    are what the query would have given it (loaded as the database
    returned them, with the query's loaders and options), so they join it
    as they are instead of being built a second time.  Not when any value
    could be changed in place: the region keeps the snapshot's values, and
    a change the caller made in place would reach the cache; nor when some
    object lacks a column of its class (deferred, or mapped since the
    statement was compiled), which a hit expires so that it loads on access.
    """
    changeable_objects, changeable_rows = value.changeable()
    if changeable_objects or changeable_rows or len(instances) != len(value.objects):
        return None
    plans = [_plan(*layout) for layout in value.classes]
    if not all(record[4] for record in value.objects) or any(plan.expire for plan in plans):
        return None
    states = [attributes.instance_state(obj) for obj in instances]
    identity_map = session.identity_map
    for state, record in zip(states, value.objects, strict=True):
        if state.session_id is not None or state.key != record[1] or record[1] in identity_map:
            return None  # the Session holds one of them already: filled as any hit (objects_of)
    if identity_map and not _held_agree(identity_map.get, plans, value.objects):
        return None  # an object it holds is named otherwise (objects_of says so)
    add_loaded = _sqlalchemy.loading_into(session)
    for state in states:
        add_loaded(state, state.key)
        # The path they were loaded by is the one a hit gives them (see
        # CachedRows); the options, those a hit gives, whatever the loader's.
        state.load_options = load_options
    if session.dispatch.loaded_as_persistent:
        for state in states:
            session.dispatch.loaded_as_persistent(session, state)
    return instances


def _own_copies(value: CachedRows, objects: bool = True) -> tuple[list, list]:
    """The rows and object records of ``value``, those that hold changeable values copied.

    Copied together, in one round trip, so that a value a row shares with
    an object (``select(Doc, Doc.data)``) is still one value.  Without
    ``objects``, the records are left as they are: the caller has its objects.
    """
    changeable_objects, changeable_rows = value.changeable()
    if not objects:
        changeable_objects = frozenset()
    if not (changeable_objects or changeable_rows):
        return value.rows, value.objects
    rows, records = list(value.rows), list(value.objects)
    row_indexes, record_indexes = sorted(changeable_rows), sorted(changeable_objects)
    copied_rows, copied_values = private_copy(([rows[i] for i in row_indexes], [records[i][2] for i in record_indexes]))
    for i, row in zip(row_indexes, copied_rows, strict=True):
        rows[i] = row
    for i, values in zip(record_indexes, copied_values, strict=True):
        records[i] = (*records[i][:2], values, *records[i][3:])
    return rows, records


class _Plan:
    """What hydrating objects of one class needs, worked out once per mapping (see :func:`_plan`)."""

    __slots__ = (
        "manager",
        "columns",
        "column_set",
        "relationship_set",
        "impls",
        "expire",
        "column_attrs",
        "load_path",
        "joined_by",
        "named",
    )

    def __init__(self, cls: type, columns: tuple, relationships: tuple) -> None:
        self.manager: Any = instrumentation.manager_of_class(cls)
        manager = self.manager
        mapper = manager.mapper
        self.columns = columns
        self.column_set = frozenset(columns)
        self.relationship_set = frozenset(relationships)
        self.impls = tuple(_sqlalchemy.attribute_impl(manager, key) for key in relationships)
        # Columns the class has now but the entry does not know (a model
        # changed since it was stored): expired, so they load on access.
        self.expire = [prop.key for prop in mapper.column_attrs if prop.key not in columns]
        self.column_attrs = mapper.column_attrs
        self.load_path = _sqlalchemy.load_path(mapper)
        #: ``(index, key, ((column key, index in columns or None), ...))`` of each relationship: the
        #: object's own columns its join names (a many-to-one's foreign key, a collection's key).
        self.joined_by = tuple(
            (index, key, _local_columns(mapper, key, columns)) for index, key in enumerate(relationships)
        )
        #: ``(index, key, target mapper, (index in columns of each value of its primary key, ...))`` of
        #: each many-to-one whose foreign key names its target by primary key.
        self.named = tuple(
            (index, key, *found)
            for index, key in enumerate(relationships)
            if (found := _target_key(mapper, key, columns)) is not None
        )


def _local_columns(mapper: Any, key: str, columns: tuple) -> tuple:
    """The column keys (and their places among ``columns``) that say which objects relationship ``key`` holds."""
    found = []
    for column in mapper.get_property(key).local_columns:
        try:
            name = mapper.get_property_by_column(column).key
        except UnmappedColumnError:
            continue  # no attribute of the object holds it
        found.append((name, columns.index(name) if name in columns else None))
    return tuple(found)


def _target_key(mapper: Any, key: str, columns: tuple) -> tuple | None:
    """The mapper many-to-one ``key`` holds, and the places among ``columns`` of its primary key's values.

    None when ``key`` is not a many-to-one whose foreign key is the whole
    primary key of its target (one joined otherwise loads by a query).
    """
    prop = mapper.get_property(key)
    if prop.direction is not MANYTOONE:
        return None
    target = prop.mapper
    try:
        local_of = {
            target.get_property_by_column(remote).key: mapper.get_property_by_column(local).key
            for local, remote in prop.local_remote_pairs
        }
        names = [local_of.get(target.get_property_by_column(column).key) for column in target.primary_key]
    except UnmappedColumnError:
        return None
    if not all(name in columns for name in names):
        return None
    return target, tuple(columns.index(name) for name in names)


def _names_held(in_session: Any, target: Any, values: tuple, positions: tuple, token: Any) -> bool:
    """Whether the foreign key at ``positions`` of ``values`` names an object the Session holds."""
    primary_key = [values[position] for position in positions]
    if any(value is None or value is NOT_LOADED for value in primary_key):
        return False
    return in_session(target.identity_key_from_primary_key(primary_key, token)) is not None


def _differ(held: Any, stored: Any) -> bool:
    """Whether a held value differs from the entry's; so too when comparing them gives no answer (``pandas.NA``)."""
    try:
        return bool(held != stored)
    except Exception:  # only the query can say
        return True


class HeldObjectDiffers(Exception):
    """An object the Session holds says otherwise than the entry which objects a relationship holds.

    A column its relationship joins by (a many-to-one's foreign key, the
    column a collection is keyed by) differs from the entry's row (it was
    loaded before a commit changed it, or changed since without a flush),
    and the relationship is not loaded: what the query would give depends
    on its loader (``selectinload()`` and ``immediateload()`` follow the
    object's value, ``joinedload()`` takes the row), so only the query can
    say.  Or a many-to-one the entry leaves empty names by its foreign key
    an object the Session holds (deleted since, or a key no constraint
    enforces): a lazy load by primary key (``immediateload()``) takes that
    object from the identity map.  The hit is not served.
    """


def _held_agree(in_session: Any, plans: list, records: list) -> bool:
    """Whether what the Session holds agrees with the entry on the relationships the entry would fill.

    See :class:`HeldObjectDiffers`.
    """
    for class_index, identity_key, values, held, _complete, _loaders, _path in records:
        plan = plans[class_index]
        if not plan.joined_by:
            continue
        obj = in_session(identity_key)
        loaded = {} if obj is None else obj.__dict__
        if obj is not None:
            for index, key, columns in plan.joined_by:
                if held[index] is NOT_LOADED or key in loaded:
                    continue  # not in the entry, or loaded: left as it is
                for column, position in columns:
                    if column not in loaded:
                        continue  # filled from the entry, as the query refreshes it
                    if position is None or values[position] is NOT_LOADED or _differ(loaded[column], values[position]):
                        return False
        for index, key, target, positions in plan.named:
            if (
                held[index] is None
                and key not in loaded
                and _names_held(in_session, target, values, positions, identity_key[2])
            ):
                return False
    return True


#: The ``info`` key of a class manager holding its plans: (column keys, relationship keys) -> plan.
_PLANS = "pyramid_sessioncache.plans"


def _plan(cls: type, columns: tuple, relationships: tuple) -> _Plan:
    """The plan for objects of ``cls`` stored with these keys, made once while the mapping stays the same.

    Kept in the class manager's ``info``, which SQLAlchemy empties when
    the class is unmapped; a mapper whose properties changed (a new
    ``column_attrs``) gets a new plan.
    """
    plans = instrumentation.manager_of_class(cls).info.setdefault(_PLANS, {})
    plan = plans.get((columns, relationships))
    if plan is None or plan.column_attrs is not plan.manager.mapper.column_attrs:
        plan = plans[(columns, relationships)] = _Plan(cls, columns, relationships)
    return plan


def objects_of(session: Session, classes: list, records: list, load_options: tuple) -> list[Any]:
    """Return the objects ``records`` describe, as objects of ``session``, in order.

    Raises :class:`HeldObjectDiffers`, having changed nothing, when an
    object the Session holds disagrees with the entry on a relationship.
    """
    plans = [_plan(*layout) for layout in classes]
    in_session = session.identity_map.get
    if session.identity_map and any(plan.joined_by for plan in plans) and not _held_agree(in_session, plans, records):
        raise HeldObjectDiffers
    listened = any(plan.manager.dispatch.load for plan in plans)
    notify = listened or bool(session.dispatch.loaded_as_persistent)
    add_loaded = _sqlalchemy.loading_into(session)
    instance_state = attributes.instance_state
    objects: list[Any] = []
    to_relate: list[tuple] = []
    created: list[tuple] = []
    refilled: list[tuple] = []
    paths: dict[int, tuple] = {}  # the objects reached through one path share its text
    for class_index, identity_key, values, held, complete, loaders, path in records:
        plan = plans[class_index]
        obj = in_session(identity_key)
        new = obj is None
        if new:
            # A new object, made persistent and clean as the ORM's loader makes one (inlined: the hot path).
            obj = plan.manager.new_instance()
            state = instance_state(obj)
            add_loaded(state, identity_key)
            if complete and not plan.expire and loaders is None:
                obj.__dict__.update(zip(plan.columns, values, strict=True))
            else:
                _fill_new(state, obj.__dict__, plan, values, complete, loaders)
            if load_options:  # as the ORM gives them (see _sqlalchemy.load_path)
                state.load_options = load_options
            # Always, as the ORM sets it: a loader another query gives this object
            # later (a lazy load with .and_() criteria) looks its relationship up there.
            if path is None:
                state.load_path = plan.load_path
            else:  # reached through a relationship: its own path
                found = paths.get(id(path))
                if found is None:
                    found = paths[id(path)] = (path, _sqlalchemy.path_of(path))
                state.load_path = found[1]
            if notify:
                created.append((state, plan, len(objects)))
        else:
            state = _fill_unloaded(obj, plan, values, loaders, refilled)
        if state is not None and held.count(NOT_LOADED) != len(held):
            to_relate.append((state, new, plan.impls, held))
        objects.append(obj)
    _set_relationships(to_relate, objects)
    _send_load_events(session, _children_first(created, records) if listened else created)
    for state, keys, others in refilled:  # as the ORM refreshes expired attributes of an object it holds
        state.manager.dispatch.refresh(state, None, keys)
        _sqlalchemy.commit_loaded(state, others)
    return objects


def _fill_new(state: Any, loaded: dict, plan: _Plan, values: tuple, complete: bool, loaders: dict | None) -> None:
    """Fill a new object from an entry that lacks some of its columns, or whose query gave it loaders.

    Columns the entry lacks are expired (they load on access), except
    those the query's options gave a loader of the object's own
    (``raiseload()``, ``defer(raiseload=True)``): ``loaders``, given to the
    object as the query gave them, answer for those.
    """
    if complete and not plan.expire:
        loaded.update(zip(plan.columns, values, strict=True))
    else:
        missing = plan.expire.copy()
        for key, value in zip(plan.columns, values, strict=True):
            if value is not NOT_LOADED:
                loaded[key] = value
            elif loaders is None or key not in loaders:
                missing.append(key)
        _sqlalchemy.expire_missing(state, missing)
    if loaders is not None:
        _sqlalchemy.give_loaders(state, loaders)


def _fill_unloaded(obj: Any, plan: _Plan, values: tuple, loaders: dict | None, refilled: list[tuple]) -> Any:
    """Fill the columns the Session's own ``obj`` has not loaded, as a query would.

    Loaded columns, changed or not, are left alone; ``(state, keys,
    unloaded)`` is added to ``refilled`` when the class listens for
    ``refresh`` (mutable types and composites do, to follow their values).
    What it has not loaded gets the entry's ``loaders``, as a query gives
    its loaders (``raiseload()``, ``load_only()``) to the objects the
    Session holds: what the query would raise for raises.  Returns the
    object's state when some relationship it has not loaded may come from
    the entry, else None.
    """
    loaded = obj.__dict__
    if loaders is not None:
        _sqlalchemy.give_unloaded_loaders(attributes.instance_state(obj), loaders)
    if not plan.column_set.issubset(loaded):  # expired or unloaded
        unloaded = [
            key
            for key, value in zip(plan.columns, values, strict=True)
            if key not in loaded and value is not NOT_LOADED
        ]
        for key, value in zip(plan.columns, values, strict=True):
            if key in unloaded:
                loaded[key] = value
        state = attributes.instance_state(obj)
        _sqlalchemy.commit_loaded(state, unloaded)
        if unloaded and plan.manager.dispatch.refresh:
            # What the event fills as well (a composite()'s value) is
            # loaded after it, as the ORM commits every key it had unloaded.
            refilled.append((state, set(unloaded), state.unloaded))
    if plan.relationship_set.issubset(loaded):
        return None
    return attributes.instance_state(obj)


def _set_relationships(to_relate: list[tuple], objects: list[Any]) -> None:
    """Set the relationships the entry holds, where the objects have not loaded them.

    An object made by this hit has no history, expiry or pending changes
    to reconcile, so its relationships are set as the loader sets them on a
    new object (``_sqlalchemy.set_loaded``); the Session's own objects go
    through ``set_committed_value()``.
    """
    for state, new, impls, held in to_relate:
        loaded = state.dict
        for impl, value in zip(impls, held, strict=True):
            if value is NOT_LOADED or impl.key in loaded:
                continue  # not in the entry, or loaded (and maybe changed) in this session
            if value.__class__ is list:
                value = [objects[i] for i in value]
            elif value is not None:
                value = objects[value]
            if new:
                _sqlalchemy.set_loaded(impl, state, loaded, value)
            else:
                impl.set_committed_value(state, loaded, value)


def _children_first(created: list[tuple], records: list) -> list[tuple]:
    """``created`` (``(state, plan, index)``), each object after those its relationships hold.

    The ORM sends the objects of a joined eager load their ``load`` event
    before their parent's, whose listeners may read what theirs made of
    them (a PostalCode's label of its City's name).
    """
    if len(created) < 2:
        return created
    position = {item[2]: item for item in created}
    done: set[int] = set()
    order: list[tuple] = []
    for _, _, start in created:
        stack = [(start, False)]
        while stack:
            index, expanded = stack.pop()
            if expanded:
                order.append(position[index])
                continue
            if index in done:
                continue
            done.add(index)
            stack.append((index, True))
            for held in reversed(records[index][3]):
                for child in reversed(held) if held.__class__ is list else (held,):
                    if child.__class__ is int and child in position and child not in done:
                        stack.append((child, False))
    return order


def _send_load_events(session: Session, created: list[tuple]) -> None:
    """Send the ``load`` and ``loaded_as_persistent`` events of the new objects, as a query would."""
    for state, plan, _ in created:
        if plan.manager.dispatch.load:
            # What another object's listener changed before (a PostalCode's
            # renaming its City) stays a pending change, as the query leaves it.
            pending = set(state.committed_state)
            state.manager.dispatch.load(state, None)
            if state.modified:  # what a listener set counts as loaded, as the ORM has it
                if not pending:
                    _sqlalchemy.commit_all_loaded(state, session)
                else:
                    _sqlalchemy.commit_loaded(state, [key for key in state.committed_state if key not in pending])
    if created and session.dispatch.loaded_as_persistent:
        for state, _, _ in sorted(created, key=lambda item: item[2]):  # in the order of the rows, as the ORM's
            session.dispatch.loaded_as_persistent(session, state)
