"""The values a cache keeps: ORM results as a Session's objects, or as plain data.

Two kinds of values:

- :class:`LocalResult`, for ``ext:local_session``: the frozen result itself,
  holding the very objects of the Session.  A hit hands them back.
- :class:`CachedRows`, for every shared region: plain data (column values,
  identities, which objects a relationship holds), never ORM objects, so
  no Session's pending state can leak into it, and unpickling is cheap.

A :class:`CachedRows` is taken from a *fresh* Session on the same
connection, so it holds what the database returned inside the current
transaction, not what the caller's Session has in memory.  A hit turns it
into objects of the caller's Session (see ``hydrate.py``).
"""

from __future__ import annotations

import hashlib
import pickle
import weakref
from collections.abc import Sequence
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from enum import Enum
from itertools import repeat
from operator import itemgetter
from typing import Any, NamedTuple
from uuid import UUID

from sqlalchemy.engine import FrozenResult, Result
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import Session, attributes, class_mapper
from sqlalchemy.orm.collections import InstrumentedDict, InstrumentedList, InstrumentedSet, collection_adapter
from sqlalchemy.sql.expression import ColumnClause

from .. import _sqlalchemy
from . import as_loaded

#: ``session.info`` flag of the Sessions that load values to cache; the ORM
#: hook leaves their queries alone.
LOADER_FLAG = "sessioncache.loader"


class LocalResult(Sequence):
    """A result kept on its own Session: reading it returns the same objects.

    It holds the rows (the Session's objects) and their states, not the
    query that loaded them (see ``_sqlalchemy.detached()``).

    Indexing it gives what ``Query.all()`` gives: entities for a
    single-entity query, rows otherwise, so the old beaker_caching example's
    ``person10 is cache.get(key)[0]`` holds.
    """

    __slots__ = (
        "commits",
        "found_by",
        "frozen",
        "requires_unique",
        "session_expired",
        "_changeable",
        "_items",
        "_states",
    )

    def __init__(
        self, frozen: FrozenResult, requires_unique: bool = False, follows: frozenset[str] | None = None
    ) -> None:
        self.frozen = frozen
        #: Whether the result demands ``.unique()``, as the query's did.
        self.requires_unique = requires_unique
        #: The cache's :attr:`~pyramid_sessioncache.SessionCache.commits` read
        #: before the query of an ``ext:local_session`` entry ran; None for
        #: the objects of a shared entry, which its versions keep current.
        self.commits: int | None = None
        #: What the Session held expired as the entry was stored, when its
        #: eager rows may have held objects it does not reach (see
        #: ``eager_rows.py``; :func:`session_snapshot`): a hit requires the
        #: same objects, nothing expired since.  None: they held none.
        self.session_expired: dict | None = None
        #: The metadata of its Results for the last statement that read it (see ``found_by.py``).
        self.found_by: Any = None
        rows = frozen().all()
        self._items = [row[0] for row in rows] if _sqlalchemy.is_single_entity(frozen) else rows
        entities = (attributes.instance_state(value) for row in rows for value in row if _is_entity(value))
        self._states = reached(entities, follows)
        #: The indexes of the rows holding a value, not an object, that its reader could change in place.
        self._changeable = [index for index, row in enumerate(_tuples(frozen)) if may_change(_plain(row))]

    @classmethod
    def from_result(cls, result: Result, follows: frozenset[str] | None = None) -> LocalResult:
        """Keep ``result``, an ORM Result not read yet: its rows, and whether it demands ``.unique()``.

        Its Results unique their rows as the ORM's does (objects by
        identity: see ``_sqlalchemy.unique_filters()``).  ``follows``: see
        :func:`reached`.
        """
        requires_unique = _sqlalchemy.requires_unique(result)
        frozen = _sqlalchemy.freeze_raw(result)
        kept = _sqlalchemy.detached(frozen)
        _unique_as_stored(kept, unique_kinds(frozen, result))
        return cls(kept, requires_unique, follows)

    def current(self, session: Session) -> bool:
        """Whether every object is still in ``session``, none of it expired, its relationships as they were.

        Checked on each hit, rather than by listening to every expiry and
        expunge of every Session in the process.  ``session.expire(obj,
        ["rel"])`` unloads a relationship without marking it expired: the
        query's eager load would load it again.  Nor anything else, when
        the query's eager rows may hold objects the result does not reach
        (:attr:`session_expired`).
        """
        if not current(self._states, session):
            return False
        return self.session_expired is None or holds_as_snapshot(session, self.session_expired)

    @property
    def checked(self) -> bool:
        """Whether a hit can check its objects (see :func:`reached`): one that cannot is not kept, never current."""
        return self._states.complete

    def __getitem__(self, index):
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)

    def result(self) -> Result:
        """Return a new Result over the stored rows, demanding ``.unique()`` where the query's did.

        Its objects are the Session's own, as the query's would be; a value
        that is not an object (``select(Doc.data)``: a JSON ``dict``) is a
        copy of its own, as the query would load it again: one its reader
        changes in place must not reach the next hit.
        """
        frozen = self.frozen
        if self._changeable:
            frozen = frozen.with_new_rows(_private_rows(frozen, self._changeable))
        result = frozen()
        return _sqlalchemy.require_unique(result) if self.requires_unique else result


def _tuples(frozen: FrozenResult) -> Sequence:
    """The rows of ``frozen`` as tuples: a result of scalars (one entity, one column) holds the values themselves."""
    return [(value,) for value in frozen.data] if _sqlalchemy.holds_scalars(frozen) else frozen.data


def _plain(row: tuple) -> tuple:
    """The values of ``row`` that are not objects of a Session."""
    return tuple(value for value in row if not _is_entity(value))


def _private_rows(frozen: FrozenResult, changeable: list[int]) -> list:
    """The rows of ``frozen``, those at ``changeable`` with their values that are not objects copied, in one round trip."""
    rows = list(_tuples(frozen))
    plain = tuple(_plain(rows[i]) for i in changeable)
    copies = private_copy(plain)
    if copies is plain:  # a value that does not pickle: the others are copied one by one
        copies = tuple(tuple(private_copy((value,))[0] for value in values) for values in plain)
    for i, copied in zip(changeable, copies, strict=True):
        values = iter(copied)
        rows[i] = tuple(value if _is_entity(value) else next(values) for value in rows[i])
    return [row[0] for row in rows] if _sqlalchemy.holds_scalars(frozen) else rows


def current(reached: Reached, session: Session) -> bool:
    """Whether the objects :func:`reached` found are in ``session``, unexpired, their relationships as they were."""
    if not reached.complete:
        return False
    session_id = session.hash_key
    left_expired = reached.left_expired
    for state in reached.states:
        if state.session_id != session_id or state.key is None:  # gone, or made pending again (make_transient())
            return False
        expired = state.expired_attributes
        if expired:
            left = left_expired.get(state, _NOTHING)
            if not expired <= left and _expired_since(state, expired, left):
                return False
    instance_dict = attributes.instance_dict  # looked up now: alternative instrumentation replaces it
    for state, held in reached.loaded:
        obj = state.obj()
        if obj is None:
            return False
        loaded = instance_dict(obj)
        for key, was in held:
            if loaded.get(key, _UNLOADED) is not was():
                return False
    for state, keys in reached.present:
        obj = state.obj()
        if obj is None:
            return False
        loaded = instance_dict(obj)
        for key in keys:
            if key not in loaded:
                return False
    return True


def _expired_since(state: Any, expired: Any, left: frozenset[str]) -> bool:
    # A key can stay in expired_attributes once loaded: a second path of one
    # query to the object fills in a column the first deferred, and leaves it there.
    loaded = state.dict
    return any(key not in loaded and key not in left for key in expired)


def _left_expired(state: Any) -> frozenset[str]:
    """The keys of ``state`` expired and not loaded (see :func:`_expired_since`)."""
    keys = state.expired_attributes
    if not keys:
        return _NOTHING
    loaded = state.dict
    return frozenset(key for key in keys if key not in loaded)


#: How many objects a Session may hold for :func:`session_snapshot` and :func:`holds_as_snapshot` to look at them all.
MAX_SCANNED = 2_000


def session_snapshot(session: Session) -> dict | None:
    """``{state: its expired keys not loaded}`` of every object ``session`` holds; None past :data:`MAX_SCANNED`."""
    identity_map = session.identity_map
    if len(identity_map) > MAX_SCANNED:
        return None
    return {state: _left_expired(state) for state in identity_map.all_states()}


def holds_as_snapshot(session: Session, before: dict) -> bool:
    """Whether ``session`` holds the objects of ``before`` (:func:`session_snapshot`), none more, none expired since.

    An object let go and loaded again since (by a query that deferred a
    column the rows would fill in) is another state: not in ``before``.
    """
    identity_map = session.identity_map
    if len(identity_map) > MAX_SCANNED:
        return False
    for state in identity_map.all_states():
        left = before.get(state)
        if left is None:
            return False
        expired = state.expired_attributes
        if expired and not expired <= left and _expired_since(state, expired, left):
            return False
    return True


class Reached(NamedTuple):
    """What :func:`current` checks of the objects a hit serves (see :func:`reached`)."""

    #: The states of the objects, and of those their loaded relationships hold.
    states: tuple
    #: ``(state, ((key, was), ...))`` for each state that had relationships
    #: loaded: ``was()`` gives what each held then, while it is alive.
    loaded: tuple
    #: ``{state: expired keys}`` of the states the load left with attributes
    #: expired, those it does not load (a lazy relationship, a deferred
    #: column, after ``expire_all()``): a query run again leaves them so.
    left_expired: dict
    #: ``(state, keys)`` for each state with columns loaded that ``expire(obj,
    #: [key])`` unloads without marking them expired (``query_expression()``):
    #: the query would load them again.
    present: tuple
    #: False when there were more than :data:`MAX_REACHED` objects: not checked, never current.
    complete: bool = True


#: How many objects ``reached()`` follows at most; past it, the objects are never current (and a local entry not kept).
MAX_REACHED = 10_000


def reached(states: Any, follows: frozenset[str] | None = None) -> Reached:
    """``states`` and the states of the objects their loaded relationships hold, however deep.

    With them, what each relationship loaded held then, weakly.  A local
    hit checks them all: the query's eager loads (of eager loads, to any
    depth: a tree read with ``recursion_depth=-1``) would refresh such an
    object once expired (and no longer hold one expunged), and load again
    a relationship it no longer has, or fill the objects a collection
    loaded again since holds, so a hit must not serve it as it is.

    ``follows``: the keys of the relationships the query's options name
    (``_sqlalchemy.eager_relationship_keys()``), which with those mapped
    to load eagerly are all it may load; None: every loaded relationship.
    Other collections are not followed: a point lookup of a post would
    walk, through its author, every post of the author the Session
    holds.  Other single objects are (one each): a joined eager load
    refreshes every object its rows hold, even one its collection,
    loaded before under other criteria, lacks, and the Session may hold
    that one through another reference.  More than :data:`MAX_REACHED`
    objects are not followed, and never current.
    """
    found = {id(state): state for state in states}
    relationships: list[tuple[Any, tuple]] = []
    left_expired = {}
    present = []
    unmarked: dict[Any, tuple] = {}
    pending = list(found.values())
    while pending:
        state = pending.pop()
        loaded = state.dict
        if state.expired_attributes:
            left_expired[state] = _left_expired(state)
        mapper = state.mapper
        columns = unmarked.get(mapper)
        if columns is None:
            columns = unmarked[mapper] = unmarked_columns(mapper)
        if columns:
            keys = tuple(key for key in columns if key in loaded)
            if keys:
                present.append((state, keys))
        held = []
        for prop in mapper.relationships:
            if not _followed(prop, follows):
                continue
            value = loaded.get(prop.key, _UNLOADED)
            if value is _UNLOADED:
                continue
            held.append((prop.key, _weak(value)))
            if value is None:
                continue
            for related in members(value) if prop.uselist else (value,):
                related_state = attributes.instance_state(related)
                if id(related_state) not in found:
                    found[id(related_state)] = related_state
                    pending.append(related_state)
        if held:
            relationships.append((state, tuple(held)))
        if len(found) > MAX_REACHED:
            return Reached((), (), {}, (), complete=False)
    return Reached(tuple(found.values()), tuple(relationships), left_expired, tuple(present))


def unmarked_columns(mapper: Any) -> tuple:
    """The keys of ``mapper``'s columns that ``session.expire(obj, [key])`` unloads without marking them expired.

    Those without a loader of their own (``query_expression()``): the ORM
    pops them from the object and leaves ``expired_attributes`` as it was.
    Found once per mapper: every shared hit that builds objects asks.
    """
    found = _UNMARKED.get(mapper)
    if found is None:
        manager = mapper.class_manager
        attrs = (manager.get(prop.key) for prop in mapper.column_attrs)  # a concrete union's discriminator has none
        found = _UNMARKED[mapper] = tuple(
            attr.key for attr in attrs if attr is not None and not attr.impl.accepts_scalar_loader
        )
    return found


_UNMARKED: weakref.WeakKeyDictionary[Any, tuple] = weakref.WeakKeyDictionary()


def populated_relationships(mapper: Any) -> tuple:
    """The relationships of ``mapper`` that a load fills in.

    Not the ``dynamic`` and ``write_only`` ones: no load fills them, and
    what their objects keep under their keys (pending changes, a marker
    once flushed) is no collection.
    """
    return tuple(prop for prop in mapper.relationships if prop.lazy not in _NEVER_POPULATED)


_NEVER_POPULATED = frozenset({"dynamic", "write_only"})


def _followed(prop: Any, follows: frozenset[str] | None) -> bool:
    """Whether :func:`reached` follows ``prop``: populated, and a single object or a collection the query may load."""
    if prop.lazy in _NEVER_POPULATED:
        return False
    return follows is None or not prop.uselist or prop.key in follows or prop.lazy in _sqlalchemy.EAGER


def members(collection: Any) -> Any:
    """The objects a loaded collection holds, whatever its class (a dict's values; a ``@collection.iterator``'s)."""
    kind = type(collection)
    if kind is InstrumentedList or kind is InstrumentedSet:
        return collection
    if kind is InstrumentedDict:
        return collection.values()
    return collection_adapter(collection)


#: Stands for a key a dictionary does not hold.
_UNLOADED = object()
#: No keys.
_NOTHING: frozenset[str] = frozenset()


def _weak(value: Any) -> Any:
    """A callable giving ``value`` back while it lives, without keeping it alive (None: None)."""
    if value is None:
        return _none
    try:
        return weakref.ref(value)
    except TypeError:  # a collection class that takes no weak reference
        return _never_the_same


def _none() -> None:
    return None


def _never_the_same() -> object:
    return object()


def _is_entity(value: Any) -> bool:
    return getattr(type(value), "_sa_class_manager", None) is not None


class _NotLoaded:
    """Marks an attribute the loaded object did not have; pickles as itself."""

    def __reduce__(self) -> str:
        return "NOT_LOADED"

    def __repr__(self) -> str:
        return "NOT_LOADED"


#: Stands for an attribute value the loaded object did not have.
NOT_LOADED = _NotLoaded()


class CachedRows:
    """A result as plain data: rows, and the objects they refer to.

    ``classes`` lists, per mapped class, ``(class, column_keys,
    relationship_keys)``; ``objects`` lists ``(class_index, identity_key,
    values, relationships, complete, loaders, path)``, the values and
    relationships aligned with their class's keys (:data:`NOT_LOADED` where
    the object had none, ``complete`` saying it had every column), a
    relationship holding an object index, a list of them, or None;
    ``loaders`` are the loaders the query's options gave the object for
    what it did not load (``raiseload()``, ``defer(..., raiseload=True)``),
    key -> loader, or None; ``path``, the loader path through which the
    query reached the object (an eager load's), serialized, or None for
    the path of its own class (see ``hydrate.py``).
    ``rows`` are tuples where the columns flagged in ``entity_columns``
    hold an object index (or None): every row the database returned, the
    repeats of a joined eager load included, and ``requires_unique`` says
    whether the query's result demanded ``.unique()``.  ``tables`` names
    the tables the result was read from and ``versions`` their version
    tokens when it was read (see ``invalidation.py``).
    """

    #: What is stored (pickled); :meth:`changeable` is worked out again after unpickling.
    _FIELDS = (
        "shell",
        "entity_columns",
        "classes",
        "mappings",
        "objects",
        "rows",
        "tables",
        "versions",
        "requires_unique",
        "uniques",
    )
    __slots__ = (*_FIELDS, "_changeable", "storable", "servable", "found_by", "_relationships")

    def __init__(
        self,
        shell,
        entity_columns,
        classes,
        objects,
        rows,
        tables=(),
        versions=(),
        requires_unique: bool = False,
        mappings: tuple[str, ...] | None = None,
        uniques: tuple | None = None,
    ):
        self.shell = shell
        self.entity_columns = entity_columns
        self.classes = classes
        #: Per class, how it was mapped when the value was stored (:func:`mapping_text`).
        self.mappings = (
            tuple(mapping_text(class_mapper(cls)) for cls, _, _ in classes) if mappings is None else mappings
        )
        self.objects = objects
        self.rows = rows
        self.tables = tables
        self.versions = versions
        self.requires_unique = requires_unique
        #: How ``.unique()`` tells each column's values apart (:func:`unique_kinds`), or None.
        self.uniques = uniques
        #: Whether a copy of the value (a region's) would serve what it does: False
        #: when its objects hold loaders that pickling loses; such a value is
        #: returned, never stored.
        self.storable = True
        #: Whether its objects hold what was loaded: False when ``load``
        #: listeners changed them before they were copied (``as_loaded.py``);
        #: a hit's load event would change them again.  Such a value is
        #: neither stored nor served: its query runs uncached.
        self.servable = True
        self._changeable: tuple[frozenset[int], frozenset[int]] | None = None
        self._relationships: set[tuple[type, str]] | None = None  # known when just loaded
        #: The metadata of its Results for the last statement that read it (see ``found_by.py``); not stored.
        self.found_by: Any = None
        _unique_as_stored(shell, uniques)

    def __getstate__(self):
        return tuple(getattr(self, name) for name in self._FIELDS)

    def __setstate__(self, state):
        for name, value in zip(self._FIELDS, state, strict=True):
            setattr(self, name, value)
        self._changeable = None
        self._relationships = None
        self.found_by = None
        self.storable = self.servable = True
        _unique_as_stored(self.shell, self.uniques)
        for (cls, _, _), stored in zip(self.classes, self.mappings, strict=True):
            if mapping_text(class_mapper(cls)) != stored:
                # Stored by code that mapped the class otherwise (the
                # previous deploy): what it holds may not fit the class now.
                # Unpickling fails, and the regions read that as a miss.
                raise StaleMappingError(f"{cls.__qualname__} is mapped otherwise than when this entry was stored")

    def changeable(self) -> tuple[frozenset[int], frozenset[int]]:
        """The indexes of the objects, and of the rows, holding a value its holder could change in place.

        A region may hand the same stored value to every hit (memory,
        Redis): a JSON ``dict``, a ``list`` or a ``MutableDict`` must then
        reach each caller as a copy of its own (see :func:`private_copy`),
        or a change one request makes in place, committed or not, would
        reach the cache and every later hit.  Worked out once per value.
        """
        if self._changeable is None:
            objects = frozenset(i for i, record in enumerate(self.objects) if may_change(record[2]))
            rows = frozenset(i for i, row in enumerate(self.rows) if may_change(row))
            self._changeable = (objects, rows)
        return self._changeable

    @classmethod
    def from_result(cls, result: Result, instances: list | None = None) -> CachedRows:
        """Snapshot ``result``, whose objects belong to a throw-away Session, before it is read.

        ``instances``, if given, receives the objects themselves, in the
        order of ``objects`` (see ``hydrate.adopted()``).
        """
        requires_unique = _sqlalchemy.requires_unique(result)
        frozen = _sqlalchemy.freeze_raw(result)
        uniques = unique_kinds(frozen, result)
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
        if snapshot.copies:
            # A value a row shares with an object (select(Doc, Doc.data)) is
            # its copy as loaded, as the object's is: one value again on a hit.
            plain_rows = [snapshot.as_loaded(row, entity_columns) for row in plain_rows]
        if instances is not None:
            instances.extend(snapshot.instances)
        value = cls(
            _sqlalchemy.detached(frozen.with_new_rows([])),
            entity_columns,
            snapshot.classes,
            snapshot.objects,
            plain_rows,
            requires_unique=requires_unique,
            uniques=uniques,
        )
        value.storable = snapshot.storable and snapshot.servable
        value.servable = snapshot.servable
        value._relationships = snapshot.loaded_relationships()
        return value

    def refreshes_always(self) -> bool:
        """Whether some object is of a class mapped with ``always_refresh`` (its queries overwrite the Session's)."""
        return any(class_mapper(cls).always_refresh for cls, _, _ in self.classes)

    def loaded_relationships(self) -> set[tuple[type, str]]:
        """Return ``(class, key)`` of every relationship some cached object holds."""
        if self._relationships is not None:
            return self._relationships
        found: set[tuple[type, str]] = set()
        for class_index, _, _, relationships, *_ in self.objects:
            cls, _, keys = self.classes[class_index]
            found.update((cls, key) for key, value in zip(keys, relationships, strict=True) if value is not NOT_LOADED)
        return found


def unique_kinds(frozen: FrozenResult, result: Result) -> tuple | None:
    """How ``.unique()`` tells apart the values of each column of ``result`` (``frozen``), as plain data that pickles.

    A stored result's rows are unique'd as the ORM's are (objects by
    identity, whatever their ``__eq__``), but the ORM's functions do not
    survive ``_sqlalchemy.detached()``: each is described by
    ``_unique_kind()``, and made again by ``_unique_filter()``.
    """
    filters = _sqlalchemy.unique_filters(frozen, result)
    return None if filters is None else tuple(map(_unique_kind, filters))


def _unique_kind(unique_filter: Any) -> Any:
    """What the ORM's ``unique_filter`` of a column does.

    None (values hash), ``"id"`` (entities: by identity), ``"hash-or-id"``
    (the legacy ``Query``'s, for values that may not hash), or
    ``("raise", message, hashable_first)``: the ORM refuses to unique
    values of that type, or those that do not hash.  Found by trying it
    on a value that hashes and on one that does not.
    """
    if unique_filter is None or unique_filter is id:
        return None if unique_filter is None else "id"
    try:
        unique_filter(0)
    except InvalidRequestError as exc:
        return ("raise", str(exc), False)
    try:
        unique_filter([])
    except InvalidRequestError as exc:
        return ("raise", str(exc), True)
    return "hash-or-id"


def _unique_filter(kind: Any) -> Any:
    """The function ``_unique_kind()`` described as ``kind``."""
    if kind is None or kind == "id":
        return None if kind is None else id
    if kind == "hash-or-id":
        return _hash_or_id
    return _Refuse(*kind[1:])


def _hash_or_id(value: Any) -> Any:
    try:
        return hash(value)
    except TypeError:
        return id(value)


class _Refuse:
    """A ``.unique()`` filter raising the ORM's error for values it cannot unique (a class: stored values hold no closure)."""

    __slots__ = ("message", "hashable_first")

    def __init__(self, message: str, hashable_first: bool) -> None:
        self.message = message
        self.hashable_first = hashable_first

    def __call__(self, value: Any) -> Any:
        if self.hashable_first:
            try:
                return hash(value)
            except TypeError:
                pass
        raise InvalidRequestError(self.message)


def _unique_as_stored(shell: FrozenResult, uniques: tuple | None) -> None:
    # On every value made or unpickled: the metadata's own filters do not pickle.
    _sqlalchemy.set_unique_filters(shell, None if uniques is None else [_unique_filter(kind) for kind in uniques])


#: Types whose values nobody can change in place (their subclasses may hold more).
_IMMUTABLE = frozenset(
    {type(None), bool, int, float, complex, str, bytes, Decimal, date, datetime, time, timedelta, UUID, _NotLoaded}
)


def may_change(values: tuple) -> bool:
    """Whether any of ``values`` could be changed in place (anything not known to be immutable)."""
    for value in values:
        kind = type(value)
        if kind in _IMMUTABLE or isinstance(value, Enum):
            continue
        if (kind is tuple or kind is frozenset) and not may_change(value):
            continue
        return True
    return False


def private_copy(values: tuple) -> tuple:
    """A copy of ``values`` that shares nothing with them: what unpickling the stored entry would give.

    A pickle round trip copies what ``copy.deepcopy`` may not, the way the
    value's class wants (``MutableDict`` leaves its parents behind).
    Values that do not pickle are returned as they are: no region stores
    them (``memory`` refuses them, the others raise), so they belong to
    the one caller whose miss loaded them.
    """
    try:
        return pickle.loads(pickle.dumps(values, pickle.HIGHEST_PROTOCOL))
    except Exception:
        return values


class StaleMappingError(ValueError):
    """Raised when unpickling a value stored while a class of it was mapped otherwise."""


#: The ``info`` key of a class manager holding its mapping text, with the ``column_attrs`` it was made from.
_MAPPING = "pyramid_sessioncache.mapping"


def mapping_text(mapper: Any) -> str:
    """A short text that differs whenever ``mapper`` maps rows to objects otherwise.

    It covers each column attribute (its key, and the name and type of
    each of its columns) and each relationship (its key, the class it
    targets, whether it holds a collection): what a stored value's
    objects were built with.  Kept in the class manager's ``info`` while
    the mapper's ``column_attrs`` stay the same object.
    """
    info = mapper.class_manager.info
    column_attrs = mapper.column_attrs
    found = info.get(_MAPPING)
    if found is not None and found[0] is column_attrs:
        return found[1]
    parts = [f"{prop.key}=" + ",".join(_column_text(column) for column in prop.columns) for prop in column_attrs]
    parts += [f"{prop.key}->{_qualified(prop.mapper.class_)}:{prop.uselist}" for prop in mapper.relationships]
    # Sorted: the order of attributes (and of backrefs, which follows the
    # order modules were imported in) changes nothing an entry holds.
    text = hashlib.blake2b("|".join(sorted(parts)).encode(), digest_size=8).hexdigest()
    info[_MAPPING] = (column_attrs, text)
    return text


def _column_text(column: Any) -> str:
    # A column's name; an expression (a column_property's labelled
    # subquery, named anonymously per process) by its kind.  Then its type
    # and the Python type of its values (Numeric(asdecimal=False) gives
    # floats, Enum(enum_class) its members); a length, say, changes neither.
    name = column.name if isinstance(column, ColumnClause) else type(column).__name__
    try:
        python_type = _qualified(column.type.python_type)
    except (NotImplementedError, AttributeError):
        python_type = "?"
    return f"{name}:{_qualified(type(column.type))}:{python_type}"


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


_instance_state = attributes.instance_state


class _Snapshot:
    """Collects the objects of a result, each once, with their loaded state."""

    def __init__(self) -> None:
        self.classes: list[tuple] = []
        self.objects: list[tuple] = []
        #: The objects themselves, in the order of ``objects``.
        self.instances: list[Any] = []
        # class -> (its index in classes, column keys, relationship keys, whether each
        # holds a collection, whether load listeners may change its objects, the
        # loader path of the objects a query selects, the relationships some object
        # holds, a function of an object's dictionary giving its column values)
        self._layouts: dict[type, tuple[int, tuple, tuple, tuple, bool, Any, set[str], Any]] = {}
        self._index: dict[int, int] = {}
        self._loaders: dict[int, tuple[Any, bool]] = {}
        self._paths: dict[int, tuple[Any, list]] = {}
        #: False when an object holds what a stored copy would lose (see ``_keeps``).
        self.storable = True
        #: False when an object holds what ``load`` listeners made of it (see ``_layout``).
        self.servable = True
        #: The copies of values as loaded its objects hold: ``id(value) -> (value, copy)`` (``as_loaded.py``).
        self.copies: dict[int, tuple[Any, Any]] = {}

    def _layout(self, cls: type, mapper: Any) -> tuple[int, tuple, tuple, tuple, bool, Any, set[str], Any]:
        layout = self._layouts.get(cls)
        if layout is None:
            columns = tuple(prop.key for prop in mapper.column_attrs)
            populated = populated_relationships(mapper)
            relationships = tuple(prop.key for prop in populated)
            collections = tuple(bool(prop.uselist) for prop in populated)
            # A hit sends its objects the load event: the entry holds them as
            # loaded, before the class's listeners changed them (as_loaded.py).
            listened = as_loaded.listened(mapper.class_manager)
            if listened and not as_loaded.watch(mapper.class_manager):
                self.servable = False
            root = _sqlalchemy.load_path(mapper)
            # All the columns, in one call; KeyError when one is missing.
            values_of = itemgetter(*columns) if len(columns) > 1 else lambda loaded, key=columns[0]: (loaded[key],)
            layout = (len(self.classes), columns, relationships, collections, listened, root, set(), values_of)
            self._layouts[cls] = layout
            if mapper.always_refresh:  # every query overwrites its objects: no hit may serve them
                self.storable = False
            self.classes.append((cls, columns, relationships))
        return layout

    def ref(self, obj: Any) -> int:
        """Return the index of ``obj``, recording it (and what it holds) the first time."""
        # Once per object of every miss: written for speed.
        index = self._index
        position = index.get(id(obj))
        if position is not None:
            return position
        objects = self.objects
        position = index[id(obj)] = len(objects)
        objects.append(())  # reserved: what it holds may refer back to it
        self.instances.append(obj)
        state = _instance_state(obj)
        layout = self._layouts.get(type(obj)) or self._layout(type(obj), state.mapper)
        class_index, columns, relationships, collections, listened, root, held_keys, values_of = layout
        loaded = obj.__dict__  # state.dict, without its two calls
        columns_loaded: dict[str, Any] = loaded
        if listened:
            kept = as_loaded.values_of(state)
            if kept is None:  # not loaded by a loader, or before its class was watched
                self.servable = False
            else:
                columns_loaded = kept
                if not self.copies:
                    self.copies = as_loaded.copies_of(state)
        if state.committed_state:
            # Changed since its own load, in the loader: by another object's
            # load listener (a PostalCode's renaming its City).  A hit sends
            # that listener the load event again.
            columns_loaded = self._before_changes(state, columns_loaded, relationships, listened)
        try:
            values = values_of(columns_loaded)
            complete = True
        except KeyError:  # deferred, expired or not loaded
            values = tuple(map(columns_loaded.get, columns, repeat(NOT_LOADED)))
            complete = False
        held: tuple = ()
        if relationships:
            ref = self.ref
            found: list[Any] = []
            for key, collection in zip(relationships, collections, strict=True):
                value = loaded.get(key, NOT_LOADED)
                if value is NOT_LOADED:
                    found.append(value)
                    continue
                held_keys.add(key)
                if value is None:
                    found.append(None)
                elif not collection:
                    found.append(ref(value))
                else:
                    found.append([ref(member) for member in members(value)])
            held = tuple(found)
        loaders = None
        if state.callables:  # most objects have none
            loaders = {key: loader for key, loader in state.callables.items() if self._keeps(loader)} or None
        load_path = state.load_path
        path = None if load_path is root else self._path_text(load_path)
        objects[position] = (class_index, state.key, values, held, complete, loaders, path)
        return position

    def loaded_relationships(self) -> set[tuple[type, str]]:
        """``(class, key)`` of every relationship some recorded object holds."""
        return {(cls, key) for cls, layout in self._layouts.items() for key in layout[6]}

    def _before_changes(self, state: Any, columns_loaded: dict, relationships: tuple, listened: bool) -> dict:
        """The columns of ``state``'s object as loaded: ``columns_loaded``, with what its changes replaced.

        The entry holds the object as loaded, changes aside, and the hit
        makes them again, leaving it changed (pending) as the query did.
        A change it cannot undo (a relationship's, a value changed in
        place) makes the value unservable.  The columns of a ``listened``
        object are kept as loaded already (``as_loaded.py``).
        """
        loaded = state.dict
        values = columns_loaded if listened else dict(columns_loaded)
        for key, old in state.committed_state.items():
            if key in relationships:
                self.servable = False
            elif listened:
                continue
            elif old is attributes.NO_VALUE:  # not loaded before the change
                values.pop(key, None)
            elif old is loaded.get(key) and may_change((old,)):  # changed in place: its value as loaded is lost
                self.servable = False
            else:
                values[key] = old
        return values

    def as_loaded(self, row: tuple, entity_columns: tuple) -> tuple:
        """``row`` with each value an object holds a copy of as loaded replaced by that copy."""
        copies = self.copies
        out = []
        for value, flag in zip(row, entity_columns, strict=True):
            found = None if flag else copies.get(id(value))
            out.append(found[1] if found is not None and found[0] is value else value)
        return tuple(out)

    def _path_text(self, path: Any) -> list:
        # One text per path, shared by the objects reached through it (and
        # by their unpickled copies: pickle keeps one object once).
        found = self._paths.get(id(path))
        if found is None:
            found = self._paths[id(path)] = (path, _sqlalchemy.path_text(path))
        return found[1]

    def _keeps(self, loader: Any) -> bool:
        # An object's own loader (the ORM gives every object of a query the
        # same one per attribute): kept if it pickles, as the entry must.
        # One that pickles without what it holds (a lazy load's .and_()
        # criteria) is kept too, and the value is never stored: its copy
        # would load other rows.
        found = self._loaders.get(id(loader))
        if found is None:
            if _sqlalchemy.loses_when_pickled(loader):
                self.storable = False
                found = (loader, True)
            else:
                try:
                    pickle.dumps(loader, pickle.HIGHEST_PROTOCOL)
                    found = (loader, True)
                except Exception:
                    found = (loader, False)
            self._loaders[id(loader)] = found
        return found[1]
