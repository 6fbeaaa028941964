"""On a real PostgreSQL server: schemas, transactions, shared-region loads."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import sessionmaker

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
