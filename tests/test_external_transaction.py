"""Sessions joined to a transaction they do not own: a test's outer transaction, rolled back at its end.

SQLAlchemy's recipe for tests ("joining a Session into an external
transaction"): an outer ``connection.begin()``, the Session bound to the
connection with ``join_transaction_mode="create_savepoint"``, so that
``Session.commit()`` only releases a savepoint.  Nothing such a Session
reads after the connection wrote may reach a shared region: it is
uncommitted, and rolled back when the test ends.
"""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, event, insert, select
from sqlalchemy.orm import Session

from pyramid_sessioncache import SessionCache, cached_query
from pyramid_sessioncache.testing import SQLCounter

from .conftest import SECRET
from .models import Base, Person


def savepoints_on_sqlite(engine):
    # SQLAlchemy's pysqlite recipe: a real BEGIN, so that SAVEPOINTs nest in it.
    @event.listens_for(engine, "connect")
    def connect(dbapi_connection, record):
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def begin(conn):
        conn.exec_driver_sql("BEGIN")


@pytest.fixture(params=["sqlite", "postgresql"])
def test_engine(request, tmp_path):
    if request.param == "sqlite":
        engine = create_engine(f"sqlite:///{tmp_path / 'outer.sqlite'}")
        savepoints_on_sqlite(engine)
    else:
        engine = create_engine(request.getfixturevalue("postgres_url"))
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Person(id=1, name="committed"))
        session.commit()
    yield engine
    Base.metadata.drop_all(engine)
    engine.dispose()


@pytest.fixture
def cache():
    return SessionCache({"shared": {"type": "memory"}}, secret=SECRET)


def a_test(engine, cache, write):
    """Run what one test does in its rolled-back transaction; return the names it read twice."""
    connection = engine.connect()
    outer = connection.begin()
    session = Session(bind=connection, join_transaction_mode="create_savepoint", info=cache.session_info())
    try:
        write(session, connection)
        query = select(Person.name).order_by(Person.id)
        return [cached_query(session, query, "shared").scalars().all() for _ in range(2)]
    finally:
        session.close()
        outer.rollback()
        connection.close()


def committed_by_the_session(session, connection):
    session.add(Person(id=2, name="ghost"))
    session.commit()  # a savepoint released: still inside the outer transaction


def flushed_by_the_session(session, connection):
    session.add(Person(id=2, name="ghost"))
    session.flush()


def written_by_the_fixture(session, connection):
    # Written on the connection before the Session began (fixture data).
    connection.execute(insert(Person).values(id=2, name="ghost"))


def written_in_a_savepoint_released_before(session, connection):
    with connection.begin_nested():
        connection.execute(insert(Person).values(id=2, name="ghost"))


@pytest.mark.parametrize(
    "write",
    [committed_by_the_session, flushed_by_the_session, written_by_the_fixture, written_in_a_savepoint_released_before],
)
def test_a_rolled_back_row_is_read_by_its_test_and_never_served_to_the_next(test_engine, cache, write):
    assert a_test(test_engine, cache, write) == [["committed", "ghost"]] * 2
    with SQLCounter(test_engine) as sql:
        assert a_test(test_engine, cache, lambda session, connection: None) == [["committed"]] * 2
    assert sql.count == 1  # the next test stores and hits what is committed


def test_a_savepoint_rolled_back_leaves_the_outer_transaction_clean(test_engine, cache):
    def rolled_back(session, connection):
        nested = connection.begin_nested()
        connection.execute(insert(Person).values(id=2, name="ghost"))
        nested.rollback()

    with SQLCounter(test_engine) as sql:
        assert a_test(test_engine, cache, rolled_back) == [["committed"]] * 2
    assert sql.count == 2  # the INSERT, then one SELECT: the second read is a hit
