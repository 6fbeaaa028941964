"""pyramid_sessioncache.testing: the helpers offered to applications' tests."""

from __future__ import annotations

import pytest
from pyramid.scripting import prepare
from sqlalchemy import select, text
from sqlalchemy.orm import sessionmaker

from pyramid_sessioncache import cached_query
from pyramid_sessioncache.testing import LookupCounter, SQLCounter, assert_lookups, clear, lookups

from .models import Person
from .test_pyramid import make_app


def named(name):
    return select(Person).where(Person.name == name)


def test_sql_counter_counts_between_with_and_its_end(engine):
    with sessionmaker(bind=engine)() as session:
        session.execute(text("SELECT 1"))
        with SQLCounter(engine) as sql:
            session.execute(text("SELECT 2"))
            session.execute(text("SELECT 3"))
        session.execute(text("SELECT 4"))
    assert sql.statements == ["SELECT 2", "SELECT 3"]
    assert sql.count == len(sql) == 2
    assert repr(sql) == "<SQLCounter 2 statement(s)>"


def test_sql_counter_started_stopped_and_reset_by_hand(engine):
    sql = SQLCounter(engine).start()
    sql.start()  # twice: one listener
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        sql.reset()
        conn.execute(text("SELECT 2"))
        sql.stop()
        sql.stop()
        conn.execute(text("SELECT 3"))
    assert sql.statements == ["SELECT 2"]


def test_sql_counter_leaves_transaction_control_out_unless_asked(engine):
    with engine.connect() as conn, SQLCounter(conn) as queries, SQLCounter(conn, transactions=True) as everything:
        conn.exec_driver_sql("BEGIN")
        conn.exec_driver_sql("SAVEPOINT one")
        conn.execute(text("SELECT 1"))
        conn.exec_driver_sql("RELEASE SAVEPOINT one")
        conn.exec_driver_sql("rollback")
    assert queries.statements == ["SELECT 1"]
    assert everything.count == 5


def test_lookup_counter_counts_every_session_of_a_cache(Session, cache):
    with Session() as session:
        cached_query(session, named("person 1"), "memory").all()
    with LookupCounter(cache) as seen:
        for _ in range(2):
            with Session() as session:
                cached_query(session, named("person 1"), "memory").all()
                cached_query(session, named("person 2"), "local").all()
        clear(cache)
    assert (seen.hits, seen.misses) == (2, 2)
    assert seen.region("memory").hits == 2
    assert seen.region("local").misses == 2
    assert seen.region("memory").invalidations == 1
    assert repr(seen) == "<LookupCounter hits=2 misses=2>"
    with Session() as session:  # after the block: not counted
        cached_query(session, named("person 1"), "memory").all()
    assert (seen.hits, seen.misses) == (2, 2)
    seen.reset()
    assert (seen.hits, seen.misses) == (0, 0)
    with Session() as session:  # reset() counts from now on: stored after the block, a hit
        cached_query(session, named("person 1"), "memory").all()
    assert (seen.hits, seen.misses) == (1, 0)


def test_clear_empties_the_shared_regions(Session, cache, sql):
    with Session() as session:
        cached_query(session, named("person 3"), "memory").all()
    clear(cache)
    with Session() as session:
        cached_query(session, named("person 3"), "memory").all()
    assert sql.count == 2


def test_lookups_and_assert_lookups_of_a_session(Session):
    with Session() as session:
        cached_query(session, named("person 4"), "local").all()
        cached_query(session, named("person 4"), "local").all()
        cached_query(session, named("person 4"), "memory").all()
        assert [(lookup.region, lookup.hit) for lookup in lookups(session)] == [
            ("local", False),
            ("local", True),
            ("memory", False),
        ]
        assert len(lookups(session, region="memory")) == 1
        assert_lookups(session, hits=1, misses=2)
        assert_lookups(session, hits=1, region="local")
        assert_lookups(session, misses=1, region="memory")
        with pytest.raises(AssertionError) as failed:
            assert_lookups(session, hits=2, region="local")
        assert str(failed.value).splitlines()[:2] == [
            "expected 2 hit(s) and 1 miss(es) in region 'local', got 1 and 1:",
            f"  local: miss {lookups(session)[0].key}",
        ]
        with pytest.raises(AssertionError, match=r"\(no look-up\)"):
            assert_lookups(session, hits=1, region="nowhere")


def test_lookups_of_a_request(db_url):
    app = make_app(db_url)
    with prepare(registry=app.registry) as env:
        request = env["request"]
        request.cached_query(named("person 5")).all()
        request.cached_query(named("person 5")).all()
        assert lookups(request) == request.sessioncache.lookups
        assert_lookups(request, hits=1, misses=1)


def test_lookups_wants_a_session_or_a_request():
    with pytest.raises(TypeError, match="expected a Session or a request with a dbsession, got 42"):
        lookups(42)
