"""What an entry read: the tables of what a load executed, of a result, of a statement shape.

The tables a load read are those of every statement it executed, as the
database received them (:func:`executed_tables`): the statement's FROMs
and joins, and the tables that mapper column properties, expressions and
loader criteria carried by options, eager loads and polymorphic loads
bring in.  SQL given as text (a textual FROM, a ``text()`` fragment or a
``literal_column`` holding a subquery or calling a function), functions
that are not SQL's or SQLAlchemy's own and table-valued functions read
tables nobody can name: such a result depends on :data:`ANY_TABLE`, which
every committed write bumps.
"""

from __future__ import annotations

import re
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.orm import Mapper, attributes
from sqlalchemy.sql import visitors
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import TableClause
from sqlalchemy.sql.functions import FunctionElement

from ... import _sqlalchemy
from ...errors import InvalidOptionError
from . import schema, sqltext

#: The pseudo-table every entry depends on: bumping it invalidates them all.
ALL_TABLES = "*"
#: How much of a name PostgreSQL keeps (``NAMEDATALEN - 1`` bytes): names that
#: begin alike for that long share a version elsewhere too (misses, never stale data).
NAME_BYTES = 63
#: The pseudo-table of results whose tables cannot all be named: every
#: committed write bumps it.
ANY_TABLE = "?"


def version_name(table: Any) -> str:
    """The name a table's version is kept under: its bare name, in lower case.

    Reads and writes must agree on it whatever spelled the table: a
    ``Table``, SQL text in any case, a name with or without a schema
    (``"main.person"`` is ``person``), as long as PostgreSQL keeps it
    (its first 63 bytes).  Tables of
    one name in two schemas share a version: a write to one invalidates
    what read the other, which costs misses, never stale data.
    """
    name = table if isinstance(table, str) else table.name
    # What follows the last dot, whichever side spelled it: a quoted name
    # holding a dot ("a.b") reads like schema a, table b in SQL text.
    name = name.rpartition(".")[2].strip('"`[]').lower()
    if len(name) > NAME_BYTES or (not name.isascii() and len(name.encode()) > NAME_BYTES):
        # PostgreSQL keeps a name's first 63 bytes (a whole character): its
        # catalog and triggers name the table so, whoever spelled it longer.
        name = name.encode()[:NAME_BYTES].decode("utf-8", "ignore")
    return name


def declared_tables(tables: Iterable[Any]) -> frozenset[str]:
    """The version names of ``tables``, as an explicit invalidation names them.

    Each is a table name (``"person"``, ``"main.person"``), a ``Table``,
    or a mapped class (all the tables it is stored in).  Anything else, an
    empty name, or several names in one string raises
    :class:`~pyramid_sessioncache.InvalidOptionError`: an invalidation that
    named no table would invalidate nothing, silently.
    """
    names: set[str] = set()
    for table in tables:
        if isinstance(table, str):
            name = table.strip()
            if not name or any(char.isspace() or char == "," for char in name):
                raise InvalidOptionError("tables", table, "give one table name per argument")
            names.add(version_name(name))
        elif isinstance(table, TableClause):
            names.add(version_name(table))
        else:
            found = inspect(table, raiseerr=False)  # a mapped class (or its mapper): a Mapper
            mapper = found.mapper if getattr(found, "is_aliased_class", False) else found
            if not isinstance(mapper, Mapper):
                raise InvalidOptionError("tables", table, "give a table name, a Table or a mapped class")
            names |= mapper_tables(mapper)
    return frozenset(names)


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


# What a compiled statement rendered --------------------------------------------

#: Schemas whose tables a schema change writes (PostgreSQL's catalog, SQL's ``information_schema``).
SYSTEM_SCHEMAS = frozenset({"pg_catalog", "information_schema"})
#: SQLite's own tables, whatever the schema (``main``, ``temp``, an attached name): its
#: schema table (``sqlite_master``, ``sqlite_schema``, ``sqlite_temp_master``...),
#: ``sqlite_sequence`` (written at each INSERT into an ``AUTOINCREMENT`` table),
#: ``sqlite_stat1``..``sqlite_stat4`` (written by ``ANALYZE``), and the pragmas read as
#: tables (``pragma_user_version``, ``pragma_table_info``: eponymous virtual tables)
#: and ``dbstat`` (the pages of every table, eponymous too).
#: SQLite reserves names that begin ``sqlite_``; what writes them names no
#: table of theirs, so a result that read one depends on :data:`ANY_TABLE`,
#: as one that read PostgreSQL's catalog does.  Elsewhere a table spelt
#: so costs misses, never stale rows.
SQLITE_OWN_TABLES = re.compile(r"^(?:sqlite_|pragma_|dbstat$)")


def sqlite_own_table(name: str) -> bool:
    """Whether the version name ``name`` is one of SQLite's own tables (see :data:`SQLITE_OWN_TABLES`)."""
    return SQLITE_OWN_TABLES.match(name) is not None


#: Text that may read a table.  Other text (``DISTINCT``, ``id > 5``) reads nothing it does not name.
_READS_SQL = re.compile(r"\b(?:select|from|join|table)\b", re.I)
#: A name followed by "(" in SQL text: a function called, or a type given its length after "::" or AS.
_CALL = re.compile(rf"(?P<type>::\s*|\bas\s+)?(?P<name>{sqltext.QUALIFIED})\s*\(", re.I)
#: Words of SQL that may stand before "(" and call no function.
_NOT_CALLS = frozenset(
    {"in", "exists", "any", "all", "some", "values", "and", "or", "not", "as", "on", "using", "over", "filter",
     "within", "group", "is", "then", "else", "when", "case", "between", "like", "ilike", "similar", "to", "row",
     "array", "interval", "distinct", "by", "where", "having", "limit", "offset", "set", "escape", "lateral",
     "into", "returning", "overlaps", "collate", "nulls", "first", "last", "asc", "desc", "with", "only",
     "default", "null", "true", "false", "tuple", "glob", "regexp", "match"}
)  # fmt: skip
#: A table after IN, without parentheses (SQLite: ``x IN t`` reads ``t``).
_IN_TABLE = re.compile(rf"\bin(?:\s+|(?=\"))(?P<table>{sqltext.QUALIFIED})(?![\w$\"]|\s*[.(])", re.I)
#: Functions known to read no table: SQL's own, and those SQLAlchemy knows
#: (``func.count``, ``func.coalesce``...).  Any other function may be one of
#: the database's own that reads a table (a user-defined function), so a
#: result that calls one depends on :data:`ANY_TABLE`.
PURE_FUNCTIONS = frozenset(
    {"abs", "avg", "bool_and", "bool_or", "ceil", "ceiling", "char_length", "character_length", "coalesce",
     "concat", "concat_ws", "count", "date", "date_part", "date_trunc", "datetime", "every", "extract", "floor",
     "greatest", "group_concat", "ifnull", "instr", "json_extract", "json_object", "jsonb_build_object", "least",
     "left", "length", "lower", "ltrim", "max", "md5", "min", "mod", "now", "nullif", "octet_length", "position",
     "power", "replace", "right", "round", "rtrim", "sign", "sqrt", "strftime", "string_agg", "substr",
     "substring", "sum", "to_char", "total", "trim", "trunc", "upper", "array_agg", "json_agg", "jsonb_agg",
     "row_number", "rank", "dense_rank", "lag", "lead", "first_value", "last_value", "ntile", "random", "julianday",
     "cast", "typeof", "hex", "quote", "printf", "format", "split_part", "regexp_replace", "lpad", "rpad"}
)  # fmt: skip
#: Functions that may stand as a FROM and read no table.
PURE_TABLE_FUNCTIONS = frozenset(
    {"generate_series", "generate_subscripts", "unnest", "json_each", "json_each_text", "json_tree", "jsonb_each",
     "jsonb_each_text", "json_array_elements", "json_array_elements_text", "jsonb_array_elements",
     "jsonb_array_elements_text", "json_to_recordset", "jsonb_to_recordset", "regexp_split_to_table"}
)  # fmt: skip


def _pure_function(name: str) -> bool:
    return name.lower() in PURE_FUNCTIONS or _sqlalchemy.known_function_name(name)


class _Recording:
    """Mixed in before a dialect's compiler: notes every table it renders, and text it cannot read."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        self.read_tables: set[str] = set()
        self.opaque = False
        super().__init__(*args, **kw)

    def visit_table(self, table: Any, **kw: Any) -> Any:
        name = version_name(table)
        self.read_tables.add(name)
        if str(getattr(table, "schema", None) or "").lower() in SYSTEM_SCHEMAS or sqlite_own_table(name):
            self.opaque = (
                True  # the catalog, written by schema changes (SQLite's: by ANALYZE, AUTOINCREMENT): ANY_TABLE
            )
        schema.note(table)  # its foreign keys may cascade into it
        return super().visit_table(table, **kw)  # type: ignore[misc]

    def visit_textclause(self, textclause: Any, **kw: Any) -> Any:
        # A whole statement or a FROM is opaque whatever it says; a fragment
        # elsewhere only if it may read tables (see _read_by_text()).
        if _sqlalchemy.at_top(self) or kw.get("asfrom") or self._read_by_text(textclause.text):
            self.opaque = True
        return super().visit_textclause(textclause, **kw)  # type: ignore[misc]

    def visit_column(self, column: Any, **kw: Any) -> Any:
        if column.is_literal and self._read_by_text(str(column.name)):
            self.opaque = True
        return super().visit_column(column, **kw)  # type: ignore[misc]

    def _read_by_text(self, sql: str) -> bool:
        # Whether a fragment of SQL text (a WHERE given as text(), a
        # literal_column()) may read tables it does not name: a subquery, a
        # function of the database's own.  Tables it names after IN (SQLite's
        # "x IN t") are read.
        return any(self._read_by_reading(cleaned) for cleaned in sqltext.readings(sql))

    def _read_by_reading(self, cleaned: sqltext.Cleaned) -> bool:
        if _READS_SQL.search(cleaned.text):
            return True
        for match in _CALL.finditer(cleaned.text):
            names = cleaned.names(match.group("name"))
            if match.group("type") or (len(names) == 1 and names[0].lower() in _NOT_CALLS):
                continue
            if len(names) > 1 or match.group("name").startswith('"') or not _pure_function(names[0]):
                return True
        for match in _IN_TABLE.finditer(cleaned.text):
            name = version_name(cleaned.names(match.group("table"))[-1])
            if sqlite_own_table(name):
                return True  # "x IN sqlite_master": see SQLITE_OWN_TABLES
            self.read_tables.add(name)
        return False

    def visit_function(self, func: Any, **kw: Any) -> Any:
        name = func.name.lower()
        if kw.get("asfrom"):
            if name not in PURE_TABLE_FUNCTIONS:
                self.opaque = True
        elif getattr(func, "packagenames", ()) or not (name in PURE_FUNCTIONS or _sqlalchemy.known_function(func)):
            self.opaque = True  # a function of the database's own (in a schema of its own) may read any table
        return super().visit_function(func, **kw)  # type: ignore[misc]

    def visit_table_valued_alias(self, element: Any, **kw: Any) -> Any:
        inner = element.element
        while not isinstance(inner, FunctionElement) and getattr(inner, "element", None) is not None:
            inner = inner.element
        if not isinstance(inner, FunctionElement) or inner.name.lower() not in PURE_TABLE_FUNCTIONS:
            self.opaque = True
        return super().visit_table_valued_alias(element, **kw)  # type: ignore[misc]


_RECORDERS: dict[type, type] = {}
_EXECUTED: weakref.WeakKeyDictionary[Any, frozenset[str]] = weakref.WeakKeyDictionary()
_ANY = frozenset({ANY_TABLE})


def executed_tables(compiled: Any) -> frozenset[str]:
    """Return the version names of the tables a compiled statement reads, or ``{ANY_TABLE}``.

    The statement is compiled once more by a recording subclass of its
    dialect's compiler, which notes every table the SQL names; the answer
    is remembered per ``Compiled``, which the engine reuses for every
    execution of a shape.
    """
    if not isinstance(compiled, SQLCompiler):
        return _ANY  # no compiled form (exec_driver_sql), or not a statement compiler
    found = _EXECUTED.get(compiled)
    if found is None:
        dialect = compiled.dialect
        recorder_class = _RECORDERS.get(dialect.statement_compiler)
        if recorder_class is None:
            compiler_class = dialect.statement_compiler
            recorder_class = type(f"Recording{compiler_class.__name__}", (_Recording, compiler_class), {})
            _RECORDERS[compiler_class] = recorder_class
        try:
            recorder = recorder_class(
                dialect, compiled.statement, column_keys=compiled.column_keys, for_executemany=compiled.for_executemany
            )
            found = _ANY if recorder.opaque or _custom(compiled.statement) else frozenset(recorder.read_tables)
        except Exception:  # what cannot be compiled again cannot be known
            found = _ANY
        _EXECUTED[compiled] = found
    return found


def _custom(element: Any) -> bool:
    # A @compiles construct renders what it likes: what it reads cannot be seen.
    return any(_sqlalchemy.custom_compiled(node) for node in visitors.iterate(element))


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
        if secondary is not None:  # a Table, or a join of several ("composite secondary join")
            names |= _tables_under(secondary)
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
