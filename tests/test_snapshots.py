"""A transaction that reads from a snapshot older than the versions it read never stores.

A shared entry is tagged with the versions of its tables read just before
its query runs.  A transaction that keeps the snapshot of its first
statement (PostgreSQL REPEATABLE READ and SERIALIZABLE, SQLite in WAL mode
inside an explicit BEGIN) may read rows older than those versions: stored,
they would be served as current after another transaction's commit.  A
query that begins its transaction takes a fresh snapshot, and its result
may be stored whatever the level.
"""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, event, select, text, update
from sqlalchemy.orm import sessionmaker

from pyramid_sessioncache import FromCache, SessionCache, invalidate

from .conftest import SQLCounter
from .models import Person

UNCACHED = select(Person.name).where(Person.id == 1)
CACHED = UNCACHED.options(FromCache("memory"))


def commit_elsewhere(url, name="changed", **engine_options):
    """Rename person 1 in a transaction of another engine, committed."""
    other = create_engine(url, **engine_options)
    try:
        with other.begin() as conn:
            conn.execute(update(Person.__table__).where(Person.__table__.c.id == 1).values(name=name))
    finally:
        other.dispose()


def sessions(engine, invalidation="auto"):
    cache = SessionCache({"memory": {"type": "memory"}}, invalidation=invalidation)
    return sessionmaker(bind=engine, info=cache.session_info())


def nothing(session):
    """Begin nothing before the first statement."""


def assert_a_read_after_a_commit_elsewhere_is_stored(url, **engine_options):
    """In one Session: a read, a commit by another engine, the cached read sees it, and it is stored."""
    engine = create_engine(url, **engine_options)
    Session = sessions(engine)
    sql = SQLCounter(engine)
    try:
        with Session() as reader:
            assert reader.execute(UNCACHED).scalar_one() == "person 1"
            commit_elsewhere(url)
            assert reader.execute(CACHED).scalar_one() == "changed"  # read after the commit: stored
        sql.reset()
        with Session() as later:
            assert later.execute(CACHED).scalar_one() == "changed"
            assert sql.count == 0
    finally:
        engine.dispose()


#: Each way a PostgreSQL transaction gets a snapshot level: the engine to
#: make, and what to run first in each Session.
PG_WAYS = {
    "engine execution option": (
        lambda url: create_engine(url).execution_options(isolation_level="REPEATABLE READ"),
        nothing,
    ),
    "create_engine(isolation_level=REPEATABLE READ)": (
        lambda url: create_engine(url, isolation_level="REPEATABLE READ"),
        nothing,
    ),
    "create_engine(isolation_level=SERIALIZABLE)": (
        lambda url: create_engine(url, isolation_level="SERIALIZABLE"),
        nothing,
    ),
    "the database's default": (create_engine, nothing),
    "the connection's execution options": (
        create_engine,
        lambda session: session.connection(execution_options={"isolation_level": "REPEATABLE READ"}),
    ),
    "SET TRANSACTION sent as SQL": (
        create_engine,
        lambda session: session.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")),
    ),
}


@pytest.fixture(params=sorted(PG_WAYS))
def pg_way(request, pg_url):
    """``(engine, start)``: an engine and what begins each Session's transaction, at a snapshot level."""
    make, start = PG_WAYS[request.param]
    if request.param == "the database's default":
        admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            name = conn.execute(text("SELECT current_database()")).scalar_one()
            conn.execute(text(f"ALTER DATABASE {name} SET default_transaction_isolation = 'repeatable read'"))
        admin.dispose()
    engine = make(pg_url)
    yield engine, start
    engine.dispose()


def test_postgresql_old_snapshot_stores_nothing(pg_url, pg_way):
    engine, start = pg_way
    Session = sessions(engine)
    with Session() as reader:
        start(reader)
        assert reader.execute(UNCACHED).scalar_one() == "person 1"  # the snapshot is taken
        commit_elsewhere(pg_url)
        assert reader.execute(CACHED).scalar_one() == reader.execute(UNCACHED).scalar_one() == "person 1"
    with Session() as later:
        assert later.execute(CACHED).scalar_one() == later.execute(UNCACHED).scalar_one() == "changed"


def test_postgresql_the_first_statement_takes_a_fresh_snapshot(pg_url, pg_way, request):
    engine, start = pg_way
    Session = sessions(engine)
    sql = SQLCounter(engine)
    with Session() as first:
        start(first)
        assert first.execute(CACHED).scalar_one() == "person 1"
    sql.reset()
    with Session() as second:
        assert second.execute(CACHED).scalar_one() == "person 1"
        set_as_sql = "SET TRANSACTION" in request.node.callspec.id
        # SET TRANSACTION begins the transaction: whether a snapshot was taken is not known.
        assert sql.count == (1 if set_as_sql else 0)
        assert second.execute(UNCACHED).scalar_one() == "person 1"


@pytest.mark.parametrize("level", [None, "READ COMMITTED", "AUTOCOMMIT"])
def test_postgresql_statement_snapshots_store_inside_a_transaction(pg_url, level):
    assert_a_read_after_a_commit_elsewhere_is_stored(pg_url, **({"isolation_level": level} if level else {}))


def test_postgresql_each_transaction_is_asked_again(pg_url):
    # One Connection for every transaction of the Session: what was found
    # of its first transaction (READ COMMITTED) must not hold for the next.
    engine = create_engine(pg_url)
    cache = SessionCache({"memory": {"type": "memory"}})
    try:
        with engine.connect() as conn, sessionmaker(bind=conn, info=cache.session_info())() as session:
            assert session.execute(UNCACHED).scalar_one() == "person 1"
            assert session.execute(CACHED).scalar_one() == "person 1"  # begun, READ COMMITTED: stored
            session.commit()
            session.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
            assert session.execute(UNCACHED).scalar_one() == "person 1"
            commit_elsewhere(pg_url)
            assert session.execute(CACHED).scalar_one() == "person 1"  # the old snapshot's
            session.commit()
            assert session.execute(CACHED).scalar_one() == session.execute(UNCACHED).scalar_one() == "changed"
    finally:
        engine.dispose()


def test_postgresql_manual_invalidation_never_stores_an_old_snapshot(pg_url):
    engine = create_engine(pg_url, isolation_level="REPEATABLE READ")
    Session = sessions(engine, invalidation="manual")
    try:
        with Session() as reader:
            assert reader.execute(UNCACHED).scalar_one() == "person 1"
            commit_elsewhere(pg_url)
            with Session() as writer:
                invalidate(CACHED, session=writer)
            assert reader.execute(CACHED).scalar_one() == "person 1"
        with Session() as later:
            assert later.execute(CACHED).scalar_one() == later.execute(UNCACHED).scalar_one() == "changed"
    finally:
        engine.dispose()


# SQLite ------------------------------------------------------------------------------


def selects(sql):
    """How many SELECT statements ``sql`` (a SQLCounter) saw: the recipe sends BEGIN too."""
    return sum(statement.startswith("SELECT") for statement in sql.statements)


def explicit_begin(url, journal_mode):
    """An engine in SQLAlchemy's documented recipe for SQLite transactions: BEGIN when one begins."""
    engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def connect(dbapi_connection, connection_record):
        dbapi_connection.isolation_level = None  # pysqlite sends no BEGIN of its own
        dbapi_connection.execute(f"PRAGMA journal_mode={journal_mode}")

    @event.listens_for(engine, "begin")
    def begin(conn):
        conn.exec_driver_sql("BEGIN")

    return engine


def test_sqlite_wal_inside_an_explicit_begin_stores_nothing(db_url):
    engine = explicit_begin(db_url, "WAL")
    Session = sessions(engine)
    sql = SQLCounter(engine)
    try:
        with Session() as reader:
            assert reader.execute(UNCACHED).scalar_one() == "person 1"  # the snapshot is taken
            commit_elsewhere(db_url)  # WAL lets a writer commit under a reader
            assert reader.execute(CACHED).scalar_one() == reader.execute(UNCACHED).scalar_one() == "person 1"
        with Session() as later:
            sql.reset()
            assert later.execute(CACHED).scalar_one() == later.execute(UNCACHED).scalar_one() == "changed"
            assert later.execute(CACHED).scalar_one() == "changed"
            # BEGIN is sent before any query: whether a snapshot was taken is not known.
            assert selects(sql) == 3
    finally:
        engine.dispose()


def test_sqlite_rollback_journal_inside_an_explicit_begin_stores(db_url):
    engine = explicit_begin(db_url, "DELETE")
    Session = sessions(engine)
    sql = SQLCounter(engine)
    try:
        with Session() as reader:
            assert reader.execute(UNCACHED).scalar_one() == "person 1"
            with pytest.raises(Exception, match="locked"):
                commit_elsewhere(db_url, connect_args={"timeout": 0.1})  # what it read is locked against writers
            assert reader.execute(CACHED).scalar_one() == "person 1"  # so it is current: stored
        sql.reset()
        with Session() as later:
            assert later.execute(CACHED).scalar_one() == "person 1"
            assert selects(sql) == 0
            assert later.execute(UNCACHED).scalar_one() == "person 1"
    finally:
        engine.dispose()


def test_sqlite_default_transactions_read_the_latest_rows(db_url):
    # pysqlite begins no transaction for a SELECT: the second read sees the commit.
    assert_a_read_after_a_commit_elsewhere_is_stored(db_url)
