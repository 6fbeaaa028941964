"""Every committed write of any client, on PostgreSQL: statement triggers and LISTEN/NOTIFY.

An opt-in mode for writes no connection of this process sees: ``psql``,
another application, a program in another language, a raw DBAPI cursor.
:func:`install_triggers` puts a statement-level ``AFTER INSERT OR UPDATE
OR DELETE OR TRUNCATE`` trigger on every table of a schema, enabled
``ALWAYS`` (it fires under ``session_replication_role = replica`` too, as
a bulk load or a logical-replication subscriber writes); each calls
``pg_notify(channel, table name)``.  A :class:`Listener` holds one
connection that ``LISTEN``\\ s on the channel, in a thread of its own, and
hands the names of the tables written to a callback, which invalidates
what read them (:meth:`~pyramid_sessioncache.SessionCache.publish`).

What it sees.  NOTIFY is transactional: notifications are delivered only
when the writing transaction commits, once per table and transaction
however many statements wrote it, and a rolled-back transaction (or
savepoint) sends nothing.  Payloads are bare table names, which the
listener hands on as :func:`~.reads.version_name` spells them (lower
case; what follows a dot the name holds).  A write
to a table also notifies the other names its rows show under, those an
entry may have read them by: the ancestors of a partition (or of a
table that ``INHERITS``), and the views over the table or them,
transitively.  The database's own writes fire the triggers of the tables
they change: a foreign key's ``ON DELETE CASCADE``, a ``TRUNCATE`` of a
partitioned table, a write through an updatable view.  A notification
whose payload is empty or ``*`` (``NOTIFY sessioncache`` in ``psql``)
names every table (:data:`~.reads.ALL_TABLES`).

What it costs.

- Each writing statement runs one small PL/pgSQL function.
- At commit, PostgreSQL serializes the commits of all transactions that
  notified, database-wide, on one lock held until the commit record is
  flushed: writers that committed in parallel now commit one after the
  other, and group commit no longer helps them.  Measured with
  ``benchmarks/notify_window.py`` (4 writers, each on a table of its
  own): 3600-3900 commits a second without the triggers, 2200-2600 with
  them; in a run where the disk flushed slower, 1500 against 500.  A
  single writer's commit costs about the same.
- One connection per listening process, idle between notifications.
- With shared regions, every listening process bumps the versions of
  every table written: one listener is enough for them, more multiply
  the backend writes, not the correctness.

Limits.

- Tables (and partitions) created after :func:`install_triggers` notify
  nothing until it runs again, and what a table notifies is what it
  showed under then: run it again after creating a view or attaching a
  partition.  ``REFRESH MATERIALIZED VIEW`` notifies nothing (a
  materialized view can have no trigger).  Foreign tables are left alone.
- A write that names a partitioned (or inheritance) parent notifies the
  parent's name only (``TRUNCATE`` aside), not the partitions': an entry
  that read a partition by its own name is not invalidated by it.
- A transaction that notified cannot be prepared: with the triggers in
  place, two-phase commit (``PREPARE TRANSACTION``, zope's
  ``twophase=True``) of a write to a table that has one fails.
- PostgreSQL queues notifications until every listener has read them
  (8 GB by default): a listener that stays connected but stops reading
  (a frozen process, a callback that never returns) lets the queue
  grow, and when it is full, every commit that notifies fails.  ``pg_notification_queue_usage()``
  shows how full it is.
- A connection pooler in transaction mode (PgBouncer's default) does not
  keep ``LISTEN``: the listener needs a session of its own, direct or
  through a pooler in session mode.
- Creating a trigger needs to own the table.  The triggers are in place
  when the transaction that installed them commits.

The window.  Between a commit and the listener's callback, entries read
before the commit may still be served.  Measured with
``benchmarks/notify_window.py``: PostgreSQL 16.2 (``pgserver``) on the
same host, Unix socket, 2 cores shared with other work (load average
about 4), 300 commits per row, from the writer's call to ``commit()`` to
the callback in another process: p50 0.4-0.8 ms, p99 about 5 ms, at
worst 8 ms, idle; with 2 listening processes and a writer committing
200 times a second besides, p50 0.6-0.7 ms, p99 5-6 ms, at worst 22 ms.
From the return of ``commit()``, p50 is under 0.1 ms and p99 about
2 ms: the callback often runs before the writer sees its commit return.
A lost connection widens the window to the time it takes to notice and
listen again; ``on_lost`` then covers everything missed meanwhile.

Usage (the triggers once, at deployment; the listener in every process)::

    with engine.begin() as connection:
        install_triggers(connection)

    listener = Listener(dsn_of(engine), cache.publish, cache.invalidate_tables)
    listener.start()

The listener needs psycopg 3.2 or later (``pip install "psycopg[binary]"``),
whatever driver the engine uses.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.engine import URL, Connection, Engine, make_url

from ... import _sqlalchemy
from .reads import ALL_TABLES, version_name

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

#: The channel notified and listened to by default.
CHANNEL = "sessioncache"

#: The name of the trigger on each table, and of the function it runs (in the schema).
TRIGGER = "sessioncache_notify"

#: A channel is an identifier: at most ``NAMEDATALEN - 1`` bytes.
_MAX_CHANNEL_BYTES = 63

#: The function: the channel is the trigger's first argument, the other
#: names the table's rows show under (its ancestors, views) are the others.
_FUNCTION_BODY = """
BEGIN
    PERFORM pg_notify(TG_ARGV[0], TG_TABLE_NAME);
    FOR i IN 1 .. TG_NARGS - 1 LOOP
        PERFORM pg_notify(TG_ARGV[0], TG_ARGV[i]);
    END LOOP;
    RETURN NULL;
END
"""

#: ``pg_trigger.tgtype`` of a statement-level AFTER INSERT, DELETE, UPDATE
#: and TRUNCATE trigger (``TRIGGER_TYPE_*`` in PostgreSQL's ``pg_trigger.h``).
_TRIGGER_TYPE = 4 | 8 | 16 | 32

#: How many more reads of what already arrived may join a batch.
_DRAIN_READS = 100

_SCHEMA_EXISTS = text("SELECT 1 FROM pg_namespace WHERE nspname = :schema")

#: Ordinary and partitioned tables of a schema, partitions included.
_TABLES = text("""
SELECT c.oid, c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = :schema AND c.relkind IN ('r', 'p')
""")

#: Where a relation's rows show under another name: ``(relation, oid, name)``.
#: Its direct parents (a partition's, or a table's that ``INHERITS``), and
#: the plain views that read it (a materialized view changes at REFRESH only).
_SHOWN_IN = text("""
SELECT i.inhrelid, i.inhparent, p.relname
FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
WHERE p.relkind IN ('r', 'p')
UNION
SELECT d.refobjid, v.oid, v.relname
FROM pg_depend d
JOIN pg_rewrite r ON r.oid = d.objid
JOIN pg_class v ON v.oid = r.ev_class
WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
  AND v.relkind = 'v' AND d.refobjid <> v.oid
""")

#: The triggers of ours on the tables of a schema, and what they are.
_TRIGGERS = text("""
SELECT c.relname, t.tgtype, t.tgenabled, t.tgqual IS NULL, t.tgargs,
       p.proname = :trigger AND pn.nspname = :schema AS ours
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_proc p ON p.oid = t.tgfoid
JOIN pg_namespace pn ON pn.oid = p.pronamespace
WHERE n.nspname = :schema AND t.tgname = :trigger
""")

_FUNCTION_SOURCE = text("""
SELECT p.prosrc, (SELECT count(*) FROM pg_trigger t WHERE t.tgfoid = p.oid)
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = :schema AND p.proname = :trigger AND p.pronargs = 0
""")

#: Two processes installing at once wait for each other, per schema.
_LOCK = text("SELECT pg_advisory_xact_lock(hashtext(:key))")


def install_triggers(connection: Connection, schema: str = "public", channel: str = CHANNEL) -> list[str]:
    """Make every table of ``schema`` notify ``channel`` of each committed write.

    Creates the function ``<schema>.sessioncache_notify()`` and, on every
    ordinary and partitioned table of ``schema`` (partitions included), a
    trigger of that name, ``FOR EACH STATEMENT`` ``AFTER INSERT OR UPDATE
    OR DELETE OR TRUNCATE``, enabled ``ALWAYS``.  Idempotent: a table whose trigger is already
    as it should be is left alone (no lock taken on it), so running it
    again, at every deployment say, changes nothing; run it again after
    creating a table or a view, or attaching a partition.  A table has
    one such trigger: installing with another channel moves it there.

    Run it in a transaction, which it does not commit::

        with engine.begin() as connection:
            install_triggers(connection)

    :param connection: a SQLAlchemy Connection to the PostgreSQL database,
        as a role that owns the tables.
    :param schema: the schema whose tables get the trigger.
    :param channel: the channel notified (at most 63 bytes).
    :returns: the names of the tables that have the trigger, sorted.
    :raises ValueError: not PostgreSQL, no such schema, or a bad channel.
    """
    _check(connection, schema, channel)
    tables = _tables(connection, schema)
    _ensure_function(connection, schema)
    present = {name: args for name, args, sound, ours in _triggers(connection, schema) if sound and ours}
    function = f"{_identifier(schema)}.{_identifier(TRIGGER)}"
    for name, shown_in in sorted(tables.items()):
        args = (channel, *shown_in)
        if present.get(name) == args:
            continue
        table = f"{_identifier(schema)}.{_identifier(name)}"
        _ddl(connection, f"DROP TRIGGER IF EXISTS {_identifier(TRIGGER)} ON {table}")
        _ddl(
            connection,
            f"CREATE TRIGGER {_identifier(TRIGGER)}"
            f" AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table}"
            f" FOR EACH STATEMENT EXECUTE FUNCTION {function}({', '.join(map(_literal, args))})",
        )
        # Fired under session_replication_role = replica too: a bulk load
        # that skips foreign-key checks, a logical-replication subscriber.
        _ddl(connection, f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {_identifier(TRIGGER)}")
    return sorted(tables)


def remove_triggers(connection: Connection, schema: str = "public", channel: str = CHANNEL) -> list[str]:
    """Drop the triggers :func:`install_triggers` put on the tables of ``schema`` for ``channel``.

    The function goes too once no trigger uses it.  Run it in a
    transaction, which it does not commit.

    :returns: the names of the tables whose trigger was dropped, sorted.
    :raises ValueError: not PostgreSQL, no such schema, or a bad channel.
    """
    _check(connection, schema, channel)
    removed = sorted(name for name, args, _, ours in _triggers(connection, schema) if ours and args[:1] == (channel,))
    for name in removed:
        table = f"{_identifier(schema)}.{_identifier(name)}"
        _ddl(connection, f"DROP TRIGGER {_identifier(TRIGGER)} ON {table}")
    found = connection.execute(_FUNCTION_SOURCE, {"schema": schema, "trigger": TRIGGER}).first()
    if found is not None and found[1] == 0:
        _ddl(connection, f"DROP FUNCTION {_identifier(schema)}.{_identifier(TRIGGER)}()")
    return removed


def _check(connection: Connection, schema: str, channel: str) -> None:
    if connection.dialect.name != "postgresql":
        raise ValueError(f"notification triggers need PostgreSQL, not {connection.dialect.name}")
    if not channel or len(channel.encode()) > _MAX_CHANNEL_BYTES:
        # pg_notify() would raise in every writing transaction.
        raise ValueError(f"a notification channel is 1 to {_MAX_CHANNEL_BYTES} bytes long, not {channel!r}")
    connection.execute(_LOCK, {"key": f"{TRIGGER}:{schema}"})
    if connection.execute(_SCHEMA_EXISTS, {"schema": schema}).first() is None:
        raise ValueError(f"there is no schema {schema!r} in this database")


def _tables(connection: Connection, schema: str) -> dict[str, tuple[str, ...]]:
    """The tables of ``schema``: name -> the other names its rows show under, sorted.

    Those of its ancestors and of the views over it or them, transitively.
    """
    tables = {oid: name for oid, name in connection.execute(_TABLES, {"schema": schema})}
    shown_in: dict[int, list[tuple[int, str]]] = {}
    for relation, oid, name in connection.execute(_SHOWN_IN):
        shown_in.setdefault(relation, []).append((oid, name))
    found = {}
    for oid, name in tables.items():
        names: set[str] = set()
        todo, seen = [oid], {oid}
        while todo:
            for other, other_name in shown_in.get(todo.pop(), ()):
                if other not in seen:
                    seen.add(other)
                    todo.append(other)
                    names.add(other_name)
        names.discard(name)
        found[name] = tuple(sorted(names))
    return found


def _ensure_function(connection: Connection, schema: str) -> None:
    found = connection.execute(_FUNCTION_SOURCE, {"schema": schema, "trigger": TRIGGER}).first()
    if found is not None and found[0] == _FUNCTION_BODY:
        return
    _ddl(
        connection,
        f"CREATE OR REPLACE FUNCTION {_identifier(schema)}.{_identifier(TRIGGER)}()"
        f" RETURNS trigger LANGUAGE plpgsql AS $sessioncache${_FUNCTION_BODY}$sessioncache$",
    )


def _triggers(connection: Connection, schema: str) -> Iterator[tuple[str, tuple[str, ...], bool, bool]]:
    """``(table, args, sound, ours)`` for each trigger named ours on the tables of ``schema``.

    ``sound``: of the right kind, enabled always (whatever the
    ``session_replication_role``), without WHEN; ``ours``: it runs the
    schema's function.
    """
    rows = connection.execute(_TRIGGERS, {"schema": schema, "trigger": TRIGGER})
    for name, kind, enabled, unconditional, raw_args, ours in rows:
        # tgargs holds each argument followed by a NUL byte.
        args = tuple(arg.decode("utf-8", "replace") for arg in bytes(raw_args).split(b"\x00")[:-1])
        sound = kind == _TRIGGER_TYPE and enabled == "A" and bool(unconditional)
        yield name, args, sound, bool(ours)


def _ddl(connection: Connection, statement: str) -> None:
    # No parameters: the driver then leaves the text alone (a % in a name).
    connection.execution_options(no_parameters=True).exec_driver_sql(statement)


def _identifier(name: str) -> str:
    # Not the dialect's quoting: it doubles % for drivers that take parameters.
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    # A string constant with standard_conforming_strings on (the default since 9.1).
    return "'" + value.replace("'", "''") + "'"


def dsn_of(engine_or_url: Engine | URL | str) -> str:
    """Return the libpq connection URI of a PostgreSQL engine or SQLAlchemy URL.

    ``postgresql+psycopg://user@host/db`` becomes ``postgresql://user@host/db``,
    password and query (``?host=/run/postgresql``) kept, for
    :class:`Listener`, whatever driver the engine uses.  Of an engine, the
    libpq parameters its ``connect_args`` add (``host``, ``sslmode``...)
    join the query: the listener connects where the engine does.

    :raises ValueError: the URL is not PostgreSQL's.
    """
    url = engine_or_url.url if isinstance(engine_or_url, Engine) else make_url(engine_or_url)
    if url.get_backend_name() != "postgresql":
        raise ValueError(f"a notification listener needs PostgreSQL, not {url.get_backend_name()}")
    if isinstance(engine_or_url, Engine):
        url = url.update_query_dict(_connect_args(engine_or_url))
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


#: libpq's connection parameters: those of an engine's ``connect_args`` that say where and how it connects.
_LIBPQ = frozenset(
    {"host", "hostaddr", "port", "dbname", "user", "password", "passfile", "channel_binding", "connect_timeout",
     "client_encoding", "options", "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
     "tcp_user_timeout", "sslmode", "sslcompression", "sslcert", "sslkey", "sslpassword", "sslcertmode",
     "sslrootcert", "sslcrl", "sslcrldir", "sslsni", "requirepeer", "ssl_min_protocol_version",
     "ssl_max_protocol_version", "gssencmode", "krbsrvname", "gsslib", "gssdelegation", "service",
     "target_session_attrs", "load_balance_hosts", "require_auth"}
)  # fmt: skip


def _connect_args(engine: Engine) -> dict[str, str]:
    """What the engine's ``connect_args`` add to its URL, as libpq parameters (the server's socket, say)."""
    arguments = _sqlalchemy.connect_arguments(engine.pool)
    if arguments is None:
        return {}
    from_url = engine.dialect.create_connect_args(engine.url)[1]
    return {
        name: str(value)
        for name, value in arguments[1].items()
        if name in _LIBPQ
        and isinstance(value, (str, int))
        and not isinstance(value, bool)
        and from_url.get(name) != value
    }


class Listener:
    """Listen to a channel in a thread of its own; report the tables written, and losses.

    ``on_tables(names)`` is called with the version names of the tables
    that committed transactions wrote (and of the views and parents their
    rows show in), those that arrived together in one call.  ``on_lost()`` is called when notifications may have been missed:
    after the connection was lost (or the first attempt to connect failed),
    once ``LISTEN`` is in place again, so that what commits after it is
    notified and what committed before is covered by ``on_lost``.  Both
    run in the listener's thread, one at a time; an exception they raise
    is logged, and listening goes on.  A lost connection is logged as a
    warning, then made again after a delay that doubles from
    ``retry[0]`` to ``retry[1]`` seconds while attempts fail.  In a
    forked child (a preloading server's worker), a started listener
    listens again on a connection of its own, then calls ``on_lost``.

    :param dsn: a libpq connection string or URI (see :func:`dsn_of`);
        its own parameters win over the listener's defaults (TCP
        keepalives, a 5 s connection timeout, ``application_name``).
    :param on_tables: called with a ``frozenset`` of table names.
    :param on_lost: called when notifications may have been missed.
    :param channel: the channel :func:`install_triggers` notifies.
    :param application_name: the connection's name in ``pg_stat_activity``.
    :param poll: the longest time, in seconds, the thread waits before it
        sees that :meth:`stop` was called.
    :param retry: the first and the longest delay between attempts to connect.

    Use it as a context manager, or :meth:`start` and :meth:`stop`::

        with Listener(dsn_of(engine), cache.publish, cache.invalidate_tables) as listener:
            listener.wait_connected(5)
            ...
    """

    def __init__(
        self,
        dsn: str,
        on_tables: Callable[[frozenset[str]], None],
        on_lost: Callable[[], None],
        channel: str = CHANNEL,
        *,
        application_name: str = "sessioncache-listener",
        poll: float = 0.25,
        retry: tuple[float, float] = (0.1, 5.0),
    ) -> None:
        if not channel or len(channel.encode()) > _MAX_CHANNEL_BYTES:
            raise ValueError(f"a notification channel is 1 to {_MAX_CHANNEL_BYTES} bytes long, not {channel!r}")
        self.dsn = dsn
        self.on_tables = on_tables
        self.on_lost = on_lost
        self.channel = channel
        self.application_name = application_name
        self.poll = poll
        self.retry = retry
        self._thread: threading.Thread | None = None
        self._fresh(late=False)

    def _fresh(self, late: bool) -> None:
        """The state of a listener that has not connected yet; ``late``: call ``on_lost`` once it has."""
        self._stopping = threading.Event()
        # Set when start() stopped waiting before LISTEN was in place: the first
        # connection then calls on_lost, as a connection made again does.
        self._late = late
        self._first = threading.Lock()
        self._connected = threading.Event()
        self._backend_pid: int | None = None

    def __repr__(self) -> str:
        state = "listening" if self.connected else "not listening"
        return f"<Listener channel={self.channel!r} {state}>"

    @property
    def connected(self) -> bool:
        """Whether ``LISTEN`` is in place now."""
        return self._connected.is_set()

    @property
    def backend_pid(self) -> int | None:
        """The process id of the listening server backend, while connected."""
        return self._backend_pid

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until ``LISTEN`` is in place; return whether it is (False after ``timeout`` seconds)."""
        return self._connected.wait(timeout)

    def start(self, wait: float | None = None) -> Listener:
        """Start listening in a daemon thread; return the listener.

        :param wait: seconds to wait until ``LISTEN`` is in place.  If it is
            not by then, ``on_lost`` is called once it is: what committed
            in between, while the caller went on (serving requests that
            store entries), was not heard.  None: return at once, and treat
            the first connection as the start (the caller waits with
            :meth:`wait_connected` before it reads anything).
        :raises RuntimeError: it was started already.
        """
        if self._thread is not None:
            raise RuntimeError("this Listener was started already; make a new one")
        _psycopg()  # a missing driver fails here, not in the thread
        self._spawn()
        _running.add(self)
        if wait is not None and not self._connected.wait(wait):
            with self._first:
                self._late = not self._connected.is_set()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop listening, close the connection and wait for the thread (up to ``timeout`` seconds).

        The thread notices within ``poll`` seconds, unless a callback or
        an attempt to connect is under way.
        """
        self._stopping.set()
        _running.discard(self)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("the sessioncache listener did not stop within %.1f s", timeout)

    def _spawn(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"sessioncache-listener:{self.channel}", daemon=True)
        self._thread.start()

    def _forked(self) -> None:
        """Listen again in a forked child, on a connection of its own; ``on_lost`` once ``LISTEN`` is in place.

        The thread stayed in the parent, with its connection (whose socket
        the child must leave alone), and what committed since the fork was
        heard by the parent only.
        """
        self._fresh(late=True)
        self._spawn()

    def __enter__(self) -> Listener:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    # The thread -------------------------------------------------------------

    def _run(self) -> None:
        psycopg = _psycopg()
        delay = self.retry[0]
        missed = False  # notifications may have been missed since start()
        while not self._stopping.is_set():
            since = None
            problem: str = "the connection ended"
            unexpected: Exception | None = None
            try:
                with self._connect(psycopg) as conn:
                    if conn.info.server_version >= 140000:
                        # An idle listener is what it should be: keep a server-wide
                        # idle_session_timeout from closing it every so often.
                        conn.execute("SET idle_session_timeout = 0")
                    conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(self.channel)))
                    since = time.monotonic()
                    self._backend_pid = conn.info.backend_pid
                    with self._first:
                        self._connected.set()
                        missed, self._late = missed or self._late, False
                    if missed:
                        self._call(self.on_lost)
                    self._receive(conn)  # returns once stop() was called
            except psycopg.Error as error:
                problem = _first_line(error)
            except Exception as error:  # a bug: say where, and carry on
                problem, unexpected = f"{type(error).__name__}: {error}", error
            finally:
                self._connected.clear()
                self._backend_pid = None
            if self._stopping.is_set():
                break
            missed = True
            if since is not None and time.monotonic() - since >= self.retry[1]:
                delay = self.retry[0]  # a connection that held: not a failing server
            log.warning(
                "sessioncache listener on %r: %s; listening again in %.1f s",
                self.channel,
                problem,
                delay,
                exc_info=unexpected,
            )
            if self._stopping.wait(delay):
                break
            delay = min(delay * 2, self.retry[1])

    def _connect(self, psycopg: Any) -> psycopg.Connection:
        params = {
            "application_name": self.application_name,
            "connect_timeout": 5,
            # Notice a peer gone without a word (a network cut) within a minute.
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
        }
        params.update(psycopg.conninfo.conninfo_to_dict(self.dsn))
        return psycopg.connect(**params, autocommit=True)

    def _receive(self, conn: psycopg.Connection) -> None:
        while not self._stopping.is_set():
            names = {notify.payload for notify in conn.notifies(timeout=self.poll, stop_after=1)}
            if not names:
                continue
            # The rest of a commit's notifications, and any others already here
            # (a bounded number of reads: a steady stream must not starve the callback).
            for _ in range(_DRAIN_READS):
                more = {notify.payload for notify in conn.notifies(timeout=0)}
                if not more:
                    break
                names |= more
            # As reads and writes spell them: a table named "ledger.2024" is "2024".
            self._call(self.on_tables, frozenset(version_name(name) or ALL_TABLES for name in names))

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("sessioncache listener on %r: %r failed", self.channel, callback)


#: The listeners started in this process and not stopped.
_running: weakref.WeakSet[Listener] = weakref.WeakSet()


def _after_fork() -> None:
    # A preloading server (uwsgi, gunicorn --preload) forks its workers after
    # the application started listening: each worker listens for itself.
    for listener in list(_running):
        listener._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _psycopg() -> Any:
    """Import psycopg 3 (and its ``sql`` and ``conninfo`` modules), or say what to install."""
    try:
        import psycopg
        import psycopg.conninfo
        import psycopg.sql
    except ImportError as exc:
        raise ImportError(
            'the sessioncache Listener needs psycopg 3.2 or later: pip install "psycopg[binary]"'
        ) from exc
    return psycopg
