"""The private SQLAlchemy names the add-on relies on, in one place.

Each function says why it needs what it touches.  All of it is checked
by the test suite against SQLAlchemy 2.0.53, the oldest release supported
(run by CI with the oldest release of every dependency), and 2.1 (2.1.9).
Older 2.0 releases lack ``strategies._NO_EXTRA_CRITERIA`` (2.0.53) and
spell the closure ``connect_arguments()`` reads otherwise (2.0.48).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy
from sqlalchemy import event, inspect
from sqlalchemy.engine import Connection, FrozenResult, Result
from sqlalchemy.engine.result import SimpleResultMetaData
from sqlalchemy.exc import InvalidRequestError, SAWarning
from sqlalchemy.orm import Bundle, Load, Query, RelationshipProperty, Session, UserDefinedOption
from sqlalchemy.orm import context as orm_context
from sqlalchemy.orm.collections import InstrumentedList
from sqlalchemy.orm.context import FromStatement
from sqlalchemy.orm.path_registry import PathRegistry, RootRegistry
from sqlalchemy.orm.strategy_options import _WildcardLoad
from sqlalchemy.orm.util import LoaderCriteriaOption
from sqlalchemy.pool.base import _ConnectionRecord
from sqlalchemy.sql import cache_key as cache_key_module
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.functions import GenericFunction
from sqlalchemy.sql.selectable import CompoundSelect, TextualSelect

from . import forks

try:
    from sqlalchemy.orm.strategies import _NO_EXTRA_CRITERIA  # 2.0.53 and later
except ImportError as exc:  # pragma: no cover - setup.py asks for 2.0.53 or later
    raise ImportError(
        f"pyramid_sessioncache needs SQLAlchemy 2.0.53 or later (or 2.1), not {sqlalchemy.__version__}"
    ) from exc

#: The empty loader path, as it appears in a statement's cache key (2.0, 2.1):
#: ``keys.py`` recognises compile options that only name the API.
ROOT_PATH = RootRegistry


def cache_key(statement: Any) -> Any:
    """SQLAlchemy's own cache key of ``statement`` (a ``CacheKey``), or None.

    ``_generate_cache_key()`` is what SQLAlchemy's compiled cache and its
    dogpile example key on; there is no public spelling of it (2.0, 2.1).
    """
    return statement._generate_cache_key()


def statement_params(cache_key: Any) -> Mapping[str, Any]:
    """The values ``select(...).params(p=2)`` gave the statement keyed by ``cache_key``.

    2.1 keeps them apart from its bound values (``CacheKey.params``), and
    ``execute()``'s parameters override them; 2.0 writes them into the
    bound values themselves, and has no such field.
    """
    return getattr(cache_key, "params", None) or {}


#: The class of SQLAlchemy's named constants (``JSON.NULL``): an ``int``
#: subclass whose value is the hash of its name, another in each process
#: (``sqlalchemy.util.langhelpers.symbol``, exported as ``sqlalchemy.util.symbol``
#: but not documented; 2.0, 2.1).  Its repr names it.
SYMBOL = sqlalchemy.util.symbol


#: What ``type_cache_key()`` returns for a type whose instances cannot be
#: told apart (a ``TypeDecorator`` with ``cache_ok = False``; 2.0, 2.1).
NO_CACHE = cache_key_module.NO_CACHE


def type_cache_key(type_: Any) -> Any:
    """The part of SQLAlchemy's cache key that describes a column type.

    A ``Table`` is in a statement's cache key as the object itself, not
    as its columns; ``keys.py`` describes its columns by name and by this
    key of their types, as SQLAlchemy describes a column it keys
    (``ColumnClause._gen_cache_key``, 2.0, 2.1): ``_static_cache_key``
    has no public spelling.  A type without ``cache_ok`` has none: SQLAlchemy
    warns, and where warnings are errors (``-W error``), that warning is
    the answer, not the query's failure.
    """
    try:
        return type_._static_cache_key
    except SAWarning:
        return NO_CACHE


def loading_into(session: Any) -> Callable[[Any, Any], None]:
    """Return ``add(state, identity_key)``, which makes a new ``state`` persistent in ``session`` as a query would.

    These are the steps ``sqlalchemy.orm.loading._instance`` takes for a row
    whose identity is not in the identity map yet (2.0, 2.1); the public
    alternatives, ``make_transient_to_detached()`` then ``Session.add()``,
    cascade through relationships and fire attach events, which costs more
    than the query a cache hit replaces.  Made once per hit, for every
    object it builds.
    """
    session_id = session.hash_key
    identity_map = session.identity_map
    add_unpresent = identity_map._add_unpresent

    def add(state: Any, identity_key: Any) -> None:
        state.key = identity_key
        state.identity_token = identity_key[2]
        state.session_id = session_id
        add_unpresent(state, identity_key)

    return add


def load_path(mapper: Any) -> Any:
    """The loader path to give objects of ``mapper`` built from a cached row.

    The ORM sets ``state.load_options`` and ``state.load_path`` on every
    object it loads, so that the object's own loads (lazy loads, deferred
    columns) carry the query's propagating options (``RelationshipCache``
    among them), matched against that path; ``engine/hydrate.py`` does the
    same.  An object the query selected has the path of its mapper
    (``Mapper._path_registry``, what ``state.mapper`` gives too); one
    reached through a relationship (an eager load) has its own, kept with
    the entry (:func:`path_text`).
    """
    return mapper._path_registry


def path_text(path: Any) -> list:
    """``path`` (a ``PathRegistry``) as plain data that pickles: ``(class, key)`` pairs.

    What ``InstanceState.__getstate__`` keeps of an object's
    ``load_path``: ``PathRegistry.serialize()`` (2.0, 2.1).
    """
    return path.serialize()


def path_of(text: list) -> Any:
    """The ``PathRegistry`` :func:`path_text` gave ``text`` for, as ``InstanceState.__setstate__`` rebuilds it."""
    return PathRegistry.deserialize(text)


def commit_loaded(state: Any, keys: Any) -> None:
    """Mark ``keys`` of ``state`` as loaded from the database (no history)."""
    state._commit(state.dict, keys)


def commit_all_loaded(state: Any, session: Any) -> None:
    """Mark every attribute of ``state`` as loaded, as the ORM does after a new object's ``load`` event changed it.

    ``sqlalchemy.orm.loading._instance`` commits a state that its ``load``
    listeners modified (2.0, 2.1): what a reconstructor sets is what was
    loaded, and the object is not dirty.
    """
    state._commit_all(state.dict, session.identity_map)


def give_loaders(state: Any, loaders: dict) -> None:
    """Give a new ``state`` the per-object loaders a query's options gave the object it was stored from.

    The ORM keeps them in ``state.callables`` (``LoadLazyAttribute`` for
    ``raiseload()``, ``LoadDeferredColumns`` for
    ``defer(raiseload=True)``), set per row by
    ``InstanceState._instance_level_callable_processor`` (2.0, 2.1).
    """
    state.callables = dict(loaders)


def give_unloaded_loaders(state: Any, loaders: dict) -> None:
    """Give the Session's own ``state`` the ``loaders`` of what it has not loaded, as a query's row does.

    For an object already in the identity map, ``loading._populate_partial``
    runs the "new" populators of the keys in ``state.unloaded``, which set
    ``state.callables[key]`` (``_instance_level_callable_processor``,
    starting a dictionary of the state's own), and leaves loaded and
    changed attributes alone (2.0, 2.1).
    """
    unloaded = state.unloaded
    keys = [key for key in loaders if key in unloaded]
    if keys:
        if "callables" not in state.__dict__:
            state.callables = {}
        for key in keys:
            state.callables[key] = loaders[key]


def loses_when_pickled(loader: Any) -> bool:
    """Whether an object's ``loader`` (from ``state.callables``) pickles without what it holds.

    A lazy load given criteria (``lazyload(A.b.and_(...))``) keeps them in
    ``_LoadLazyAttribute.extra_criteria``, which its ``__getstate__``
    replaces by none (``strategies._NO_EXTRA_CRITERIA``), with a warning
    (2.0, 2.1): the copy loads every row.
    """
    return getattr(loader, "extra_criteria", _NO_EXTRA_CRITERIA) is not _NO_EXTRA_CRITERIA


def expire_missing(state: Any, keys: Any) -> None:
    """Mark column ``keys`` that a cached row lacks as expired, so they load on access.

    Except those with a loader of their own (a ``deferred()`` column's):
    a query leaves them unloaded, not expired (``no_loader=True``, what
    ``InstanceState._expire_attributes`` offers for this, 2.0, 2.1), and an
    object with expired attributes is one a local hit refuses.  A column
    property the class does not instrument (``ConcreteBase``'s ``type``
    on the base) has nothing to expire.
    """
    manager = state.manager
    state._expire_attributes(state.dict, [key for key in keys if key in manager], no_loader=True)


def is_single_entity(frozen: Any) -> bool:
    """Whether a frozen ORM result selects one entity (``Query.all()`` gives objects).

    The ORM records it in the result's private ``_attributes``, which is
    also what ``Query._iter()`` reads.
    """
    return bool(frozen._attributes.get("is_single_entity"))


#: What an ORM Result that requires ``.unique()`` raises when read without
#: it: the message of ``sqlalchemy.orm.loading.instances()`` (2.0, 2.1).
UNIQUE_REQUIRED = (
    "The unique() method must be invoked on this Result, as it contains results "
    "that include joined eager loads against collections"
)


def requires_unique(result: Result) -> bool:
    """Whether an ORM ``result``, not read yet, demands ``.unique()`` (a joined eager load of a collection).

    ``sqlalchemy.orm.loading.instances()`` sets the private
    ``Result._unique_filter_state`` to ``(set(), require_unique)`` exactly
    then (2.0, 2.1), a filter that raises on the first row; ``.unique()``
    replaces it.  There is no public way to ask.
    """
    state = result._unique_filter_state
    return state is not None and state[1] is not None


def freeze_raw(result: Result) -> FrozenResult:
    """Freeze every row of ``result`` as the database returned it, whatever its unique filter.

    ``Result.freeze()`` reads a single entity's rows raw but a result of
    several columns through its unique filter (``_allrows()``, 2.0, 2.1):
    one that requires ``.unique()`` would raise there, before its caller
    had a chance to call it.  The filter is dropped first, so both freeze
    the same raw rows; :func:`require_unique` puts the requirement back
    on each Result made from them.
    """
    result._unique_filter_state = None
    return result.freeze()


def raw_connect(engine: Any) -> Any:
    """A new DBAPI connection to ``engine``'s database, made as its pool makes one, outside it: the caller closes it.

    ``Pool._invoke_creator`` (2.0, 2.1): the engine's own connect function,
    with its URL, ``connect_args`` and ``do_connect`` listeners, or the
    application's ``creator``, given a connection record of its own (the
    private ``_ConnectionRecord``, made without connecting: its ``info``
    and ``record_info``), as a new connection of the pool would be.  The
    pool's ``connect`` listeners (session settings) do not run.
    """
    pool = engine.pool
    return pool._invoke_creator(_ConnectionRecord(pool, connect=False))


#: The ORM's compile state of a SELECT (renamed in 2.1).
_SELECT_STATE: Any = vars(orm_context).get("_ORMSelectCompileState") or vars(orm_context)["ORMSelectCompileState"]


def _first_select(statement: Any) -> Any:
    """``statement``, or a union's (``CompoundSelect``) first select, however nested."""
    while isinstance(statement, CompoundSelect):
        statement = statement.selects[0]
    return statement


def selected_columns(statement: Any) -> tuple | None:
    """What ``statement`` selects, as given: a ``select()``'s raw columns (a union's first select's), a ``TextualSelect``'s columns; or None."""
    statement = _first_select(statement)
    if isinstance(statement, TextualSelect):
        return tuple(statement.column_args)
    columns = getattr(statement, "_raw_columns", None)
    return None if columns is None else tuple(columns)


def column_objects(statement: Any) -> list[tuple] | dict[str, tuple] | None:
    """What each result column of ``statement`` is found by besides its name, as its uncached result finds it; or None.

    For a ``select()`` (of entities, attributes, aliases or Core columns)
    and ``select().from_statement()``: the ``_extra_entities`` of the
    ORM's entities, as ``Session.merge_frozen_result()`` gathers them
    (``_create_entities_collection()`` of ``ORMSelectCompileState``, 2.0;
    ``_ORMSelectCompileState``, 2.1), one per column.  A union's are its
    first select's columns, as Core finds them (not its ORM attributes).
    For ``text().columns(...)``: the columns it was given, by position
    when given as columns (``TextualSelect.positional``, however many the
    SQL returns), else by name.
    None for anything else (plain ``text()``): found by name only.
    """
    if isinstance(statement, CompoundSelect):
        return [(column,) for column in _first_select(statement).selected_columns]
    if isinstance(statement, TextualSelect):
        if statement.positional:
            return [(column,) for column in statement.column_args]
        return {column.name: (column,) for column in statement.column_args}
    if getattr(statement, "_raw_columns", None) is None:
        return None
    entities = _SELECT_STATE._create_entities_collection(statement, legacy=False)._entities
    return [entity._extra_entities for entity in entities]


def found_by(result: Result, objects: list[tuple] | dict[str, tuple]) -> Any:
    """The metadata of ``result``, whose rows are found by name only, that finds each column by ``objects`` too; or None.

    ``objects``: per column, or per name (see :func:`column_objects`).

    ``SimpleResultMetaData`` made with ``extra=`` as the ORM makes it,
    with the stored one's translation and ambiguous names, and its
    ``.unique()`` filters (``_unique_filters``, 2.0;
    ``_create_unique_filters``, 2.1).  None for any other kind of metadata.
    """
    stored: Any = result._metadata
    if type(stored) is not SimpleResultMetaData:
        return None
    keys = stored._keys
    if isinstance(objects, dict):
        objects = [objects.get(key, ()) for key in keys]
    elif len(objects) != len(keys):
        # SQL text given fewer columns than it returns: by position still, as the cursor's.
        objects = [*objects[: len(keys)], *[()] * (len(keys) - len(objects))]
    metadata: Any = SimpleResultMetaData(
        stored._keys,
        extra=objects,
        _tuplefilter=stored._tuplefilter,
        _translated_indexes=stored._translated_indexes,
        _ambiguous_keys=stored._ambiguous_keys,
    )
    for name in ("_unique_filters", "_create_unique_filters"):
        if hasattr(stored, name):
            setattr(metadata, name, getattr(stored, name))
    return metadata


def set_metadata(result: Result, metadata: Any) -> None:
    """Give ``result``, not read yet, ``metadata`` (``Result._metadata``, which its rows take as they are made)."""
    result._metadata = metadata


def holds_scalars(frozen: FrozenResult) -> bool:
    """Whether each row ``frozen`` holds is the value itself (one entity or one column per row), not a tuple.

    ``FrozenResult._source_supports_scalars``, set from the result frozen
    (2.0, 2.1).
    """
    return bool(frozen._source_supports_scalars)


def detached(frozen: FrozenResult) -> FrozenResult:
    """Return a copy of ``frozen`` that holds its rows and column names, nothing of the query that made it.

    An ORM result's metadata (``SimpleResultMetaData``) keeps
    ``_create_unique_filters``, a closure of ``sqlalchemy.orm.loading.instances()``
    over the ``QueryContext``: the Session that ran the query, its ``info``
    (a Pyramid request, through the caller's), its identity map and
    connection.  A cached value holding it keeps all of that alive as long
    as the entry lives, with the listeners of that Session.  Pickling drops
    it (``SimpleResultMetaData.__getstate__`` keeps the keys, the
    translated indexes and the ambiguous keys), so the metadata is copied
    the way pickling does, and every region holds what file and Redis
    regions hold: ``.unique()`` on a hit then hashes each row, as it does
    on a row read from a pickled region.  ``_attributes``, an
    ``immutabledict`` of flags (``is_single_entity``, ``filtered``), is
    kept.  Checked against SQLAlchemy 2.0 (2.0.x) and 2.1 (2.1.9), whose
    ``FrozenResult`` and ``SimpleResultMetaData`` are the same in this.
    """
    metadata: Any = frozen.metadata
    copy = metadata.__class__.__new__(metadata.__class__)
    copy.__setstate__(metadata.__getstate__())
    result = FrozenResult.__new__(FrozenResult)
    result.metadata = copy
    result._attributes = frozen._attributes
    result._source_supports_scalars = frozen._source_supports_scalars
    result.data = frozen.data
    return result


def unique_filters(frozen: FrozenResult, result: Result) -> list | None:
    """The ORM's functions by which ``.unique()`` tells apart the values of each column of ``result``.

    ``id`` for an entity (objects are told apart by identity, whatever
    their ``__eq__``), None (hash the value), or a function of the ORM's
    for a type whose values may not hash (JSON).  ``frozen`` is
    ``result`` frozen: its metadata holds them, as the private
    ``_unique_filters`` list (2.0), or ``_create_unique_filters(result)``,
    a function of the query that made them (2.1); neither survives
    :func:`detached`.
    """
    metadata: Any = frozen.metadata
    create = getattr(metadata, "_create_unique_filters", None)
    if create is not None:
        return list(create(result))
    filters = getattr(metadata, "_unique_filters", None)
    return None if filters is None else list(filters)


def set_unique_filters(frozen: FrozenResult, filters: list | None) -> None:
    """Make the Results of ``frozen`` unique their columns by ``filters``, as :func:`unique_filters` gave them."""
    metadata: Any = frozen.metadata
    if hasattr(metadata, "_create_unique_filters"):
        metadata._create_unique_filters = None if filters is None else _Filters(filters)
    else:
        metadata._unique_filters = filters


class _Filters:
    # What 2.1's _create_unique_filters(result) returns, without a closure
    # (a stored value keeps none: it could hold what a query saw).
    __slots__ = ("filters",)

    def __init__(self, filters: list) -> None:
        self.filters = filters

    def __call__(self, result: Any) -> list:
        return self.filters


def _unique_required(row: Any) -> Any:
    raise InvalidRequestError(UNIQUE_REQUIRED)


def require_unique(result: Result) -> Result:
    """Make ``result`` demand ``.unique()``, as the ORM result it was frozen from did; return it.

    The filter ``loading.instances()`` installs, as the same private
    ``_unique_filter_state`` (2.0, 2.1): ``.scalars()``, ``.mappings()``
    and the like carry it over, and ``.unique()`` (the legacy ``Query``
    calls it for every result of entities) replaces it.
    """
    result._unique_filter_state = (set(), _unique_required)
    return result


def textual_sql(statement: Any) -> str | None:
    """The SQL text ``statement`` runs when it is SQL text, else None.

    SQL text is ``text(...)``, ``text(...).columns(...)`` (a
    ``TextualSelect``) and ``select(...).from_statement(...)`` of either.
    ``Select.from_statement()`` builds a ``FromStatement``, whose class is
    in the ORM's private ``sqlalchemy.orm.context`` and whose ``element``
    is the statement it was given (2.0, 2.1); ``Query.from_statement()``
    runs one too.
    """
    if isinstance(statement, FromStatement):
        statement = statement.element
    if isinstance(statement, TextualSelect):
        statement = statement.element
    return statement.text if isinstance(statement, TextClause) else None


def query_statement(query: Query) -> Any:
    """Return the statement a legacy ``Query`` executes, and its parameters.

    ``Query.statement`` is not it: it is built for embedding and labelled
    differently; ``_statement_20()`` is what ``Query._iter()`` runs.
    """
    return query._statement_20(), query._params


def legacy_bypass(execution_options: Any) -> bool:
    """Whether a legacy ``Query`` asked for ``populate_existing()`` or ``yield_per()``.

    ``Query`` keeps those in its private load options, passed to the
    execution as ``_sa_orm_load_options``, not as execution options.
    """
    load_options = execution_options.get("_sa_orm_load_options")
    if load_options is None:
        return False
    return bool(getattr(load_options, "_populate_existing", False) or getattr(load_options, "_yield_per", None))


def query_session(context: Any) -> Any:
    """The Session of the query a ``refresh`` event's ``context`` stands for; None when no query sent it.

    A query passes its ``QueryContext``; a shared hit's objects
    (``hydrate.py``) pass None, and reading a ``composite()`` whose columns
    are loaded passes a marker of its own (``CompositeProperty._COMPOSITE_FGET``,
    a bare ``object()``, 2.0 and 2.1), on any object, even one of no Session.
    """
    return getattr(context, "session", None)


def populates_existing(execution_options: Any) -> bool:
    """Whether an ORM execution overwrites the objects the Session holds (``populate_existing``, however asked).

    The ORM gathers the option from the statement, the call and a legacy
    ``Query`` into its private load options (``_sa_orm_load_options``)
    before ``do_orm_execute`` listeners run (2.0, 2.1).
    """
    load_options = execution_options.get("_sa_orm_load_options")
    return load_options is not None and bool(getattr(load_options, "_populate_existing", False))


def autobegin(session: Any) -> None:
    """Begin ``session``'s transaction as a query would, without a connection: what ``rollback()`` then expires.

    ``Session._autobegin_t()`` is what ``Session.execute()`` calls on its
    way to a connection (2.0, 2.1); ``Session.begin()`` would begin it as
    explicit, which a later ``with session.begin():`` refuses.  It raises
    as the query would on a Session made with ``autobegin=False``.
    """
    session._autobegin_t()


def transaction_connections(transaction: Any) -> list:
    """The Connections a Session's ``transaction`` (a ``SessionTransaction``) works on.

    ``SessionTransaction._connections`` maps each bind to ``(connection,
    transaction, should_commit, autoclose)`` (2.0, 2.1): there is no public
    list.  ``transaction`` None (a Session with none): none.
    """
    return [] if transaction is None else [found[0] for found in transaction._connections.values()]


#: Whether ``Session.execute()`` autoflushes before a Core statement (a
#: ``select()`` of a Table): SQLAlchemy 2.1 does, 2.0 only before ORM ones.
AUTOFLUSHES_CORE = tuple(int(part) for part in sqlalchemy.__version__.split(".")[:2]) >= (2, 1)


def autoflush(session: Any, execution_options: Any, statement: Any = None) -> None:
    """Flush pending changes as the ORM does before running ``statement``.

    ``do_orm_execute`` listeners run *before* the ORM's autoflush, so a
    cache look-up must flush first or it would serve results that ignore
    the Session's own pending inserts, updates and deletes.  This mirrors
    ``ORMCompileState.orm_pre_session_exec`` (2.0, 2.1): the ``autoflush``
    execution option, a legacy ``Query.autoflush(False)`` (private load
    options), then ``Session._autoflush()``, which honours ``no_autoflush``
    and adds the ORM's "Query-invoked autoflush" note to errors.  Before
    a Core statement, only where ``Session.execute()`` would (2.1; see
    :data:`AUTOFLUSHES_CORE`).
    """
    if not execution_options.get("autoflush", True):
        return
    if (
        not AUTOFLUSHES_CORE
        and statement is not None
        and statement._propagate_attrs.get("compile_state_plugin") != "orm"
    ):
        return
    load_options = execution_options.get("_sa_orm_load_options")
    if load_options is not None and not getattr(load_options, "_autoflush", True):
        return
    if session.autoflush and not session._is_clean():
        session._autoflush()


def statement_options(statement: Any) -> tuple:
    """Return the ORM options given to ``statement`` with ``.options()``.

    ``Executable._with_options`` holds them (2.0, 2.1), and the entities a
    ``with_only_columns()`` replaced keep theirs in
    ``_memoized_select_entities``: this is what the public
    ``ORMExecuteState.user_defined_options`` reads, without building a list
    on every execution, and it works outside one.
    """
    options = getattr(statement, "_with_options", ())
    for entities in getattr(statement, "_memoized_select_entities", ()):
        options += entities._with_options
    return options


#: The ``lazy`` strategies that load a relationship with the query itself (``False`` is ``"joined"``).
EAGER = frozenset({"joined", "selectin", "subquery", "immediate", False})

#: The ``lazy`` strategies that read every related row of the parents' rows, even where a
#: parent has the relationship loaded already (``contains_eager()`` is ``"joined"``).
ROW_EAGER = frozenset({"joined", "subquery", False})


def eager_relationship_keys(statement: Any) -> frozenset[str] | None:
    """The keys of the relationships ``statement``'s loader options name, on any path; None when they may load any.

    A superset of what its options load eagerly, read from the options'
    private elements (2.0, 2.1): every relationship on the path of a
    ``Load`` (``joinedload(A.bs).selectinload(B.cs)`` gives ``bs`` and
    ``cs``, whatever each strategy is).  None for a wildcard that loads
    eagerly (``selectinload("*")``), and for an option of a kind not known
    here (it may load anything); ``raiseload("*")``, ``load_only()`` and
    the add-on's and the application's own options (``UserDefinedOption``)
    load nothing.  Relationships mapped to load eagerly
    (:data:`EAGER`) are not in it.
    """
    return _relationship_keys(statement, EAGER, whole_path=True)


def row_eager_relationship_keys(statement: Any) -> frozenset[str] | None:
    """The keys of the relationships ``statement``'s options load from rows (:data:`ROW_EAGER`); None: maybe any.

    Read as :func:`eager_relationship_keys` reads them, but only the
    relationship each option sets a :data:`ROW_EAGER` strategy for
    (``joinedload(A.bs).selectinload(B.cs)`` gives ``bs``).
    Relationships mapped so are not in it.
    """
    return _relationship_keys(statement, ROW_EAGER, whole_path=False)


def _relationship_keys(statement: Any, strategies: frozenset, whole_path: bool) -> frozenset[str] | None:
    keys: set[str] = set()
    for option in statement_options(statement):
        if isinstance(option, (UserDefinedOption, LoaderCriteriaOption)):
            continue
        if isinstance(option, _WildcardLoad):
            if _loads_with(option.strategy, strategies):
                return None
            continue
        if type(option) is not Load:
            return None
        for element in option.context:
            if element.is_token_strategy:
                if _loads_with(element.strategy, strategies):
                    return None
                continue
            on_path = [prop.key for prop in element.path.path if isinstance(prop, RelationshipProperty)]
            if whole_path:
                keys.update(on_path)
            elif on_path and _loads_with(element.strategy, strategies):
                keys.add(on_path[-1])  # the path ends with the relationship's target: (A, A.bs, B)
    return frozenset(keys)


def _loads_with(strategy: Any, strategies: frozenset) -> bool:
    # A strategy is a tuple of (name, value) pairs: (("lazy", "selectin"),); None for columns.
    return strategy is not None and dict(strategy).get("lazy", True) in strategies


def _orm_compile_options(statement: Any) -> Any:
    # What ORMExecuteState._orm_compile_options() reads (2.0, 2.1); the
    # properties built on it look it up again on every access.
    options = getattr(statement, "_compile_options", None)
    return options if hasattr(options, "_for_refresh_state") else None


def relationship_load_path(statement: Any) -> Any:
    """The loader path when ``statement`` loads a relationship, else None.

    What ``ORMExecuteState.loader_strategy_path`` gives when
    ``is_relationship_load`` is true: the path ends with the mapper and the
    relationship being loaded.
    """
    options = _orm_compile_options(statement)
    path = getattr(options, "_current_path", None)
    return None if path is None or path.is_root else path


def is_column_load(statement: Any) -> bool:
    """``ORMExecuteState.is_column_load``: a refresh or an unexpire of an object's columns."""
    options = _orm_compile_options(statement)
    return bool(options is not None and options._for_refresh_state)


def set_loaded(impl: Any, state: Any, dict_: Any, value: Any) -> None:
    """Set relationship ``impl`` of a new ``state`` to ``value`` as loaded from the database.

    What ``impl.set_committed_value()`` does (2.0, 2.1), less what a new
    state has nothing of: committed history, expired keys and loader
    callables to clear, pending collection changes.  A plain list
    collection is filled at once; any other collection class takes its
    members through its own appender, without events, as the ORM's does.
    """
    if not impl.collection:
        dict_[impl.key] = value
        return
    adapter, collection = impl._initialize_collection(state)  # sends init_collection, as the ORM does
    if value:
        if type(collection) is InstrumentedList:
            list.extend(collection, value)
        else:
            adapter.append_multiple_without_event(value)
    dict_[impl.key] = collection


def attribute_impl(manager: Any, key: str) -> Any:
    """Return the attribute implementation behind ``manager[key]``.

    ``impl.set_committed_value(state, dict_, value)`` is what the public
    ``attributes.set_committed_value()`` calls, without looking the state
    and the manager up again for every object of a cached result.
    """
    return manager[key].impl


def later_listeners(orm_execute_state: Any) -> bool:
    """Whether ``do_orm_execute`` listeners remain to run after the current one."""
    return len(orm_execute_state._events_todo) > orm_execute_state._starting_event_idx + 1


def execution_options(orm_execute_state: Any) -> Any:
    """The execution options the statement will run with, as the listeners left them.

    Those of the execution as it began, then those of the statement a
    listener may have put in its place, then the execution's own and what
    listeners added with ``update_execution_options()`` (which
    ``local_execution_options`` holds): the order in which
    ``Session._execute_internal`` and ``Connection`` let them override each
    other (2.0, 2.1).
    """
    return orm_execute_state.execution_options.union(orm_execute_state.statement.get_execution_options()).union(
        orm_execute_state.local_execution_options
    )


class _NoListeners:
    # What Session._execute_internal asks a parent execution for: the
    # do_orm_execute listeners still to run (2.0, 2.1).
    @staticmethod
    def _remaining_events() -> list:
        return []


def execute_without_listeners(session: Any, statement: Any, parameters: Any, execution_options: Any) -> Any:
    """``session.execute(statement, ...)`` without running any ``do_orm_execute`` listener.

    For a statement that has been through the listeners of another
    execution already.  It is what ``ORMExecuteState.invoke_statement()``
    does for the listeners that already ran: ``Session.execute`` takes the
    execution it continues as the private ``_parent_execute_state``.
    """
    return session.execute(
        statement, parameters, execution_options=execution_options, _parent_execute_state=_NoListeners()
    )


def run_later_listeners(orm_execute_state: Any) -> Any:
    """Run the ``do_orm_execute`` listeners after the current one, as the ORM would.

    Returns the first result one of them returns (it executed the statement
    itself), else None.  Afterwards none remain: ``invoke_statement()``
    runs none of them again.  This is the loop of ``Session._execute_internal``
    over ``ORMExecuteState._events_todo`` (2.0, 2.1).
    """
    events = orm_execute_state._events_todo
    for index in range(orm_execute_state._starting_event_idx + 1, len(events)):
        orm_execute_state._starting_event_idx = index
        result = events[index](orm_execute_state)
        if result:
            return result
    return None


def bind_arguments(statement: Any) -> dict:
    """The ``bind_arguments`` that ``session.execute(statement)`` gives ``Session.get_bind()``.

    ``ORMCompileState.orm_pre_session_exec`` (2.0, 2.1) passes the
    statement and its mapper, the private ``plugin_subject``.
    """
    subject = statement._propagate_attrs.get("plugin_subject")
    return {"clause": statement, "mapper": subject.mapper if subject else None}


#: The mappers of the process configured with ``always_refresh=True`` (see :func:`watch_always_refresh`).
ALWAYS_REFRESHED: weakref.WeakSet[Any] = weakref.WeakSet()


def watch_always_refresh() -> None:
    """Keep :data:`ALWAYS_REFRESHED`: every mapper mapped now, and each one configured from now on.

    ``always_refresh`` (a legacy ``Mapper`` argument) makes every query of
    the class overwrite what the Session holds, pending changes included,
    as ``populate_existing()`` does; the set is empty in most applications,
    so that look-ups pay nothing for it.
    """
    from sqlalchemy.orm import Mapper

    if not event.contains(Mapper, "mapper_configured", _configured):
        event.listen(Mapper, "mapper_configured", _configured)
    for mapper in mappers():
        _configured(mapper, mapper.class_)


def mappers() -> list[Any]:
    """Every mapper of the process.

    The ORM keeps its registries in ``sqlalchemy.orm.mapper._all_registries()``
    (2.0, 2.1); there is no public list of them.
    """
    from sqlalchemy.orm.mapper import _all_registries

    return [mapper for registry in _all_registries() for mapper in registry.mappers]


def _configured(mapper: Any, cls: Any) -> None:
    if mapper.always_refresh:
        ALWAYS_REFRESHED.add(mapper)


def loads_always_refreshed(statement: Any) -> bool:
    """Whether ``statement`` loads objects of a mapper in :data:`ALWAYS_REFRESHED` (ask only when it is not empty).

    Only objects are overwritten: ``select(Item.name)`` or a count over
    such a class loads none, and is cached as any other.  A ``Bundle``
    counts as the entity it reads from.
    """
    descriptions = getattr(statement, "column_descriptions", None)
    if descriptions is None:
        subject = statement._propagate_attrs.get("plugin_subject")
        return subject is not None and subject.mapper in ALWAYS_REFRESHED
    for description in descriptions:
        entity = description.get("entity")
        if entity is None:
            continue
        expr = description.get("expr")
        if expr is not entity and not isinstance(expr, Bundle):  # a column of it: no object loaded
            continue
        mapper = getattr(inspect(entity), "mapper", None)
        if mapper is not None and mapper in ALWAYS_REFRESHED:
            return True
    return False


def mapped_metadata() -> list[Any]:
    """The ``MetaData`` of the tables of every mapped class in the process (see :func:`mappers`).

    ``invalidation/schema.py`` reads the foreign keys of those tables.
    """
    from sqlalchemy.orm.mapper import _all_registries

    found: dict[int, Any] = {}
    for registry in _all_registries():
        found.setdefault(id(registry.metadata), registry.metadata)
    for mapper in mappers():
        for table in mapper.tables:
            metadata = getattr(table, "metadata", None)
            if metadata is not None:
                found.setdefault(id(metadata), metadata)
    return list(found.values())


def at_top(compiler: Any) -> bool:
    """Whether ``compiler`` is rendering the statement itself, not a part nested in it.

    ``SQLCompiler.stack`` (2.0, 2.1) holds an entry per SELECT being
    rendered: ``invalidation/reads.py`` treats text given as a whole
    statement as opaque.
    """
    return not compiler.stack


def custom_compiled(element: Any) -> bool:
    """Whether ``element``'s class is rendered by a ``@compiles`` function.

    ``sqlalchemy.ext.compiler.compiles`` marks each class it serves with
    ``_compiler_dispatcher`` (2.0, 2.1): such SQL may read anything.
    """
    return any("_compiler_dispatcher" in vars(klass) for klass in type(element).__mro__)


def after_dbapi_commit(connection: Any, callback: Any) -> None:
    """Run ``callback`` as soon as the database has committed ``connection``'s transaction.

    ``ConnectionEvents.commit`` fires before the DBAPI commit, and no event
    fires after it (2.0, 2.1).  What ``Connection._commit_impl`` calls
    next is the dialect's ``do_commit()``, given the pool's proxy of the
    DBAPI connection (``Connection.connection``): the engine's dialect
    gets, once, a ``do_commit`` of its own (an instance attribute) that
    runs the original, then the callbacks waiting for that connection,
    even if the commit failed (a callback only invalidates).
    """
    dialect = connection.dialect
    waiting = dialect.__dict__.get("_sessioncache_after_commit")
    if waiting is None:
        with _wrapping:  # two threads' first commits: one wrapper, or the other's callbacks never run
            waiting = dialect.__dict__.get("_sessioncache_after_commit")
            if waiting is None:
                waiting = _wrap_do_commit(dialect)
    waiting.setdefault(id(connection.connection), []).append(callback)


#: Held while a dialect's ``do_commit`` is wrapped (:func:`after_dbapi_commit`).
_wrapping = forks.lock()


def _wrap_do_commit(dialect: Any) -> dict:
    waiting: dict = {}
    original = dialect.do_commit

    def do_commit(proxied_connection: Any) -> None:
        try:
            original(proxied_connection)
        finally:
            for run in waiting.pop(id(proxied_connection), ()):
                run()

    dialect.do_commit = do_commit
    dialect._sessioncache_after_commit = waiting
    return waiting


def after_twophase_commit(dialect: Any, callback: Any) -> None:
    """Run ``callback(connection, xid, is_prepared, recover)`` after each two-phase commit by ``dialect``.

    ``ConnectionEvents.commit_twophase`` fires before the commit, and not
    at all for ``Connection.commit_prepared()`` (a prepared transaction
    committed apart from its ``TwoPhaseTransaction``: recovered after a
    crash).  Both call the dialect's ``do_commit_twophase()`` (2.0, 2.1):
    the dialect gets, once, one of its own (an instance attribute) that
    runs the original, then ``callback``, only if the commit succeeded.
    """
    if "_sessioncache_twophase" in dialect.__dict__:
        return
    original = dialect.do_commit_twophase

    def do_commit_twophase(connection: Any, xid: Any, is_prepared: bool = True, recover: bool = False) -> None:
        original(connection, xid, is_prepared=is_prepared, recover=recover)
        callback(connection, xid, is_prepared, recover)

    dialect.do_commit_twophase = do_commit_twophase
    dialect._sessioncache_twophase = True


def known_function(func: Any) -> bool:
    """Whether ``func`` is one of SQLAlchemy's own generic functions (``func.count``, ``func.now``...).

    Those are ``GenericFunction`` subclasses that SQLAlchemy defines
    (``sqlalchemy.sql.functions``, 2.0, 2.1): SQL functions of the
    database, which read no table.  A subclass the application declares
    (to type the result of a function of its database) registers in the
    same ``sqlalchemy.sql.functions._registry``, and is not one of them:
    it may read anything.
    """
    return isinstance(func, GenericFunction) and _defined_by_sqlalchemy(type(func))


def known_function_name(name: str) -> bool:
    """Whether SQL calling ``name`` calls one of SQLAlchemy's own generic functions.

    ``func.<name>`` looks ``name`` up, in lower case, in the private
    ``sqlalchemy.sql.functions._registry["_default"]`` (2.0, 2.1); the
    class found must be SQLAlchemy's own (see :func:`known_function`).
    """
    from sqlalchemy.sql.functions import _registry

    found = _registry["_default"].get(name.lower())
    return found is not None and _defined_by_sqlalchemy(found)


def _defined_by_sqlalchemy(cls: type) -> bool:
    return cls.__module__ == "sqlalchemy" or cls.__module__.startswith("sqlalchemy.")


def connect_arguments(pool: Any) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The ``(args, kwargs)`` that ``pool`` passes to the DBAPI's ``connect()``, or None.

    ``engine/identity.py`` needs the ``connect_args`` given to
    ``create_engine()``: they can name another database than the URL does
    (PostgreSQL's ``options="-c search_path=..."``), and SQLAlchemy keeps
    them nowhere public.  ``create_engine()`` builds them once and closes
    over them in the function it gives its pool, ``Pool._creator`` (a
    private attribute): a closure named ``create_engine.<locals>.connect``
    over ``cargs_tup`` and ``cparams`` (the dialect's arguments from the
    URL, then ``connect_args``), in SQLAlchemy 2.0 (2.0.58) and 2.1 (2.1.9).

    None for a pool that connects otherwise (``creator=``, ``pool=``), and
    for anything not in that shape: the caller then treats the database as
    one it cannot name, never as another engine's.
    """
    creator = getattr(pool, "_creator", None)
    if (
        getattr(creator, "__module__", None) != "sqlalchemy.engine.create"
        or getattr(creator, "__qualname__", None) != "create_engine.<locals>.connect"
    ):
        return None
    names = getattr(getattr(creator, "__code__", None), "co_freevars", ())
    cells = getattr(creator, "__closure__", None) or ()
    try:
        found = {name: cell.cell_contents for name, cell in zip(names, cells, strict=True)}
    except ValueError:  # an empty cell
        return None
    args, kwargs = found.get("cargs_tup"), found.get("cparams")
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, Mapping):
        return None
    return tuple(args), dict(kwargs)


def entity_binds(session: Any) -> tuple:
    """The binds of ``Session(binds={mapper or table: bind})``, or () for a Session without.

    The Session keeps them in the private ``__binds`` (2.0), or in
    ``binds`` (2.1); the public ``Session.get_bind()`` resolves one mapper
    at a time.
    """
    binds = _binds(session)
    return tuple(binds.values()) if binds else ()


def _binds(session: Any) -> Any:
    # Read from the instance's dictionary: no attribute lookup that fails
    # (and raises inside getattr) on every key of every look-up.
    found = session.__dict__
    return found.get("_Session__binds") or found.get("binds")


def routes_binds(session: Any) -> bool:
    """Whether ``session`` may run the loads of one statement on several binds.

    A Session with binds per mapper or table, or one whose class has a
    ``get_bind()`` of its own (routing, sharding).
    """
    return bool(_binds(session)) or type(session).get_bind is not Session.get_bind


def transaction_connection(session: Any, bind: Any) -> Any:
    """The ``Connection`` ``session``'s transaction holds for ``bind`` (or ``bind`` itself, a Connection), or None.

    Read from the root ``SessionTransaction``'s private ``_connections``
    (2.0, 2.1), as :func:`execution_bind` does.
    """
    if isinstance(bind, Connection):
        return bind
    transaction = session._transaction
    if transaction is None:
        return None
    while transaction._parent is not None:
        transaction = transaction._parent
    entry = transaction._connections.get(bind)
    return None if entry is None else entry[0]


def execution_bind(session: Any, bind_arguments: dict) -> Any:
    """Return the bind a statement of ``session`` runs on, with the options it runs with.

    ``session.get_bind(**bind_arguments)``, unless the Session's
    transaction holds a ``Connection`` for that bind with execution options
    of its own, given by ``session.connection(execution_options=...)`` (a
    ``schema_translate_map``) or set on it since: the statement runs with
    those, which ``get_bind()`` does not show, so that connection is
    returned.

    The root ``SessionTransaction`` keeps its connections in the private
    ``_connections``, keyed by the bind and by the connection (2.0, 2.1);
    a savepoint's holds only those it used itself.  A connection starts
    with its engine's ``_execution_options`` object, and gets a new one
    when options are set on it.  SQLAlchemy 2.1.7 adds the public
    ``SessionTransaction.bound_connection()``, but it resolves the bind
    again and raises when there is no connection; 2.0 has no public way.
    This runs on every look-up, a hit included, so it reads attributes
    rather than calling ``get_transaction()`` and ``get_execution_options()``.
    """
    bind = session.get_bind(**bind_arguments)
    connection = transaction_connection(session, bind)
    if connection is None or connection._execution_options is bind._execution_options:
        return bind
    return connection
