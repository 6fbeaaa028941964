"""Attack s33, PostgreSQL: races and isolation levels that leave a shared region stale.

Each test makes a reader's miss and a writer's commit meet in a given
order (with engine events and thread events, never with timing), or
gives the reader a snapshot older than the versions it reads, and then
checks that a reader in a fresh transaction, after the writer's commit
has returned, is served what the same query returns uncached on a
connection of its own.  Hits are proven by counting SQL.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Column, Date, Integer, MetaData, String, Table, create_engine, event, select, text, update
from sqlalchemy.orm import Session, selectinload, sessionmaker

from pyramid_sessioncache import FromCache, SessionCache, _sqlalchemy
from pyramid_sessioncache.engine.invalidation import schema, writes
from pyramid_sessioncache.engine.invalidation.notify import Listener, dsn_of, install_triggers
from pyramid_sessioncache.engine.invalidation.reads import ALL_TABLES

from . import models
from .conftest import SECRET, SQLCounter
from .models import Address, Person

#: Person 1 and its addresses, in id order: two statements (selectinload).
WITH_ADDRESSES = select(Person).where(Person.id == 1).options(selectinload(Person.addresses))
STREETS_1 = select(Address.street).where(Address.person_id == 1).order_by(Address.id)
#: Seconds a paused thread (or a poll of what arrives asynchronously) waits before the test fails.
WAIT = 30.0


def streets(session, statement=WITH_ADDRESSES, region: str | None = "memory") -> list[str]:
    """The streets of person 1, read with ``statement`` through ``region`` (None: uncached)."""
    if region is not None:
        statement = statement.options(FromCache(region))
    people = session.execute(statement).scalars().all()
    return [address.street for person in people for address in sorted(person.addresses, key=lambda a: a.id)]


def truth(url: str) -> list[str]:
    """Person 1's streets, uncached, on a connection of a fresh engine."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(STREETS_1).scalars())
    finally:
        engine.dispose()


def write_elsewhere(url: str, sql: str) -> None:
    """Run ``sql`` in a transaction of a fresh engine of the process (its commit is published), committed."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(sql)
    finally:
        engine.dispose()


def served_then_hit(Sessions, engines, expected: list[str]) -> None:
    """A new Session is served ``expected`` (what the database holds now); the next one, the same as a hit."""
    with Sessions() as fresh:
        assert streets(fresh) == expected
    counters = [SQLCounter(engine) for engine in engines]
    with Sessions() as again:
        assert streets(again) == expected
    assert [counter.count for counter in counters] == [0] * len(engines)  # a hit


@pytest.fixture
def memory_cache() -> SessionCache:
    """A cache with one ``memory`` region."""
    return SessionCache({"memory": {"type": "memory"}}, secret=SECRET)


# 1. A Session with a bind per class: an eager load on another bind's connection --------------------


def test_an_eager_load_on_another_binds_older_snapshot_is_not_stored(pg_url, memory_cache):
    """An eager load run on another bind's connection, whose REPEATABLE READ snapshot is older, stores nothing."""
    people = create_engine(pg_url)
    addresses = create_engine(pg_url, isolation_level="REPEATABLE READ")
    try:
        Sessions = sessionmaker(binds={Person: people, Address: addresses}, info=memory_cache.session_info())
        with Sessions() as warm:  # the shape's tables (person, address) are learnt, an entry stored
            assert streets(warm) == truth(pg_url) == ["1 Main St", "1 High St"]
        with Sessions() as old:
            old.execute(select(Address.id)).all()  # the address bind's snapshot is taken here
            write_elsewhere(pg_url, "UPDATE address SET street = 'moved' WHERE id = 1")
            # person's connection has not begun: the miss is allowed to store.
            assert streets(old) == ["1 Main St", "1 High St"]  # as its snapshot shows them
        assert truth(pg_url) == ["moved", "1 High St"]
        served_then_hit(Sessions, (people, addresses), ["moved", "1 High St"])
    finally:
        people.dispose()
        addresses.dispose()


def test_an_eager_load_on_another_binds_uncommitted_writes_is_not_stored(pg_url, memory_cache):
    """An eager load run on another bind, a Connection whose open transaction wrote, stores nothing."""
    people, other = create_engine(pg_url), create_engine(pg_url)
    try:
        with other.connect() as shared:
            shared.execute(update(Address).where(Address.id == 1).values(street="never committed"))
            Sessions = sessionmaker(binds={Person: people, Address: shared}, info=memory_cache.session_info())
            with Sessions() as reader:
                assert streets(reader) == ["never committed", "1 High St"]  # what its transaction shows
            shared.rollback()
        fresh_sessions = sessionmaker(binds={Person: people, Address: other}, info=memory_cache.session_info())
        assert truth(pg_url) == ["1 Main St", "1 High St"]
        served_then_hit(fresh_sessions, (people, other), ["1 Main St", "1 High St"])
    finally:
        people.dispose()
        other.dispose()


def test_an_eager_load_on_a_standby_bind_that_has_not_replayed_a_commit_is_not_stored(pg_standby, memory_cache):
    """An eager load run on a hot standby bind that has not replayed a commit stores nothing."""
    primary, standby = (create_engine(url) for url in pg_standby)
    try:
        models.Base.metadata.create_all(primary)
        with Session(primary) as seeding:
            models.seed(seeding)
        Sessions = sessionmaker(binds={Person: primary, Address: standby}, info=memory_cache.session_info())
        replayed(standby, ["1 Main St", "1 High St"])
        with Sessions() as warm:
            assert streets(warm) == ["1 Main St", "1 High St"]
        with standby.connect() as conn:
            conn.exec_driver_sql("SELECT pg_wal_replay_pause()")
        try:
            move_address(primary)  # committed and published; not replayed yet
            with Sessions() as reader:
                assert streets(reader) == ["1 Main St", "1 High St"]  # as the standby shows them
        finally:
            with standby.connect() as conn:
                conn.exec_driver_sql("SELECT pg_wal_replay_resume()")
        replayed(standby, ["moved", "1 High St"])
        with Sessions() as fresh:  # nothing read on a standby is stored: a miss, every time
            assert streets(fresh) == ["moved", "1 High St"]
    finally:
        primary.dispose()
        standby.dispose()


def replayed(standby, expected: list[str]) -> None:
    """Wait until the standby shows person 1's streets as ``expected`` (replay is asynchronous)."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            with standby.connect() as conn:
                if list(conn.execute(STREETS_1).scalars()) == expected:
                    return
        except Exception:  # no table yet
            pass
        assert time.monotonic() < deadline, "the standby did not replay"
        time.sleep(0.05)


# 2. A commit racing a miss, each step of one against the other ---------------------------------------


def region_cache(request, name: str) -> SessionCache:
    """A cache with the region ``name``: ``memory``, or ``redis`` (a real server, shared like another process's)."""
    if name == "redis":
        return SessionCache(
            {"redis": {"type": "ext:redis", "url": request.getfixturevalue("redis_url")}}, secret=SECRET
        )
    return SessionCache({"memory": {"type": "memory"}}, secret=SECRET)


def move_address(engine, street: str = "moved") -> None:
    """Rename address 1 in a Session of ``engine``, committed."""
    with Session(engine) as writer:
        writer.execute(update(Address).where(Address.id == 1).values(street=street))
        writer.commit()


def read_streets(Sessions, region: str, into: list) -> None:
    """Append person 1's streets, read through ``region`` in a Session of its own, to ``into`` (a thread's target)."""
    with Sessions() as session:
        into.append(streets(session, region=region))


def assert_served_as_stored(Sessions, engine, url: str, region: str) -> None:
    """A fresh Session is served person 1's streets as they are now, and the next one from the region (no SQL)."""
    with Sessions() as fresh:
        assert streets(fresh, region=region) == truth(url)
    sql = SQLCounter(engine)
    with Sessions() as again:
        assert streets(again, region=region) == truth(url)
    assert sql.count == 0, sql.statements


@pytest.mark.parametrize("region", ["memory", "redis"])
def test_rows_read_before_a_commit_and_stored_after_it_returned_are_void(request, pg_url, region):
    """A miss that read the old rows, then stored them after another thread's commit returned, is never served."""
    cache = region_cache(request, region)
    reader_engine, writer_engine = create_engine(pg_url), create_engine(pg_url)
    Sessions = sessionmaker(reader_engine, info=cache.session_info())
    read, go, armed = threading.Event(), threading.Event(), threading.Event()

    @event.listens_for(reader_engine, "after_cursor_execute")
    def pause(conn, cursor, statement, parameters, context, executemany):
        if armed.is_set() and "FROM address" in statement:  # the last statement of the load: old rows in hand
            armed.clear()
            read.set()
            assert go.wait(WAIT)

    try:
        with Sessions() as warm:
            assert streets(warm, region=region) == ["1 Main St", "1 High St"]  # the shape's tables are learnt
        move_address(writer_engine, "first move")  # the entry is void: the next read misses
        armed.set()
        seen: list = []
        reader = threading.Thread(target=read_streets, args=(Sessions, region, seen))
        reader.start()
        assert read.wait(WAIT)
        move_address(writer_engine)  # committed, returned
        go.set()
        reader.join(WAIT)
        assert seen == [["first move", "1 High St"]]  # what its statement read
        assert_served_as_stored(Sessions, reader_engine, pg_url, region)
        assert truth(pg_url)[0] == "moved"
    finally:
        go.set()
        reader_engine.dispose()
        writer_engine.dispose()
        cache.close()


@pytest.mark.parametrize("region", ["memory", "redis"])
def test_a_miss_inside_a_commits_window_is_void_once_the_commit_returned(request, pg_url, region):
    """A miss that reads versions already bumped by a commit, and rows the database has not committed yet, is never served after the commit returned."""
    cache = region_cache(request, region)
    reader_engine, writer_engine = create_engine(pg_url), create_engine(pg_url)
    Sessions = sessionmaker(reader_engine, info=cache.session_info())
    bumped, go = threading.Event(), threading.Event()
    invalidations = []

    @event.listens_for(writer_engine, "commit")  # after the add-on's (class-level) listener: published once
    def pause(conn):
        invalidations.append(cache.stats.region(region).invalidations)
        bumped.set()
        assert go.wait(WAIT)

    try:
        with Sessions() as warm:
            assert streets(warm, region=region) == ["1 Main St", "1 High St"]
        before = cache.stats.region(region).invalidations
        writer = threading.Thread(target=move_address, args=(writer_engine,))
        writer.start()
        assert bumped.wait(WAIT)
        assert invalidations == [before + 1]  # the first publication happened, the database has not committed
        stores = cache.stats.region(region).stores
        with Sessions() as inside:
            assert streets(inside, region=region) == ["1 Main St", "1 High St"]  # a miss, stored
        assert cache.stats.region(region).stores == stores + 1
        go.set()
        writer.join(WAIT)
        assert not writer.is_alive()
        assert_served_as_stored(Sessions, reader_engine, pg_url, region)
        assert truth(pg_url)[0] == "moved"
    finally:
        go.set()
        reader_engine.dispose()
        writer_engine.dispose()
        cache.close()


def test_a_miss_that_read_versions_before_a_commit_and_rows_after_it_stores_nothing_stale(pg_url, memory_cache):
    """A miss paused between reading its versions and running its query, while another thread commits, is never served stale."""
    reader_engine, writer_engine = create_engine(pg_url), create_engine(pg_url)
    Sessions = sessionmaker(reader_engine, info=memory_cache.session_info())
    about_to_read, go, armed = threading.Event(), threading.Event(), threading.Event()

    @event.listens_for(reader_engine, "before_cursor_execute")
    def pause(conn, cursor, statement, parameters, context, executemany):
        if armed.is_set() and "FROM person" in statement:  # versions read, no row yet
            armed.clear()
            about_to_read.set()
            assert go.wait(WAIT)

    try:
        with Sessions() as warm:
            assert streets(warm) == ["1 Main St", "1 High St"]
        move_address(writer_engine, "first move")
        armed.set()
        seen: list = []
        reader = threading.Thread(target=read_streets, args=(Sessions, "memory", seen))
        reader.start()
        assert about_to_read.wait(WAIT)
        move_address(writer_engine)
        go.set()
        reader.join(WAIT)
        assert seen == [["moved", "1 High St"]]
        assert_served_as_stored(Sessions, reader_engine, pg_url, "memory")
    finally:
        go.set()
        reader_engine.dispose()
        writer_engine.dispose()


# 3. Isolation levels and snapshots -------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"isolation_level": "SERIALIZABLE", "postgresql_readonly": True, "postgresql_deferrable": True},
        {"isolation_level": "REPEATABLE READ", "postgresql_readonly": True},
        {"isolation_level": "READ COMMITTED", "postgresql_readonly": True},
    ],
    ids=["serializable read only deferrable", "repeatable read read only", "read committed read only"],
)
def test_a_read_only_transaction_begun_before_a_commit_never_stores_old_rows(pg_url, memory_cache, options):
    """A read-only (deferrable) transaction whose snapshot predates a commit leaves no old rows in the region."""
    engine = create_engine(pg_url)
    Sessions = sessionmaker(engine, info=memory_cache.session_info())
    try:
        with Sessions() as warm:
            assert streets(warm) == ["1 Main St", "1 High St"]
        with Sessions() as old:
            old.connection(execution_options=options)
            old.execute(select(Address.id)).all()  # the transaction's first snapshot
            write_elsewhere(pg_url, "UPDATE address SET street = 'moved' WHERE id = 1")
            served = streets(old)
            if options["isolation_level"] == "READ COMMITTED":
                assert served == ["moved", "1 High St"]  # each statement's own snapshot: current
            else:
                assert served == ["1 Main St", "1 High St"]
        assert_served_as_stored(Sessions, engine, pg_url, "memory")
    finally:
        engine.dispose()


def test_an_imported_older_snapshot_never_stores(pg_url, memory_cache):
    """A transaction that imports a snapshot exported before a commit (SET TRANSACTION SNAPSHOT) stores nothing."""
    engine = create_engine(pg_url)
    Sessions = sessionmaker(engine, info=memory_cache.session_info())
    exporter = create_engine(pg_url, isolation_level="REPEATABLE READ")
    try:
        with Sessions() as warm:
            assert streets(warm) == ["1 Main St", "1 High St"]
        with exporter.connect() as holder:
            snapshot = holder.execute(text("SELECT pg_export_snapshot()")).scalar_one()
            write_elsewhere(pg_url, "UPDATE address SET street = 'moved' WHERE id = 1")
            with Sessions() as old:
                old.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
                old.execute(text(f"SET TRANSACTION SNAPSHOT '{snapshot}'"))
                assert streets(old) == ["1 Main St", "1 High St"]
        assert_served_as_stored(Sessions, engine, pg_url, "memory")
    finally:
        engine.dispose()
        exporter.dispose()


def test_a_write_on_an_autocommit_connection_of_a_session_is_seen_at_once(pg_url, memory_cache):
    """A write run through ``session.connection(execution_options={'isolation_level': 'AUTOCOMMIT'})`` voids entries as it returns."""
    engine = create_engine(pg_url)
    Sessions = sessionmaker(engine, info=memory_cache.session_info())
    try:
        with Sessions() as warm:
            assert streets(warm) == ["1 Main St", "1 High St"]
        with Sessions() as writer:
            conn = writer.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
            conn.execute(update(Address).where(Address.id == 1).values(street="moved"))
            with Sessions() as meanwhile:  # committed by the database already
                assert streets(meanwhile) == truth(pg_url) == ["moved", "1 High St"]
            assert streets(writer) == ["moved", "1 High St"]
        assert_served_as_stored(Sessions, engine, pg_url, "memory")
    finally:
        engine.dispose()


# 4. Other programs' writes, heard by LISTEN/NOTIFY ---------------------------------------------------

#: Another program's schema: a partitioned table (read through its parent), a procedure that commits part-way.
OTHER_SCHEMA = """
CREATE TABLE reading (id int, at date, value text) PARTITION BY RANGE (at);
CREATE TABLE reading_2024 PARTITION OF reading FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE reading_2025 PARTITION OF reading FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
INSERT INTO reading VALUES (1, '2024-05-01', 'first'), (2, '2025-05-01', 'second');
CREATE PROCEDURE move_and_commit() LANGUAGE plpgsql AS $$
BEGIN
    UPDATE address SET street = 'moved' WHERE id = 1;
    COMMIT;
    UPDATE address SET street = 'moved too' WHERE id = 2;
END $$;
"""


#: The partitioned table, as the application reads it (the models do not map it).
READING = Table("reading", MetaData(), Column("id", Integer), Column("at", Date), Column("value", String))
READINGS = select(READING.c.id, READING.c.value).order_by(READING.c.id)


@pytest.fixture
def listening(pg_url, memory_cache):
    """``(engine, Sessions)`` on a database whose tables notify, with ``memory_cache`` listening."""
    engine = create_engine(pg_url)
    other_program(engine, OTHER_SCHEMA)  # a migration of its own, before the application starts
    with engine.begin() as conn:
        install_triggers(conn)
    memory_cache.listen(engine)
    try:
        yield engine, sessionmaker(engine, info=memory_cache.session_info())
    finally:
        memory_cache.close()
        engine.dispose()


def other_program(engine, *statements: str, autocommit: bool = False, copy_rows=()) -> None:
    """Run ``statements`` on a plain psycopg connection (no engine of the process sees it), committed."""
    with psycopg.connect(dsn_of(engine), autocommit=autocommit) as conn:
        for statement in statements:
            conn.execute(statement)
        if copy_rows:
            with conn.cursor().copy("COPY address (id, person_id, street, postal_code_id) FROM STDIN") as copy:
                for row in copy_rows:
                    copy.write_row(row)


def eventually_served(Sessions, engine, read, uncached) -> None:
    """Poll until a fresh Session's cached ``read`` equals ``uncached()`` (NOTIFY is asynchronous), then prove a hit."""
    deadline = time.monotonic() + WAIT
    while True:
        with Sessions() as fresh:
            served = read(fresh)
        if served == uncached():
            break
        assert time.monotonic() < deadline, f"still served {served!r}, not {uncached()!r}"
        time.sleep(0.02)
    expected = uncached()
    sql = SQLCounter(engine)
    with Sessions() as again:
        assert read(again) == expected
    assert sql.count == 0, sql.statements


OTHER_WRITES = {
    "COPY FROM": dict(copy_rows=[(1001, 1, "copied", 1)]),
    "TRUNCATE address": dict(statements=["TRUNCATE address"]),
    "TRUNCATE person CASCADE": dict(statements=["TRUNCATE person CASCADE"]),
    "a function called by a SELECT": dict(
        statements=[
            "CREATE FUNCTION pg_temp.move() RETURNS int LANGUAGE sql AS "
            "$$ UPDATE address SET street = 'moved' WHERE id = 1 RETURNING 1 $$",
            "SELECT pg_temp.move()",
        ]
    ),
    "a DO block": dict(statements=["DO $$ BEGIN UPDATE address SET street = 'moved' WHERE id = 1; END $$"]),
    "a DO block that commits": dict(
        statements=[
            "DO $$ BEGIN UPDATE address SET street = 'moved' WHERE id = 1; COMMIT; "
            "UPDATE address SET street = 'moved too' WHERE id = 2; END $$"
        ],
        autocommit=True,
    ),
    "a procedure that commits": dict(statements=["CALL move_and_commit()"], autocommit=True),
    "MERGE": dict(
        statements=[
            "MERGE INTO address a USING (VALUES (1, 'merged')) v (id, street) ON a.id = v.id "
            "WHEN MATCHED THEN UPDATE SET street = v.street"
        ]
    ),
    "an upsert": dict(
        statements=[
            "INSERT INTO address (id, person_id, street, postal_code_id) VALUES (1, 1, 'upserted', 1) "
            "ON CONFLICT (id) DO UPDATE SET street = excluded.street"
        ]
    ),
    "as a replica": dict(
        statements=[
            "SET session_replication_role = replica",
            "UPDATE address SET street = 'replicated' WHERE id = 1",
        ]
    ),
}


@pytest.mark.parametrize("write", list(OTHER_WRITES))
def test_another_programs_write_is_heard(listening, pg_url, write):
    """Each way another program writes (COPY, TRUNCATE, a function, a DO block, MERGE...) voids what read the table."""
    engine, Sessions = listening
    with Sessions() as warm:
        assert streets(warm) == ["1 Main St", "1 High St"]
    options = dict(OTHER_WRITES[write])
    other_program(engine, *options.pop("statements", ()), **options)
    assert truth(pg_url) != ["1 Main St", "1 High St"]
    eventually_served(Sessions, engine, streets, lambda: truth(pg_url))


@pytest.mark.parametrize("target", ["reading_2024", "reading"])
def test_another_programs_write_to_a_partition_voids_what_read_the_parent(listening, target):
    """A partition written directly or through its parent by another program voids what read the parent."""
    engine, Sessions = listening

    def read(session):
        return [tuple(row) for row in session.execute(READINGS.options(FromCache("memory"))).all()]

    def uncached():
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(READINGS).all()]

    with Sessions() as warm:
        assert read(warm) == [(1, "first"), (2, "second")]
    other_program(engine, f"UPDATE {target} SET value = 'changed' WHERE id = 1")
    eventually_served(Sessions, engine, read, uncached)
    assert uncached()[0] == (1, "changed")


def test_a_write_committed_after_the_listener_reconnected_is_heard(listening, memory_cache, pg_url):
    """A transaction open while the listener's backend is killed, committed after it listens again, is heard."""
    engine, Sessions = listening
    (listener,) = memory_cache.listeners
    with Sessions() as warm:
        assert streets(warm) == ["1 Main St", "1 High St"]
    with psycopg.connect(dsn_of(engine)) as writer:
        writer.execute("UPDATE address SET street = 'moved' WHERE id = 1")  # open, not committed
        killed = listener.backend_pid
        with psycopg.connect(dsn_of(engine), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (killed,))
        deadline = time.monotonic() + WAIT
        while not (listener.connected and listener.backend_pid not in (None, killed)):
            assert time.monotonic() < deadline, "the listener did not listen again"
            time.sleep(0.02)
        with Sessions() as meanwhile:  # stored again after on_lost, perhaps: the old rows are current still
            assert streets(meanwhile) == ["1 Main St", "1 High St"]
        writer.commit()
    eventually_served(Sessions, engine, streets, lambda: truth(pg_url))
    assert truth(pg_url)[0] == "moved"


def test_a_write_committed_while_the_listener_is_away_is_covered(pg_url, memory_cache):
    """A write committed while the listener's connection is gone is covered once it listens again (everything is void)."""
    engine = create_engine(pg_url)
    with engine.begin() as conn:
        install_triggers(conn)
    # The engine's own listener, but slow to connect again: the write lands while it is away.
    listener = Listener(dsn_of(engine), writes.publish, lambda: writes.publish({ALL_TABLES}), retry=(1.0, 1.0))
    listener.start(wait=WAIT)
    Sessions = sessionmaker(engine, info=memory_cache.session_info())
    try:
        with Sessions() as warm:
            assert streets(warm) == ["1 Main St", "1 High St"]
        killed = listener.backend_pid
        with psycopg.connect(dsn_of(engine), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (killed,))
        deadline = time.monotonic() + WAIT
        while listener.connected and listener.backend_pid == killed:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        other_program(engine, "UPDATE address SET street = 'moved' WHERE id = 1")
        with Sessions() as away:  # nothing heard yet: may be served the old entry (the documented window)
            streets(away)
        eventually_served(Sessions, engine, streets, lambda: truth(pg_url))
        assert truth(pg_url)[0] == "moved"
    finally:
        listener.stop()
        engine.dispose()


# 5. The catalog, read in a transaction whose snapshot predates the process's own migration ---------

#: A migration: each UPDATE of address also renames person 1, by a trigger.
TOUCHING_TRIGGER = """
CREATE FUNCTION touch_person() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE person SET name = name || ' (touched)' WHERE id = 1;
    RETURN NULL;
END $$;
CREATE TRIGGER touch AFTER UPDATE ON address FOR EACH STATEMENT EXECUTE FUNCTION touch_person();
"""
NAME_1 = select(Person.name).where(Person.id == 1)


def migrate(url: str) -> None:
    """Run the migration on an engine of the process (its DDL is seen), committed."""
    migrator = create_engine(url)
    try:
        with migrator.begin() as conn:
            conn.exec_driver_sql(TOUCHING_TRIGGER)
    finally:
        migrator.dispose()


def name_1(session, region: str | None = "memory") -> str:
    statement = NAME_1 if region is None else NAME_1.options(FromCache(region))
    return session.execute(statement).scalar_one()


def assert_trigger_writes_invalidate(engine, Sessions, url: str) -> None:
    """Person 1's name is stored, address is updated (its trigger renames person 1), a fresh read sees it."""
    with Sessions() as warm:
        assert name_1(warm) == "person 1"  # stored after the migration committed
    with Sessions() as writer:
        writer.execute(update(Address).where(Address.id == 1).values(street="moved"))
        writer.commit()
    with Session(create_engine(url)) as outside:
        now = outside.execute(NAME_1).scalar_one()
        outside.get_bind().dispose()
    assert now == "person 1 (touched)"
    with Sessions() as fresh:
        assert name_1(fresh) == now


def test_a_trigger_the_process_created_is_seen_at_the_next_write(pg_url, memory_cache):
    """A trigger added by the process's own migration makes a write to its table invalidate what the trigger writes."""
    engine = create_engine(pg_url)
    Sessions = sessionmaker(engine, info=memory_cache.session_info())
    try:
        with Sessions() as before:
            assert name_1(before) == "person 1"  # the catalog of before the migration is read
        migrate(pg_url)
        assert_trigger_writes_invalidate(engine, Sessions, pg_url)
    finally:
        engine.dispose()


@pytest.mark.parametrize("connecting", ["a connection of its own", "no connection to spare"])
def test_a_catalog_read_again_on_an_older_snapshot_still_sees_the_migration(
    pg_url, memory_cache, monkeypatch, connecting
):
    """The catalog read again after the process's own migration, first needed in a transaction whose snapshot predates it, shows the migration.

    Read on a connection of its own; when none can be made, in the old
    transaction, for that once: it is not kept.
    """
    if connecting == "no connection to spare":

        def refused(engine):
            raise OSError("too many connections")

        monkeypatch.setattr(_sqlalchemy, "raw_connect", refused)
    engine = create_engine(pg_url)
    repeatable = create_engine(pg_url, isolation_level="REPEATABLE READ")
    Sessions = sessionmaker(engine, info=memory_cache.session_info())
    try:
        with Sessions() as before:
            assert name_1(before) == "person 1"
        with Session(repeatable) as old:
            old.execute(select(Address.id)).all()  # a snapshot of before the migration
            migrate(pg_url)  # committed: every catalog is forgotten
            old.execute(select(Address.id)).all()  # its statement needs the catalog: read here, as of its snapshot
        assert_trigger_writes_invalidate(engine, Sessions, pg_url)
    finally:
        engine.dispose()
        repeatable.dispose()


def test_a_catalog_read_before_a_migration_committed_is_not_kept_after_it(pg_url, memory_cache, monkeypatch):
    """A catalog read that began before the process's own migration committed, and ended after, is not kept."""
    engine = create_engine(pg_url)
    Sessions = sessionmaker(engine, info=memory_cache.session_info())
    read, go = threading.Event(), threading.Event()
    reader_thread: list = []
    original = schema._Schema._read_catalog

    def paused(conn):
        found = original(conn)
        if threading.current_thread() in reader_thread:  # the reader's, not the migration's own
            read.set()
            assert go.wait(WAIT)
        return found

    monkeypatch.setattr(schema._Schema, "_read_catalog", staticmethod(paused))

    def reader():
        with Sessions() as session:
            session.execute(select(Address.id)).all()  # its statement needs the catalog: read, then kept

    thread = threading.Thread(target=reader)
    reader_thread.append(thread)
    try:
        thread.start()
        assert read.wait(WAIT)  # read: the schema of before the migration
        migrate(pg_url)  # committed: every catalog is forgotten
        go.set()
        thread.join(WAIT)
        assert not thread.is_alive()
        assert_trigger_writes_invalidate(engine, Sessions, pg_url)
    finally:
        go.set()
        engine.dispose()


# 6. Two-phase commit ------------------------------------------------------------------------------


def test_a_miss_between_prepare_and_commit_prepared_is_void_once_the_commit_returned(two_phase_url, memory_cache):
    """A miss that reads the rows of before a prepared transaction, between its first publication and COMMIT PREPARED, is never served after the commit returned."""
    url = two_phase_url.replace("postgresql://", "postgresql+psycopg://", 1)
    reader_engine, writer_engine = create_engine(url), create_engine(url)
    models.Base.metadata.create_all(reader_engine)
    with Session(reader_engine) as seeding:
        models.seed(seeding)
    Sessions = sessionmaker(reader_engine, info=memory_cache.session_info())
    prepared, go = threading.Event(), threading.Event()

    @event.listens_for(writer_engine, "commit_twophase")  # after the add-on's: published once, not committed
    def pause(conn, xid, is_prepared):
        prepared.set()
        assert go.wait(WAIT)

    def write():
        with Session(writer_engine, twophase=True) as writer:
            writer.execute(update(Address).where(Address.id == 1).values(street="moved"))
            writer.commit()

    try:
        with Sessions() as warm:
            assert streets(warm) == ["1 Main St", "1 High St"]
        writer = threading.Thread(target=write)
        writer.start()
        assert prepared.wait(WAIT)
        with Sessions() as inside:
            assert streets(inside) == ["1 Main St", "1 High St"]  # a miss: the prepared rows are not committed
        go.set()
        writer.join(WAIT)
        assert not writer.is_alive()
        assert_served_as_stored(Sessions, reader_engine, url, "memory")
        assert truth(url)[0] == "moved"
    finally:
        go.set()
        reader_engine.dispose()
        writer_engine.dispose()


# 7. Across processes ------------------------------------------------------------------------------

#: Another process of the application: its own SessionCache on the shared Redis region; renames address 1, commits, exits.
WRITER_PROCESS = """
import sys
from sqlalchemy import create_engine, update
from sqlalchemy.orm import Session
from pyramid_sessioncache import SessionCache
from tests.models import Address
url, redis_url, secret = sys.argv[1:4]
cache = SessionCache({"redis": {"type": "ext:redis", "url": redis_url}}, secret=secret)
engine = create_engine(url)
with Session(engine) as session:
    session.execute(update(Address).where(Address.id == 1).values(street="moved by another process"))
    session.commit()
engine.dispose()
cache.close()
"""


def test_rows_read_before_another_processs_commit_and_stored_after_it_exited_are_void(request, pg_url):
    """A miss that read the old rows, then stored them after another process's commit returned (and it exited), is never served."""
    cache = region_cache(request, "redis")
    engine = create_engine(pg_url)
    Sessions = sessionmaker(engine, info=cache.session_info())
    read, go, armed = threading.Event(), threading.Event(), threading.Event()

    @event.listens_for(engine, "after_cursor_execute")
    def pause(conn, cursor, statement, parameters, context, executemany):
        if armed.is_set() and "FROM address" in statement:
            armed.clear()
            read.set()
            assert go.wait(WAIT)

    try:
        with Sessions() as warm:
            assert streets(warm, region="redis") == ["1 Main St", "1 High St"]
        write_elsewhere(pg_url, "UPDATE address SET street = 'first move' WHERE id = 1")
        armed.set()
        seen: list = []
        reader = threading.Thread(target=read_streets, args=(Sessions, "redis", seen))
        reader.start()
        assert read.wait(WAIT)
        done = subprocess.run(
            [sys.executable, "-c", WRITER_PROCESS, pg_url, request.getfixturevalue("redis_url"), SECRET],
            cwd=Path(__file__).resolve().parent.parent,
            timeout=120,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        go.set()
        reader.join(WAIT)
        assert seen == [["first move", "1 High St"]]
        assert_served_as_stored(Sessions, engine, pg_url, "redis")
        assert truth(pg_url)[0] == "moved by another process"
    finally:
        go.set()
        engine.dispose()
        cache.close()
