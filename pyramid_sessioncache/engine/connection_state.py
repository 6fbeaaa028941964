"""What a connection's own settings make of a query: part of its key.

Rows can depend on settings of the database session rather than on the
statement: ``SET search_path`` (a schema per tenant), ``SET ROLE`` and
``set_config('app.tenant', ...)`` read by a row-level security policy.
A statement executed after ``SET LOCAL search_path TO tenant_b`` must not
be served the entry stored under ``tenant_a``.

A temporary table (or view, or sequence) shows under its name on its
connection only: ``pg_temp`` comes first in every ``search_path``, so
``CREATE TEMPORARY TABLE person`` makes ``person`` another table there,
and there alone.  A connection that made a temporary relation keys its
look-ups under a token of its own from then on (until ``DISCARD ALL`` or
``DISCARD TEMP`` drops them): no other connection is served what it read,
and it is served nothing another stored.

Every statement a connection of the process runs is seen
(``after_cursor_execute``); those that change a setting (``SET``,
``RESET``, ``set_config(...)``; SQLite's ``ATTACH``, ``DETACH`` and a
``PRAGMA`` that sets) are kept per DBAPI connection: the
session's settings as long as the connection lives, ``SET LOCAL`` (and
every setting made inside a transaction) until the transaction ends.  A
look-up on a connection with settings adds them to its key
(:func:`state_text`); one whose settings cannot be told (a session
setting changed in a transaction that rolled back: the database undid
it, or not) is not cached in shared regions.

The settings a Session's connection will have are known once it is
checked out: a look-up begins the Session's transaction first when the
Session runs ``after_begin`` listeners of the application's (they may
set the tenant), and when the engine's connections have been given
session settings.  Settings made when the connection is opened (a
``connect`` listener) are not seen: name such databases apart with the
``sessioncache_database`` execution option (see the docs).
"""

from __future__ import annotations

import os
import re
import secrets
import weakref
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import StaticPool

from .. import _sqlalchemy
from . import shared_memory
from .invalidation import schema, sqltext
from .invalidation.writes import in_transaction, transaction_ends
from .keys import Unkeyable, value_text

#: ``Connection.info`` keys (kept with the DBAPI connection).
_SESSION = "sessioncache.settings"
_LOCAL = "sessioncache.local_settings"
_UNKNOWN = "sessioncache.settings_unknown"
_SAVEPOINTS = "sessioncache.setting_savepoints"
_TEMPORARY = "sessioncache.temporary"
#: A token for a SQLite connection that had a database no other connection
#: sees (in memory) when first used, or the token of the shared database in
#: memory it opened (:mod:`.shared_memory`), else "": see :func:`_connected`.
_OWN_DATABASE = "sessioncache.own_database"
#: This process's part of every :data:`_OWN_DATABASE` token: a forked child's
#: copy of a connection holds a copy of its database in memory, which then
#: diverges from the parent's, and the token in its ``info`` is a copy too.
_process = secrets.token_hex(8)
#: How the open transaction that made the connection's first temporary
#: relation undoes it: ``"commit"`` (``ON COMMIT DROP`` alone), or
#: ``"rollback"``; absent when the token outlives any transaction.
_TEMPORARY_UNTIL = "sessioncache.temporary_until"
#: The session settings before the open transaction changed one (PostgreSQL):
#: what its rollback leaves in force.
_BEFORE = "sessioncache.settings_before"
#: A word that may end a transaction, in SQL text: the database's settings
#: then no longer follow SQLAlchemy's rollback.
_ENDS_SQL = re.compile(r"\b(?:commit|end|prepare|rollback|abort)\b")

#: Words that change settings when they start a statement.
_FIRST_WORDS = frozenset({"set", "reset", "discard", "attach", "detach", "pragma"})
#: What a statement that changes a setting holds, lowered ("reset" holds "set").
_CHANGING = re.compile("set|discard|attach|detach|pragma")
#: SQLite's: a database attached under a schema name (``ATTACH 'tenant_a.db' AS tenant``)
#: shows its tables to this connection alone, and a ``PRAGMA`` (``case_sensitive_like``) changes
#: what its queries return; no rollback undoes either.
_ATTACH = re.compile(r"^attach\s+(?:database\s+)?.*\bas\s+(?P<name>\S+)$", re.S)
_DETACH = re.compile(r"^detach\s+(?:database\s+)?(?P<name>\S+)$")
_PRAGMA = re.compile(r"^pragma\s+(?P<name>[^\s=(]+)\s*(?P<value>[=(])?")
#: Pragmas given a value that change nothing a query returns: those that read (their
#: argument is what they describe), and the tuning an application sets on every connection.
_NEUTRAL_PRAGMAS = frozenset(
    {"table_info", "table_xinfo", "table_list", "index_info", "index_xinfo", "index_list", "foreign_key_list",
     "foreign_key_check", "integrity_check", "quick_check", "busy_timeout", "cache_size", "journal_mode",
     "synchronous", "mmap_size", "temp_store", "wal_checkpoint", "wal_autocheckpoint", "optimize",
     "incremental_vacuum"}
)  # fmt: skip
#: The settings of those statements (see :func:`_statement_change`), which a rollback leaves in force.
_KEPT_AT_ROLLBACK = ("attach ", "pragma ", "*reset attach ")
_SET = re.compile(r"^set\s+(?:(?P<scope>session|local)\s+)?(?P<rest>.*)$", re.I | re.S)
_TWO_WORDS = ("session authorization", "time zone", "transaction isolation", "xml option")
#: A SET, RESET or DISCARD that starts a statement of a ``DO`` block's code, or of a string it EXECUTEs.
_SET_IN_BODY = re.compile(r"(?:^|[;']|\$|\b(?:begin|then|else|loop))\s*(?:set|reset|discard)\b", re.I)
#: set_config(), however spelt (quoted, in any case).
_SET_CONFIG = re.compile(r"\bset_config\"?\s*\(", re.I)
#: A set_config() call whose name and scope are literals: set_config('name', value, true|false).
_LITERAL_CONFIG = re.compile(r"\bset_config\s*\(\s*'(?P<name>[^']*)'\s*,.*?,\s*(?P<local>true|false)\s*\)", re.I | re.S)

#: A statement that makes a temporary relation, in :class:`~.invalidation.sqltext.Cleaned` text:
#: ``CREATE [GLOBAL|LOCAL] TEMP[ORARY] ...`` (``EXPLAIN ANALYZE`` runs one too), ``SELECT ... INTO TEMP``, or
#: anything created in ``pg_temp`` by name (a view over a temporary table
#: is temporary too, but that table made its connection's look-ups apart already).
#: SQLite's ``temp`` schema named: see :data:`_CREATED_IN_SCHEMA`.
_TEMPORARY_SQL = re.compile(
    r"\bcreate\b[^;]*?\b(?:temp|temporary)\s+(?:unlogged\s+)?(?:recursive\s+)?(?:table|view|sequence)\b"
    r"|\binto\s+(?:temp|temporary)\b|\bpg_temp\w*\s*\.",
    re.I,
)

#: Pools some of whose connections have session settings: their look-ups check out a connection first.
_POOLS_WITH_SETTINGS: weakref.WeakSet[Any] = weakref.WeakSet()

#: SQLite pools a connection of which was seen (:func:`_connected`): until then,
#: whether their connections have databases of their own is not known, and a
#: look-up checks out a connection first rather than key under none.
_SQLITE_POOLS_SEEN: weakref.WeakSet[Any] = weakref.WeakSet()

#: At most this many settings per connection are told apart; past it, its look-ups are not cached.
_MAX_SETTINGS = 64


def install() -> None:
    """Listen to every engine's statements, transactions and savepoints, once per process."""
    if not event.contains(Engine, "after_cursor_execute", _executed):
        event.listen(Engine, "after_cursor_execute", _executed)
        event.listen(Engine, "commit", _ended)
        event.listen(Engine, "begin", _began)
        event.listen(Engine, "rollback", _rolled_back)
        event.listen(Engine, "savepoint", _savepoint)
        event.listen(Engine, "rollback_savepoint", _rolled_back_to)
        event.listen(Engine, "engine_connect", _connected)


def _executed(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
    lowered = statement.lower()
    if _LOCAL in conn.info:
        _transaction_ended_by(conn, statement if _ENDS_SQL.search(lowered) else None)
    if (_BEFORE in conn.info or _TEMPORARY_UNTIL in conn.info) and (
        (_ENDS_SQL.search(lowered) and transaction_ends(statement)) or not in_transaction_of(conn)
    ):
        # The transaction may have been committed by SQL text: what its end
        # undoes is no longer known (settings unknown; temporary token kept).
        conn.info.pop(_BEFORE, None)
        conn.info.pop(_TEMPORARY_UNTIL, None)
    if "temp" in lowered:
        _note_temporary(conn, statement)
    # SET, RESET, set_config(), DISCARD; else a function of the database's own that changes settings.
    changes = _changes(statement) if _CHANGING.search(lowered) else ()
    if not changes and "(" in statement and _calls_a_setter(conn, statement):
        changes = ((None, False),)
    if not changes:
        return
    info = conn.info
    # The driver's word, not SQLAlchemy's: on an autocommit connection a
    # setting is committed as it is made, and no rollback undoes it.
    in_transaction = in_transaction_of(conn)
    value = _setting_value(statement, parameters) if any(name != "*none" for name, _ in changes) else ""
    if value and any(name and name.startswith("attach ") for name, _ in changes) and _attached_its_own(conn):
        # ATTACH ':memory:' (or '', or 'file:x?vfs=memdb'): a database this
        # connection alone sees, whatever another's same statement attached.
        value += "|" + secrets.token_hex(8)
    for name, local in changes:
        if name is None or value is None:  # what it changes, or for how long, or to what, cannot be told
            info[_UNKNOWN] = True
            _POOLS_WITH_SETTINGS.add(conn.engine.pool)  # a Session's next transaction must see it too
            continue
        undone = in_transaction and not name.startswith(_KEPT_AT_ROLLBACK)
        _apply(info, name, value, local, undone, conn)


def _attached_its_own(conn: Any) -> bool:
    """Whether SQLite's ``conn`` has attached a database no other connection sees: in memory, or a temporary file.

    True when that cannot be read: keyed apart, its look-ups cost misses only.
    """
    if conn.dialect.name != "sqlite":
        return False
    databases = _databases(conn)
    return databases is None or bool(_its_own(databases) - {"main", "temp"})


def _databases(conn: Any) -> list[tuple[str, str]] | None:
    """The databases SQLite's ``conn`` sees (``PRAGMA database_list``), each one's name and file; None if unknown."""
    try:
        cursor = conn.connection.dbapi_connection.cursor()
        try:
            cursor.execute(schema.SQLITE_DATABASES)
            return [(name, file) for _, name, file in cursor.fetchall()]
        finally:
            cursor.close()
    except Exception:
        return None


def _its_own(databases: list[tuple[str, str]]) -> set[str]:
    """The names of those of ``databases`` a connection alone sees: no file (in memory, or a temporary file).

    A ``memdb`` database (``file:NAME?vfs=memdb``, or the copy
    ``Connection.deserialize()`` makes, named ``"x"``) has a name, as a
    file has, but no file: SQLite names a file by its full path, which
    exists.  A ``memdb`` name that is a file's path is told apart by
    nothing here.
    """
    return {name for name, file in databases if not (file and os.path.isabs(file) and os.path.isfile(file))}


def _connected(conn: Any) -> None:
    """A Connection is made: if SQLite's DBAPI connection has a database of its own, its look-ups are keyed apart.

    ``sqlite://`` gives each thread a connection (``SingletonThreadPool``)
    and each connection a database in memory: one identity for the pool
    (see :func:`~.identity.database_identity`) would serve one thread the
    rows of another's.  So would a database in memory each connection
    attaches as it opens (a ``connect`` listener: no statement event sees
    it).  A ``StaticPool`` has one connection: nothing to tell apart.  A
    database in memory that connections share by name
    (``file:NAME?mode=memory&cache=shared``) gives them one token while it
    lives (see :mod:`.shared_memory`), unless a ``connect`` listener gave
    a connection temporary tables (which would shadow the shared ones
    there alone).  Asked once per DBAPI connection.
    """
    info = conn.info
    if _OWN_DATABASE in info or conn.dialect.name != "sqlite":
        return
    pool = conn.engine.pool
    _SQLITE_POOLS_SEEN.add(pool)
    databases = _databases(conn)
    shared = _shared_token(conn, databases)
    if shared is not None:  # even in a StaticPool: its connection may be replaced, and the database with it
        info[_OWN_DATABASE] = shared
    else:
        own = databases is None or bool(_its_own(databases) - {"temp"})
        own = own and not isinstance(pool, StaticPool)
        info[_OWN_DATABASE] = secrets.token_hex(8) if own else ""
        if not own:
            return
    _POOLS_WITH_SETTINGS.add(pool)


def _shared_token(conn: Any, databases: list[tuple[str, str]] | None) -> str | None:
    """The token of the shared database in memory ``conn`` has as its main one (see :mod:`.shared_memory`), or None.

    None when it has any other database of its own (attached as it
    opened), or temporary tables: what they show, it shows alone; and when
    its main database is not the one it opened (``Connection.deserialize()``
    in a ``connect`` listener replaces it with a copy, which SQLite names
    ``"x"``).
    """
    if databases is None or _its_own(databases) - {"main", "temp"}:
        return None
    name = shared_memory.shared_name(conn.engine)
    main = [file for database, file in databases if database == "main"]
    if name is None or main != [name[1] if name[0] else ""] or _has_temporary_tables(conn):
        return None
    return shared_memory.token(name, conn.connection.dbapi_connection, conn.info)


def _has_temporary_tables(conn: Any) -> bool:
    """Whether SQLite's ``conn`` has temporary tables; True if that cannot be read."""
    try:
        cursor = conn.connection.dbapi_connection.cursor()
        try:
            cursor.execute("SELECT count(*) FROM temp.sqlite_master")
            return cursor.fetchone()[0] != 0
        finally:
            cursor.close()
    except Exception:
        return True


def _setting_value(statement: str, parameters: Any) -> str | None:
    """What a statement that changes a setting sets, as key text; None when its parameters have none.

    Its parameters as keys show them, not their repr, which may hide a
    value (a tenant's name masked for the logs).
    """
    try:
        return f"{statement}|{value_text(parameters)}"
    except Unkeyable:
        return None


def _transaction_ended_by(conn: Any, statement: str | None) -> None:
    """Settle what the transaction set, if it ended unseen by SQLAlchemy.

    A ``COMMIT`` or ``ROLLBACK`` sent as SQL (``AND CHAIN`` too), or one
    on the driver's connection (the driver then says no transaction is
    open).  Its ``SET LOCAL`` settings end with it.  The changes it made to
    the session's settings stay if it committed, are undone if it rolled
    back (PostgreSQL), and are unknown when how it ended is.
    ``statement``: SQL text that may have ended it.
    """
    ends = transaction_ends(statement) if statement is not None else frozenset()
    info = conn.info
    local = info[_LOCAL]
    if "commit" not in ends and in_transaction_of(conn):
        if "rollback" in ends and local:  # ROLLBACK TO SAVEPOINT, or AND CHAIN: which remain is not kept here
            info[_UNKNOWN] = True
        return
    del info[_LOCAL]
    info.pop(_SAVEPOINTS, None)
    if ends != {"commit"} and any(isinstance(name, tuple) for name in local):
        before = info.get(_BEFORE)
        if ends == {"rollback"} and before is not None:
            info[_SESSION] = before  # PostgreSQL undid every session setting the transaction made
        else:
            info[_UNKNOWN] = True


def _note_temporary(conn: Any, statement: str) -> None:
    """Key ``conn``'s look-ups apart if ``statement`` made a temporary relation, or drop that if it dropped them all."""
    found = _temporary(statement)
    info = conn.info
    if found in ("made", "made until commit"):
        if _TEMPORARY not in info:
            info[_TEMPORARY] = secrets.token_hex(8)
            _POOLS_WITH_SETTINGS.add(conn.engine.pool)
            if in_transaction_of(conn):  # dropped by its rollback too: the token with it (see _ended)
                info[_TEMPORARY_UNTIL] = "commit" if found == "made until commit" else "rollback"
        elif found == "made" and info.get(_TEMPORARY_UNTIL) == "commit":
            info[_TEMPORARY_UNTIL] = "rollback"  # one that outlives its commit
    elif found == "dropped" and not in_transaction(conn.connection.dbapi_connection):
        conn.info.pop(_TEMPORARY, None)  # a DISCARD TEMP in a transaction may yet roll back


@sqltext.per_text
def _temporary(statement: str) -> str | None:
    """``"made"`` if ``statement`` may make a temporary relation, ``"dropped"`` if it drops every one, else None.

    ``"made until commit"`` if every one it may make is a table dropped
    at commit (``ON COMMIT DROP``).
    """
    until_commit = False
    for cleaned in sqltext.readings(statement):
        for part in cleaned.statements():
            quoted = any(
                cleaned.name(match.group(1)).lower().startswith("pg_temp") for match in _QUOTED_SCHEMA.finditer(part)
            )
            created = _CREATED_IN_SCHEMA.search(part)
            if quoted or (created and cleaned.name(created.group("schema")).lower() == "temp"):
                return "made"
            found = _TEMPORARY_SQL.findall(part)
            if len(found) == 1 and found[0].lower().endswith("table") and _ON_COMMIT_DROP.search(part):
                until_commit = True
            elif found:
                return "made"
    if until_commit:
        return "made until commit"
    if " ".join(statement.lower().replace(";", " ").split()) in ("discard all", "discard temp", "discard temporary"):
        return "dropped"
    return None


#: A temporary table its transaction's end drops.
_ON_COMMIT_DROP = re.compile(r"\bon\s+commit\s+drop\b", re.I)

#: A table or view created in a schema named (SQLite's ``temp``: ``CREATE TABLE temp.person``).
_CREATED_IN_SCHEMA = re.compile(
    rf"\bcreate\b[^;]*?\b(?:table|view)\s+(?:if\s+not\s+exists\s+)?(?P<schema>{sqltext.NAME})\s*\.", re.I
)

#: A quoted name before a dot: a schema (``"pg_temp".person``).
_QUOTED_SCHEMA = re.compile(r'("\d+")\s*\.')


def _calls_a_setter(conn: Any, statement: str) -> bool:
    try:
        return schema.calls_setters(conn, statement)
    except Exception:  # the catalog could not be read: assume the worst
        return True


@sqltext.per_text
def _changes(statement: str) -> tuple[tuple[str | None, bool], ...]:
    """What ``statement`` changes, as ``(name, local)``; a name None when what or how long cannot be told.

    Remembered per text: every ``LIMIT ... OFFSET`` query, or one naming an
    ``asset`` column, would otherwise be read again on each execution.
    """
    found: list[tuple[str | None, bool]] = []
    for cleaned in sqltext.readings(statement):
        for part in cleaned.statements():
            words = part.split(None, 1)
            if words and words[0].lower() in _FIRST_WORDS:
                found.append(_statement_change(words[0].lower(), part, cleaned))
            elif words and words[0].lower() == "do" and _SET_IN_BODY.search(statement):
                found.append((None, False))  # an anonymous block's SET: which, and for how long, is its code's
    calls = len(_SET_CONFIG.findall(statement))
    if calls:
        literal = list(_LITERAL_CONFIG.finditer(statement))
        if len(literal) != calls:
            found.append((None, False))  # a name or a scope given otherwise than as literals
        else:
            found += [(match.group("name").lower(), match.group("local").lower() == "true") for match in literal]
    return tuple(found)


def _statement_change(word: str, text: str, cleaned: sqltext.Cleaned) -> tuple[str | None, bool]:
    lowered = " ".join(text.lower().split())
    if word in ("attach", "detach", "pragma"):
        return _sqlite_change(word, lowered, cleaned)
    if word == "discard":
        return ("*all", False) if lowered.startswith("discard all") else ("*none", False)
    if word == "reset":
        rest = lowered[len("reset") :].strip()
        return ("*all" if rest == "all" else "*reset " + _name_of(rest, cleaned), False)
    found = _SET.match(lowered)
    if found is None:
        return (None, False)
    return _name_of(found.group("rest"), cleaned), found.group("scope") == "local"


def _sqlite_change(word: str, lowered: str, cleaned: sqltext.Cleaned) -> tuple[str | None, bool]:
    # Schema names are read in any case, quoted or not.
    if word == "pragma":
        found = _PRAGMA.match(lowered)
        if found is None:
            return (None, False)
        name = ".".join(cleaned.names(found.group("name"))).lower()
        if not found.group("value") or name.rpartition(".")[2] in _NEUTRAL_PRAGMAS:
            return ("*none", False)  # a pragma read, or one that changes no row
        return ("pragma " + name, False)
    found = (_ATTACH if word == "attach" else _DETACH).match(lowered)
    if found is None or found.group("name") == "''":
        # A schema named by a string (AS 'tenant'), whose text the cleaned SQL
        # no longer holds: every such name would be one, and DETACH 'other'
        # would forget the tenant's.
        return (None, False)
    name = "attach " + cleaned.name(found.group("name")).lower()
    return (name if word == "attach" else "*reset " + name), False


#: The one name of a setting PostgreSQL also takes under another: the last
#: change of either is what is in force, so they must be one setting here.
_ALIASES = {
    "schema": "search_path",
    "time zone": "timezone",
    "names": "client_encoding",
    "xml option": "xmloption",
    "transaction isolation": "transaction_isolation",
    "session authorization": "session_authorization",
    "authorization": "session_authorization",  # SET SESSION AUTHORIZATION, its SESSION read as the scope
}
#: A setting's name: a quoted name's token, or what comes before a space or "=" (``SET search_path=a``).
_SETTING = re.compile(r'"\d+"|[^\s=]+')


def _name_of(rest: str, cleaned: sqltext.Cleaned) -> str:
    name = next((words for words in _TWO_WORDS if rest.startswith(words)), None)
    if name is None:
        found = _SETTING.match(rest)
        name = "" if found is None else found.group()
        if name.startswith('"'):  # a setting's name is read in any case, quoted or not
            name = cleaned.name(name).lower()
    return _ALIASES.get(name, name)


def _apply(info: dict, name: str, value: str, local: bool, in_transaction: bool, conn: Any) -> None:
    """Record one change in ``info``: the session's settings and the transaction's, as the database keeps them."""
    session, local_settings = info.setdefault(_SESSION, {}), info.setdefault(_LOCAL, {})
    if name == "*none":
        return
    first = in_transaction and not local and not any(isinstance(key, tuple) for key in local_settings)
    if first and conn.dialect.name == "postgresql" and in_transaction_of(conn):
        # The transaction's first change of the session's settings: what a
        # rollback brings back, where the database surely undoes it.
        info[_BEFORE] = dict(session)
    if name == "*all" or name.startswith("*reset "):
        target = None if name == "*all" else name[len("*reset ") :]
        if target is None and not in_transaction:
            info.pop(_UNKNOWN, None)  # every setting back to its default: known again
        for settings in (session, local_settings):
            for key in [k for k in settings if target is None or k == target or k == ("session", target)]:
                del settings[key]
        if in_transaction:
            local_settings[("session", name)] = value  # undone by a rollback, like any change
        return
    if local:
        local_settings[name] = value
    else:
        session[name] = value
        local_settings.pop(name, None)
        if in_transaction:
            local_settings[("session", name)] = value  # undone by a rollback
        _POOLS_WITH_SETTINGS.add(conn.engine.pool)
        if len(session) > _MAX_SETTINGS:
            info[_UNKNOWN] = True
    _note_in_savepoint(info)


def _note_in_savepoint(info: dict) -> None:
    savepoints = info.get(_SAVEPOINTS)
    if savepoints:
        savepoints[-1] = True  # the innermost savepoint changed a setting


def _savepoint(conn: Any, name: str) -> None:
    conn.info.setdefault(_SAVEPOINTS, []).append(False)


def _rolled_back_to(conn: Any, name: str, context: Any) -> None:
    if conn.invalidated:  # see _rolled_back()
        return
    savepoints = conn.info.get(_SAVEPOINTS)
    if savepoints and savepoints.pop():
        # The database undid what the savepoint set; which values remain is not kept here.
        conn.info[_UNKNOWN] = True


def in_transaction_of(conn: Any) -> bool:
    """Whether ``conn``'s DBAPI connection has a transaction open (not in autocommit, where a rollback undoes nothing)."""
    return in_transaction(conn.connection.dbapi_connection)


def _began(conn: Any) -> None:
    conn.info.pop(_BEFORE, None)  # of a transaction that ended unseen
    conn.info.pop(_TEMPORARY_UNTIL, None)  # its temporary relations kept, as far as is known here


def _ended(conn: Any) -> None:
    conn.info.pop(_LOCAL, None)
    conn.info.pop(_SAVEPOINTS, None)
    conn.info.pop(_BEFORE, None)
    if conn.info.pop(_TEMPORARY_UNTIL, None) == "commit":  # its temporary tables dropped at commit
        conn.info.pop(_TEMPORARY, None)


def _rolled_back(conn: Any) -> None:
    if conn.invalidated:
        # Its DBAPI connection went (a disconnect), with its settings: the
        # next one starts with none (the pool clears its info).  conn.info
        # would raise, and the rollback with it.
        return
    local = conn.info.pop(_LOCAL, None)
    conn.info.pop(_SAVEPOINTS, None)
    before = conn.info.pop(_BEFORE, None)
    if conn.info.pop(_TEMPORARY_UNTIL, None) is not None:  # the temporary relations it made: undone
        conn.info.pop(_TEMPORARY, None)
    if local and any(isinstance(name, tuple) for name in local):
        if before is not None:
            # PostgreSQL undid every session setting the transaction made.
            conn.info[_SESSION] = before
            return
        # A session setting made in this transaction: PostgreSQL undoes it
        # at a rollback, other databases keep it; or it may have been
        # committed by SQL text.  Not told apart from here.
        conn.info[_UNKNOWN] = True


def state_text(session: Any, bind_arguments: dict, bind: Any) -> str | None:
    """The settings the statement's connection runs with, as key text: "" for none, None when unknown.

    Begins the Session's transaction first when its settings would be made
    then (see the module's docstring).  The first look-up on a SQLite
    engine's pool opens a connection and gives it back, to learn whether
    its connections have databases of their own (see ``_connected``).
    """
    connection = _sqlalchemy.transaction_connection(session, bind)
    if connection is None:
        # The WeakSet is empty in most applications: asked before the listeners are walked.
        pool = _pool_of(bind)
        unseen = _unseen_sqlite(bind, pool)
        if unseen and isinstance(bind, Engine):
            with bind.connect():  # now seen (see _connected), and back in the pool: a waiter holds none
                unseen = False
        if not ((_POOLS_WITH_SETTINGS and pool in _POOLS_WITH_SETTINGS) or unseen or _sets_at_begin(session)):
            return ""
        connection = session.connection(bind_arguments=dict(bind_arguments))
    info = connection.info
    if _LOCAL in info:
        _transaction_ended_by(connection, None)  # on the driver's connection, since the last statement
    if info.get(_UNKNOWN):
        return None
    settings = {**info.get(_SESSION, {}), **{k: v for k, v in info.get(_LOCAL, {}).items() if not isinstance(k, tuple)}}
    if _TEMPORARY in info:  # what its temporary relations shadow: this connection's alone
        settings["*temporary"] = info[_TEMPORARY]
    if info.get(_OWN_DATABASE):  # a database this connection alone sees, or those that share it while it lives
        settings["*database"] = f"{_process}:{info[_OWN_DATABASE]}"
    return "|".join(f"{name}={settings[name]}" for name in sorted(settings)) if settings else ""


def _unseen_sqlite(bind: Any, pool: Any) -> bool:
    dialect = getattr(getattr(bind, "engine", bind), "dialect", None)
    return getattr(dialect, "name", None) == "sqlite" and pool not in _SQLITE_POOLS_SEEN


def _pool_of(bind: Any) -> Any:
    engine = getattr(bind, "engine", bind)
    return getattr(engine, "pool", None)


#: ``after_begin`` listener functions known to change no setting.
_QUIET: set[Any] = set()


def quiet_at_begin(listener: Any) -> None:
    """Declare that ``listener``, an ``after_begin`` listener, changes no setting of the connection."""
    _QUIET.add(getattr(listener, "__func__", listener))


def _sets_at_begin(session: Any) -> bool:
    """Whether an ``after_begin`` listener of ``session`` may change the connection's settings."""
    return any(getattr(listener, "__func__", listener) not in _QUIET for listener in session.dispatch.after_begin)


def _forked() -> None:
    global _process
    _process = secrets.token_hex(8)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)
