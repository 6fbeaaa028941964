"""Locking reads run uncached: no look-up, no store, in every region, by either entrance.

A ``SELECT ... FOR UPDATE`` (or ``FOR SHARE``, ``NOWAIT``, ``OF``...) is
run for its locks as much as for its rows: served from a cache, it would
lock nothing.  Whatever spells it (``select().with_for_update()``, the
legacy ``Query.with_for_update()``, ``Session.get(..., with_for_update=True)``,
a locking subquery, SQL text) it must reach the database every time.
"""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, exc, select, text
from sqlalchemy.orm import Query, sessionmaker

from pyramid_sessioncache import FromCache, SessionCache, cached_query

from .conftest import SECRET, SQLCounter
from .models import Address, Person

#: Each locking read of person 1 (or of what locks it), built for a Session.
FORMS = {
    "select().with_for_update()": lambda session: select(Person).where(Person.id == 1).with_for_update(),
    "with_for_update(read=True)": lambda session: select(Person).where(Person.id == 1).with_for_update(read=True),
    "with_for_update(nowait=True, of=Person)": lambda session: (
        select(Person).where(Person.id == 1).with_for_update(nowait=True, of=Person)
    ),
    "a locking subquery": lambda session: select(Person).where(
        Person.id.in_(select(Address.person_id).where(Address.id == 1).with_for_update().scalar_subquery())
    ),
    "Query.with_for_update()": lambda session: session.query(Person).filter(Person.id == 1).with_for_update(),
}


@pytest.fixture
def cache(region_options, any_region):
    return SessionCache(region_options, default_region=any_region, secret=SECRET)


def ids(session, query, region, entrance):
    """Run ``query`` through ``region`` by ``entrance``; return the ids of the people it returns."""
    if isinstance(query, Query):
        if entrance == "cached_query()":
            query = cached_query(session, query, region)
        else:
            query = query.options(FromCache(region))
        return [person.id for person in query.all()]
    if entrance == "cached_query()":
        result = cached_query(session, query, region)
    else:
        result = session.execute(query.options(FromCache(region)))
    return [getattr(row[0], "id", row[0]) for row in result]  # entities, or an id column


@pytest.mark.parametrize("form", sorted(FORMS))
def test_a_locking_read_sends_sql_every_time(Session, cache, sql, any_region, entrance, form):
    plain = select(Person).where(Person.id == 1)
    with Session() as session:
        # The same rows without the lock are cached, in this very Session.
        assert ids(session, plain, any_region, entrance) == [1]
        sql.reset()
        assert ids(session, FORMS[form](session), any_region, entrance) == [1]
        assert ids(session, FORMS[form](session), any_region, entrance) == [1]
        assert sql.count == 2
        assert ids(session, plain, any_region, entrance) == [1]
        assert sql.count == 2  # the entry of the plain read is there, and still served
    with Session() as session:
        sql.reset()
        assert ids(session, FORMS[form](session), any_region, entrance) == [1]
        assert sql.count == 1
    counters = cache.stats.region(any_region)
    assert (counters.hits, counters.misses) == (1, 1)  # the plain read's: the locking ones were never looked up


def test_a_read_that_only_names_the_words_is_cached(Session, sql, any_region, entrance):
    # "for update" as a bound value: the statement locks nothing.
    named = select(Person.id).where(Person.name != "for update")
    with Session() as session:
        for _ in range(2):
            assert len(ids(session, named, any_region, entrance)) == 20
        assert sql.count == 1


def test_session_get_with_for_update_sends_sql_every_time(Session, cache, sql, any_region):
    with Session() as session:
        assert session.get(Person, 1, options=[FromCache(any_region)]).id == 1
        sql.reset()
        for _ in range(2):
            assert session.get(Person, 1, options=[FromCache(any_region)], with_for_update=True).id == 1
        assert sql.count == 2
    with Session() as session:
        sql.reset()
        assert session.get(Person, 1, options=[FromCache(any_region)], with_for_update=True).id == 1
        assert sql.count == 1


# On PostgreSQL: the lock is really taken --------------------------------------------


def lock_fails(url, sql):
    """Whether another connection fails to lock a row (``sql``: a ``... FOR UPDATE NOWAIT``) at once."""
    other = create_engine(url)
    try:
        with other.connect() as conn:
            try:
                conn.execute(text(sql)).all()
            except exc.OperationalError as error:
                assert "could not obtain lock" in str(error)
                return True
            return False
    finally:
        other.dispose()


#: Each locking read, and the concurrent lock it must make fail.
PG_FORMS = {
    **{name: (build, "SELECT id FROM person WHERE id = 1 FOR UPDATE NOWAIT") for name, build in FORMS.items()},
    "a locking subquery": (FORMS["a locking subquery"], "SELECT id FROM address WHERE id = 1 FOR UPDATE NOWAIT"),
    "from_statement(text(... FOR UPDATE))": (
        lambda session: select(Person).from_statement(text("SELECT * FROM person WHERE id = 1 FOR UPDATE")),
        "SELECT id FROM person WHERE id = 1 FOR UPDATE NOWAIT",
    ),
    "text(... FOR SHARE).columns()": (
        lambda session: text("SELECT id, name FROM person WHERE id = 1 FOR SHARE").columns(Person.id, Person.name),
        "SELECT id FROM person WHERE id = 1 FOR UPDATE NOWAIT",
    ),
    "text(... FOR NO KEY UPDATE)": (
        lambda session: text("SELECT id, name FROM person WHERE id = 1 FOR NO KEY UPDATE"),
        "SELECT id FROM person WHERE id = 1 FOR UPDATE NOWAIT",
    ),
}


@pytest.mark.parametrize("region", ["memory", "local"])
@pytest.mark.parametrize("form", sorted(PG_FORMS))
def test_a_cached_locking_read_takes_its_lock(pg_url, region, entrance, form):
    build, concurrent = PG_FORMS[form]
    engine = create_engine(pg_url)
    cache = SessionCache({"local": {"type": "ext:local_session"}, "memory": {"type": "memory"}})
    Session = sessionmaker(bind=engine, info=cache.session_info())
    sql = SQLCounter(engine)
    try:
        for _ in range(2):
            with Session() as session:
                assert ids(session, build(session), region, entrance) == [1]
                assert lock_fails(pg_url, concurrent)
            assert not lock_fails(pg_url, concurrent)  # the lock went with the transaction
        assert sql.count == 2
    finally:
        engine.dispose()
