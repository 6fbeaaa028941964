"""What a connection's own settings make of a query: part of its key.

Rows can depend on settings of the database session rather than on the
statement: ``SET search_path`` (a schema per tenant), ``SET ROLE`` and
``set_config('app.tenant', ...)`` read by a row-level security policy.
A statement executed after ``SET LOCAL search_path TO tenant_b`` must not
be served the entry stored under ``tenant_a``.

Every statement a connection of the process runs is seen
(``after_cursor_execute``); those that change a setting (``SET``,
``RESET``, ``set_config(...)``) are kept per DBAPI connection: the
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

import re
import weakref
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

from .. import _sqlalchemy

#: ``Connection.info`` keys (kept with the DBAPI connection).
_SESSION = "sessioncache.settings"
_LOCAL = "sessioncache.local_settings"
_UNKNOWN = "sessioncache.settings_unknown"

#: A statement of SQL text that changes a setting: SET/RESET first, or a set_config() call.
_CHANGES = re.compile(r"(?:^|;)\s*(?:set|reset)\b|\bset_config\s*\(", re.I)
_SET = re.compile(r"^\s*set\s+(?:(?P<scope>session|local)\s+)?(?P<rest>.*)$", re.I | re.S)
_TWO_WORDS = ("session authorization", "time zone", "transaction isolation")
_SET_CONFIG = re.compile(r"set_config\s*\(\s*'(?P<name>[^']*)'", re.I)
_LOCAL_CONFIG = re.compile(r"set_config\s*\([^)]*,\s*true\s*\)", re.I)

#: Pools some of whose connections have session settings: their look-ups check out a connection first.
_POOLS_WITH_SETTINGS: weakref.WeakSet[Any] = weakref.WeakSet()

#: At most this many settings per connection are told apart; past it, its look-ups are not cached.
_MAX_SETTINGS = 64


def install() -> None:
    """Listen to every engine's statements and transactions, once per process."""
    if not event.contains(Engine, "after_cursor_execute", _executed):
        event.listen(Engine, "after_cursor_execute", _executed)
        event.listen(Engine, "commit", _ended)
        event.listen(Engine, "rollback", _rolled_back)


def _executed(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
    if not _CHANGES.search(statement):
        return
    info = conn.info
    name, local = _setting(statement)
    value = f"{statement}|{parameters!r}"
    in_transaction = conn.in_transaction()
    if local or in_transaction:
        info.setdefault(_LOCAL, {})[name] = value
    if not local:
        settings = info.setdefault(_SESSION, {})
        settings[name] = value
        if in_transaction:
            info.setdefault(_LOCAL, {})[("session", name)] = value  # undone by a rollback
        _POOLS_WITH_SETTINGS.add(conn.engine.pool)
        if len(settings) > _MAX_SETTINGS:
            info[_UNKNOWN] = True


def _setting(statement: str) -> tuple[str, bool]:
    """The name of the setting ``statement`` changes (its text when not understood), and whether only locally."""
    found = _SET.match(statement)
    if found is not None:
        rest = found.group("rest").strip().lower()
        name = next((words for words in _TWO_WORDS if rest.startswith(words)), rest.split(None, 1)[0] if rest else "")
        return name, (found.group("scope") or "").lower() == "local"
    config = _SET_CONFIG.search(statement)
    if config is not None:
        return config.group("name").lower(), _LOCAL_CONFIG.search(statement) is not None
    return statement, False  # RESET, several statements: as a whole


def _ended(conn: Any) -> None:
    conn.info.pop(_LOCAL, None)


def _rolled_back(conn: Any) -> None:
    local = conn.info.pop(_LOCAL, None)
    if local and any(isinstance(name, tuple) for name in local):
        # A session setting made in this transaction: PostgreSQL undoes it
        # at a rollback, other databases keep it.  Not told apart from here.
        conn.info[_UNKNOWN] = True


def state_text(session: Any, bind_arguments: dict, bind: Any) -> str | None:
    """The settings the statement's connection runs with, as key text: "" for none, None when unknown.

    Begins the Session's transaction first when its settings would be made
    then (see the module's docstring).
    """
    connection = _sqlalchemy.transaction_connection(session, bind)
    if connection is None:
        if not (_sets_at_begin(session) or _pool_of(bind) in _POOLS_WITH_SETTINGS):
            return ""
        connection = session.connection(bind_arguments=dict(bind_arguments))
    info = connection.info
    if info.get(_UNKNOWN):
        return None
    settings = {**info.get(_SESSION, {}), **{k: v for k, v in info.get(_LOCAL, {}).items() if not isinstance(k, tuple)}}
    return "|".join(f"{name}={settings[name]}" for name in sorted(settings)) if settings else ""


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
