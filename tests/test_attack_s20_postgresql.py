"""Attack s20, PostgreSQL: a cached read that returns what the same query, uncached, would not.

Each test sets up a case where the database shows a query's rows otherwise
than the cache believed: a connection's own temporary tables, a commit
that happens apart from its transaction (prepared, chained), a name
spelt otherwise (a dot, 63 bytes, a setting's alias), a schema change
whose effect the catalog no longer shows afterwards, a snapshot or a
standby older than the versions read, a statement run for its effect, a
setting changed where the SQL reader does not look.  The schema is
``test_writes_postgresql``'s (``pg_parent``, ``pg_child``...); tenants
are ``test_attack_s18_round6``'s.
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    Sequence,
    String,
    Table,
    create_engine,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool

from pyramid_sessioncache import SessionCache
from pyramid_sessioncache.engine import cache as engine_cache
from pyramid_sessioncache.engine.invalidation.notify import Listener, dsn_of, install_triggers
from pyramid_sessioncache.engine.invalidation.schema import forget_catalog

from . import test_attack_s18_round6 as round6
from . import test_writes_postgresql
from .conftest import SECRET, SQLCounter
from .test_writes_postgresql import PgParent, cached, uncached

#: Its fixtures: a database whose schema migrations made, and Sessions caching on it.
pg = test_writes_postgresql.pg
PgSession = test_writes_postgresql.PgSession
#: Schemas public, tenant_a and tenant_b, each with its ``item``.
tenants = round6.tenants
PARENTS = select(PgParent.id, PgParent.name).order_by(PgParent.id)


# 1. A temporary table that shadows a table: what one connection sees ------------------


TEMPORARY = {
    "CREATE TEMPORARY TABLE": "CREATE TEMPORARY TABLE pg_parent (id integer PRIMARY KEY, name varchar(50));"
    "INSERT INTO pg_parent VALUES (1, 'temporary')",
    'CREATE TABLE "pg_temp".name': "CREATE TABLE \"pg_temp\".pg_parent AS SELECT 1 AS id, 'temporary' AS name",
    "SELECT INTO TEMP": "SELECT 1 AS id, 'temporary'::varchar AS name INTO TEMP pg_parent",
    "EXPLAIN ANALYZE CREATE TEMP TABLE AS": "EXPLAIN ANALYZE CREATE TEMP TABLE pg_parent AS SELECT 1 AS id, "
    "'temporary'::varchar AS name",
}


@pytest.mark.parametrize("make", TEMPORARY)
@pytest.mark.parametrize("first", ["the shadowed connection", "another connection"])
def test_a_temporary_table_keeps_its_rows_to_its_connection(pg, region_options, region, first, make):
    # pg_temp comes first in every search_path: on the connection that made
    # it, "pg_parent" is the temporary table, elsewhere the permanent one.
    own = create_engine(pg.url, pool_size=1, max_overflow=0)  # its one connection, every time
    try:
        cache = SessionCache(region_options, default_region=region, secret=SECRET)
        Own = sessionmaker(bind=own, info=cache.session_info())
        Other = sessionmaker(bind=pg, info=cache.session_info())
        with Own() as session:
            session.connection().exec_driver_sql(TEMPORARY[make])
            session.commit()
        sessions = [(Own, own), (Other, pg)] if first == "the shadowed connection" else [(Other, pg), (Own, own)]
        for _ in range(2):
            for Sess, engine in sessions:
                assert cached(Sess, region, PARENTS) == uncached(engine, PARENTS)
        assert uncached(own, PARENTS) == [(1, "temporary")]
    finally:
        own.dispose()


@pytest.mark.parametrize("discard", ["DISCARD TEMP, rolled back", "DISCARD ALL"])
def test_a_discard_that_drops_temporary_tables(pg, region_options, region, discard):
    own = create_engine(pg.url, pool_size=1, max_overflow=0)
    try:
        cache = SessionCache(region_options, default_region=region, secret=SECRET)
        Own = sessionmaker(bind=own, info=cache.session_info())
        Other = sessionmaker(bind=pg, info=cache.session_info())
        with own.begin() as conn:
            conn.exec_driver_sql(TEMPORARY["CREATE TEMPORARY TABLE"])
        if discard == "DISCARD ALL":
            with own.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("DISCARD ALL")
        else:
            with own.connect() as conn:
                conn.exec_driver_sql("DISCARD TEMP")
                conn.rollback()
        for Sess, engine in [(Other, pg), (Own, own), (Other, pg), (Own, own)]:
            assert cached(Sess, region, PARENTS) == uncached(engine, PARENTS)
        assert len(uncached(own, PARENTS)) == (3 if discard == "DISCARD ALL" else 1)
    finally:
        own.dispose()


# 2. Two-phase commit sent as SQL: the commit happens at COMMIT PREPARED --------------------


@pytest.fixture
def pg2pc(two_phase_url):
    """An engine on a server that allows prepared transactions, with ``pg_parent``."""
    engine = create_engine(two_phase_url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE pg_parent (id integer PRIMARY KEY, name varchar(50));"
            "INSERT INTO pg_parent VALUES (1, 'one'), (2, 'two'), (3, 'three')"
        )
    yield engine
    engine.dispose()


def _commit_prepared(engine, gid):
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(f"COMMIT PREPARED '{gid}'")


@pytest.mark.parametrize("committer", ["the same connection", "another connection"])
def test_a_write_prepared_by_sql_is_published_when_committed(pg2pc, region_options, region, committer):
    cache = SessionCache(region_options, default_region=region, secret=SECRET)
    Sess = sessionmaker(bind=pg2pc, info=cache.session_info())
    cached(Sess, region, PARENTS)
    with pg2pc.connect() as conn:
        conn.execute(update(PgParent.__table__).where(PgParent.id == 1).values(name="prepared"))
        conn.exec_driver_sql("PREPARE TRANSACTION 'pg-s20'")
        conn.rollback()  # SQLAlchemy's transaction: the prepared one is the server's now
        # Until it commits, readers see the rows before it, and may store them.
        assert cached(Sess, region, PARENTS) == uncached(pg2pc, PARENTS) == [(1, "one"), (2, "two"), (3, "three")]
        if committer == "the same connection":
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("COMMIT PREPARED 'pg-s20'")
    if committer == "another connection":
        _commit_prepared(pg2pc, "pg-s20")
    assert uncached(pg2pc, PARENTS)[0] == (1, "prepared")
    assert cached(Sess, region, PARENTS) == uncached(pg2pc, PARENTS)


def test_a_prepared_transaction_recovered_by_another_process_is_published(pg2pc, two_phase_url, region_options, region):
    # Another process prepared a write, then died; this one commits it
    # (zope's two-phase commit recovered with Connection.commit_prepared()).
    cache = SessionCache(region_options, default_region=region, secret=SECRET)
    Sess = sessionmaker(bind=pg2pc, info=cache.session_info())
    cached(Sess, region, PARENTS)
    died = psycopg.connect(two_phase_url)
    died.tpc_begin("pg-s20-died")
    died.execute("UPDATE pg_parent SET name = 'recovered' WHERE id = 1")
    died.tpc_prepare()
    died.close()  # the prepared transaction stays, the server's
    assert cached(Sess, region, PARENTS) == uncached(pg2pc, PARENTS) == [(1, "one"), (2, "two"), (3, "three")]
    with pg2pc.connect() as recovering:
        assert "pg-s20-died" in recovering.recover_twophase()
        recovering.commit_prepared("pg-s20-died", recover=True)
    assert uncached(pg2pc, PARENTS)[0] == (1, "recovered")
    assert cached(Sess, region, PARENTS) == uncached(pg2pc, PARENTS)


# 3. The PostgreSQL listener: a table whose name holds a dot ------------------------------


def test_a_notification_of_a_table_whose_name_holds_a_dot(pg, region_options, region):
    # Another program writes "ledger.2024" (a table's name, not schema
    # ledger's table 2024); its entries read it by that name.
    with pg.begin() as conn:
        conn.exec_driver_sql(
            'CREATE TABLE "ledger.2024" (id integer PRIMARY KEY, amount integer); INSERT INTO "ledger.2024" VALUES (1, 10)'
        )
        install_triggers(conn)
    cache = SessionCache(region_options, default_region=region, secret=SECRET)
    Sess = sessionmaker(bind=pg, info=cache.session_info())
    ledger = Table("ledger.2024", MetaData(), Column("id", Integer, primary_key=True), Column("amount", Integer))
    amounts = select(ledger.c.id, ledger.c.amount)
    listener = cache.listen(pg)
    try:
        assert listener.wait_connected(30)
        assert cached(Sess, region, amounts) == [(1, 10)]
        assert cached(Sess, region, PARENTS)[0] == (1, "one")
        with psycopg.connect(dsn_of(pg)) as other:  # commits at the end of the block
            other.execute('UPDATE "ledger.2024" SET amount = 20')
            other.execute("UPDATE pg_parent SET name = 'heard' WHERE id = 1")
        # Both entries are polled: one commit's tables are bumped one key at
        # a time in a file region (in no set order), so "pg_parent" heard
        # does not mean "2024" is bumped yet.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
            cached(Sess, region, PARENTS)[0] != (1, "heard") or cached(Sess, region, amounts) != [(1, 20)]
        ):
            time.sleep(0.02)
        assert cached(Sess, region, PARENTS)[0] == (1, "heard")  # the commit's notifications were handled
        assert cached(Sess, region, amounts) == uncached(pg, amounts) == [(1, 20)]
    finally:
        cache.close()


# 4. DDL that takes a table's rows out of its parent --------------------------------------------

reading = Table("s20_reading", MetaData(), Column("id", Integer), Column("v", Integer))
HIERARCHIES = """
CREATE TABLE s20_reading (id int, v int) PARTITION BY RANGE (id);
CREATE TABLE s20_reading_old PARTITION OF s20_reading FOR VALUES FROM (0) TO (100);
CREATE TABLE s20_reading_new PARTITION OF s20_reading FOR VALUES FROM (100) TO (200);
INSERT INTO s20_reading VALUES (1, 1), (150, 2);
CREATE TABLE s20_animal (id int, v int);
CREATE TABLE s20_dog (bark text) INHERITS (s20_animal);
INSERT INTO s20_animal VALUES (1, 1);
INSERT INTO s20_dog VALUES (2, 2, 'woof');
"""
animal = Table("s20_animal", MetaData(), Column("id", Integer), Column("v", Integer))


@pytest.mark.parametrize(
    "parent, ddl",
    [
        (reading, "DROP TABLE s20_reading_old"),
        (animal, "DROP TABLE s20_dog"),
        (animal, "ALTER TABLE s20_dog NO INHERIT s20_animal"),
    ],
    ids=["a partition dropped", "a child table dropped", "NO INHERIT"],
)
@pytest.mark.parametrize("catalog", ["read", "not read yet"])
def test_ddl_that_unlinks_a_child_invalidates_its_parent(pg, PgSession, region, parent, ddl, catalog):
    with pg.begin() as conn:
        conn.exec_driver_sql(HIERARCHIES)
    stmt = select(parent.c.id, parent.c.v).order_by(parent.c.id)
    assert cached(PgSession, region, stmt) == uncached(pg, stmt)
    if catalog == "not read yet":  # by this process: a migration's, the entries another's
        forget_catalog()
    with PgSession() as session:  # a migration run by the application
        session.execute(text(ddl))
        session.commit()
    assert len(uncached(pg, stmt)) == 1
    assert cached(PgSession, region, stmt) == uncached(pg, stmt)


# 5. A snapshot taken by the first of a miss's two loads ---------------------------------------


def test_a_miss_that_loads_twice_at_repeatable_read_stores_nothing_older(pg, region_options, region):
    # The first miss of a view calling a function loads twice (it reads
    # tables its statement does not name: their versions are read, then it
    # loads again).  At REPEATABLE READ the second load reads the snapshot
    # of the first: a commit in between is bumped in the versions it
    # stores with, and missing from its rows.
    with pg.begin() as conn:
        conn.exec_driver_sql(test_writes_postgresql.FUNCTIONS)
    counted = test_writes_postgresql.counted
    stmt = select(counted.c.id, counted.c.tags).order_by(counted.c.id)
    repeatable = create_engine(pg.url, isolation_level="REPEATABLE READ")
    cache = SessionCache(region_options, default_region=region, secret=SECRET)
    Sess = sessionmaker(bind=repeatable, info=cache.session_info())
    writes = []

    @event.listens_for(repeatable, "after_cursor_execute")
    def another_commits(conn, cursor, statement, parameters, context, executemany):
        if "pg_counted" in statement and not writes:  # the first load has its snapshot
            writes.append(statement)
            with pg.begin() as other:
                other.execute(text("INSERT INTO pg_tag VALUES (4, 1)"))

    try:
        assert cached(Sess, region, stmt) == [(1, 2), (2, 1), (3, 0)]  # as of its snapshot
        assert writes
        assert uncached(pg, stmt) == [(1, 3), (2, 1), (3, 0)]
        assert cached(Sess, region, stmt) == uncached(pg, stmt)
    finally:
        repeatable.dispose()


# 6. A commit sent as SQL that begins the next transaction at once ----------------------------


@pytest.mark.parametrize("sql", ["COMMIT AND CHAIN", "END AND CHAIN", "commit work and chain", "COMMIT; BEGIN"])
def test_a_commit_and_chain_sent_as_sql_is_published(pg, PgSession, region, sql):
    cached(PgSession, region, PARENTS)
    with pg.connect() as conn:
        conn.execute(update(PgParent.__table__).where(PgParent.id == 1).values(name="chained"))
        conn.exec_driver_sql(sql)  # committed; a new transaction is open
        conn.rollback()  # which writes nothing
    assert uncached(pg, PARENTS)[0] == (1, "chained")
    assert cached(PgSession, region, PARENTS) == uncached(pg, PARENTS)


# 7. Names longer than PostgreSQL keeps ----------------------------------------------------------

#: PostgreSQL keeps the first 63 bytes of a name: the catalog, triggers and psql spell it so.
LONG = "pg_child_of_a_parent_whose_rows_cascade_and_whose_name_is_long_enough_to_be_cut"
long_child = Table(LONG, MetaData(), Column("id", Integer, primary_key=True), Column("parent_id", Integer))


def test_a_name_longer_than_postgresql_keeps_is_one_table(pg, PgSession, region):
    assert len(LONG) > 63
    with pg.begin() as conn:
        conn.exec_driver_sql(
            f"CREATE TABLE {LONG} (id integer PRIMARY KEY, parent_id integer REFERENCES pg_parent ON DELETE CASCADE);"
            f"INSERT INTO {LONG} VALUES (1, 1), (2, 2)"
        )
    stmt = select(long_child.c.id, long_child.c.parent_id).order_by(long_child.c.id)
    assert cached(PgSession, region, stmt) == [(1, 1), (2, 2)]
    with PgSession() as session:  # the catalog's cascade names the child by its first 63 bytes
        session.delete(session.get(PgParent, 1))
        session.commit()
    assert cached(PgSession, region, stmt) == uncached(pg, stmt) == [(2, 2)]
    with PgSession() as session:  # as psql and the catalog spell it
        session.execute(text(f"DELETE FROM {LONG[:63]}"))
        session.commit()
    assert cached(PgSession, region, stmt) == uncached(pg, stmt) == []


# 8. One setting under two names ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "first, then",
    [
        ("SET search_path TO tenant_a", "SET SCHEMA 'tenant_b'"),
        ("SET search_path TO tenant_a", 'SET "search_path" TO tenant_b'),
        ("SET search_path TO tenant_a", "SELECT set_config('Search_Path', 'tenant_b', false)"),
        ("SET search_path TO tenant_a", "SET search_path=tenant_b"),
    ],
    ids=["SET SCHEMA", "a quoted name", "set_config() of another case", "no space before ="],
)
def test_one_setting_under_two_names_in_either_order(tenants, first, then):
    # The same two statements, in the other order, leave the other tenant in force.
    engine = create_engine(tenants, poolclass=NullPool)
    Session = sessionmaker(engine, info=round6._cache().session_info())
    try:
        with Session() as session:
            for statement in (first, then):
                session.connection().exec_driver_sql(statement)
            assert round6._prime(session) == list(session.scalars(round6.ITEMS)) == ["of b"]
        with Session() as session:
            for statement in (then, first):
                session.connection().exec_driver_sql(statement)
            assert list(session.scalars(round6.CACHED)) == list(session.scalars(round6.ITEMS)) == ["of a"]
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "switch",
    [
        "DO $$ BEGIN SET search_path TO tenant_b; END $$",
        "DO $$ BEGIN EXECUTE 'SET search_path TO tenant_b'; END $$",
        "DO LANGUAGE plpgsql $body$ BEGIN RESET search_path; SET LOCAL search_path = tenant_b; END $body$",
    ],
    ids=["SET", "EXECUTE 'SET'", "SET LOCAL"],
)
def test_a_setting_changed_in_a_do_block(tenants, switch):
    _switched_then_read(tenants, switch)


def _switched_then_read(tenants, switch):
    """Two pools of one connection each on tenant_a; ``switch`` runs on the first: reads of both stay their tenant's."""
    engine = create_engine(tenants, pool_size=1, max_overflow=0)  # one connection: its settings stay
    other = create_engine(tenants, pool_size=1, max_overflow=0)
    cache = round6._cache()
    Session = sessionmaker(engine, info=cache.session_info())
    Other = sessionmaker(other, info=cache.session_info())
    try:
        for Sess in (Session, Other):
            with Sess() as session:
                session.connection().exec_driver_sql("SET search_path TO tenant_a")
                session.commit()
        with Session() as session:
            session.connection().exec_driver_sql(switch)
            session.commit()
        for Sess in (Session, Other, Session, Other):
            with Sess() as session:
                assert round6._prime(session) == list(session.scalars(round6.ITEMS))
    finally:
        engine.dispose()
        other.dispose()


# 9. The system catalog, read as tables ----------------------------------------------------------------

pg_tables = Table("pg_tables", MetaData(), Column("schemaname", String), Column("tablename", String))
info_tables = Table(
    "tables", MetaData(), Column("table_schema", String), Column("table_name", String), schema="information_schema"
)


@pytest.mark.parametrize(
    "stmt",
    [
        select(pg_tables.c.tablename).where(pg_tables.c.schemaname == "public").order_by(pg_tables.c.tablename),
        select(info_tables.c.table_name)
        .where(info_tables.c.table_schema == "public")
        .order_by(info_tables.c.table_name),
    ],
    ids=["pg_catalog.pg_tables", "information_schema.tables"],
)
def test_a_read_of_the_catalog_sees_the_schema_changes_of_the_process(pg, PgSession, region, stmt):
    assert cached(PgSession, region, stmt) == uncached(pg, stmt)
    with PgSession() as session:  # a migration run by the application
        session.execute(text("CREATE TABLE pg_new (id integer)"))
        session.commit()
    assert ("pg_new",) in uncached(pg, stmt)
    assert cached(PgSession, region, stmt) == uncached(pg, stmt)


# 10. SELECTs run for what they do -----------------------------------------------------------------------

EFFECTS = {
    "Sequence.next_value()": select(Sequence("pg_s20_seq").next_value()),
    "func.nextval()": select(func.nextval("pg_s20_seq")),
    "nextval() in text()": text("SELECT nextval('pg_s20_seq')").columns(nextval=Integer),
    "func.setval()": select(func.setval("pg_s20_seq", 5)),
    "an advisory lock": select(func.pg_try_advisory_xact_lock(20)),
    "set_config()": select(func.set_config("app.tenant", "b", False)),
}


@pytest.mark.parametrize("stmt", EFFECTS.values(), ids=EFFECTS.keys())
def test_a_select_run_for_its_effect_runs_every_time(pg, PgSession, region, stmt):
    # A sequence advanced, a lock taken, a setting made: a hit does none of it.
    with pg.begin() as conn:
        conn.exec_driver_sql("CREATE SEQUENCE pg_s20_seq")
    sql = SQLCounter(pg)
    for _ in range(3):
        cached(PgSession, region, stmt)
    assert sql.count == 3


# 11. The listener's first connection ---------------------------------------------------------------


def test_listen_returns_once_listening(pg, region_options, monkeypatch):
    # The application serves once listen() returned: a write committed then is heard.
    # (Given as long as a loaded machine may take to connect: LISTEN_WAIT is 5 s.)
    monkeypatch.setattr(engine_cache, "LISTEN_WAIT", 60.0)
    with pg.begin() as conn:
        install_triggers(conn)
    cache = SessionCache(region_options, default_region="memory", secret=SECRET)
    try:
        assert cache.listen(pg).connected
    finally:
        cache.close()


def test_a_listener_that_was_not_listening_when_started_returned_covers_what_it_missed(pg):
    # start() gave up waiting: what committed before LISTEN was not heard.
    lost = threading.Event()
    listener = Listener(dsn_of(pg), lambda tables: None, lost.set, application_name="s20-late")
    # Its thread connects only once start() gave up: on a loaded machine it
    # could otherwise be listening before start() looked, and rightly not late.
    may_connect = threading.Event()
    connect = listener._connect

    def held_back(psycopg):
        assert may_connect.wait(30)
        return connect(psycopg)

    listener._connect = held_back
    try:
        listener.start(wait=0)
        may_connect.set()
        assert listener.wait_connected(30)
        assert lost.wait(30)
    finally:
        listener.stop()


# 12. A hot standby replays the primary's commits after they were published ---------------------------


def test_a_read_of_a_standby_that_has_not_replayed_a_commit_is_not_stored(pg_standby, region_options, region):
    # Writes go to the primary, reads to its replica (a routing Session, a
    # read-only engine): a commit is published before the standby shows it.
    primary, standby = (create_engine(url) for url in pg_standby)
    try:
        with primary.begin() as conn:
            conn.exec_driver_sql(test_writes_postgresql.SCHEMA)
        cache = SessionCache(region_options, default_region=region, secret=SECRET)
        Writer = sessionmaker(bind=primary, info=cache.session_info())
        Reader = sessionmaker(bind=standby, info=cache.session_info())
        _replayed(standby, lambda rows: len(rows) == 3)
        assert cached(Reader, region, PARENTS) == uncached(standby, PARENTS)
        with standby.connect() as conn:
            conn.exec_driver_sql("SELECT pg_wal_replay_pause()")
        try:
            with Writer() as session:
                session.execute(update(PgParent).where(PgParent.id == 1).values(name="replayed"))
                session.commit()
            assert cached(Reader, region, PARENTS) == uncached(standby, PARENTS)  # as of the standby: not yet
        finally:
            with standby.connect() as conn:
                conn.exec_driver_sql("SELECT pg_wal_replay_resume()")
        _replayed(standby, lambda rows: rows[0] == (1, "replayed"))
        assert cached(Reader, region, PARENTS) == uncached(standby, PARENTS)
    finally:
        primary.dispose()
        standby.dispose()


def _replayed(engine, condition):
    deadline = time.monotonic() + 60
    while True:
        try:
            if condition(uncached(engine, PARENTS)):
                return
        except ProgrammingError:  # no table yet
            pass
        assert time.monotonic() < deadline, "the standby did not replay"
        time.sleep(0.05)


my_tables = Table("pg_my_tables", MetaData(), Column("name", String))


@pytest.mark.parametrize(
    "over",
    ["SELECT tablename::text AS name FROM pg_tables WHERE schemaname = 'public'",
     "SELECT relname::text AS name FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind = 'r'"],
    ids=["pg_tables", "pg_class"],
)  # fmt: skip
def test_a_view_over_the_catalog_sees_the_schema_changes_of_the_process(pg, PgSession, region, over):
    with pg.begin() as conn:
        conn.exec_driver_sql(f"CREATE VIEW pg_my_tables AS {over}")
    stmt = select(my_tables.c.name).order_by(my_tables.c.name)
    assert cached(PgSession, region, stmt) == uncached(pg, stmt)
    with PgSession() as session:
        session.execute(text("CREATE TABLE pg_new (id integer)"))
        session.commit()
    assert ("pg_new",) in uncached(pg, stmt)
    assert cached(PgSession, region, stmt) == uncached(pg, stmt)


def test_a_function_that_calls_a_function_that_sets(tenants):
    # use_tenant_for_good() sets the search path; enter_for_good() only calls it.
    engine = create_engine(tenants)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE FUNCTION public.use_tenant_for_good(t text) RETURNS void LANGUAGE sql AS "
                "$f$ SELECT pg_catalog.set_config('search_path', 'tenant_' || t, false) $f$;"
                "CREATE FUNCTION public.enter_for_good(t text) RETURNS void LANGUAGE plpgsql AS "
                "$f$ BEGIN PERFORM public.use_tenant_for_good(t); END $f$"
            )
    finally:
        engine.dispose()
    _switched_then_read(tenants, "SELECT public.enter_for_good('b')")


@pytest.mark.parametrize("undo", ["a rollback", "a savepoint rolled back"])
def test_a_schema_change_rolled_back_leaves_the_catalog_as_it_was(pg, PgSession, region, undo):
    # The catalog read again after the DROP, inside its transaction, no
    # longer links the partition to its parent: the DROP is undone, and the
    # partition's writes must reach what read the parent again.
    with pg.begin() as conn:
        conn.exec_driver_sql(HIERARCHIES)
    stmt = select(reading.c.id, reading.c.v).order_by(reading.c.id)
    with PgSession() as session:  # a migration that fails
        if undo == "a rollback":
            session.execute(text("DROP TABLE s20_reading_old"))
            session.rollback()
        else:
            savepoint = session.begin_nested()
            session.execute(text("DROP TABLE s20_reading_old"))
            savepoint.rollback()
            session.commit()
    assert cached(PgSession, region, stmt) == uncached(pg, stmt) == [(1, 1), (150, 2)]
    with PgSession() as session:  # the partition, by its own name
        session.execute(text("UPDATE s20_reading_old SET v = 10 WHERE id = 1"))
        session.commit()
    assert cached(PgSession, region, stmt) == uncached(pg, stmt) == [(1, 10), (150, 2)]


newer = Table("pg_newer", MetaData(), Column("id", Integer), Column("name", String))


def test_a_catalog_read_while_a_schema_change_is_not_committed_is_read_again(pg, PgSession, region):
    # A migration creates a view; before it commits, another connection of
    # the process writes, and reads the catalog as committed: without it.
    migration = pg.connect()
    try:
        migration.begin()
        migration.exec_driver_sql("CREATE VIEW pg_newer AS SELECT id, name FROM pg_parent")
        with PgSession() as session:
            session.execute(text("UPDATE pg_child SET name = name WHERE id = 1"))
            session.commit()
        migration.commit()
    finally:
        migration.close()
    stmt = select(newer.c.id, newer.c.name).order_by(newer.c.id)
    assert cached(PgSession, region, stmt) == uncached(pg, stmt)
    with PgSession() as session:
        session.execute(update(PgParent).where(PgParent.id == 1).values(name="through the view"))
        session.commit()
    assert cached(PgSession, region, stmt) == uncached(pg, stmt)


def test_the_listener_connects_where_the_engine_does(pg, region_options):
    # The server's socket given as a connect argument, not in the URL: a
    # listener built from the URL alone listens elsewhere (or nowhere).
    host = pg.url.query["host"]
    engine = create_engine(pg.url.difference_update_query(["host"]), connect_args={"host": host})
    with engine.begin() as conn:
        install_triggers(conn)
    assert psycopg.conninfo.conninfo_to_dict(dsn_of(engine))["host"] == host
    cache = SessionCache(region_options, default_region="memory", secret=SECRET)
    try:
        assert cache.listen(engine).wait_connected(60)
    finally:
        cache.close()
        engine.dispose()


def test_a_table_created_by_explain_analyze_is_a_schema_change(pg, PgSession, region):
    # EXPLAIN ANALYZE runs what it explains: here a table that comes first on
    # the search path ("$user", then public), where pg_parent is read.
    with pg.begin() as conn:
        conn.exec_driver_sql("CREATE SCHEMA postgres")
    assert cached(PgSession, region, PARENTS) == uncached(pg, PARENTS)
    with PgSession() as session:
        session.execute(
            text("EXPLAIN ANALYZE CREATE TABLE postgres.pg_parent AS SELECT 1 AS id, 'shadowing'::varchar AS name")
        ).all()
        session.commit()
    assert uncached(pg, PARENTS) == [(1, "shadowing")]
    assert cached(PgSession, region, PARENTS) == uncached(pg, PARENTS)
