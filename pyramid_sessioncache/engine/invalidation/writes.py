"""What a transaction wrote, seen where it happens: on the connection.

Once the first :class:`~pyramid_sessioncache.SessionCache` is made, every
Connection of every engine in the process reports each statement it runs
(``after_cursor_execute``).  What a statement writes (``statements.py``),
and what the database changes because of it (``schema.py``), is marked in
that connection's transaction, whoever issued it: an ORM flush, the bulk
API, ``session.execute(update(...))``, ``session.connection().execute()``,
``text()`` or ``exec_driver_sql()``, a Session that carries no cache.

- A savepoint keeps its marks apart: rolled back, they are forgotten;
  released, they join the enclosing transaction's.
- At commit, the marks are published to every cache of the process
  (each bumps the versions of those tables in its shared regions) just
  before the database commits, and again as soon as it has (SQLAlchemy
  has no event then: ``_sqlalchemy.after_dbapi_commit``).  The second
  bump voids what a reader stored in between from rows read before the
  commit became visible.  A two-phase commit is published again when
  the connection next begins or goes back to its pool, and as soon as
  the database has committed it.  A prepared transaction commits apart
  from the one that prepared it (``COMMIT PREPARED`` sent as SQL,
  ``Connection.commit_prepared()``, perhaps by another process after a
  crash): its writes, kept by transaction id when it was prepared, are
  published when it commits, or every table when they are not known here.
- A rollback forgets them.  A write the database committed by itself
  (an autocommit connection, SQL outside any transaction, a ``COMMIT``
  sent as SQL or on the driver's connection) is published as soon as the
  driver says no transaction is open, at the latest before the next
  statement.  A statement that fails part-way is marked too: the rows written
  before the failure may be committed.
- What cannot be worked out (an error while reading a statement) counts
  as a write to every table.

The Session the connection works for (``after_begin``) is told too: a
transaction that has written reads around shared regions until it ends,
and its local cache is dropped, as it is whenever the connection's
transaction ends (a Session bound to a Connection carries on in the next).  :func:`~pyramid_sessioncache.invalidate_tables` declares writes
no connection sees; they are published when the Session commits.
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import Pool, SingletonThreadPool, StaticPool
from sqlalchemy.sql.elements import TextClause

from ... import _sqlalchemy, collecting, forks
from ..._weak import members
from ...storage.backends import local_session
from .. import info
from ..cache import live_caches
from . import schema, sqltext
from .reads import ALL_TABLES, ANY_TABLE, declared_tables
from .statements import is_ddl, written_tables

log = logging.getLogger(__name__)

#: ``Connection.info`` (kept with the DBAPI connection) keys.
_MARKS = "sessioncache.marks"
#: How many statements that wrote the connection (or called a function for its effect) has run (see :func:`writes_run`).
_WRITES_RUN = "sessioncache.writes_run"
_OWNERS = "sessioncache.owners"
#: How many statements seen here wrote on the connection; and when the
#: transaction began, that count and SQLite's count of the rows the DBAPI
#: connection had changed (see :func:`wrote_unseen`).
_WROTE_SEEN = "sessioncache.wrote_seen"
_WROTE_AT_BEGIN = "sessioncache.wrote_at_begin"
_CHANGES = "sessioncache.changes_at_begin"

#: Marked with the tables the application names (see :func:`~pyramid_sessioncache.invalidate_tables`)
#: in a connection's transaction: published as declared when it commits, which
#: manual invalidation does not ignore.
DECLARED = "!declared"

#: What each prepared transaction of the process wrote, by transaction id,
#: until it commits or rolls back; the oldest are forgotten past
#: :data:`_MAX_PREPARED` (a commit of an unknown one publishes every table).
_PREPARED: OrderedDict[str, frozenset[str]] = OrderedDict()
_MAX_PREPARED = 1024
#: What may be ``PREPARE TRANSACTION``, ``COMMIT PREPARED`` or ``ROLLBACK PREPARED`` sent as SQL.
_PREPARED_WORD = re.compile(r"prepare", re.I)
#: The transaction id of one (a string constant).
_GID = re.compile(r"\b(?:transaction|prepared)\s+'((?:[^']|'')*)'", re.I)


class _Marks:
    """The tables a connection's transaction wrote, per savepoint, and those it committed."""

    __slots__ = ("levels", "committed", "__weakref__")

    def __init__(self) -> None:
        #: ``[name, tables]`` per open transaction level, the outermost first.
        self.levels: list[list[Any]] = [[None, set()]]
        #: A two-phase commit's, published before the database committed; to publish again after.
        self.committed: set[str] = set()

    def pending(self) -> set[str]:
        """Everything the open transaction wrote, savepoints included."""
        return set().union(*(tables for _, tables in self.levels))


def install() -> None:
    """Listen to every engine's connections and every pool, once per process."""
    if event.contains(Engine, "after_cursor_execute", _executed):
        return
    event.listen(Engine, "after_cursor_execute", _executed)
    event.listen(Engine, "before_cursor_execute", _executing)
    event.listen(Engine, "handle_error", _failed)
    event.listen(Engine, "begin", _begun)
    event.listen(Engine, "begin_twophase", lambda conn, xid: _begun(conn))
    event.listen(Engine, "prepare_twophase", _prepared)
    event.listen(Engine, "engine_connect", _connected)
    event.listen(Engine, "commit", _committing)
    event.listen(Engine, "commit_twophase", lambda conn, xid, is_prepared: _committing(conn, twophase=True))
    event.listen(Engine, "rollback", _rolled_back)
    event.listen(Engine, "rollback_twophase", lambda conn, xid, is_prepared: _rolled_back(conn))
    event.listen(Engine, "savepoint", _savepoint)
    event.listen(Engine, "rollback_savepoint", _rolled_back_to)
    event.listen(Engine, "release_savepoint", _released)
    event.listen(Pool, "checkin", _checked_in)


def publish(tables: Iterable[str], again: bool = False, declared: bool = False) -> None:
    """Invalidate, in every cache of the process, the entries that read ``tables``.

    ``again``: the second publication of a commit's writes (not counted);
    ``declared``: tables the application named (see ``SessionCache.publish()``),
    as are those published with :data:`DECLARED`.
    """
    tables = frozenset(tables)
    if DECLARED in tables:
        tables, declared = tables - {DECLARED}, True
    if tables:
        for cache in live_caches():
            cache.publish(tables, again, declared)


def _marks(conn: Any) -> _Marks:
    found = conn.info.get(_MARKS)
    if found is None:
        found = conn.info[_MARKS] = _Marks()
        pool = conn.engine.pool
        if isinstance(pool, SHARING_POOLS):
            with _sharing_lock:
                _sharing.setdefault(pool, weakref.WeakSet()).add(found)
    return found


#: SQL text that may change the schema so as to unlink a table from what showed its rows.
_UNLINKS = re.compile(r"\b(?:drop|alter)\b", re.I)


def _executing(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
    if pending_on(conn) and not _transaction_open(conn):
        # Written, then committed on the driver's connection: this statement
        # may begin the next transaction (psycopg; SQLite's DML), whose
        # rollback must not forget what the last one committed.
        _ended_by_itself(conn)
    # DROP TABLE of a partition or a child, ALTER TABLE ... NO INHERIT: once
    # it has run, the catalog no longer says which parent showed the rows it
    # took away.  Have the catalog of before it at hand (read now if it is not).
    if conn.dialect.name != "postgresql":
        return
    compiled = context.compiled
    if not context.isddl and compiled is not None and not isinstance(getattr(compiled, "statement", None), TextClause):
        return  # a compiled SELECT or DML: no schema change
    if context.isddl or _UNLINKS.search(statement):
        try:
            schema.read_catalog(conn)
        except Exception:  # the statement's own error, if any, must reach the caller
            log.warning("could not read the catalog before a schema change", exc_info=True)


#: Pools that hand the same DBAPI connection to every checkout (of a
#: thread): every Session of the engine reads what another's open
#: transaction wrote (SQLite in memory).
SHARING_POOLS = (StaticPool, SingletonThreadPool)
#: Such pools -> the marks of their connections.
_sharing: weakref.WeakKeyDictionary[Any, weakref.WeakSet[_Marks]] = weakref.WeakKeyDictionary()
#: Held to add to, or to copy, a pool's marks: a SingletonThreadPool's
#: threads each add their connection's while others' look-ups read them
#: ("Set changed size during iteration" made the query raise).
_sharing_lock = forks.lock()


def pending_in_pool(engine: Any) -> bool:
    """Whether ``engine`` hands every Session a connection whose open transaction has written (see :data:`SHARING_POOLS`).

    Such a Session's query sees those uncommitted rows, before it has
    begun anything: no shared entry holds them.  Other pools give each
    Session a connection of its own, whose writes :func:`has_written` sees.
    """
    if not _sharing or not isinstance(engine, Engine):  # a Connection: has_written() reads its own marks
        return False
    with _sharing_lock:
        found = tuple(_sharing.get(engine.pool, ()))
    return any(tables for marks in found for _, tables in list(marks.levels))


def _executed(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
    textual = _textual(context)  # asked first: the SQL of a compiled statement is never searched for words
    if textual and _PREPARED_WORD.search(statement):
        _two_phase_sql(conn, statement)
    try:
        tables = written_tables(context, statement)
        if ALL_TABLES not in tables and schema.calls_writers(conn, statement):
            # A function of the database's own that writes, called by a SELECT,
            # or by DML (INSERT ... SELECT f(), UPDATE ... SET c = f()): it writes
            # more than the statement's own table.
            tables = frozenset({ALL_TABLES})
        elif not tables and schema.calls_effects(conn, statement):
            # One run for what it does (nextval(), a lock): no write, but what a hit would not do.
            conn.info[_WRITES_RUN] = conn.info.get(_WRITES_RUN, 0) + 1
        if tables and is_ddl(context, statement):
            # What the tables it names showed under before it ran (a partition
            # dropped, NO INHERIT: its parent no longer shows its rows), and after.
            before = schema.also_written(conn, tables)
            schema.schema_changed(conn, _transaction_open(conn))
            tables = before | schema.also_written(conn, tables)
        elif tables:
            tables = schema.also_written(conn, tables)
    except Exception:  # never let the cache break a write, nor miss one
        log.warning("could not tell what a statement writes; counting it as a write to every table", exc_info=True)
        tables = frozenset({ALL_TABLES})
    if tables:
        conn.info[_WROTE_SEEN] = conn.info.get(_WROTE_SEEN, 0) + 1  # see wrote_unseen()
        _mark(conn, tables)
    elif conn.info.get(_MARKS) is not None and not in_transaction(conn.connection.dbapi_connection):
        _ended_by_itself(conn)  # a COMMIT (or ROLLBACK) sent as SQL
    if textual and _ENDS_WORD.search(statement):
        ends = transaction_ends(statement)
        if ends:
            _ended_by_sql(conn, ends, tables)


#: What may end a transaction (or roll back to a savepoint) sent as SQL: see :func:`transaction_ends`.
_ENDS_WORD = re.compile(r"\b(?:commit|end|rollback|abort|prepare)\b", re.I)


def _textual(context: Any) -> bool:
    # SQL the application wrote: text(), exec_driver_sql(), and DDL() or a
    # construct of its own rendered by a @compiles function, which are
    # compiled but hold any SQL (DDL("COMMIT AND CHAIN")).
    compiled = context.compiled
    if compiled is None or context.isddl:
        return True
    statement = getattr(compiled, "statement", None)
    if isinstance(statement, TextClause):
        return True
    custom = _CUSTOM.get(type(statement))
    if custom is None:
        custom = _CUSTOM[type(statement)] = _sqlalchemy.custom_compiled(statement)
    return custom


#: Statement classes -> whether a ``@compiles`` function renders them (asked once per class).
_CUSTOM: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


#: A statement whose body, statements each ended by ``;``, its own ``END`` closes.
_OPENS_BODY = re.compile(r"create\b.*\b(?:trigger\b.*\bbegin|begin\s+atomic)\b", re.I | re.S)


@sqltext.per_text
def transaction_ends(statement: str) -> frozenset[str]:
    """How SQL text ends its transaction: none, or some of ``"commit"``, ``"rollback"``, ``"prepare"``.

    ``"commit"``: ``COMMIT``, ``END``; ``"rollback"``: ``ROLLBACK``,
    ``ABORT``, ``ROLLBACK TO SAVEPOINT``; ``"prepare"``: ``PREPARE
    TRANSACTION``.  ``COMMIT PREPARED`` and ``ROLLBACK PREPARED`` end
    another transaction.  The ``END`` that closes the body of a ``CREATE
    TRIGGER`` (SQLite) or of ``BEGIN ATOMIC`` (PostgreSQL) ends nothing.
    """
    found = set()
    for cleaned in sqltext.readings(statement):
        body = False
        for part in cleaned.statements():
            words = part.lower().split()
            if words[1:2] == ["prepared"]:
                continue
            if body and words[0] == "end":
                body = False
            elif _OPENS_BODY.match(part):
                body = words[-1] != "end"  # BEGIN ATOMIC END: an empty body, closed already
            elif words[0] in ("commit", "end"):
                found.add("commit")
            elif words[0] in ("rollback", "abort"):
                found.add("rollback")
            elif words[:2] == ["prepare", "transaction"]:
                found.add("prepare")
    return frozenset(found)


def _ended_by_sql(conn: Any, ends: frozenset[str], tables: frozenset[str]) -> None:
    # SQL text that ended the transaction (or rolled back to a savepoint) behind SQLAlchemy's back.
    _transaction_over(conn)
    if "commit" in ends and _transaction_open(conn):
        _committed_within(conn, tables)
    elif "rollback" in ends and pending_on(conn) and _transaction_open(conn):
        # A ROLLBACK TO SAVEPOINT undid writes SQLAlchemy saw no savepoint
        # end for: they stay marked (misses at worst), and what the Sessions
        # read since, over them, is no longer what they read now.
        _read_again(conn)


def _committed_within(conn: Any, tables: frozenset[str]) -> None:
    # A COMMIT sent as SQL after which a transaction is open again (COMMIT
    # AND CHAIN, "...; COMMIT; BEGIN; ..."): what was marked before it is
    # committed, whatever SQLAlchemy does next.  The statement's own tables
    # may come after the COMMIT: published now and kept for the next end.
    marks = conn.info.get(_MARKS)
    if marks is not None:
        pending = marks.pending()
        marks.levels = [[None, set(tables)]]
        publish(pending)


def _connected(conn: Any) -> None:
    _sqlalchemy.after_twophase_commit(conn.dialect, _twophase_committed)


def _remember_prepared(gid: str | None, tables: Iterable[str]) -> None:
    if gid is None:
        return  # its COMMIT PREPARED will not be known: every table then
    _PREPARED[gid] = frozenset(tables)
    _PREPARED.move_to_end(gid)
    while len(_PREPARED) > _MAX_PREPARED:
        _PREPARED.popitem(last=False)


def _prepared(conn: Any, xid: Any) -> None:
    """``prepare_twophase``: remember what the transaction wrote, for whoever commits it."""
    marks = conn.info.get(_MARKS)
    _remember_prepared(str(xid), marks.pending() if marks is not None else ())


def _twophase_committed(conn: Any, xid: Any, is_prepared: bool, recover: bool) -> None:
    """The database committed a two-phase transaction: publish what it wrote, again if it was published before."""
    known = _PREPARED.pop(str(xid), None)
    marks = conn.info.get(_MARKS)
    committed: set[str] = set()
    if marks is not None:
        committed, marks.committed = marks.committed, set()
    if committed:  # its own TwoPhaseTransaction: published before the commit already
        _committed_again(committed | (known or set()))
    elif known is not None:
        publish(known)
    elif is_prepared and recover:  # prepared by another process, or forgotten: it may have written anything
        publish({ALL_TABLES})


@sqltext.per_text
def _two_phase(statement: str) -> tuple[str, str | None] | None:
    """``(what, transaction id)`` of ``PREPARE TRANSACTION``, ``COMMIT PREPARED`` or ``ROLLBACK PREPARED`` SQL."""
    for cleaned in sqltext.readings(statement):
        for part in cleaned.statements():
            words = " ".join(part.lower().split()[:2])
            if words in ("prepare transaction", "commit prepared", "rollback prepared"):
                gids = _GID.findall(statement)
                return words, gids[0].replace("''", "'") if len(gids) == 1 else None
    return None


def _two_phase_sql(conn: Any, statement: str) -> None:
    found = _two_phase(statement)
    if found is None:
        return
    what, gid = found
    if what == "prepare transaction":  # the server's now: published when it commits
        marks = conn.info.get(_MARKS)
        _remember_prepared(gid, marks.pending() if marks is not None else ())
    elif what == "commit prepared":  # committed by now (never inside a transaction block)
        known = _PREPARED.pop(gid, None) if gid is not None else None
        publish({ALL_TABLES} if known is None else known)
    elif gid is not None:
        _PREPARED.pop(gid, None)


def _failed(context: Any) -> None:
    # A statement that failed part-way (an executemany, UPDATE OR FAIL) may
    # have written rows that the application still commits.
    conn = context.connection
    if conn is None or context.execution_context is None or conn.closed:
        return
    try:
        tables = written_tables(context.execution_context, context.statement or "")
    except Exception:
        tables = frozenset({ALL_TABLES})
    if tables and ALL_TABLES not in tables:
        try:
            tables = schema.also_written(conn, tables)
        except Exception:  # the failed statement's own error must reach the caller, not one of ours
            tables = frozenset({ALL_TABLES})
    if tables:
        _mark(conn, tables)


def _mark(conn: Any, tables: frozenset[str]) -> None:
    conn.info[_WRITES_RUN] = conn.info.get(_WRITES_RUN, 0) + 1
    for session in members(conn.info.get(_OWNERS, ())):
        written(session).update(tables)
    _read_again(conn)
    if _transaction_open(conn):
        _marks(conn).levels[-1][1].update(tables)
    else:  # the database committed it already
        _ended_by_itself(conn)
        publish(_committed_writes(conn, tables))


def _read_again(conn: Any) -> None:
    # What the database shows the Sessions working on ``conn`` changed:
    # their local entries are void.
    for session in members(conn.info.get(_OWNERS, ())):
        local_session.drop(session)
    _seen_by_every_session(conn)


def _transaction_over(conn: Any) -> None:
    # The database transaction of the Sessions working on ``conn`` ended.
    # One bound to the Connection carries on in the next, which shows what
    # other processes committed meanwhile (a new snapshot): what it read is
    # no longer what it reads now, and what the database said of the
    # transaction (its isolation level) is asked again.
    for session in members(conn.info.get(_OWNERS, ())):
        local_session.drop(session)
        session.info.pop(info.SNAPSHOTS, None)


def _ended_by_itself(conn: Any) -> None:
    # The driver's transaction ended without SQLAlchemy: publish what it had
    # marked (a rollback sent as SQL costs misses, never stale data).
    _transaction_over(conn)
    schema.schema_settled(conn.info, ended=True)
    marks = conn.info.get(_MARKS)
    if marks is not None:
        pending = marks.pending()
        marks.levels = [[None, set()]]
        publish(_committed_writes(conn, pending))


def _transaction_open(conn: Any) -> bool:
    """Whether ``conn``'s DBAPI connection has a transaction open; False for an invalidated connection."""
    try:
        return in_transaction(conn.connection.dbapi_connection)
    except Exception:
        return False


def in_transaction(dbapi_connection: Any) -> bool:
    """Whether the DBAPI connection has a transaction open (True when it cannot tell)."""
    status = getattr(dbapi_connection, "in_transaction", None)  # sqlite3
    if isinstance(status, bool):
        return status
    transaction_status = getattr(getattr(dbapi_connection, "info", None), "transaction_status", None)
    if transaction_status is not None:  # psycopg 3: IDLE is 0
        return int(transaction_status) != 0
    get_status = getattr(dbapi_connection, "get_transaction_status", None)
    if get_status is not None:  # psycopg2: TRANSACTION_STATUS_IDLE is 0
        return get_status() != 0
    return getattr(dbapi_connection, "autocommit", False) is not True


def _begun(conn: Any) -> None:
    _publish_committed(conn.info)
    if _transaction_open(conn):
        # Another Connection's transaction is open on this DBAPI connection
        # (a StaticPool's one connection, shared): its marks and Sessions stay.
        return
    conn.info.pop(_MARKS, None)
    conn.info[_WROTE_AT_BEGIN] = conn.info.get(_WROTE_SEEN, 0)  # see wrote_unseen()
    dbapi_connection = conn.connection.dbapi_connection
    changes = getattr(dbapi_connection, "total_changes", None)
    if changes is not None:  # sqlite3
        schema_version = _schema_version(conn) if _ddl_may_wait(dbapi_connection) else None
        conn.info[_CHANGES] = (changes, schema_version)
    schema.transaction_begins(conn)
    # Its Sessions stay until it goes back to the pool (_checked_in): one bound
    # to this Connection carries on in its next transaction, and must be told
    # of the writes there (its own Core DML included).


def _committing(conn: Any, twophase: bool = False) -> None:
    _transaction_over(conn)
    schema.schema_settled(conn.info, ended=True)
    marks = conn.info.get(_MARKS)
    if marks is None:
        return
    tables = marks.pending()
    marks.levels = [[None, set()]]
    if not tables:
        return
    publish(tables)  # entries stored before now are void
    if twophase:
        marks.committed |= tables  # published again at the next begin or check-in
    else:
        # ...and those a reader stores while the database commits, too.
        _sqlalchemy.after_dbapi_commit(conn, lambda: _committed_again(tables, conn))


def _committed_again(tables: Iterable[str], conn: Any = None) -> None:
    """Publish a commit's writes once more, now that the database has committed them.

    With ``conn``, the connection that committed them, closed over its
    database's schema as it is now (see ``schema.committed_writes()``),
    unless the commit failed, leaving its transaction open.
    """
    if conn is not None and not _transaction_open(conn):
        tables = _committed_writes(conn, tables)
    publish(tables, again=True)
    if ANY_TABLE in tables or ALL_TABLES in tables:
        # It changed the schema (or may have): catalogs read by others
        # before the commit show the schema of before.
        schema.forget_catalog()


def _committed_writes(conn: Any, tables: Iterable[str]) -> frozenset[str]:
    """``schema.committed_writes()``, which may count every table instead, keeping :data:`DECLARED`."""
    tables = frozenset(tables)
    return schema.committed_writes(conn, tables) | (tables & {DECLARED})


def _rolled_back(conn: Any) -> None:
    if conn.invalidated:
        # Its DBAPI connection went, with the transaction (a disconnect),
        # back to the pool: _checked_in() did what is to do; conn.info
        # would raise, and the rollback with it.
        return
    _transaction_over(conn)
    schema.schema_settled(conn.info, ended=True)
    marks = conn.info.get(_MARKS)
    if marks is not None:
        if marks.pending():
            if not _transaction_open(conn):
                # Ended before this rollback, which undoes nothing: committed
                # on the driver's connection itself, perhaps.
                _ended_by_itself(conn)
                return
            _read_again(conn)
        marks.levels = [[None, set()]]


def _seen_by_every_session(conn: Any) -> None:
    # On a connection every Session of the engine shares, a write (or its
    # rollback) changes what they all read now, whatever their transaction:
    # their local entries are void (shared regions: see pending_in_pool()).
    if isinstance(conn.engine.pool, SHARING_POOLS):
        for cache in live_caches():
            cache.void_local_entries()


def _savepoint(conn: Any, name: str) -> None:
    _marks(conn).levels.append([name, set()])


def _rolled_back_to(conn: Any, name: str, context: Any) -> None:
    if conn.invalidated:  # see _rolled_back()
        return
    if pending_on(conn) and not _transaction_open(conn):
        # Committed on the driver's connection, savepoint and all: this
        # rollback undoes nothing (and fails).
        _ended_by_itself(conn)
        return
    schema.schema_settled(conn.info, ended=False)
    marks = conn.info.get(_MARKS)
    if marks is not None:
        index = _level(marks, name)
        if any(tables for _, tables in marks.levels[index:]):
            _read_again(conn)
        del marks.levels[index:]


def _released(conn: Any, name: str, context: Any) -> None:
    marks = conn.info.get(_MARKS)
    if marks is not None:
        index = _level(marks, name)
        released = set().union(*(tables for _, tables in marks.levels[index:]))
        del marks.levels[index:]
        marks.levels[-1][1].update(released)


def _level(marks: _Marks, name: str) -> int:
    # SQLAlchemy names its savepoints after the ``savepoint`` event (which
    # gets None): a name not found is the innermost savepoint's.
    for index in range(len(marks.levels) - 1, 0, -1):
        if marks.levels[index][0] == name:
            return index
    return max(len(marks.levels) - 1, 1)


def _checked_in(dbapi_connection: Any, connection_record: Any) -> None:
    if connection_record is None:
        return
    found = connection_record.info
    # Its transaction ended (the pool's reset, or lost with the DBAPI
    # connection): so did what its Sessions read in it.
    for session in members(found.pop(_OWNERS, ())):
        local_session.drop(session)
    schema.schema_settled(found, ended=True)
    marks = found.pop(_MARKS, None)
    if marks is None:
        return
    committed, pending = marks.committed, marks.pending()

    def publishing() -> None:
        if committed:
            _committed_again(committed)
        # Written but neither committed nor rolled back through SQLAlchemy:
        # the pool's reset decided; publishing costs misses, never stale data.
        publish(pending)

    if collecting.in_collection():
        # A lost connection finalized by a garbage collection, perhaps while
        # this thread holds a lock publishing takes (a region's): published
        # by a thread of its own, which waits for it.
        threading.Thread(target=publishing, name="sessioncache-publish", daemon=True).start()
    else:
        publishing()


def _publish_committed(conn_info: dict) -> None:
    marks = conn_info.get(_MARKS)
    if marks is not None and marks.committed:
        committed, marks.committed = marks.committed, set()
        _committed_again(committed)


# The Session side ------------------------------------------------------------


def session_began(session: Any, transaction: Any, connection: Any) -> None:
    """``after_begin``: the connection now works for ``session`` too (loader Sessions aside).

    Every Session whose transaction uses the connection is told of each
    write on it, whoever makes it (two Sessions may share a Connection).
    What the connection's transaction already wrote (before the Session
    joined it: the cookiecutter's test fixtures, a Session bound to a
    Connection) counts as the Session's own writes.
    """
    if info.LOADER in session.info:
        return
    owners = connection.info.get(_OWNERS)
    if owners is None:
        owners = connection.info[_OWNERS] = weakref.WeakSet()
    owners.add(session)
    marks = connection.info.get(_MARKS)
    if marks is not None:
        pending = marks.pending()
        if pending:
            written(session).update(pending)


def written(session: Any) -> set[str]:
    """Return the set of tables the Session's current transaction wrote, marking that it wrote."""
    found = session.info.get(info.WRITTEN)
    if found is None:
        found = session.info[info.WRITTEN] = set()
    return found


def has_written(session: Any, bind: Any = None) -> bool:
    """Whether the Session's current transaction wrote anything.

    ``bind``: the Connection or Engine the Session runs a statement on.  A
    Session bound to a Connection whose transaction has written (a test's
    outer transaction, rolled back at its end; a savepoint an earlier
    ``Session.commit()`` released into it) counts as having written, even
    before its own transaction begins: none of it is committed.
    """
    if info.WRITTEN in session.info:
        return True
    if not isinstance(bind, Connection) or bind.closed or bind.invalidated:
        return False
    marks = bind.info.get(_MARKS)
    return marks is not None and any(tables for _, tables in marks.levels)


def pending_on(connection: Any) -> bool:
    """Whether the transaction of ``connection``'s DBAPI connection has written, not yet committed.

    Asked before a load that has not written itself (it would read around
    the shared regions): marks there are another Session's, on the same
    DBAPI connection (a ``StaticPool``), whose rows the load would see.
    """
    marks = connection.info.get(_MARKS)
    return marks is not None and any(tables for _, tables in marks.levels)


def wrote_unseen(connection: Any) -> bool:
    """Whether the transaction of ``connection``'s DBAPI connection may have written rows no statement seen here wrote.

    SQL sent on the driver's own connection
    (``session.connection().connection.cursor()``, psycopg's ``COPY ...
    FROM STDIN``) sends no event of SQLAlchemy's: what it writes is
    published by nobody, and a load in the same transaction reads it.
    Such rows must not be stored, since a rollback leaves them in no
    committed state.  The database tells: SQLite counts the rows each
    connection changes (``total_changes``) and the changes to its schema
    (``PRAGMA schema_version``), compared with their counts when the
    transaction began; PostgreSQL gives a transaction an id at its
    first write (asked on the driver's connection, so that no event
    counts it, and only once the transaction has begun).  Other
    databases: not known (False).

    Only asked of a transaction in which no statement seen here wrote:
    what those wrote, :func:`pending_on` and :func:`has_written` answer
    for, and once one has written (and was rolled back to a savepoint,
    as a test's fixture does) the database's answer no longer tells them
    apart.  On PostgreSQL a row lock (``with_for_update()``) gives the
    transaction its id too: a transaction that took one stores no miss
    after it, which costs queries, never stale rows.
    """
    dbapi_connection = connection.connection.dbapi_connection
    info = connection.info
    if not in_transaction(dbapi_connection) or info.get(_WROTE_SEEN, 0) != info.get(_WROTE_AT_BEGIN, 0):
        return False
    changes = getattr(dbapi_connection, "total_changes", None)
    if isinstance(changes, int):
        at_begin = info.get(_CHANGES)
        if at_begin is None:
            return False
        return changes != at_begin[0] or (at_begin[1] is not None and at_begin[1] != _schema_version(connection))
    if connection.dialect.name == "postgresql":
        return _transaction_id_assigned(dbapi_connection, connection.dialect.server_version_info or ())
    return False


def _ddl_may_wait(dbapi_connection: Any) -> bool:
    """Whether SQLite DDL sent on ``dbapi_connection`` may wait uncommitted in a transaction that changed no row.

    sqlite3's own transaction control begins a transaction before DML
    only: DDL before it commits at once, and DDL after it comes with
    changed rows.  A transaction begun otherwise (``BEGIN`` sent by the
    application, ``isolation_level=None``; Python 3.12's ``autocommit=False``)
    may hold DDL alone, which only the schema's version tells (a query,
    so asked of those connections only).
    """
    return (
        getattr(dbapi_connection, "isolation_level", "") is None
        or getattr(dbapi_connection, "autocommit", None) is False
    )


def _schema_version(conn: Any) -> Any:
    # DDL changes no row: SQLite's counts of the changes to each schema tell it.  Raises nothing (None).
    try:
        return schema.sqlite_schema_version(conn)
    except Exception:
        return None


def _transaction_id_assigned(dbapi_connection: Any, version: tuple) -> bool:
    # An error would abort the application's transaction: the function is
    # chosen by the server's version, and anything unexpected counts as a write.
    if version >= (13,):
        sql = "SELECT pg_current_xact_id_if_assigned() IS NOT NULL"
    elif version >= (10,):
        sql = "SELECT txid_current_if_assigned() IS NOT NULL"
    else:
        return True
    try:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(sql)
            return bool(cursor.fetchone()[0])
        finally:
            cursor.close()
    except Exception:
        return True


def writes_run(connection: Any) -> int:
    """How many statements that wrote ``connection``'s DBAPI connection has run, or that called a function for its effect.

    Read before and after a statement runs: whether it wrote (a SELECT
    calling a function of the database's own that writes), or did what a
    hit would not do (one calling ``nextval()`` or ``currval()``): its
    result is stored nowhere.
    """
    return connection.info.get(_WRITES_RUN, 0)


def invalidate_tables(session: Any, *tables: Any) -> None:
    """Invalidate the entries that read ``tables`` when ``session``'s transaction commits.

    For writes no connection of the process sees: another program's, or a
    table changed behind the database's back.  ``tables`` are table
    names, ``Table`` objects or mapped classes; anything else raises
    :class:`~pyramid_sessioncache.InvalidOptionError`.  With no table, every entry
    of every shared region.  Like zope.sqlalchemy's ``mark_changed()``,
    call it after such a write; in a Pyramid request,
    ``request.sessioncache.mark_changed()`` does both.  The Session's local
    cache is dropped now, and the Session reads around the shared regions
    until its transaction ends.  A Session joined to a Connection's
    transaction (bound to one in ``engine.begin()``) leaves them to that
    transaction too, which may commit after the Session is closed.
    """
    declared = set(declared_tables(tables)) or {ALL_TABLES}
    written(session).update(declared)
    session.info.setdefault(info.DECLARED, set()).update(declared)
    local_session.drop(session)
    _left_to_connections(session, declared)


def committed(session: Any) -> None:
    """``after_commit``: publish what the Session declared; forget what it wrote.

    SQLAlchemy sends ``after_commit`` for a savepoint's release too: nothing
    is committed then, and what the transaction wrote and declared is kept
    for its real end.
    """
    if session.in_nested_transaction():  # the committing savepoint is still the Session's transaction
        return
    session.info.pop(info.WRITTEN, None)
    declared = session.info.pop(info.DECLARED, None)
    if declared:
        publish(declared, declared=True)


def forget(session: Any) -> None:
    """Forget what the Session's transaction wrote and declared (it ended without committing)."""
    session.info.pop(info.WRITTEN, None)
    session.info.pop(info.DECLARED, None)


def _left_to_connections(session: Any, declared: set[str]) -> None:
    # A Session joined to a Connection's transaction (bound to one in
    # ``engine.begin()``) commits nothing itself, and may be closed without
    # committing: what it declared is that transaction's, published when it
    # commits, forgotten if it rolls back.
    connections = _sqlalchemy.transaction_connections(session.get_transaction())
    if isinstance(session.bind, Connection):  # joined even if the Session ran nothing on it yet
        connections.append(session.bind)
    for conn in connections:
        if not conn.closed and conn.in_transaction():
            _mark(conn, frozenset({*declared, DECLARED}))
