"""On a real PostgreSQL server: schemas, transactions, shared-region loads."""

from __future__ import annotations

import pytest
from sqlalchemy import Integer, create_engine, func, literal_column, select, text
from sqlalchemy.orm import sessionmaker
from sqlalchemy.sql.functions import GenericFunction

from pyramid_sessioncache import FromCache, SessionCache

from . import models
from .conftest import SQLCounter
from .models import Person


@pytest.fixture
def pg_engine(pg_database):
    """A database of its own, seeded, with a copy of ``person`` in schema ``other``."""
    engine = create_engine(pg_database)
    models.Base.metadata.create_all(engine)
    with sessionmaker(engine)() as session:
        models.seed(session)
    with engine.begin() as conn:
        conn.execute(text("CREATE SCHEMA other"))
        conn.execute(text("CREATE TABLE other.person (id integer primary key, name varchar(100))"))
        conn.execute(text("INSERT INTO other.person VALUES (1, 'someone else')"))
    yield engine
    engine.dispose()


@pytest.fixture
def pg_session(pg_engine):
    cache = SessionCache({"local": {"type": "ext:local_session"}, "memory": {"type": "memory"}})
    return sessionmaker(bind=pg_engine, info=cache.session_info())


def test_schema_translate_map_keys_apart(pg_session, pg_engine):
    sql = SQLCounter(pg_engine)
    stmt = select(Person.name).where(Person.id == 1).options(FromCache("memory"))
    other = stmt.execution_options(schema_translate_map={None: "other"})
    for expected_sql in (2, 0):
        sql.reset()
        with pg_session() as session:
            assert session.execute(stmt).all() == [("person 1",)]
            assert session.execute(other).all() == [("someone else",)]
        assert sql.count == expected_sql, sql.statements


def test_shared_miss_runs_only_the_query_and_a_hit_runs_nothing(pg_session, pg_engine):
    sql = SQLCounter(pg_engine)
    stmt = select(Person).where(Person.name == "person 3").options(FromCache("memory"))
    with pg_session() as session:
        assert session.scalars(stmt).one().id == 3
        session.commit()
    assert [s.split()[0] for s in sql.statements] == ["SELECT"]
    sql.reset()
    with pg_session() as session:
        person = session.scalars(stmt).one()
        person.name = "renamed"
        session.commit()
    assert [s.split()[0] for s in sql.statements] == ["UPDATE"]


def test_a_commit_elsewhere_invalidates(pg_session):
    stmt = select(Person.name).where(Person.id == 3).options(FromCache("memory"))
    with pg_session() as reader:
        assert reader.execute(stmt).scalar_one() == "person 3"
    with pg_session() as writer:
        writer.get(Person, 3).name = "changed"
        writer.commit()
    with pg_session() as reader:
        assert reader.execute(stmt).scalar_one() == "changed"


# Functions of the database that read a table ------------------------------------------

ADDRESS_COUNT = """CREATE FUNCTION address_count(p integer) RETURNS bigint LANGUAGE sql STABLE
AS 'SELECT count(*) FROM address WHERE person_id = p'"""


class address_count(GenericFunction):
    """The application's declaration of a function of its database, the documented way to type its result."""

    type = Integer()
    inherit_cache = True


CALLS = {
    "a GenericFunction the application declares": select(Person.id, address_count(Person.id)).order_by(Person.id),
    "text() in WHERE": select(Person.id).where(text("address_count(person.id) > 2")).order_by(Person.id),
    "literal_column()": select(Person.id, literal_column("address_count(person.id)")).order_by(Person.id),
    "a function in a schema": select(Person.id, func.public.address_count(Person.id)).order_by(Person.id),
}


@pytest.mark.parametrize("call", CALLS)
def test_a_function_reading_another_table_is_invalidated_by_its_writes(pg_session, pg_engine, call):
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(ADDRESS_COUNT)
    stmt = CALLS[call]
    with sessionmaker(pg_engine)() as plain:
        before = plain.execute(stmt).all()
    with pg_session() as session:
        assert session.execute(stmt.options(FromCache("memory"))).all() == before
    sql = SQLCounter(pg_engine)
    with pg_session() as session:
        assert session.execute(stmt.options(FromCache("memory"))).all() == before
    assert sql.count == 0, "a hit"
    with pg_session() as session:  # a write to the table the function reads, and to no table the query names
        session.execute(text("INSERT INTO address VALUES (100, 1, 'one more', 1)"))
        session.commit()
    with sessionmaker(pg_engine)() as plain:
        after = plain.execute(stmt).all()
    assert after != before
    with pg_session() as session:
        assert session.execute(stmt.options(FromCache("memory"))).all() == after
