"""Counting the SQL statements of each request, for the demo's pages.

An engine ``before_cursor_execute`` listener appends every statement to
``request.sql_log`` of the request being served on this thread (found with
:func:`pyramid.threadlocal.get_current_request`).  Statements run outside a
request (the seed at start-up) are not counted.
"""

from __future__ import annotations

from typing import Any

from pyramid.threadlocal import get_current_request
from sqlalchemy import Engine, event


class SQLLog:
    """The SQL statements one request has sent to the database so far."""

    def __init__(self, request: Any = None) -> None:
        self.statements: list[str] = []

    def __len__(self) -> int:
        return len(self.statements)

    def since(self, mark: int) -> list[str]:
        """Return the statements sent after the first ``mark`` ones."""
        return self.statements[mark:]


def _record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
    request = get_current_request()
    # A request of another application on this thread has no sql_log.
    log = getattr(request, "sql_log", None)
    if isinstance(log, SQLLog):
        log.statements.append(statement)


def watch(engine: Engine) -> None:
    """Count the statements ``engine`` runs into the current request's ``sql_log``."""
    if not event.contains(engine, "before_cursor_execute", _record):
        event.listen(engine, "before_cursor_execute", _record)


def includeme(config: Any) -> None:
    """Add ``request.sql_log``, a :class:`SQLLog`."""
    config.add_request_method(SQLLog, "sql_log", reify=True)
