"""Attack s23 (A): how a transaction ends, after the fixes of s22 (A), cached and uncached side by side.

Each test runs a query cached and as a plain Session would, around a
transaction that ends where the add-on does not look for it: a commit on
the driver's connection followed by more statements (or by a rollback to
a savepoint it ended), the ``END`` of a trigger's body read as SQL text,
a transaction a Session bound to a Connection carries on after in a new
snapshot, a connection the database dropped, and settings of a tenant
(``SET LOCAL``, ``SET``) that such an end took away; and a commit sent
by a construct of the application's own.  PostgreSQL cases
use ``test_writes_postgresql``'s schema (``pg_parent``...).
"""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, select, text, update
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.expression import ClauseElement, Executable

from pyramid_sessioncache import SessionCache, cached_query

from . import test_writes_postgresql
from .conftest import SECRET, SQLCounter
from .models import Country, Person
from .test_writes_postgresql import PgParent, cached, uncached

pg = test_writes_postgresql.pg


def _stored(request, region_options, engine_fixture: str, table):
    """The engine, a read of ``table``'s first rows stored in ``memory``, and a factory of Sessions caching there."""
    engine = request.getfixturevalue(engine_fixture)
    stmt = select(table.c.id, table.c.name).where(table.c.id <= 3).order_by(table.c.id)
    cache = SessionCache(region_options, default_region="memory", secret=SECRET)
    Sess = sessionmaker(bind=engine, info=cache.session_info())
    cached(Sess, "memory", stmt)
    return engine, stmt, Sess


# 1. A commit on the driver's connection, more statements, then SQLAlchemy's rollback ---------------


@pytest.mark.parametrize("then", ["a read", "a write"])
@pytest.mark.parametrize("engine_fixture, table", [("engine", Person.__table__), ("pg", PgParent.__table__)])
def test_writes_committed_on_the_driver_are_published_whatever_runs_before_the_rollback(
    request, region_options, engine_fixture, table, then
):
    # s22 (A) published them at a rollback that came next.  A statement in
    # between begins the next transaction (psycopg at any statement, pysqlite
    # at DML): the rollback then undid that one, and forgot the committed write.
    engine, stmt, Sess = _stored(request, region_options, engine_fixture, table)
    with Sess() as session:
        session.execute(update(table).where(table.c.id == 1).values(name="committed by the driver"))
        session.connection().connection.driver_connection.commit()
        if then == "a read":
            session.execute(select(table.c.id)).all()
        else:
            session.execute(update(table).where(table.c.id == 2).values(name="rolled back"))
        session.rollback()
    assert uncached(engine, stmt)[0] == (1, "committed by the driver")
    assert cached(Sess, "memory", stmt) == uncached(engine, stmt)


@pytest.mark.parametrize("end", ["rollback", "release, then rollback"])
@pytest.mark.parametrize("engine_fixture, table", [("engine", Person.__table__), ("pg", PgParent.__table__)])
def test_writes_of_a_savepoint_committed_on_the_driver_are_published(
    request, region_options, engine_fixture, table, end
):
    # The commit ended the savepoint too: SQLAlchemy's rollback to it (or
    # its release) fails, as it does uncached; what the savepoint wrote is
    # committed, and was forgotten with the savepoint's marks.
    engine, stmt, Sess = _stored(request, region_options, engine_fixture, table)
    with Sess() as session:
        savepoint = session.begin_nested()
        session.execute(update(table).where(table.c.id == 1).values(name="committed by the driver"))
        session.connection().connection.driver_connection.commit()
        with pytest.raises(DBAPIError):  # no such savepoint
            if end == "rollback":
                session.rollback()
            else:
                savepoint.commit()
        session.rollback()
    assert uncached(engine, stmt)[0] == (1, "committed by the driver")
    assert cached(Sess, "memory", stmt) == uncached(engine, stmt)


# 2. The END of a trigger's body, in SQL text -----------------------------------------------------


def test_the_end_of_a_triggers_body_commits_nothing(engine, region_options):
    # A migration that updates rows and creates a SQLite trigger in one
    # transaction: the END closing the trigger's body was read as a COMMIT
    # sent as SQL, and what was written before it was published then, as
    # committed, and not at the real commit; a reader in between stored the
    # rows of before the write under the versions that followed it.
    cache = SessionCache(region_options, default_region="memory", secret=SECRET)
    Sess = sessionmaker(bind=engine, info=cache.session_info())
    stmt = select(Country.id, Country.name).order_by(Country.id)
    cached(Sess, "memory", stmt)
    with Sess() as session:
        session.execute(update(Country).where(Country.id == 1).values(name="renamed"))
        session.execute(
            text(
                "CREATE TRIGGER person_renamed AFTER UPDATE OF name ON person"
                " BEGIN UPDATE address SET person_id = new.id WHERE person_id = old.id; END"
            )
        )
        assert cached(Sess, "memory", stmt) == uncached(engine, stmt)  # another request, before the commit
        session.commit()
    assert uncached(engine, stmt)[0][1] == "renamed"
    assert cached(Sess, "memory", stmt) == uncached(engine, stmt)


# 3. A Session bound to a Connection carries on in the Connection's next transaction -------------------


def _write_elsewhere(engine, sql):
    """Run ``sql`` as another program would: on a connection of its own, unseen by the add-on."""
    url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql)


ENDS = {
    "Connection.commit()": lambda conn, session: conn.commit(),
    "Connection.rollback()": lambda conn, session: conn.rollback(),
    "COMMIT as SQL": lambda conn, session: session.execute(text("COMMIT")),
    "ROLLBACK as SQL": lambda conn, session: session.execute(text("ROLLBACK")),
    "the connection dropped": lambda conn, session: (conn.invalidate(), conn.rollback()),
}


@pytest.mark.parametrize("end", list(ENDS))
def test_a_sessions_local_entries_end_with_the_transaction_of_its_connection(pg, region_options, end):
    # At REPEATABLE READ, what the Session reads is its transaction's
    # snapshot.  The code owning the Connection ends the transaction (or
    # SQL text does): the Session carries on in the next, whose snapshot
    # shows what another program committed meanwhile.  Its local entries,
    # dropped when its own transaction ends, were kept as they were.
    engine = create_engine(pg.url, isolation_level="REPEATABLE READ")
    cache = SessionCache(region_options, default_region="local", secret=SECRET)
    stmt = select(PgParent.name).where(PgParent.id == 1)
    try:
        with engine.connect() as conn:
            session = Session(bind=conn, info=cache.session_info())
            assert cached_query(session, stmt, "local").scalar_one() == "one"
            _write_elsewhere(pg, "UPDATE pg_parent SET name = 'written elsewhere' WHERE id = 1")
            ENDS[end](conn, session)
            assert session.execute(stmt).scalar_one() == "written elsewhere"
            assert cached_query(session, stmt, "local").scalar_one() == "written elsewhere"
            session.close()
    finally:
        engine.dispose()


def test_a_snapshot_begun_after_the_connections_commit_stores_nothing(pg, region_options):
    # The add-on asks the isolation level once per transaction of the
    # Session: the Connection's code commits, and the Session carries on in
    # a transaction at REPEATABLE READ, whose snapshot predates a write made
    # elsewhere; stored under the versions of now, its rows were served to
    # the next transaction at that level, which sees the write.
    region = "memory"
    cache = SessionCache(region_options, default_region=region, secret=SECRET)
    stmt = select(PgParent.id, PgParent.name).order_by(PgParent.id)
    repeatable = text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    with pg.connect() as conn:
        session = Session(bind=conn, info=cache.session_info())
        session.execute(select(PgParent.id)).all()
        cached_query(session, select(PgParent.id).where(PgParent.id == 2), region).all()  # asked: READ COMMITTED
        conn.commit()
        session.execute(repeatable)
        session.execute(select(PgParent.id)).all()  # the snapshot
        _write_elsewhere(pg, "UPDATE pg_parent SET name = 'after the snapshot' WHERE id = 1")
        assert cached_query(session, stmt, region).all()[0] == (1, "one")  # as of its snapshot
        session.close()
    with sessionmaker(bind=pg, info=cache.session_info())() as session:
        session.execute(repeatable)
        assert cached_query(session, stmt, region).all() == session.execute(stmt).all()


# 4. A rollback after the database dropped the connection ---------------------------------------------


def _drop_the_connection(engine, session):
    if engine.dialect.name == "sqlite":
        session.connection().invalidate()  # what SQLAlchemy does on a disconnect error
        return
    pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
    with engine.connect() as admin:
        admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})  # a restart, a failover
    with pytest.raises(OperationalError):
        session.execute(select(PgParent.id)).all()


@pytest.mark.parametrize("engine_fixture, table", [("engine", Person.__table__), ("pg", PgParent.__table__)])
def test_a_session_rolls_back_after_the_database_dropped_its_connection(request, region_options, engine_fixture, table):
    # SQLAlchemy invalidates a connection the database dropped, and the
    # application rolls back (pyramid_tm does) to carry on.  The add-on's
    # rollback listeners read the Connection's info, which raises on an
    # invalidated Connection: the rollback raised PendingRollbackError,
    # where SQLAlchemy's own succeeds.
    engine, stmt, Sess = _stored(request, region_options, engine_fixture, table)
    with Sess() as session:
        session.execute(update(table).where(table.c.id == 1).values(name="lost"))
        session.begin_nested()
        _drop_the_connection(engine, session)
        session.rollback()
        for region in ("local", "memory"):
            assert cached_query(session, stmt, region).all() == session.execute(stmt).all()
    assert uncached(engine, stmt)[0][1] != "lost"
    assert cached(Sess, "memory", stmt) == uncached(engine, stmt)


# 5. Settings, when the transaction ends unseen ------------------------------------------------

items = Table("item", MetaData(), Column("id", Integer, primary_key=True), Column("name", String(20)))


@pytest.fixture
def tenants(pg_database):
    """A PostgreSQL database with an ``item`` table in ``public`` and in ``tenant_b``, each naming its schema."""
    engine = create_engine(pg_database)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE SCHEMA tenant_b")
        for schema in ("public", "tenant_b"):
            conn.exec_driver_sql(f"CREATE TABLE {schema}.item (id integer PRIMARY KEY, name varchar(20))")
            conn.exec_driver_sql(f"INSERT INTO {schema}.item VALUES (1, '{schema}')")
    yield engine
    engine.dispose()


SET_LOCAL_ENDS = {
    "COMMIT as SQL": lambda session: session.execute(text("COMMIT")),
    "COMMIT AND CHAIN as SQL": lambda session: session.execute(text("COMMIT AND CHAIN")),
    "a commit on the driver's connection": lambda session: session.connection().connection.driver_connection.commit(),
    "autocommit": None,
}


@pytest.mark.parametrize("end", list(SET_LOCAL_ENDS))
def test_set_local_ends_with_the_transaction_however_it_ends(tenants, region_options, end):
    # SET LOCAL search_path (a tenant per schema) is part of the keys of
    # the look-ups that follow, until SQLAlchemy's commit or rollback.  The
    # database forgets it at any end of the transaction (and an autocommit
    # connection never had it): the next look-up stored the rows of the
    # default schema under tenant_b's key, and served them to tenant_b.
    cache = SessionCache(region_options, default_region="memory", secret=SECRET)
    Sess = sessionmaker(bind=tenants, info=cache.session_info())
    stmt = select(items.c.name)
    set_local = text("SET LOCAL search_path TO tenant_b")
    with Sess() as session:
        if end == "autocommit":
            session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        session.execute(set_local)
        if SET_LOCAL_ENDS[end] is not None:
            SET_LOCAL_ENDS[end](session)
        assert cached_query(session, stmt, "memory").all() == session.execute(stmt).all() == [("public",)]
    with Sess() as session:
        session.execute(set_local)
        assert cached_query(session, stmt, "memory").all() == session.execute(stmt).all() == [("tenant_b",)]


SET_ENDS = {
    "ROLLBACK as SQL": lambda session: session.execute(text("ROLLBACK")),
    "a rollback on the driver's connection": lambda session: (
        session.connection().connection.driver_connection.rollback()
    ),
}


@pytest.mark.parametrize("end", list(SET_ENDS))
def test_a_session_setting_a_rollback_undid_is_no_part_of_the_keys(tenants, region_options, end):
    # PostgreSQL undoes a SET search_path at the rollback of its
    # transaction; one that SQLAlchemy did not see left it in the keys of
    # the look-ups that followed: the default schema's rows were stored
    # under tenant_b's key, and served to tenant_b.
    cache = SessionCache(region_options, default_region="memory", secret=SECRET)
    Sess = sessionmaker(bind=tenants, info=cache.session_info())
    stmt = select(items.c.name)
    set_path = text("SET search_path TO tenant_b")
    with Sess() as session:
        session.execute(set_path)
        SET_ENDS[end](session)
        assert cached_query(session, stmt, "memory").all() == session.execute(stmt).all() == [("public",)]
        session.rollback()
    with Sess() as session:
        session.execute(set_path)
        assert cached_query(session, stmt, "memory").all() == session.execute(stmt).all() == [("tenant_b",)]


def test_a_session_setting_on_an_autocommit_connection_stays_cached(tenants, region_options):
    # No rollback undoes it: the look-ups of the connection keep using the shared region.
    cache = SessionCache(region_options, default_region="memory", secret=SECRET)
    Sess = sessionmaker(bind=tenants.execution_options(isolation_level="AUTOCOMMIT"), info=cache.session_info())
    stmt = select(items.c.name)
    sql = SQLCounter(tenants)
    with Sess() as session:
        session.execute(text("SET search_path TO tenant_b"))
        for _ in range(2):
            assert cached_query(session, stmt, "memory").all() == [("tenant_b",)]
    assert sum("FROM item" in statement for statement in sql.statements) == 1  # the second look-up was a hit


def test_a_case_end_in_sql_text_leaves_a_connection_whose_setting_was_rolled_back_cached(tenants, region_options):
    # The word END (of CASE ... END) was taken for a transaction's end sent
    # as SQL: what the rollback restores was forgotten, and the connection's
    # settings marked unknown for the rest of its life in the pool.
    engine = create_engine(tenants.url, pool_size=1, max_overflow=0)  # one connection: its settings stay
    cache = SessionCache(region_options, default_region="memory", secret=SECRET)
    Sess = sessionmaker(bind=engine, info=cache.session_info())
    stmt = select(items.c.name)
    sql = SQLCounter(engine)
    try:
        with Sess() as session:
            session.execute(text("SET search_path TO tenant_b"))
            session.execute(text("SELECT CASE WHEN name = 'tenant_b' THEN 1 END FROM item")).all()
            session.rollback()
        with Sess() as session:
            for _ in range(2):
                assert cached_query(session, stmt, "memory").all() == session.execute(stmt).all() == [("public",)]
    finally:
        engine.dispose()
    assert sum(statement.startswith("SELECT item.name") for statement in sql.statements) == 3  # one miss, two uncached


# 6. A commit sent by a construct of the application's own ---------------------------------------------


class CommitAndChain(Executable, ClauseElement):
    """``COMMIT AND CHAIN``, as an application would define it (SQLAlchemy has no construct for it)."""

    inherit_cache = True


@compiles(CommitAndChain)
def _commit_and_chain(element, compiler, **kw):
    return "COMMIT AND CHAIN"


def test_a_commit_sent_by_a_construct_of_the_applications_own_is_published(pg, region_options):
    # Compiled, like DDL() (s22), but rendered by the application's
    # @compiles function: any SQL.  The writes before it were left marked
    # as uncommitted, and the rollback of the chained transaction forgot them.
    parents = select(PgParent.id, PgParent.name).order_by(PgParent.id)
    cache = SessionCache(region_options, default_region="memory", secret=SECRET)
    Sess = sessionmaker(bind=pg, info=cache.session_info())
    cached(Sess, "memory", parents)
    with pg.connect() as conn:
        conn.execute(update(PgParent.__table__).where(PgParent.id == 1).values(name="chained"))
        conn.execute(CommitAndChain())
        conn.rollback()
    assert uncached(pg, parents)[0] == (1, "chained")
    assert cached(Sess, "memory", parents) == uncached(pg, parents)
