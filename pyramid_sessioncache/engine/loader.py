"""Loading a shared region's miss: the rows the database returns, as plain data."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import ORMExecuteState, Session, instrumentation

from .. import _sqlalchemy
from . import as_loaded, info
from .invalidation import schema, writes
from .invalidation.reads import ANY_TABLE, executed_tables, record_tables, statement_tables
from .invalidation.writes import in_transaction
from .values import CachedRows

#: Isolation levels at which a transaction reads from the snapshot of its first statement.
SNAPSHOT_LEVELS = frozenset({"REPEATABLE READ", "SERIALIZABLE", "SNAPSHOT"})


#: Connection -> the tables its statements read, while a load runs on it.
_READING: dict[Any, set[str]] = {}


def install() -> None:
    """Listen to the statements of every engine's connections, once per process.

    Once rather than per load: adding and removing a listener on the
    connection cost a load more than reading the tables of what it ran.
    """
    if not event.contains(Engine, "before_cursor_execute", _executing):
        event.listen(Engine, "before_cursor_execute", _executing)


def _executing(conn: Any, cursor: Any, statement: Any, parameters: Any, context: Any, executemany: bool) -> None:
    if _READING:  # nothing to do unless a load is running
        read = _READING.get(conn)
        if read is not None:
            read.update(executed_tables(context.compiled))
            if schema.calls_routines(conn, statement):  # a function of the database's own may read anything
                read.add(ANY_TABLE)


def load(
    state: ORMExecuteState, connection: Any, named: frozenset[str] | None = None, instances: list | None = None
) -> CachedRows:
    """Run the statement of ``state`` in a fresh Session on the caller's ``connection``.

    The fresh Session's objects hold exactly what the database returned in
    the caller's transaction, whatever the caller's Session has in memory.
    The value records the tables the load read: those of every statement
    executed on the connection while it ran (eager loads, column
    properties, loader criteria...), those of the objects it built, and
    ``named``: those the statement names, which the caller may know
    already for its shape (default: read from the statement).
    ``instances`` receives the objects built, detached (see
    ``CachedRows.from_result()``).
    """
    # The statement has been through the caller's listeners: it runs
    # without them.  The relationship loads it makes go through those on the
    # Session class, with the caller's info as they would have seen it (the
    # add-on's own keys stay behind).
    # Copied in one step first: on a connection every thread's Sessions share
    # (StaticPool), another thread's write or commit changes this Session's
    # info (writes.py), which would break an iteration.
    given = {key: value for key, value in state.session.info.copy().items() if not info.own_key(key)}
    loader_info = {**given, info.LOADER: True}
    read: set[str] = set()
    options: dict[str, Any] = {"info": loader_info, "autoflush": False, "expire_on_commit": False}
    if _sqlalchemy.routes_binds(state.session):
        loader: Session = _RoutedLoader(state.session, connection, state.statement, read, **options)
    else:
        loader = Session(bind=connection, **options)
    outer = _READING.get(connection)  # a load within a load (a listener's query): both record
    _READING[connection] = read  # see install(), which the ORM hook's install() calls
    try:
        result = _sqlalchemy.execute_without_listeners(
            loader, state.statement, state.parameters, state.local_execution_options
        )
        value = CachedRows.from_result(result, instances)
        if instances and _kept_to_itself(loader, instances, given):
            instances.clear()  # the caller's Session builds its own, and their listeners act on it
        if isinstance(loader, _RoutedLoader) and not loader.others_committed():
            value.storable = False
    finally:
        if outer is None:
            del _READING[connection]
        else:
            outer.update(read)
            _READING[connection] = outer
        loader.close()
        if isinstance(loader, _RoutedLoader):
            loader.stop_reading()
    if named is None:
        named = statement_tables(state.statement)
    value.tables = frozenset(read | named | record_tables(value))
    return value


def _kept_to_itself(loader: Session, handed: list, given: dict) -> bool:
    """Whether the objects of ``loader`` must stay its own, rather than be ``handed`` to the caller's Session.

    ``given``: the caller's ``info`` the loader was given (the add-on's keys aside).

    The loader's objects are its own while they load.  A ``load`` listener
    of their class (a reconstructor too) ran with the loader as their
    Session, and may have kept it (``object_session(target)``,
    ``context.session``), added or read objects there, or noted in its
    ``info``: all in a Session then closed.  The application's listeners
    for ``loaded_as_persistent`` or ``persistent_to_detached`` on every
    Session would see the very objects the caller gets enter the loader
    and leave it.  And whatever else left the loader holding more than it
    hands over, or with changes or ``info`` of its own, means the same.
    Run uncached, all of that happens in the caller's Session: so then the
    caller's Session builds objects of its own from the entry
    (``hydrate.objects_of()``), whose ``load`` events act on it.
    """
    if loader.dispatch.loaded_as_persistent or loader.dispatch.persistent_to_detached:
        return True
    if any(as_loaded.listened(instrumentation.manager_of_class(cls)) for cls in {type(obj) for obj in handed}):
        return True
    if loader.new or loader.dirty or loader.deleted or len(loader.identity_map) != len(handed):
        return True
    # The add-on's own keys (the loader's flag, what its transaction did) aside: the application's.
    left = {key: value for key, value in loader.info.items() if not info.own_key(key)}
    return len(left) != len(given) or any(left.get(key, left) is not value for key, value in given.items())


class _RoutedLoader(Session):
    """A loader for a Session whose loads may run on several binds (``Session(binds=...)``, routing).

    Each statement runs where the caller's Session would run it, on the
    caller's connection for that bind (``Session.connection()``, which
    asks the caller's ``get_bind()``): an eager load of a class bound to
    another database reads that database, in the caller's transaction.
    The tables read on those connections are recorded with the load's.
    """

    def __init__(self, caller: Session, connection: Any, statement: Any, read: set[str], **options: Any) -> None:
        super().__init__(bind=connection, **options)
        self._caller = caller
        self._connection = connection
        self._statement = statement
        self._read = read
        self._others: list[Any] = []
        #: Each other connection a load ran on -> whether it was fit to store from
        #: when first used, and how many writing statements it had run then.
        self._used: dict[Any, tuple[bool, int]] = {}

    def get_bind(self, mapper: Any = None, *, clause: Any = None, bind: Any = None, **kw: Any) -> Any:
        if bind is not None:
            return bind
        if clause is self._statement:  # the statement itself: where the caller runs it (its bind_arguments too)
            return self._connection
        connection = self._caller.connection(bind_arguments={"mapper": mapper, "clause": clause, **kw})
        if connection is not self._connection and connection not in self._used:
            # Asked before its first load runs there, as of the statement's own
            # connection before the versions are read (they were read already).
            self._used[connection] = (not must_not_store(self._caller, connection), writes.writes_run(connection))
        if connection not in _READING:
            _READING[connection] = self._read
            self._others.append(connection)
        return connection

    def others_committed(self) -> bool:
        """Whether what the loads on other connections than the statement's read is committed, and current.

        An eager load of a class bound elsewhere runs on the caller's
        connection for that bind, whose transaction may read an older
        snapshot or rows it wrote itself, may have written while loading
        (a function of the database's own), or may read a standby: each
        makes the whole result unfit to store, as it would on the
        statement's own connection (see ``hook.py``).
        """
        return all(
            fit and writes.writes_run(connection) == run and not reads_a_standby(connection)
            for connection, (fit, run) in self._used.items()
        )

    def stop_reading(self) -> None:
        """Stop recording the tables read on the other connections."""
        for connection in self._others:
            _READING.pop(connection, None)


def must_not_store(session: Session, connection: Any) -> bool:
    """Whether what a load on ``connection`` reads may be rows no committed state holds.

    An older snapshot (:func:`reads_a_snapshot`); another Session's
    uncommitted writes on the same DBAPI connection (a ``StaticPool``'s
    one connection, shared by every Session), or those of the transaction
    of a Connection the Session is bound to; a connection that reads
    uncommitted rows (SQLite's ``read_uncommitted`` in shared-cache mode,
    ``READ UNCOMMITTED``); a transaction that wrote on the driver's own
    connection (:func:`~.invalidation.writes.wrote_unseen`).  The result is
    still returned; it is not stored.
    """
    known = _known(session)
    return (
        reads_a_snapshot(connection, known)
        or writes.pending_on(connection)
        or reads_uncommitted(connection, known)
        or writes.wrote_unseen(connection)
    )


def _known(session: Session) -> dict:
    # What the database said of this transaction's connections, kept as long as the transaction.
    known = session.info.get(info.SNAPSHOTS)
    if known is None:
        known = session.info[info.SNAPSHOTS] = {}
    return known


def reads_a_snapshot(connection: Any, known: dict[Any, bool] | None = None) -> bool:
    """Whether the next query on ``connection`` may read from a snapshot older than now.

    Asked before a miss reads the versions of its tables, with nothing run
    on the connection in between: a result read from an older snapshot,
    tagged with those versions, would be served as current after the
    commits the snapshot does not show.

    - The database transaction has not begun (the driver says so): the
      query begins it, and its snapshot is taken then, after the versions
      were read, whatever the isolation level.
    - Begun, on SQLite: a read transaction in WAL mode keeps the snapshot
      of its first read; in the rollback-journal modes, what it has read
      is locked against writers, so nothing it reads is older than now.
    - Begun elsewhere: the transaction's own level, asked of the database
      (``Connection.get_isolation_level()``, which sees ``SET TRANSACTION``
      sent as SQL too); at REPEATABLE READ, SERIALIZABLE or SNAPSHOT the
      transaction keeps the snapshot of its first statement.

    Once the database transaction has begun the answer holds until it
    ends: ``known``, a dictionary kept as long as the transaction, keeps
    it per Connection, so that the database is asked once.
    """
    if not in_transaction(connection.connection.dbapi_connection):
        return False
    if known is not None and connection in known:
        return known[connection]
    if connection.dialect.name == "sqlite":
        answer = str(_pragma(connection, "journal_mode")).lower() == "wal"
    else:
        try:
            answer = str(connection.get_isolation_level()).upper() in SNAPSHOT_LEVELS
        except NotImplementedError:  # a dialect that cannot tell: assume the worst
            answer = True
    if known is not None:
        known[connection] = answer
    return answer


#: ``Connection.info`` (kept with the DBAPI connection): whether the server said it is a standby.
_STANDBY = "sessioncache.standby"


def reads_a_standby(connection: Any) -> bool:
    """Whether ``connection`` reads a PostgreSQL hot standby, which shows a commit only once it has replayed it.

    A commit is published when the primary commits: a standby that has
    not replayed it yet returns the rows before it, which would be stored
    under the versions that commit bumped.  So nothing read on a standby
    is stored (its reads may still be served entries stored from the
    primary, which are no older).  Asked after the load (the question may
    be a query, which must not take a ``REPEATABLE READ`` snapshot before
    the versions are read): the server's ``in_hot_standby`` (PostgreSQL
    14+, reported at connection time and on promotion), else
    ``pg_is_in_recovery()``, once per DBAPI connection.
    """
    if connection.dialect.name != "postgresql":
        return False
    dbapi_connection = connection.connection.dbapi_connection
    reported = _parameter_status(dbapi_connection, "in_hot_standby")
    if reported is not None:
        return str(reported).lower() == "on"
    found = connection.info.get(_STANDBY)
    if found is None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("SELECT pg_is_in_recovery()")
            found = connection.info[_STANDBY] = bool(cursor.fetchone()[0])
        finally:
            cursor.close()
    return found


def _parameter_status(dbapi_connection: Any, name: str) -> Any:
    info = getattr(dbapi_connection, "info", None)  # psycopg 3
    if info is not None and hasattr(info, "parameter_status"):
        return info.parameter_status(name)
    get = getattr(dbapi_connection, "get_parameter_status", None)  # psycopg2
    return get(name) if get is not None else None


def reads_uncommitted(connection: Any, known: dict[Any, Any] | None = None) -> bool:
    """Whether queries on ``connection`` may read other transactions' uncommitted rows.

    SQLite's ``PRAGMA read_uncommitted`` (it matters in shared-cache mode;
    it can be turned on at any time, so it is asked before every load), or
    a transaction at ``READ UNCOMMITTED`` where the database honours it
    (PostgreSQL reads committed rows at that level; asked once per
    transaction, in ``known``).
    """
    dialect = connection.dialect.name
    if dialect == "sqlite":
        return bool(_pragma(connection, "read_uncommitted"))
    if dialect == "postgresql":
        return False
    marker = (connection, "uncommitted")
    if known is not None and marker in known:
        return bool(known[marker])
    try:
        answer = str(connection.get_isolation_level()).upper() == "READ UNCOMMITTED"
    except NotImplementedError:
        answer = False
    if known is not None:
        known[marker] = answer
    return answer


def _pragma(connection: Any, name: str) -> Any:
    # On the DBAPI connection: the add-on's own question, not the application's SQL.
    cursor = connection.connection.dbapi_connection.cursor()
    try:
        return cursor.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        cursor.close()
