"""What an executed statement writes: the tables of compiled DML, of DML in CTEs, of raw SQL.

:func:`written_tables` looks at what a Connection actually ran
(``after_cursor_execute``): a compiled ``insert()``/``update()``/``delete()``
names its table; a SELECT may hold DML in its CTEs; SQL given as text
(``text()``, ``exec_driver_sql()``) is read for the tables it writes.  When
SQL that may write cannot be read, it writes :data:`~.reads.ALL_TABLES`.
Names are version names (:func:`~.reads.version_name`): bare, lower case.
"""

from __future__ import annotations

import re
import weakref
from functools import lru_cache
from typing import Any

from sqlalchemy.sql import visitors
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.expression import TableClause

from . import schema
from .reads import ALL_TABLES, version_name

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
            names |= _tables_in(node.text, whole=False)  # a fragment of text in a statement
    return frozenset(names)


def _target(table: Any) -> Any:
    # The table a DML statement writes, through aliases (update(aliased(...))).
    while table is not None and not isinstance(table, TableClause):
        table = getattr(table, "element", None)
    return table


def is_ddl(context: Any, statement: str) -> bool:
    """Whether a statement that ran changes the schema (a migration, a view created)."""
    return bool(context.isddl) or _DDL.match(statement) is not None


_DDL = re.compile(r"\s*(?:create|alter|drop)\b", re.I)


# Reading SQL text ------------------------------------------------------------

# Strings and comments, left to right: a quote inside a comment opens no
# string, and a comment marker inside a string opens no comment.
_NOISE = re.compile(
    r"(?P<string>[eE]'(?:[^'\\]|\\.|'')*'|'(?:[^']|'')*'|\$(?P<tag>\w*)\$.*?\$(?P=tag)\$)"
    r"|(?P<comment>--[^\n]*|/\*.*?\*/)",
    re.S,
)
_NAME = r'(?:"(?:[^"]|"")+"|`[^`]+`|\[[^\]]+\]|[\w$]+)'
_QUALIFIED = rf"{_NAME}(?:\s*\.\s*{_NAME})*"
_TARGETS = re.compile(
    r"\b(?:"
    rf"insert\s+(?:or\s+\w+\s+)?into\s+(?P<insert>{_QUALIFIED})"
    rf"|replace\s+into\s+(?P<replace>{_QUALIFIED})"
    rf"|update\s+(?:or\s+\w+\s+)?(?:only\s+)?(?P<update>{_QUALIFIED})\s+(?:(?:as\s+)?{_NAME}\s+)?set\b"
    rf"|delete\s+from\s+(?:only\s+)?(?P<delete>{_QUALIFIED})"
    rf"|merge\s+into\s+(?:only\s+)?(?P<merge>{_QUALIFIED})"
    rf"|truncate\s+(?:table\s+)?(?P<truncate>(?:only\s+)?{_QUALIFIED}(?:\s*,\s*(?:only\s+)?{_QUALIFIED})*)"
    rf"|(?:drop|alter)\s+(?:materialized\s+)?(?:table|view)\s+(?:if\s+exists\s+)?(?:only\s+)?(?P<ddl>{_QUALIFIED}(?:\s*,\s*{_QUALIFIED})*)"
    rf"|create\s+(?:or\s+replace\s+)?(?:materialized\s+)?view\s+(?:if\s+not\s+exists\s+)?(?P<view>{_QUALIFIED})"
    rf"|refresh\s+materialized\s+view\s+(?:concurrently\s+)?(?P<refresh>{_QUALIFIED})"
    r")",
    re.I,
)
# Words that make SQL a write whatever else it says; what follows them is read by _TARGETS.
_WRITES = re.compile(r"\b(?:insert|update|delete|merge|truncate|drop|alter|refresh|copy|call|do|execute)\b", re.I)
# Uses of those words that write nothing.
_HARMLESS = re.compile(
    r"\bfor\s+(?:no\s+key\s+)?update\b|\bon\s+(?:update|delete)\b|\bdo\s+(?:update\s+set|nothing)\b"
    r"|\bthen\s+(?:update|delete|insert)\b|\bdrop\s+(?:index|trigger|function|sequence|type|schema)\b|\balter\s+(?:index|sequence|role|user|database)\b",
    re.I,
)
# SQL that starts with one of these writes no rows.
_READS = frozenset(
    {"select", "with", "values", "show", "explain", "pragma", "set", "reset", "begin", "start", "commit", "end",
     "rollback", "savepoint", "release", "listen", "unlisten", "notify", "create", "analyze", "vacuum", "declare",
     "fetch", "close", "prepare", "deallocate", "discard", "lock", "comment", "grant", "revoke", "table"}
)  # fmt: skip


@lru_cache(maxsize=2048)
def sql_tables(sql: str) -> frozenset[str]:
    """Return the version names of the tables the SQL text ``sql`` writes.

    :data:`NOTHING` for SQL that writes no rows (a SELECT, a PRAGMA, a
    ``CREATE INDEX``); :data:`EVERYTHING` when it may write and its targets
    cannot be told (a procedure call, ``COPY``, a statement not understood).
    """
    return _tables_in(sql, whole=True)


def _tables_in(sql: str, whole: bool) -> frozenset[str]:
    # ``whole``: a statement of its own, which writes unless it starts as a
    # read; else a fragment of one (a textual FROM or WHERE), which writes
    # only what its write words say.
    text = _NOISE.sub(lambda match: "''" if match.group("string") else " ", sql).strip().rstrip(";")
    words = text.split(None, 1)
    if not words:
        return NOTHING
    first = words[0].lower().lstrip("(")
    names: set[str] = set()
    for match in _TARGETS.finditer(text):
        for group in match.groupdict().values():
            if group:
                names.update(_version_names(group))
    remaining = _TARGETS.sub(" ", _HARMLESS.sub(" ", text))
    if _WRITES.search(remaining) or (whole and first not in _READS and not names):
        return EVERYTHING  # a write whose targets were not all read
    if _TRUNCATE_CASCADE.search(text):
        return EVERYTHING  # empties whatever refers to the tables, whatever the foreign keys say
    return frozenset(names)


_TRUNCATE_CASCADE = re.compile(r"\btruncate\b[^;]*\bcascade\b", re.I)


def _version_names(listed: str) -> list[str]:
    names = []
    for qualified in re.findall(_QUALIFIED, re.sub(r"(?i)\bonly\s+", " ", listed)):
        parts = re.findall(_NAME, qualified)
        names.append(version_name(_unquote(parts[-1])))
    return names


def _unquote(name: str) -> str:
    if name[:1] in '"`[':
        return name[1:-1].replace('""', '"')
    return name
