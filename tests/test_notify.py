"""Writes of any client, on PostgreSQL: statement triggers, NOTIFY at commit, a listener thread.

Every test has a schema of its own, named after its channel, on the real
server of the ``postgres_url`` fixture.  Writes come from plain psycopg
connections, as another program's would; listeners are real ones, with a
connection of their own.  Waits are bounded: what must arrive is waited
for up to 10 s, what must not arrive for 0.5 s, after which a committed
write proves that the listener was listening all along.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg
import pytest
from sqlalchemy import create_engine, make_url
from sqlalchemy.engine import Engine

from pyramid_sessioncache.engine.invalidation.notify import (
    TRIGGER,
    Listener,
    dsn_of,
    install_triggers,
    remove_triggers,
)

#: How long a test waits for what comes eventually (generous, for a loaded machine: a wait ends as it comes).
WAIT = 30.0
#: How long a test waits to see that nothing arrives.
SILENCE = 0.5

TABLES = """
CREATE TABLE {schema}.person (id int PRIMARY KEY, name text);
CREATE TABLE {schema}.address (id int PRIMARY KEY, person_id int, email text);
CREATE TABLE {schema}.tag (id int PRIMARY KEY);
CREATE TABLE {schema}.marker (id serial PRIMARY KEY);
INSERT INTO {schema}.person VALUES (1, 'one'), (2, 'two');
"""


@dataclass
class Database:
    """A schema of its own on the test server; its name is also the channel."""

    engine: Engine
    schema: str
    dsn: str

    @property
    def channel(self) -> str:
        return self.schema

    def install(self, channel: str | None = None) -> list[str]:
        with self.engine.begin() as conn:
            return install_triggers(conn, self.schema, channel or self.channel)

    def remove(self, channel: str | None = None) -> list[str]:
        with self.engine.begin() as conn:
            return remove_triggers(conn, self.schema, channel or self.channel)

    def sql(self, statement: str) -> list[tuple]:
        """Run ``statement`` in a transaction of its own through SQLAlchemy; return its rows, if any."""
        with self.engine.begin() as conn:
            result = conn.execution_options(no_parameters=True).exec_driver_sql(statement)
            return [tuple(row) for row in result] if result.returns_rows else []

    def writer(self) -> psycopg.Connection:
        """A plain psycopg connection (no SQLAlchemy), its search path set to the schema."""
        return psycopg.connect(self.dsn, options=f"-c search_path={self.schema}")

    def write(self, *statements: str) -> None:
        """Run ``statements`` in one transaction of a plain psycopg connection, and commit."""
        with self.writer() as conn:
            for statement in statements:
                conn.execute(statement)

    def trigger_oids(self) -> dict[str, int]:
        rows = self.sql(
            "SELECT c.relname, t.oid FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
            f" WHERE c.relnamespace = '{self.schema}'::regnamespace AND t.tgname = '{TRIGGER}'"
        )
        return dict(rows)


@pytest.fixture
def db(postgres_url) -> Iterator[Database]:
    engine = create_engine(postgres_url)
    schema = f"notify_{uuid.uuid4().hex[:10]}"
    database = Database(engine, schema, dsn_of(postgres_url))
    database.sql(f"CREATE SCHEMA {schema}")
    database.sql(TABLES.format(schema=schema))
    yield database
    database.sql(f"DROP SCHEMA {schema} CASCADE")
    engine.dispose()


@pytest.fixture
def installed(db) -> Database:
    assert db.install() == ["address", "marker", "person", "tag"]
    return db


class Heard:
    """What a listener reported: each ``on_tables`` batch, and how many times ``on_lost`` ran."""

    def __init__(self) -> None:
        self.batches: list[frozenset[str]] = []
        self.lost = 0
        self._changed = threading.Condition()

    def on_tables(self, tables: frozenset[str]) -> None:
        with self._changed:
            self.batches.append(tables)
            self._changed.notify_all()

    def on_lost(self) -> None:
        with self._changed:
            self.lost += 1
            self._changed.notify_all()

    def wait_for(self, condition: Callable[[Heard], bool], timeout: float = WAIT) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: condition(self), timeout)

    def tables(self) -> set[str]:
        with self._changed:
            return set().union(*self.batches)

    def until(self, *names: str) -> list[frozenset[str]]:
        """Wait until every one of ``names`` was heard; return the batches heard, and forget them."""
        assert self.wait_for(lambda heard: set(names) <= heard.tables()), f"{names} not heard: {self.batches}"
        with self._changed:
            batches, self.batches = self.batches, []
        return batches

    def nothing(self) -> None:
        """Assert that nothing is heard for a while."""
        assert not self.wait_for(lambda heard: bool(heard.batches), SILENCE), self.batches


@pytest.fixture
def listen(db) -> Iterator[Callable[..., tuple[Listener, Heard]]]:
    """Start listeners on the schema's channel; each is stopped after the test."""
    started: list[Listener] = []

    def start(**options) -> tuple[Listener, Heard]:
        heard = Heard()
        options.setdefault("channel", db.channel)
        options.setdefault("application_name", f"{db.channel}-{len(started)}")
        options.setdefault("poll", 0.05)
        listener = Listener(options.pop("dsn", db.dsn), heard.on_tables, heard.on_lost, **options)
        started.append(listener.start())
        assert listener.wait_connected(WAIT)
        return listener, heard

    yield start
    for listener in started:
        listener.stop()


# What is heard -------------------------------------------------------------------


def test_a_write_by_another_client_is_heard(installed, listen):
    _, heard = listen()
    installed.write("INSERT INTO person VALUES (3, 'three')")
    assert heard.until("person") == [frozenset({"person"})]
    assert heard.lost == 0


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO person VALUES (3, 'three')",
        "UPDATE person SET name = 'uno' WHERE id = 1",
        "DELETE FROM person WHERE id = 2",
        "TRUNCATE person",
        # A statement-level trigger fires even when no row changed.
        "UPDATE person SET name = 'nobody' WHERE false",
    ],
)
def test_each_kind_of_write_is_heard(installed, listen, statement):
    _, heard = listen()
    installed.write(statement)
    assert heard.until("person") == [frozenset({"person"})]


def test_tables_written_in_one_transaction_arrive_together(installed, listen):
    _, heard = listen()
    installed.write(
        "INSERT INTO person VALUES (3, 'three')",
        "UPDATE person SET name = 'tres' WHERE id = 3",
        "INSERT INTO address VALUES (1, 3, 'three@example.org')",
        "DELETE FROM tag",
    )
    # One notification per table however many statements wrote it, all in one call.
    assert heard.until("person", "address", "tag") == [frozenset({"person", "address", "tag"})]


def test_nothing_is_heard_before_the_commit(installed, listen):
    _, heard = listen()
    with installed.writer() as conn:
        conn.execute("INSERT INTO person VALUES (3, 'three')")
        heard.nothing()
    assert heard.until("person") == [frozenset({"person"})]


def test_a_rolled_back_write_sends_nothing(installed, listen):
    _, heard = listen()
    with installed.writer() as conn:
        conn.execute("INSERT INTO person VALUES (3, 'three')")
        conn.execute("TRUNCATE address")
        conn.rollback()
    heard.nothing()
    installed.write("INSERT INTO marker DEFAULT VALUES")
    assert heard.until("marker") == [frozenset({"marker"})]


def test_a_rolled_back_savepoint_sends_nothing(installed, listen):
    _, heard = listen()
    with installed.writer() as conn:
        conn.execute("INSERT INTO tag VALUES (1)")
        with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():
            conn.execute("UPDATE person SET name = 'uno' WHERE id = 1")
            conn.execute("INSERT INTO person VALUES (1, 'again')")
    assert heard.until("tag") == [frozenset({"tag"})]
    heard.nothing()


def test_what_arrived_while_a_callback_ran_comes_in_one_call(installed, listen):
    _, observed = listen(dsn=installed.dsn, channel=installed.channel)
    heard = Heard()
    release = threading.Event()

    def on_tables(tables: frozenset[str]) -> None:
        heard.on_tables(tables)
        release.wait(WAIT)

    with Listener(installed.dsn, on_tables, heard.on_lost, channel=installed.channel, poll=0.05) as listener:
        assert listener.wait_connected(WAIT)
        installed.write("INSERT INTO marker DEFAULT VALUES")
        assert heard.until("marker") == [frozenset({"marker"})]  # its callback now waits
        installed.write("INSERT INTO person VALUES (3, 'three')")
        installed.write("INSERT INTO address VALUES (1, 3, 'three@example.org')")
        installed.write("INSERT INTO tag VALUES (1)")
        # A notification travels after its commit returned: let the last one
        # reach the listener's socket.  Another listener hearing them says
        # that the server sent them (a fixed pause alone was too short for a
        # loaded machine); the pause, that this one's backend did too.
        assert observed.until("marker", "person", "address", "tag")
        time.sleep(SILENCE)
        release.set()
        assert heard.until("person", "address", "tag") == [frozenset({"person", "address", "tag"})]


def test_every_listener_hears(installed, listen):
    (_, first), (_, second) = listen(), listen()
    installed.write("DELETE FROM person WHERE id = 1")
    assert first.until("person") == [frozenset({"person"})]
    assert second.until("person") == [frozenset({"person"})]


def test_names_are_lower_case_version_names(db, listen):
    db.sql(f'CREATE TABLE {db.schema}."Mixed%Case" (id int)')
    assert "Mixed%Case" in db.install()
    _, heard = listen()
    db.write('INSERT INTO "Mixed%Case" VALUES (1)')
    assert heard.until("mixed%case") == [frozenset({"mixed%case"})]


def test_a_partition_or_child_table_also_notifies_its_ancestors(db, listen):
    db.sql(f"""
        CREATE TABLE {db.schema}.reading (at date, value int) PARTITION BY RANGE (at);
        CREATE TABLE {db.schema}.reading_2024 PARTITION OF {db.schema}.reading
            FOR VALUES FROM ('2024-01-01') TO ('2025-01-01') PARTITION BY RANGE (at);
        CREATE TABLE {db.schema}.reading_2024_h1 PARTITION OF {db.schema}.reading_2024
            FOR VALUES FROM ('2024-01-01') TO ('2024-07-01');
        CREATE TABLE {db.schema}.animal (name text);
        CREATE TABLE {db.schema}.cat (lives int) INHERITS ({db.schema}.animal);
        CREATE TABLE {db.schema}.kitten () INHERITS ({db.schema}.cat, {db.schema}.animal);
    """)
    assert {"reading", "reading_2024", "reading_2024_h1", "animal", "cat", "kitten"} <= set(db.install())
    _, heard = listen()
    # Queries of the parent read the partition's rows: the partition's write names it too.
    db.write("INSERT INTO reading_2024_h1 VALUES ('2024-02-01', 1)")
    assert heard.until("reading_2024_h1") == [frozenset({"reading", "reading_2024", "reading_2024_h1"})]
    # A write naming the parent fires the parent's trigger only...
    db.write("INSERT INTO reading VALUES ('2024-03-01', 2)")
    assert heard.until("reading") == [frozenset({"reading"})]
    # ...but TRUNCATE goes down the tree and fires every partition's.
    db.write("TRUNCATE reading")
    assert heard.until("reading") == [frozenset({"reading", "reading_2024", "reading_2024_h1"})]
    # SELECT FROM animal reads the cats too.
    db.write("INSERT INTO cat VALUES ('Tom', 9)")
    assert heard.until("cat") == [frozenset({"cat", "animal"})]
    db.write("INSERT INTO kitten VALUES ('Tim', 9)")
    assert heard.until("kitten") == [frozenset({"kitten", "cat", "animal"})]


def test_a_write_also_names_the_views_that_show_its_rows(db, listen):
    db.sql(f"""
        CREATE VIEW {db.schema}.named AS SELECT * FROM {db.schema}.person WHERE name IS NOT NULL;
        CREATE VIEW {db.schema}.named_with_address AS
            SELECT n.name, a.email FROM {db.schema}.named n JOIN {db.schema}.address a ON a.person_id = n.id;
        CREATE MATERIALIZED VIEW {db.schema}.snapshot AS SELECT * FROM {db.schema}.person;
        ALTER TABLE {db.schema}.address ADD FOREIGN KEY (person_id) REFERENCES {db.schema}.person ON DELETE CASCADE;
    """)
    db.install()
    _, heard = listen()
    db.write("UPDATE person SET name = 'uno' WHERE id = 1")  # not the materialized view: it changes at REFRESH
    assert heard.until("person") == [frozenset({"person", "named", "named_with_address"})]
    db.write("INSERT INTO tag VALUES (1)")
    assert heard.until("tag") == [frozenset({"tag"})]
    # A write through a view is its base table's; a cascade fires the referring table's trigger.
    db.write("INSERT INTO address VALUES (1, 1, 'one@example.org')", "DELETE FROM named WHERE id = 1")
    assert heard.until("person", "address") == [frozenset({"person", "address", "named", "named_with_address"})]
    db.write("REFRESH MATERIALIZED VIEW snapshot")
    heard.nothing()


def test_an_empty_or_star_payload_names_every_table(installed, listen):
    _, heard = listen()
    installed.sql(f'NOTIFY "{installed.channel}"')
    assert heard.until("*") == [frozenset({"*"})]
    installed.sql(f"SELECT pg_notify('{installed.channel}', '*')")
    assert heard.until("*") == [frozenset({"*"})]


# Installing and removing ---------------------------------------------------------


def test_install_is_idempotent(installed, listen):
    before = installed.trigger_oids()
    assert sorted(before) == ["address", "marker", "person", "tag"]
    assert installed.install() == ["address", "marker", "person", "tag"]
    # Nothing was made again: no lock was taken on the tables.
    assert installed.trigger_oids() == before
    _, heard = listen()
    installed.write("INSERT INTO tag VALUES (1)")
    assert heard.until("tag") == [frozenset({"tag"})]  # one trigger, not two
    heard.nothing()


def test_a_table_created_later_needs_install_again(installed, listen):
    before = installed.trigger_oids()
    installed.sql(f"CREATE TABLE {installed.schema}.later (id int)")
    assert "later" not in installed.trigger_oids()
    assert installed.install() == ["address", "later", "marker", "person", "tag"]
    after = installed.trigger_oids()
    assert {name: after[name] for name in before} == before
    _, heard = listen()
    installed.write("INSERT INTO later VALUES (1)")
    assert heard.until("later") == [frozenset({"later"})]


def test_install_repairs_a_disabled_trigger_and_moves_to_another_channel(installed, listen):
    installed.sql(f"ALTER TABLE {installed.schema}.tag DISABLE TRIGGER {TRIGGER}")
    installed.install()
    _, heard = listen()
    installed.write("INSERT INTO tag VALUES (1)")
    assert heard.until("tag") == [frozenset({"tag"})]

    other = f"{installed.channel}_other"
    installed.install(other)
    _, elsewhere = listen(channel=other)
    installed.write("INSERT INTO tag VALUES (2)")
    assert elsewhere.until("tag") == [frozenset({"tag"})]
    heard.nothing()


def test_remove_triggers_stops_notifications(installed, listen):
    _, heard = listen()
    assert installed.remove(f"{installed.channel}_other") == []  # another channel's: none here
    assert installed.remove() == ["address", "marker", "person", "tag"]
    assert installed.trigger_oids() == {}
    functions = f"SELECT count(*) FROM pg_proc WHERE pronamespace = '{installed.schema}'::regnamespace"
    assert installed.sql(functions) == [(0,)]
    installed.write("INSERT INTO person VALUES (3, 'three')", "TRUNCATE tag")
    heard.nothing()
    installed.sql(f"SELECT pg_notify('{installed.channel}', 'marker')")  # still listening
    assert heard.until("marker") == [frozenset({"marker"})]
    assert installed.remove() == []


def test_install_refuses_what_would_not_work(db, tmp_path):
    with db.engine.begin() as conn:
        with pytest.raises(ValueError, match="no schema 'missing'"):
            install_triggers(conn, "missing", "x")
        with pytest.raises(ValueError, match="1 to 63 bytes"):
            install_triggers(conn, db.schema, "c" * 64)
        with pytest.raises(ValueError, match="1 to 63 bytes"):
            remove_triggers(conn, db.schema, "")
    sqlite = create_engine(f"sqlite:///{tmp_path / 'x.sqlite'}")
    with sqlite.begin() as conn, pytest.raises(ValueError, match="need PostgreSQL, not sqlite"):
        install_triggers(conn)
    sqlite.dispose()
    with pytest.raises(ValueError, match="1 to 63 bytes"):
        Listener(db.dsn, print, print, channel="é" * 32)


def test_a_notifying_write_cannot_be_prepared_for_two_phase_commit(two_phase_url):
    # A limit of PostgreSQL: with the triggers in place, two-phase commit of a write fails.
    with psycopg.connect(two_phase_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE person (id int)")
    with psycopg.connect(two_phase_url) as conn:  # the DBAPI's two-phase commit, as zope.sqlalchemy's
        conn.tpc_begin(conn.xid(1, "before", "sessioncache"))
        conn.execute("INSERT INTO person VALUES (1)")
        conn.tpc_prepare()
        conn.tpc_commit()
    engine = create_engine(two_phase_url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as conn:
        install_triggers(conn)
    engine.dispose()
    conn = psycopg.connect(two_phase_url)
    try:
        conn.tpc_begin(conn.xid(1, "after", "sessioncache"))
        conn.execute("INSERT INTO person VALUES (2)")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="cannot PREPARE .* NOTIFY"):
            conn.tpc_prepare()
    finally:
        conn.close()  # the failed transaction goes with it


# The listener's connection -------------------------------------------------------


def test_a_killed_connection_is_made_again_and_on_lost_runs_once(installed, listen, caplog):
    listener, heard = listen(application_name=f"{installed.channel}-killed")
    (pid,) = installed.sql(
        f"SELECT pid FROM pg_stat_activity WHERE application_name = '{installed.channel}-killed'"
        " AND query LIKE 'LISTEN%'"
    )[0]
    assert pid == listener.backend_pid
    with caplog.at_level(logging.WARNING, logger="pyramid_sessioncache"):
        assert installed.sql(f"SELECT pg_terminate_backend({pid})") == [(True,)]
        assert heard.wait_for(lambda heard: heard.lost == 1), "on_lost was not called"
    assert listener.connected and listener.backend_pid not in (None, pid)
    (warning,) = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warning.startswith(f"sessioncache listener on {installed.channel!r}: ")
    assert warning.endswith("listening again in 0.1 s") and "\n" not in warning
    installed.write("INSERT INTO person VALUES (3, 'three')")
    assert heard.until("person") == [frozenset({"person"})]
    assert heard.lost == 1


def test_the_delay_before_listening_again_doubles_and_starts_again_after_a_connection_that_held(
    installed, listen, caplog
):
    # Each kill must come within the longest delay of the connection, or it
    # "held": 2 s leaves room for a loaded machine (0.3 s did not).
    listener, heard = listen(retry=(0.5, 2.0))

    def kill() -> str:
        pid = listener.backend_pid
        caplog.clear()
        installed.sql(f"SELECT pg_terminate_backend({pid})")
        assert heard.wait_for(lambda heard: listener.connected and listener.backend_pid not in (None, pid))
        (warning,) = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
        return warning.rpartition(" in ")[2]

    with caplog.at_level(logging.WARNING, logger="pyramid_sessioncache"):
        time.sleep(2.05)  # the connection held longer than the longest delay
        assert kill() == "0.5 s"
        assert kill() == "1.0 s"  # lost again at once: wait longer
        assert kill() == "2.0 s"  # the longest
        time.sleep(2.05)
        assert kill() == "0.5 s"
    assert heard.lost == 4


def test_a_callback_that_does_not_return_delays_stop_with_a_warning(installed, caplog):
    heard = Heard()
    release = threading.Event()

    def on_tables(tables: frozenset[str]) -> None:
        heard.on_tables(tables)
        release.wait(WAIT)

    listener = Listener(installed.dsn, on_tables, heard.on_lost, channel=installed.channel, poll=0.05).start()
    try:
        assert listener.wait_connected(WAIT)
        installed.write("INSERT INTO tag VALUES (1)")
        heard.until("tag")  # the callback now holds the thread
        with caplog.at_level(logging.WARNING, logger="pyramid_sessioncache"):
            listener.stop(timeout=0.2)
        assert any("did not stop within 0.2 s" in record.getMessage() for record in caplog.records)
    finally:
        release.set()
        listener.stop()
    assert not listener.connected


def test_a_database_that_appears_later_is_listened_to_then_on_lost_runs(db, postgres_url, listen):
    name = f"later_{uuid.uuid4().hex[:10]}"
    failed = threading.Event()

    class Failure(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno == logging.WARNING and name in record.getMessage():
                failed.set()

    logger = logging.getLogger("pyramid_sessioncache.engine.invalidation.notify")
    handler = Failure()
    logger.addHandler(handler)
    dsn = dsn_of(make_url(postgres_url).set(database=name))
    heard = Heard()
    listener = Listener(dsn, heard.on_tables, heard.on_lost, channel=db.channel, poll=0.05).start()
    try:
        assert failed.wait(WAIT), "no warning was logged"
        assert not listener.connected
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        assert listener.wait_connected(WAIT)
        # What was committed before LISTEN is unknown: on_lost says so.
        assert heard.wait_for(lambda heard: heard.lost == 1)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"NOTIFY \"{db.channel}\", 'person'")
        assert heard.until("person") == [frozenset({"person"})]
    finally:
        listener.stop()
        logger.removeHandler(handler)
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_a_failing_callback_is_logged_and_listening_goes_on(installed, caplog):
    heard = Heard()
    calls = []

    def on_tables(tables: frozenset[str]) -> None:
        calls.append(tables)
        if len(calls) == 1:
            raise RuntimeError("the cache backend is down")
        heard.on_tables(tables)

    with (
        caplog.at_level(logging.ERROR, logger="pyramid_sessioncache"),
        Listener(installed.dsn, on_tables, heard.on_lost, channel=installed.channel, poll=0.05) as listener,
    ):
        assert listener.wait_connected(WAIT)
        installed.write("INSERT INTO tag VALUES (1)")
        deadline = time.monotonic() + WAIT
        while not calls and time.monotonic() < deadline:  # one batch each: both at once would both fail
            time.sleep(0.01)
        installed.write("INSERT INTO person VALUES (3, 'three')")
        assert heard.until("person") == [frozenset({"person"})]
    assert calls[0] == frozenset({"tag"})
    assert any("the cache backend is down" in str(record.exc_info[1]) for record in caplog.records if record.exc_info)
    assert heard.lost == 0


def test_stop_is_prompt_and_closes_the_connection(installed):
    name = f"{installed.channel}-stop"
    listener = Listener(installed.dsn, print, print, channel=installed.channel, application_name=name)
    assert repr(listener) == f"<Listener channel={installed.channel!r} not listening>"
    with listener:
        assert listener.wait_connected(WAIT)
        assert repr(listener) == f"<Listener channel={installed.channel!r} listening>"
        with pytest.raises(RuntimeError, match="started already"):
            listener.start()
        began = time.monotonic()
    assert time.monotonic() - began < 5.0  # the default poll: 0.25 s, given room for a loaded machine
    assert not listener.connected and listener.backend_pid is None
    query = f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{name}'"
    deadline = time.monotonic() + WAIT
    while installed.sql(query) != [(0,)] and time.monotonic() < deadline:
        time.sleep(0.01)  # the server ends the backend just after the client closed
    assert installed.sql(query) == [(0,)]


def test_stop_is_prompt_while_waiting_to_connect_again(tmp_path, caplog):
    listener = Listener(f"host={tmp_path} port=1 dbname=nothing", print, print, retry=(30.0, 30.0))
    with caplog.at_level(logging.WARNING, logger="pyramid_sessioncache"):
        listener.start()

        def waiting() -> bool:
            return any("listening again in 30.0 s" in record.getMessage() for record in caplog.records)

        deadline = time.monotonic() + WAIT  # the attempt failed, and the delay began
        while not waiting() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert waiting() and not listener.connected
        began = time.monotonic()
        listener.stop()
    assert time.monotonic() - began < 10.0  # not the 30 s delay (given room for a loaded machine)


# dsn_of ----------------------------------------------------------------------------


def test_dsn_of_gives_libpq_what_the_engine_connects_to():
    url = "postgresql+psycopg://app:s3cret@db.example.org:6432/shop?sslmode=require"
    expected = "postgresql://app:s3cret@db.example.org:6432/shop?sslmode=require"
    assert dsn_of(url) == expected
    assert dsn_of(make_url(url)) == expected
    engine = create_engine(url)
    assert dsn_of(engine) == expected  # the password, hidden in repr(engine.url), is kept
    assert dsn_of(url.replace("+psycopg", "+psycopg2", 1)) == expected  # whatever the driver
    socket = psycopg.conninfo.conninfo_to_dict(dsn_of("postgresql+psycopg://app@/shop?host=/run/postgresql"))
    assert socket == {"user": "app", "dbname": "shop", "host": "/run/postgresql"}
    assert psycopg.conninfo.conninfo_to_dict(dsn_of(url))["password"] == "s3cret"
    with pytest.raises(ValueError, match="needs PostgreSQL, not sqlite"):
        dsn_of("sqlite:///x.sqlite")


def test_without_psycopg_the_module_imports_and_the_listener_says_what_to_install():
    code = """
import importlib.abc, sys

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "psycopg":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")

sys.meta_path.insert(0, Absent())
from pyramid_sessioncache.engine.invalidation.notify import Listener, dsn_of
print(dsn_of("postgresql+psycopg://app@db/shop"))
try:
    Listener("", print, print).start()
except ImportError as exc:
    print(exc)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "postgresql://app@db/shop",
        'the sessioncache Listener needs psycopg 3.2 or later: pip install "psycopg[binary]"',
    ]
