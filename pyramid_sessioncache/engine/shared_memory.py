"""SQLite databases in memory that connections share, and how long each lives.

``file:NAME?mode=memory&cache=shared`` (``file::memory:?cache=shared``,
``file:/NAME?vfs=memdb``) opens a database in memory that every
connection of the process opening that name sees.  It has no file, like
the database each ``sqlite://`` connection has to itself, but its
connections must share their cache entries: :func:`token` gives them one
key token.

Such a database vanishes when its last connection closes: a connection
opened later under the same name opens a new, empty one, which anything
may fill (another engine, ``sqlite3`` itself) with other rows under the
same table names.  So a name's token lives only while a connection
given it is open.  A connection opened while one is still open sees the
same database and gets the same token; one opened when none is gets a
new token, and misses what was stored for a database that may be gone.
Whether a connection is open is asked of the driver's connection itself,
not counted from events, so a connection closed in any way (by the pool,
invalidated, by the application on the driver) is never taken for open.
Connections this module was not given (opened by other code) may keep a
database alive longer: that costs misses, never another database's rows.

The name is read from the arguments ``create_engine()`` gives the driver
(see :func:`shared_name`); whatever SQLite could read otherwise than
here is not known to be shared, and its connections stay keyed apart.
"""

from __future__ import annotations

import secrets
import sqlite3
import weakref
from typing import Any

from .. import _sqlalchemy, forks
from .._weak import members

#: ``Connection.info`` key: the :class:`_Holder` of a connection given a token.
_HOLDER = "sessioncache.shared_memory_holder"


class _Holder:
    """The driver's connection, kept in the connection's ``info``: the registry holds it weakly.

    ``sqlite3.Connection`` takes no weak reference.  The holder lives as
    long as the pool keeps the connection's ``info`` (it clears it when it
    opens another), so it never keeps a connection open, nor alive longer
    than its pool entry does.
    """

    __slots__ = ("__weakref__", "connection")

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection


class _Life:
    """One life of a shared database: its token, and the connections given it."""

    __slots__ = ("holders", "token")

    def __init__(self) -> None:
        self.token = secrets.token_hex(16)
        self.holders: weakref.WeakSet[_Holder] = weakref.WeakSet()

    def alive(self) -> bool:
        return any(_open(holder.connection) for holder in members(self.holders))


#: The current life of each shared database seen, by :func:`shared_name`.
_lives: dict[tuple[str, str], _Life] = {}
_lock = forks.lock()


def shared_name(engine: Any) -> tuple[str, str] | None:
    """The name of the shared database in memory ``engine``'s connections open, or None.

    ``("", path)`` for SQLite's shared cache (``file:NAME?mode=memory&cache=shared``,
    ``file::memory:?cache=shared``), ``("memdb", path)`` for
    ``file:/NAME?vfs=memdb``: every connection of the process that opens
    that name sees one database.  None when the database is not one of
    those, or cannot be known to be: an engine made with ``creator=`` or
    given a ``do_connect`` listener, a driver other than ``sqlite3``, a URI
    with ``%`` escapes, a fragment, a host, or ``mode``, ``cache`` or
    ``vfs`` given twice (SQLite reads the last).  The name is taken as
    written: SQLite tells names apart by case, and two spellings of one
    database are only kept apart (misses).
    """
    if engine.dialect.driver != "pysqlite" or engine.dialect.dispatch.do_connect:
        return None
    arguments = _sqlalchemy.connect_arguments(engine.pool)
    if arguments is None:
        return None
    args, kwargs = arguments
    if len(args) != 1 or not isinstance(args[0], str) or not kwargs.get("uri") or "database" in kwargs:
        return None
    filename = args[0]
    if not filename.startswith("file:") or "%" in filename or "#" in filename:
        return None
    path, _, query = filename[len("file:") :].partition("?")
    if not path or path.startswith("//"):
        return None
    given = [part.partition("=") for part in query.split("&") if part]
    names = [name for name, _, _ in given]
    if any(names.count(name) > 1 for name in ("mode", "cache", "vfs")):
        return None
    values = {name: value for name, _, value in given}
    vfs, cache, mode = values.get("vfs"), values.get("cache"), values.get("mode")
    if vfs is None and cache == "shared" and (mode == "memory" or (mode is None and path == ":memory:")):
        return ("", path)
    if vfs == "memdb" and path.startswith("/") and mode is None and cache in (None, "shared"):
        return ("memdb", path)
    return None


def token(name: tuple[str, str], dbapi_connection: Any, info: dict) -> str | None:
    """The key token of the shared database ``name`` that ``dbapi_connection`` has open; None if unknown.

    The token of the database's current life when a connection given it
    is still open (so ``dbapi_connection`` opened that very database),
    else a new one.  ``info``, the connection's ``info``, keeps it counted
    while it lives.
    """
    if not isinstance(dbapi_connection, sqlite3.Connection) or not _open(dbapi_connection):
        return None
    holder = _Holder(dbapi_connection)
    with _lock:
        life = _lives.get(name)
        if life is None or not life.alive():
            for gone in [key for key, other in _lives.items() if not other.holders]:
                del _lives[gone]  # names whose connections are all gone
            life = _lives[name] = _Life()
        life.holders.add(holder)
    info[_HOLDER] = holder
    return life.token


def _open(connection: sqlite3.Connection) -> bool:
    try:
        connection.total_changes  # noqa: B018  raises once closed, from any thread
    except Exception:
        return False
    return True
