"""Loading a shared region's miss: the rows the database returns, as plain data."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import ORMExecuteState, Session

from .. import _sqlalchemy
from . import info
from .invalidation.reads import executed_tables, record_tables, statement_tables
from .values import CachedRows

#: Isolation levels whose snapshot may predate the versions a query reads.
SNAPSHOT_LEVELS = frozenset({"REPEATABLE READ", "SERIALIZABLE", "SNAPSHOT"})


def load(state: ORMExecuteState, connection: Any) -> CachedRows:
    """Run the statement of ``state`` in a fresh Session on the caller's ``connection``.

    The fresh Session's objects hold exactly what the database returned in
    the caller's transaction, whatever the caller's Session has in memory.
    The value records the tables the load read: those of every statement
    executed on the connection while it ran (eager loads, column
    properties, loader criteria...), and those of the objects it built.
    """
    # The statement has been through the caller's listeners: it runs
    # without them.  The relationship loads it makes go through those on the
    # Session class, with the caller's info as they would have seen it (the
    # add-on's own keys stay behind).
    loader_info = {key: value for key, value in state.session.info.items() if not info.own_key(key)}
    loader_info[info.LOADER] = True
    loader = Session(bind=connection, info=loader_info, autoflush=False, expire_on_commit=False)
    read: set[str] = set()

    def executing(conn: Any, cursor: Any, statement: Any, parameters: Any, context: Any, executemany: bool) -> None:
        read.update(executed_tables(context.compiled))

    event.listen(connection, "before_cursor_execute", executing)
    try:
        result = _sqlalchemy.execute_without_listeners(
            loader, state.statement, state.parameters, state.local_execution_options
        )
        value = CachedRows.from_result(result)
    finally:
        event.remove(connection, "before_cursor_execute", executing)
        loader.close()
    value.tables = frozenset(read | statement_tables(state.statement) | record_tables(value))
    return value


def reads_a_snapshot(connection: Any) -> bool:
    """Whether ``connection``'s transaction may read from a snapshot older than now.

    Under REPEATABLE READ or SERIALIZABLE a transaction reads from a
    snapshot that can be older than the versions read just now; storing
    its result could tag old rows with new versions.  pysqlite starts no
    transaction for a SELECT, so SQLite reads the latest data regardless.
    """
    if connection.dialect.name == "sqlite":
        return False
    level = connection.get_execution_options().get("isolation_level") or connection.default_isolation_level
    return str(level).upper() in SNAPSHOT_LEVELS
