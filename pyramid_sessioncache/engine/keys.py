"""Cache keys for SQL statements.

A key must differ whenever two executions can return different rows, and
must be the same in every process, so that processes share entries.  It is
a digest of four parts:

- the statement's *structure*, from SQLAlchemy's own cache key
  (``statement._generate_cache_key()``), which covers the SQL, the
  entities and the ORM loader options.  That key holds ``Mapper`` and
  ``Table`` objects whose ``repr()`` includes memory addresses, so it is
  rewritten here into a stable text (class paths; table names, with their
  columns and types, since SQLAlchemy tells two Tables of one name apart
  by the object only); the text is memoized per structure, so a statement
  shape is described once.
- every bound value, in statement order: ``execute()`` parameters first,
  then those the statement's ``.params()`` gave it, then the values bound in
  the statement (``LIMIT``/``OFFSET``, the members
  of ``in_()`` lists).  Values of types that have no stable text (arbitrary
  objects) make the statement unkeyable.
- the public execution options (``schema_translate_map``, ...).
- the bind: the identity of the database it reads (``identity.py``; not
  its URL, which two databases can share), and its own public execution
  options, those of a ``Connection`` included.

A statement that cannot be keyed gets ``None`` and runs uncached.  So does
a locking read (``with_for_update()`` anywhere in it, or ``FOR UPDATE``,
``FOR SHARE``... in its SQL text, hints or suffixes): it is run for its
locks as much as for its rows, and a cached result would lock nothing;
and a statement that calls a function for its effect (``nextval()``,
``Sequence.next_value()``, an advisory lock, ``set_config()``: see
:data:`EFFECT_FUNCTIONS`), which a hit would not have.
Both are found in the one walk over a statement's structure, once per
shape.  Unlike ``CacheKey.to_offline_string()`` used by SQLAlchemy's
dogpile example, the loader options, execution options and bind are part
of the key.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import functools
import hashlib
import logging
import os
import re
import secrets
import sys
import types
import uuid
import weakref
from collections.abc import Mapping
from typing import Any, NamedTuple

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SAWarning
from sqlalchemy.orm import ClassManager, Mapper, MapperProperty
from sqlalchemy.sql.expression import ColumnClause, Label, TableClause
from sqlalchemy.sql.functions import next_value
from sqlalchemy.sql.operators import custom_op
from sqlalchemy.sql.schema import Column
from sqlalchemy.sql.selectable import AliasedReturnsRows, ForUpdateArg, SelectLabelStyle
from sqlalchemy.types import TypeEngine

from .. import _sqlalchemy
from .._weak import members
from .identity import database_identity
from .invalidation import sqltext
from .values import mapping_text

#: Execution options that never change the rows a statement returns.
NEUTRAL_OPTIONS = frozenset({"compiled_cache", "logging_token", "autoflush", "max_row_buffer", "isolation_level"})

#: Execution options under which a result must not come from the cache:
#: streamed results, and loads meant to overwrite the identity map.
BYPASS_OPTIONS = frozenset({"yield_per", "stream_results", "populate_existing"})

_PLAIN = (str, int, float, bytes, decimal.Decimal, datetime.date, datetime.time, datetime.timedelta, uuid.UUID)
_DEFAULT_LABELS = frozenset({SelectLabelStyle.LABEL_STYLE_LEGACY_ORM, SelectLabelStyle.LABEL_STYLE_DISAMBIGUATE_ONLY})
# Compile options that only say which API built the statement: a legacy
# Query and the equivalent select() read the same rows and share a key.
_API_ONLY_COMPILE_OPTIONS = frozenset(
    {
        ("_for_statement", False),
        ("_use_legacy_query_style", True),
        ("_bake_ok", True),
        ("_enable_single_crit", True),
        ("_enable_eagerloads", True),
    }
)

#: SQL that takes row locks, wherever a statement holds SQL text (``text()``,
#: hints, suffixes): ``FOR [NO KEY] UPDATE``, ``FOR [KEY] SHARE``, MySQL's
#: ``LOCK IN SHARE MODE``, SQL Server's locking table hints.
LOCKING_SQL = re.compile(
    r"\bfor\s+(?:no\s+key\s+)?update\b|\bfor\s+(?:key\s+)?share\b|\block\s+in\s+share\s+mode\b"
    r"|\b(?:updlock|xlock|holdlock|tablockx)\b",
    re.IGNORECASE,
)

#: Functions called for what they do as much as for what they return: a
#: sequence advanced, a lock taken, a setting made, a notification sent.
#: A hit would do none of it, so a statement that calls one runs every time.
#: So does one that reads what its connection's own calls did (``currval()``,
#: ``lastval()``: the number its last ``nextval()`` drew, which no write publishes;
#: SQLite's ``last_insert_rowid()``), or which connection it is.
EFFECT_FUNCTIONS = frozenset(
    {"nextval", "setval", "currval", "lastval", "last_insert_rowid", "total_changes", "pg_backend_pid",
     "set_config", "pg_notify", "txid_current", "pg_current_xact_id", "lo_create", "lo_import",
     "lo_unlink", "lo_put", "lo_from_bytea", "pg_advisory_lock", "pg_advisory_lock_shared", "pg_advisory_xact_lock",
     "pg_advisory_xact_lock_shared", "pg_try_advisory_lock", "pg_try_advisory_lock_shared",
     "pg_try_advisory_xact_lock", "pg_try_advisory_xact_lock_shared", "pg_advisory_unlock",
     "pg_advisory_unlock_shared", "pg_advisory_unlock_all", "pg_cancel_backend", "pg_terminate_backend",
     "changes", "pg_export_snapshot", "pg_sequence_last_value", "lo_creat", "lo_open", "lo_close", "loread",
     "lowrite", "lo_lseek", "lo_lseek64", "lo_tell", "lo_tell64", "lo_truncate", "lo_truncate64", "lo_export",
     "lo_get"}
)  # fmt: skip
#: A call of one of them in SQL text, its name quoted or not (``"nextval"(...)`` is ``nextval(...)``).
EFFECT_SQL = re.compile(rf"\b(?:{'|'.join(sorted(EFFECT_FUNCTIONS))})\"?\s*\(", re.IGNORECASE)
#: SQL text that reads what its connection alone holds, changing it as it
#: goes or answering for that connection only: a cursor's next rows
#: (``FETCH``, ``MOVE``), a setting as it stands (``SHOW``; an isolation
#: level given as an execution option is none of the key).  Run every time.
CONNECTION_SQL = re.compile(r"^\s*(?:fetch|move|show)\b", re.IGNORECASE)

_MEMO_SIZE = 2000
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_UNSEEN: Any = object()

log = logging.getLogger(__name__)


class Unkeyable(Exception):
    """Raised inside this module for what has no stable key text."""


class Locking(Unkeyable):
    """Raised inside this module for a statement that takes row locks: it must run every time."""


class Effect(Locking):
    """Raised inside this module for a statement that calls a function for its effect: it must run every time."""


def _qualified(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _structure_text(element: Any, out: list[str], merge_labels: bool = True, mappers: bool = True) -> None:
    # mappers=False: a Mapper by its class path alone (inside a mapper's own text).
    if isinstance(element, tuple):
        if element and isinstance(element[0], type) and issubclass(element[0], TypeEngine):
            element = _type_key(element)
        out.append("(")
        previous = None
        skip = False
        for index, item in enumerate(element):
            if skip:
                skip = False
                continue
            if isinstance(item, str) and item == "_with_options" and element[index + 1 : index + 2] == ((),):
                skip = True  # options that are all ours: the same as no options
                continue
            if previous == "_label_style" and merge_labels and item in _DEFAULT_LABELS:
                out.append("labels")
            elif isinstance(item, str) and (
                (previous == "name" and _names_a_column(element)) or (previous == "proxy_key" and len(element) == 2)
            ):
                _name_text(item, out)  # a column's or label's name; an ORM annotation's attribute name
            elif previous == "_compile_options" and _api_only(item):
                out.append("compile")
            else:
                _structure_text(item, out, merge_labels, mappers)
            out.append(",")
            previous = item if isinstance(item, str) else None
        out.append(")")
    elif isinstance(element, str):
        _check_sql(element)
        out.append(repr(_plain(element)))
        quote = getattr(element, "quote", None)
        if quote is not None:  # a quoted_name: quote=True and False name two tables on PostgreSQL
            out.append(f"quote={quote}")
    elif element is None or isinstance(element, (int, float, bytes)):
        out.append(repr(_plain(element)))
    elif isinstance(element, enum.Enum):
        out.append(_enum_text(element))
    elif isinstance(element, type):
        if issubclass(element, ForUpdateArg):  # with_for_update(), at any depth
            raise Locking(element)
        if issubclass(element, next_value):  # Sequence.next_value()
            raise Effect(element)
        out.append(_qualified(element))
    elif isinstance(element, (types.FunctionType, types.BuiltinFunctionType)):
        out.append(_qualified(element))
    elif isinstance(element, types.ModuleType):  # PickleType's pickler
        out.append(f"module:{element.__name__}")
    elif isinstance(element, types.CodeType):
        out.append(_code_text(element))
    elif isinstance(element, Mapper):
        out.append(_mapper_text(element) if mappers else f"mapper:{_qualified(element.class_)}")
    elif isinstance(element, MapperProperty):
        out.append(f"property:{_mapper_text(element.parent) if mappers else _qualified(element.parent.class_)}")
        out.append(f".{element.key}")
    elif isinstance(element, TableClause):
        _table_text(element, out)
    elif isinstance(element, custom_op):
        _structure_text(_operator_key(element), out, merge_labels, mappers)
    else:
        raise Unkeyable(element)


def _check_sql(element: str) -> None:
    # Raise Locking or Effect for a string of the structure (a name, or SQL
    # text) that takes row locks or calls a function for its effect, as
    # written or with its comments read as the database reads them
    # (``FOR /* the row */ UPDATE``, ``nextval -- draw\n('s')``).
    if LOCKING_SQL.search(element):
        raise Locking(element)
    if element.lower() in EFFECT_FUNCTIONS or ("(" in element and EFFECT_SQL.search(element)):
        raise Effect(element)  # a function's name, or SQL text calling one
    if "--" in element or "/*" in element:
        for reading in sqltext.readings(element):
            if LOCKING_SQL.search(reading.text):
                raise Locking(element)
            if EFFECT_SQL.search(reading.text):
                raise Effect(element)


def _operator_key(operator: custom_op) -> tuple:
    # A custom operator (Column.op("~"), JSONB's ->> of .astext) is in a
    # cache key as the object itself, which SQLAlchemy compares by these
    # attributes; its return type as a column's is (see _table_text).
    return_type = operator.return_type
    type_key = None
    if return_type is not None:
        type_key = _sqlalchemy.type_cache_key(return_type)
        if type_key is _sqlalchemy.NO_CACHE:
            type_key = (type(return_type),)
    return (
        "op",
        type(operator),
        operator.opstring,
        operator.precedence,
        operator.is_comparison,
        operator.natural_self_precedent,
        operator.eager_grouping,
        type_key,
        getattr(operator, "operator_class", None),  # 2.1
    )


#: The ``info`` keys of a class manager holding its mapper's own digest,
#: with the ``column_attrs`` and configuration it was made from, and the
#: digest of the mappings its objects are loaded with (see :func:`_mapper_text`).
_OWN_TEXT = "pyramid_sessioncache.own_key_text"
_MAPPER_TEXT = "pyramid_sessioncache.key_text"

#: Bumped whenever mappers are configured: a mapper's descendants and
#: relationships may have changed, and with them the mappings it reaches.
_configurations = 0


def _mapper_text(mapper: Mapper) -> str:
    # A statement's cache key names the mapper, not what it maps: the
    # columns an entity loads, and the SQL of its column_property
    # expressions, come from the mapper at compile time.  Two classes of
    # one path (a class factory; type() in a loop) or two releases of one
    # class (a rolling deploy that changed a column_property) read other
    # rows under the same name, so the mapping is in the key.  Not its
    # own alone: a query of it loads objects of its subclasses (polymorphic
    # loading, a subclass added by the next release), and those of the
    # classes its relationships reach (eager loads, whether the mapping or
    # an option asks for them, "*" included): every mapping it reaches
    # goes in (:func:`_own_text`).  Worked out once per mapper, again
    # when mappers are configured or a mapping reached changes.
    info = mapper.class_manager.info
    found = info.get(_MAPPER_TEXT)
    if (
        found is None
        or found[0] != _configurations
        or not all(reached.column_attrs is column_attrs for reached, column_attrs in found[1])
    ):
        reached = _reached(mapper)
        try:
            # Each mapping's own digest, sorted: a model of many related
            # classes hashes a short text per class, not their mappings.
            texts = sorted(_own_text(other) for other in reached)
            digest: str | None = hashlib.blake2b(",".join(texts).encode(), digest_size=8).hexdigest()
        except Unkeyable:
            digest = None
        found = (_configurations, tuple((other, other.column_attrs) for other in reached), digest)
        info[_MAPPER_TEXT] = found
    if found[2] is None:
        raise Unkeyable(mapper)
    return f"mapper:{_qualified(mapper.class_)}:{found[2]}"


def _reached(mapper: Mapper) -> list[Mapper]:
    """``mapper``, its subclasses, the mappers its relationships reach, and theirs, each once."""
    seen: dict[Mapper, None] = {}
    pending = [mapper]
    while pending:
        current = pending.pop()
        for other in current.self_and_descendants:
            if other not in seen:
                seen[other] = None
                pending.extend(relationship.mapper for relationship in other.relationships)
    return list(seen)


def _own_text(mapper: Mapper) -> str:
    # The digest of what one mapper loads: its tables, its attributes
    # (``values.mapping_text``) and how each column is loaded, the SQL
    # structure and the bound values of each expression mapped, how each
    # relationship joins, orders and loads, and how it loads its
    # subclasses.  Mappers inside those expressions are named by their
    # class path only (their own texts are in the key beside it).
    if type(mapper.class_manager) is not ClassManager:
        # Alternative instrumentation (sqlalchemy.ext.instrumentation): its
        # objects keep their state and attributes where a hit's checks and
        # copies do not look.  Never cached.
        raise Unkeyable(mapper)
    info = mapper.class_manager.info
    column_attrs = mapper.column_attrs
    found = info.get(_OWN_TEXT)
    if found is not None and found[0] is column_attrs and found[1] == _configurations:  # subclasses: see below
        return found[2]
    out = [_qualified(mapper.class_), mapping_text(mapper)]
    for table in mapper.tables:
        _names_text((getattr(table, "schema", None), table.name), out)
    # Its identity: which columns tell its objects apart (primary_key=...).
    _names_text(tuple(column.name for column in mapper.primary_key), out)
    parts = []
    for prop in column_attrs:
        strategy: list[str] = []
        _structure_text((prop.strategy_key, prop.group), strategy, mappers=False)  # deferred, raiseload, its group
        expressions = [c for c in prop.columns if not isinstance(c, ColumnClause)]
        parts.append("".join(strategy) + _expressions_text(prop.key, expressions))
    for relationship in mapper.relationships:
        # How it loads, and what: an eager load stores its collections, in
        # the relationship's order, to the depth it is told; an inner join
        # leaves out the parents that have none.
        strategy = []
        loading = (relationship.lazy, relationship.innerjoin, relationship.join_depth)
        _structure_text((*loading, relationship.distinct_target_key, relationship.omit_join), strategy, mappers=False)
        joins = [relationship.primaryjoin, relationship.secondaryjoin, *(relationship.order_by or ())]
        parts.append("".join(strategy) + _expressions_text(relationship.key, joins))
    # Sorted: backrefs are added in the order modules were imported in.
    out.extend(sorted(parts))
    polymorphic_on = mapper.polymorphic_on
    out.append(_expressions_text("polymorphic_on", [polymorphic_on]))
    loads = sorted(_qualified(other.class_) for other in mapper.with_polymorphic_mappers)
    _structure_text((mapper.polymorphic_identity, mapper.polymorphic_load, *loads), out, mappers=False)
    text = hashlib.blake2b("".join(out).encode(), digest_size=16).hexdigest()
    info[_OWN_TEXT] = (column_attrs, _configurations, text)
    return text


def _expressions_text(name: str, expressions: list[Any]) -> str:
    out = [name]
    for expression in expressions:
        if expression is None:
            out.append("-")
            continue
        try:
            expression_key = expression._generate_cache_key()
        except SAWarning:  # no cache key, where warnings are errors (see _sqlalchemy.type_cache_key)
            expression_key = None
        if expression_key is None:
            out.append(_compiled_text(expression))
            continue
        if any(bind.callable is not None for bind in expression_key.bindparams):
            # bindparam(callable_=...): a value of each execution, where
            # the mapping's text is made once.
            raise Unkeyable(expression)
        _structure_text(expression_key.key, out, mappers=False)
        out.extend(value_text(bind.effective_value) for bind in expression_key.bindparams)
    return "".join(out)


def _compiled_text(expression: Any) -> str:
    # An expression SQLAlchemy has no cache key for: a column of a type
    # without ``cache_ok`` (the old recipes' GUID) in a relationship's join
    # or a column_property.  SQLAlchemy runs statements naming it uncached,
    # but keys a statement of the entity by its mapper alone: were the
    # mapping unkeyable, every query of the class would run uncached.  Its
    # SQL (compiled the same way in every process) and bound values say
    # what it does.
    try:
        compiled = expression.compile()
        if any(bind.callable is not None for bind in compiled.binds.values()):
            raise Unkeyable(expression)
        return f"sql:{compiled.string}:{value_text(dict(compiled.params))}"
    except Unkeyable:
        raise
    except Exception as exc:  # an element no default dialect compiles
        raise Unkeyable(expression) from exc


def _table_text(table: TableClause, out: list[str]) -> None:
    # SQLAlchemy keys a Table by the object itself: two Tables of one name
    # (two MetaData, a partial reflection next to the model's) are told
    # apart there, and here only by what they hold.  A statement selecting
    # a whole table gets its columns from the Table at compile time, so
    # its columns and their types are part of its text.
    out.append("table:")
    # Its names as _structure_text() would key the tuple (schema, name).
    _names_text((getattr(table, "schema", None), table.name), out)
    out.append("(")
    for column in table.columns:
        type_key = _sqlalchemy.type_cache_key(column.type)
        if type_key is _sqlalchemy.NO_CACHE:
            # A type whose instances cannot be told apart (cache_ok not
            # True): its class, rather than no key for every query of
            # the table.
            type_key = (type(column.type),)
        _names_text((column.key, column.name), out, close=False)
        _structure_text(type_key, out)
        out.append(",)")
    out.append(")")


#: Classes whose ``name`` in a cache key is an identifier, rendered quoted
#: where needed, never SQL: a column, label, alias, subquery or CTE named
#: ``nextval``, ``changes`` or ``updlock`` calls and locks nothing
#: (``literal_column()``, whose name is SQL, is a plain ``ColumnClause``,
#: not one of them).
_IDENTIFIER_NAMED = (Column, Label, AliasedReturnsRows)


def _names_a_column(element: tuple) -> bool:
    # A cache key's tuple for an element is (id, class, name, value, ...).
    cls = element[1] if len(element) > 1 else None
    return isinstance(cls, type) and issubclass(cls, _IDENTIFIER_NAMED)


def _name_text(name: Any, out: list[str]) -> None:
    # A table's, column's or label's name: keyed as any string, but never
    # read as SQL for locks or effects (a table named setval was never cached).
    out.append(repr(_plain(name)))
    quote = getattr(name, "quote", None)
    if quote is not None:  # a quoted_name: quote=True and False name two tables on PostgreSQL
        out.append(f"quote={quote}")


def _names_text(names: tuple, out: list[str], close: bool = True) -> None:
    # The tuple ``names`` (None or names) as _structure_text() keys one,
    # its closing parenthesis left off with close=False.
    out.append("(")
    for name in names:
        _name_text(name, out)
        out.append(",")
    if close:
        out.append(")")


def _enum_text(member: enum.Enum) -> str:
    # A member's name tells it apart, except a Flag's: combinations and
    # unknown bits are pseudo-members, nameless (Bits(0), Bits(4)) or
    # named after their parts in one Python and not another.  A Flag's
    # value is an int: it says which one.
    if isinstance(member, enum.Flag):
        return f"{_qualified(type(member))}:{int(member.value)}"
    return f"{_qualified(type(member))}.{member.name}"


def _type_key(key: tuple) -> tuple:
    # A type's key is its class and its (argument, value) pairs in the
    # order of a set of argument names, which changes between processes
    # (hash randomization): Numeric(10, 2) is keyed (precision, scale) in
    # one and (scale, precision) in another, and no entry was shared.
    pairs = key[1:]
    if all(isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str) for pair in pairs):
        return (key[0], *sorted(pairs, key=lambda pair: pair[0]))
    return key


def _entities_only(statement: Any) -> bool:
    # A legacy Query and a select() of the same entities return the same
    # rows; of columns or expressions, rows whose fields are named apart
    # (a Query's count(), unlabelled, has no name; a select()'s is
    # "count"; two columns "id" are ("id", "id") and ("id", "id_1")), and
    # a hit hands back the fields of the one that stored the entry.
    try:
        descriptions = statement.column_descriptions
    except Exception:  # a statement that has none (a union, textual SQL): its own label style
        return False
    return all(d.get("entity") is not None and d.get("expr") is d.get("entity") for d in descriptions)


def _code_text(code: types.CodeType) -> str:
    # Lambda statements (the ORM's lazy loads use them) key on their code
    # object: where it is, and what it does, constants included.
    consts = ",".join(_code_text(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts)
    name = getattr(code, "co_qualname", code.co_name)  # co_qualname: Python 3.11+
    return f"code:{_code_path(code.co_filename)}:{code.co_firstlineno}:{name}:{code.co_code.hex()}:{code.co_names}:{consts}"


@functools.lru_cache(maxsize=1024)
def _code_path(filename: str) -> str:
    # A module's file as its import path names it ("sqlalchemy/orm/
    # strategies.py" for the ORM's lazy loads), not where it is installed:
    # processes of two virtualenvs, or two releases of an app, share keys.
    absolute = os.path.abspath(filename)
    for entry in sorted((os.path.abspath(entry or ".") for entry in sys.path), key=len, reverse=True):
        prefix = os.path.join(entry, "")
        if absolute.startswith(prefix):
            return absolute[len(prefix) :]
    return filename


def _plain(value: Any) -> Any:
    # str/int subclasses such as quoted_name or IntEnum: keep the base value.
    base: Any
    for base in (bool, int, float, str, bytes):
        if isinstance(value, base):
            return base(value)
    return value


def _api_only(options: Any) -> bool:
    # Compile options appear in a cache key as (index, class, name, value,
    # ...) or (class, ()).  A legacy Query spells out the defaults that a
    # select() leaves implicit; only those are "API only".
    items = list(options) if isinstance(options, tuple) else []
    if items and isinstance(items[0], (int, str)):  # the index: an int in 2.1, a str in 2.0
        items = items[1:]
    if not items or not isinstance(items[0], type):
        return False
    pairs = items[1:]
    if pairs == [()]:
        return True
    if len(pairs) % 2:
        return False
    for name, value in zip(pairs[::2], pairs[1::2], strict=True):
        if name == "_current_path":
            if not (isinstance(value, tuple) and _sqlalchemy.ROOT_PATH in value):
                return False
        elif (name, value) not in _API_ONLY_COMPILE_OPTIONS:
            return False
    return True


def value_text(value: Any) -> str:
    """Return a stable text for a bound value, or raise :class:`Unkeyable`."""
    kind = type(value)
    if kind is int or kind is str:  # most values: the same text as _PLAIN's, sooner
        return f"{kind.__name__}:{value!r}"
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, enum.Enum):
        return _enum_text(value)
    if isinstance(value, (datetime.datetime, datetime.time)) and value.tzinfo is not None:
        return _aware_text(value)
    if isinstance(value, _PLAIN):
        text = f"{type(value).__name__}:{value!r}"
        if _ADDRESS.search(text):  # a subclass's repr with an address: not stable, and reused
            raise Unkeyable(value)
        if type(value) not in _PLAIN_BASES and not isinstance(value, _sqlalchemy.SYMBOL):
            # A subclass's repr may hide its value (a token, an account
            # number masked for the logs): the value as its plain type shows
            # it says which it is.  Not a SQLAlchemy symbol's (JSON.NULL): an
            # int whose value is a hash, another in each process; its repr names it.
            text += ":" + _plain_repr(value)
        return text
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(value_text(item) for item in value) + "]"
    if isinstance(value, (set, frozenset)):
        return "{" + ",".join(sorted(value_text(item) for item in value)) + "}"
    if isinstance(value, Mapping):
        return "{" + ",".join(sorted(f"{value_text(k)}:{value_text(v)}" for k, v in value.items())) + "}"
    raise Unkeyable(value)


#: The types of :data:`_PLAIN`, each before those it is the base of (a ``datetime`` is a ``date``).
_PLAIN_BASES = (datetime.datetime, *_PLAIN)


def _plain_repr(value: Any) -> str:
    """The repr of ``value``, an instance of a subclass of a :data:`_PLAIN` type, as that type makes it."""
    base = next(base for base in _PLAIN_BASES if isinstance(value, base))
    return base.__repr__(value)


def _aware_text(value: datetime.datetime | datetime.time) -> str:
    # The repr of a tzinfo class that has no __repr__ of its own holds a
    # memory address, which the next such object may reuse with another
    # offset: two instants would share a key.  Its offset and name say
    # what the database is sent; the repr is kept only when stable.
    tz = value.tzinfo
    zone = repr(tz)
    if _ADDRESS.search(zone):
        zone = _qualified(type(tz))
    naive = value.replace(tzinfo=None)
    # A subclass's repr may hide its value: the plain type's repr shows it.
    return f"{type(value).__name__}:{_plain_repr(naive)}@{zone}:{value.utcoffset()!r}:{value.tzname()!r}"


def _normalized(options: dict[str, Any]) -> dict[str, Any]:
    translate = options.get("schema_translate_map")
    if translate and "_none" in translate:
        # SQLAlchemy adds "_none" (its spelling of the None key) to the
        # caller's map in place when it first compiles with it.
        options = {**options, "schema_translate_map": {k: v for k, v in translate.items() if k != "_none"}}
    return options


class EntryKey(NamedTuple):
    """A cache key, and the digest of its statement's shape (parameters aside)."""

    text: str
    shape: str


class KeyMaker:
    """Builds cache keys; remembers what it learnt about statement shapes and binds."""

    def __init__(self) -> None:
        self._structures: dict[Any, str | None] = {}
        # bind -> (its execution options, its text), valid while the bind
        # keeps those options (a Connection's change in place).  Emptied
        # when any engine is disposed and in a forked child: see _watch().
        self._binds: dict[Any, tuple[Any, str]] = {}
        _watch(self)

    def structure(self, cache_key: Any, statement: Any = None) -> str | None:
        """Return the stable digest of a ``CacheKey``'s structure, or None.

        None when the structure has no stable text, or takes row locks.
        ``statement``, the statement keyed, tells whether a legacy
        ``Query`` and a ``select()`` of that shape return the same rows.
        """
        digest = self._structures.get(cache_key.key, _UNSEEN)
        if digest is not _UNSEEN:
            return digest
        out: list[str] = []
        try:
            if statement is not None:
                _check_connection_sql(statement)
            _structure_text(cache_key.key, out, statement is None or _entities_only(statement))
            digest = hashlib.blake2b("".join(out).encode(), digest_size=16).hexdigest()
        except Locking:
            log.debug("never cached: a statement shape that takes locks or calls a function for its effect")
            digest = None
        except Unkeyable:
            digest = None
        if len(self._structures) >= _MEMO_SIZE:
            self._structures.clear()
        self._structures[cache_key.key] = digest
        return digest

    def bind(self, bind: Any) -> str:
        """Return a stable text naming the database ``bind`` reads, and how it reads it.

        ``bind`` is an ``Engine`` or the ``Connection`` a statement runs
        on.  The text holds the :func:`~.identity.database_identity` of its
        database and its public execution options (a
        ``schema_translate_map``); it is computed once per bind, and again
        when those options change or an engine is disposed.
        """
        options = bind.get_execution_options()
        found = self._binds.get(bind)
        if found is not None and found[0] is options:
            return found[1]
        try:
            options_text = value_text(_normalized(_keyed_options(options)))
        except Unkeyable:
            # Options with no stable text (an object a listener reads):
            # entries of this bind alone, while it keeps these options.  A
            # token rather than id(bind): once this text is forgotten, the
            # next bind may get the same address, with other options.
            options_text = f"unkeyable:{secrets.token_hex(16)}"
        text = f"{database_identity(bind)}|{options_text}"
        if len(self._binds) >= _MEMO_SIZE:
            self._binds.clear()
        self._binds[bind] = (options, text)
        return text

    def key(
        self,
        statement: Any,
        parameters: Mapping[str, Any] | None,
        execution_options: Mapping[str, Any],
        bind: Any,
        label: str | None = None,
        others: tuple = (),
        state: str = "",
    ) -> EntryKey | None:
        """Return the cache key of ``statement`` run with these arguments, or None.

        ``label`` (a ``FromCache`` ``cache_key``) is a readable prefix; it
        never replaces the parameters, so it cannot make two different
        results share a key.  ``others`` are more binds the statement's
        loads may read (a Session's binds per mapper); ``state``, the
        settings of the connection it runs on.
        """
        cache_key = _sqlalchemy.cache_key(statement)
        if cache_key is None:
            return None
        structure = self.structure(cache_key, statement)
        if structure is None:
            return None
        given = _sqlalchemy.statement_params(cache_key)
        if given:
            parameters = {**given, **(parameters or {})}
        parts = [structure, self.bind(bind)]
        if others:
            parts.append("binds:" + ",".join(sorted({self.bind(other) for other in others})))
        if state:
            parts.append("settings:" + state)
        try:
            for bindparam in cache_key.bindparams:
                if parameters and bindparam.key in parameters:
                    parts.append(value_text(parameters[bindparam.key]))
                else:
                    parts.append(value_text(bindparam.effective_value))
            if parameters:
                # Parameters are matched to a statement's bound values by
                # their compiled names too: ``{"id_1": 2}`` replaces the
                # value of ``Person.id == 1``, whose key is anonymous.
                # Those names are only known once compiled, so every
                # parameter that names no bound value is keyed by name.
                named = {bindparam.key for bindparam in cache_key.bindparams}
                unmatched = {name: value for name, value in parameters.items() if name not in named}
                if unmatched:
                    parts.append("parameters:" + value_text(unmatched))
            for name in execution_options:
                if _public(name):
                    parts.append(value_text(_normalized(_keyed_options(execution_options))))
                    break
        except Unkeyable:
            return None
        digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=20).hexdigest()
        return EntryKey(f"{label}:{digest}" if label else digest, structure)


def _check_connection_sql(statement: Any) -> None:
    # Raise Effect for SQL text that reads its connection's own state (see CONNECTION_SQL).
    sql = _sqlalchemy.textual_sql(statement)
    if sql is not None and any(CONNECTION_SQL.match(reading.text) for reading in sqltext.readings(sql)):
        raise Effect(sql)


def _keyed_options(execution_options: Mapping[str, Any]) -> dict[str, Any]:
    # The public options that may change the rows: part of the key.
    return {k: v for k, v in execution_options.items() if _public(k)}


def _public(name: Any) -> bool:
    # SQLAlchemy's own options start with "_" or are not strings at all
    # (subqueryload's ("orig_query", loader) tuples).
    return isinstance(name, str) and not name.startswith("_") and name not in NEUTRAL_OPTIONS


_makers: weakref.WeakSet[KeyMaker] = weakref.WeakSet()
_watching = False


def _watch(maker: KeyMaker) -> None:
    """Empty ``maker``'s bind texts whenever the identity of a database may have changed.

    ``engine.dispose()`` gives the engine a new pool, which for a database
    in memory is a new, empty database, and a forked child keeps its
    parent's pools but not its databases in memory: in both cases
    ``identity.py`` gives the new pool a new process-local identity, so the
    texts made with the old one must go.  Both are rare; every text is
    forgotten, and made again on the next look-up.
    """
    global _watching
    if not _watching:
        event.listen(Engine, "engine_disposed", _forget_binds)
        event.listen(Mapper, "after_configured", _mappers_configured)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_forget_binds)
        _watching = True
    _makers.add(maker)


def _forget_binds(*args: Any) -> None:
    for maker in members(_makers):
        maker._binds.clear()


def _mappers_configured() -> None:
    """Have every mapper's key text made again: mappers were added, and with them subclasses and relationships."""
    global _configurations
    _configurations += 1
    for maker in members(_makers):
        maker._structures.clear()
