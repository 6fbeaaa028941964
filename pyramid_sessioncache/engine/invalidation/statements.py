"""What an executed statement writes: the tables of compiled DML, of DML in CTEs, of raw SQL.

:func:`written_tables` looks at what a Connection actually ran
(``after_cursor_execute``): a compiled ``insert()``/``update()``/``delete()``
names its table; a SELECT may hold DML in its CTEs; SQL given as text
(``text()``, ``exec_driver_sql()``) is read for the tables it writes
(``sqltext.py`` tells its strings, comments and quoted identifiers from
its SQL).  When SQL that may write cannot be read, it writes
:data:`~.reads.ALL_TABLES`.  A schema change (``CREATE``, ``ALTER``,
``DROP``, ``GRANT``...) writes :data:`~.reads.ANY_TABLE` and the tables it
names, or every table when what it changes cannot be told.
Names are version names (:func:`~.reads.version_name`): bare, lower case.
"""

from __future__ import annotations

import re
import weakref
from typing import Any

from sqlalchemy.sql import visitors
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.expression import TableClause

from . import schema, sqltext
from .reads import ALL_TABLES, ANY_TABLE, version_name

#: What a statement that writes nothing writes.
NOTHING: frozenset[str] = frozenset()
#: What SQL that may write, but cannot be read, writes.
EVERYTHING = frozenset({ALL_TABLES})


def written_tables(context: Any, statement: str) -> frozenset[str]:
    """Return the version names of the tables a statement that just ran wrote.

    ``context`` is its ``ExecutionContext``, ``statement`` the SQL sent.
    """
    compiled = context.compiled
    if compiled is None or getattr(compiled, "statement", None) is None:
        return sql_tables(statement)  # exec_driver_sql()
    element = compiled.statement
    if isinstance(element, TextClause):
        return sql_tables(statement)
    if context.isddl:
        return sql_tables(statement)
    if context.isinsert or context.isupdate or context.isdelete or element.is_select:
        return _compiled_tables(compiled)
    return sql_tables(statement)


def _compiled_tables(compiled: Any) -> frozenset[str]:
    # Compiled statements are cached and run again: remember what each
    # writes for as long as the engine keeps it (a weak key: no statement,
    # nor the options and caches it holds, is kept alive by this).
    found = _WRITTEN.get(compiled)
    if found is None:
        found = _WRITTEN[compiled] = _dml_under(compiled.statement)
    return found


_WRITTEN: weakref.WeakKeyDictionary[Any, frozenset[str]] = weakref.WeakKeyDictionary()


def _dml_under(element: Any) -> frozenset[str]:
    names: set[str] = set()
    for node in visitors.iterate(element):
        if isinstance(node, UpdateBase):
            table = _target(getattr(node, "table", None))
            if table is None:
                return EVERYTHING
            schema.note(table)
            names.add(version_name(table))
        elif isinstance(node, TextClause):
            names |= fragment_tables(node.text)
    return frozenset(names)


def _target(table: Any) -> Any:
    # The table a DML statement writes, through aliases (update(aliased(...))).
    while table is not None and not isinstance(table, TableClause):
        table = getattr(table, "element", None)
    return table


def is_ddl(context: Any, statement: str) -> bool:
    """Whether a statement that ran changes the schema (a migration, a view created, a grant)."""
    return bool(context.isddl) or any(
        _first_word(_explained(part)) in _SCHEMA_CHANGES
        for cleaned in sqltext.readings(statement)
        for part in cleaned.statements()
    )


#: What comes before the statement ``EXPLAIN`` explains: ``ANALYZE`` runs it
#: (``EXPLAIN ANALYZE CREATE TABLE ... AS`` creates the table); SQLite's
#: ``EXPLAIN QUERY PLAN`` runs nothing, and reads as what it explains.
_EXPLAIN = re.compile(r"^explain\s+(?:query\s+plan\s+)?(?:\([^)]*\)\s*|(?:analy[sz]e|verbose)\s+)*", re.I)


def _explained(text: str) -> str:
    """The statement an ``EXPLAIN`` explains, or ``text`` itself."""
    found = _EXPLAIN.match(text)
    return text[found.end() :] if found else text


# Reading SQL text ------------------------------------------------------------

_NAME = sqltext.NAME
_QUALIFIED = sqltext.QUALIFIED
_TARGETS = re.compile(
    r"\b(?:"
    rf"insert\s+(?:or\s+\w+\s+)?into\s+(?P<insert>{_QUALIFIED})"
    rf"|replace\s+into\s+(?P<replace>{_QUALIFIED})"
    rf"|update\s+(?:or\s+\w+\s+)?(?:only\s+)?(?P<update>{_QUALIFIED})\s+(?:(?:as\s+)?{_NAME}\s+)?set\b"
    rf"|delete\s+from\s+(?:only\s+)?(?P<delete>{_QUALIFIED})"
    rf"|merge\s+into\s+(?:only\s+)?(?P<merge>{_QUALIFIED})"
    rf"|truncate\s+(?:table\s+)?(?P<truncate>(?:only\s+)?{_QUALIFIED}(?:\s*\*)?(?:\s*,\s*(?:only\s+)?{_QUALIFIED}(?:\s*\*)?)*)"
    rf"|(?:drop|alter)\s+(?:materialized\s+)?(?:table|view)\s+(?:if\s+exists\s+)?(?:only\s+)?(?P<ddl>{_QUALIFIED}(?:\s*,\s*{_QUALIFIED})*)"
    rf"|create\s+(?:or\s+replace\s+)?(?:(?:temp|temporary|recursive)\s+)?(?:materialized\s+)?view\s+(?:if\s+not\s+exists\s+)?(?P<view>{_QUALIFIED})"
    rf"|refresh\s+materialized\s+view\s+(?:concurrently\s+)?(?P<refresh>{_QUALIFIED})"
    # A table or view renamed: what its new name showed before (another schema's, further down the search path).
    rf"|rename\s+to\s+(?P<renamed>{_QUALIFIED})"
    r")",
    re.I,
)
# Words that make SQL a write whatever else it says; what follows them is read by _TARGETS.
# An INTO left once those are read is PostgreSQL's SELECT ... INTO, which creates a table.
_WRITES = re.compile(r"\b(?:insert|update|delete|merge|truncate|drop|alter|refresh|copy|call|do|execute|into)\b", re.I)
# Uses of those words that write nothing.
_HARMLESS = re.compile(
    r"\bfor\s+(?:no\s+key\s+)?update\b|\bon\s+(?:update|delete)\b|\bdo\s+(?:update\s+set|nothing)\b"
    r"|\bthen\s+(?:update|delete|insert)\b|\bdrop\s+(?:index|trigger|function|sequence|type|schema)\b|\balter\s+(?:index|sequence|role|user|database)\b",
    re.I,
)
# SQL that starts with one of these writes no rows.  A PRAGMA that sets
# (``PRAGMA user_version = 7``) publishes nothing either: no read of a
# pragma's value is ever stored (see schema.calls_effects()).
_READS = frozenset(
    {"select", "with", "values", "show", "explain", "pragma", "set", "reset", "begin", "start", "commit", "end",
     "rollback", "savepoint", "release", "listen", "unlisten", "notify", "declare",
     "fetch", "close", "prepare", "deallocate", "discard", "lock", "table"}
)  # fmt: skip
# Maintenance that writes no row an application wrote, but what reads return:
# ANALYZE (``ANALYSE``) writes the planner's statistics (SQLite's
# ``sqlite_stat1``..``sqlite_stat4``, PostgreSQL's ``pg_statistic`` and
# ``pg_class.reltuples``), which only reads of the database's own tables show,
# and those depend on ANY_TABLE (reads.SQLITE_OWN_TABLES, reads.SYSTEM_SCHEMAS);
# so does SQLite's ``PRAGMA optimize``, which runs ANALYZE.  VACUUM may give
# the rows of any table new rowids (SQLite: a table without an INTEGER PRIMARY
# KEY; PostgreSQL's VACUUM FULL moves rows, and so their ctid): every table.
_MAINTENANCE = {"analyze": ANY_TABLE, "analyse": ANY_TABLE, "vacuum": ALL_TABLES}
# ``PRAGMA [schema.]optimize``, with or without its mask.
_PRAGMA_OPTIMIZE = re.compile(rf"^pragma\s+(?:{_NAME}\s*\.\s*)?optimize\b", re.I)
# SQL that starts with one of these changes the schema: see _schema_change().
_SCHEMA_CHANGES = frozenset({"create", "alter", "drop", "grant", "revoke", "comment", "security", "import"})
# What a CREATE, ALTER or DROP may say before the kind of object it changes.
_MODIFIERS = frozenset(
    {"or", "replace", "global", "local", "temp", "temporary", "unlogged", "materialized", "recursive", "unique",
     "constraint", "foreign", "virtual"}
)  # fmt: skip
# Objects that change what reads of the tables they name return, and nothing else.
_TABLE_OBJECTS = frozenset({"table", "view", "index", "policy", "trigger", "sequence", "statistics"})
_CREATED_TABLE = re.compile(
    rf"^create\s+(?:(?:global|local)\s+)?(?:(?:temp|temporary|unlogged)\s+)?(?:virtual\s+)?table\s+"
    rf"(?:if\s+not\s+exists\s+)?(?P<table>{_QUALIFIED})",
    re.I,
)
# The table a policy, a trigger or an index is on.
_ON_TABLE = re.compile(rf"\bon\s+(?:table\s+)?(?:only\s+)?(?P<table>{_QUALIFIED})", re.I)
_CASCADE = re.compile(r"\bcascade\b", re.I)
_ANY = frozenset({ANY_TABLE})


@sqltext.per_text
def sql_tables(sql: str) -> frozenset[str]:
    """Return the version names of the tables the SQL text ``sql`` writes.

    :data:`NOTHING` for SQL that writes no rows (a SELECT, a PRAGMA);
    :data:`EVERYTHING` when it may write and its targets cannot be told (a
    procedure call, ``COPY``, a statement not understood).  A schema
    change writes :data:`~.reads.ANY_TABLE` and the tables it names (see
    ``_schema_change()``).  Each statement of several is read.
    """
    if _UESCAPE.search(sql):
        return EVERYTHING  # a name spelt with an escape character of its own: not read here
    found: set[str] = set()
    for cleaned in sqltext.readings(sql):
        for part in cleaned.statements():
            tables = _tables_in(cleaned, part, whole=True)
            if ALL_TABLES in tables:
                return EVERYTHING
            found |= tables
    return frozenset(found)


def fragment_tables(sql: str) -> frozenset[str]:
    """Return what SQL text that is part of a statement (a textual FROM or WHERE) writes.

    Only what its write words say: a fragment is no statement of its own.
    """
    found: set[str] = set()
    for cleaned in sqltext.readings(sql):
        found |= _tables_in(cleaned, cleaned.text.strip(), whole=False)
    return EVERYTHING if ALL_TABLES in found else frozenset(found)


def trigger_tables(sql: str) -> frozenset[str]:
    """Return what a SQLite trigger writes, from its ``CREATE TRIGGER`` text: the DML of its body.

    The body follows the first ``BEGIN`` that is a word of SQL (not in a
    string, a quoted name or a comment of its ``WHEN`` clause).
    """
    found: set[str] = set()
    for cleaned in sqltext.readings(sql):
        body = _BEGIN.search(cleaned.text)
        if body is None:
            return EVERYTHING
        found |= _tables_in(cleaned, cleaned.text[body.end() :], whole=False)
    return EVERYTHING if ALL_TABLES in found else frozenset(found)


_BEGIN = re.compile(r"\bbegin\b", re.I)


def _first_word(text: str) -> str:
    words = text.split(None, 1)
    return words[0].lower().lstrip("(") if words else ""


def _tables_in(cleaned: sqltext.Cleaned, text: str, whole: bool) -> frozenset[str]:
    # ``whole``: a statement of its own, which writes unless it starts as a
    # read; else a fragment of one (a textual FROM or WHERE), which writes
    # only what its write words say.
    if whole:
        text = _explained(text)  # what EXPLAIN ANALYZE runs: it writes what that writes
    first = _first_word(text)
    if not first:
        return NOTHING
    if whole and first in _MAINTENANCE:
        return frozenset({_MAINTENANCE[first]})
    if whole and first == "pragma" and _PRAGMA_OPTIMIZE.match(text):
        return _ANY
    names: set[str] = set()
    for match in _TARGETS.finditer(text):
        for group in match.groupdict().values():
            if group:
                names.update(_version_names(cleaned, group))
    if whole and first in _SCHEMA_CHANGES:
        return _schema_change(cleaned, text, first, names)
    remaining = _TARGETS.sub(" ", _HARMLESS.sub(" ", text))
    if _WRITES.search(remaining) or (whole and first not in _READS and not names):
        return EVERYTHING  # a write whose targets were not all read
    if _TRUNCATE_CASCADE.search(text):
        return EVERYTHING  # empties whatever refers to the tables, whatever the foreign keys say
    return frozenset(names)


def _schema_change(cleaned: sqltext.Cleaned, text: str, first: str, names: set[str]) -> frozenset[str]:
    # A schema change writes no rows, but may change what reads return: a
    # function replaced (called by a query, a view or a policy), a policy
    # created, a privilege revoked, a column's type altered.  Entries whose
    # reads are unknown depend on ANY_TABLE, which it writes; tables it
    # names are written too.  What may change reads of tables it does not
    # name (a function, a type, a role, a grant, a DROP ... CASCADE) writes
    # every table: schema changes are rare, stale rows are not an option.
    if first == "comment":
        return _ANY  # read only through functions, on which an entry depends on ANY_TABLE
    if first not in ("create", "alter", "drop"):
        return EVERYTHING
    kind = next((word for word in text.lower().split()[1:] if word not in _MODIFIERS), "")
    if kind not in _TABLE_OBJECTS or (first != "create" and _CASCADE.search(text)):
        return EVERYTHING
    created = _CREATED_TABLE.match(text)
    if created:
        names.update(_version_names(cleaned, created.group("table")))
    if kind in ("policy", "trigger", "index"):
        for match in _ON_TABLE.finditer(text):
            names.update(_version_names(cleaned, match.group("table")))
    return frozenset({ANY_TABLE, *names})


_UESCAPE = re.compile(r"\buescape\b", re.I)
_TRUNCATE_CASCADE = re.compile(r"\btruncate\b[^;]*\bcascade\b", re.I)


def _version_names(cleaned: sqltext.Cleaned, listed: str) -> list[str]:
    names = []
    for qualified in re.findall(_QUALIFIED, re.sub(r"(?i)\bonly\s+", " ", listed)):
        names.append(version_name(cleaned.names(qualified)[-1]))
    return names
