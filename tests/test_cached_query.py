"""cached_query(session, ...) on shared regions: a hit read before Session.execute() keeps every rule.

The local-session rules are tested both ways in ``test_local_session.py``;
here the shared regions: versions checked, pending changes kept, the
Session's own writes seen, the Session's transaction begun.
"""

from __future__ import annotations

import pytest
from sqlalchemy import event, select
from sqlalchemy.orm import selectinload, sessionmaker

from pyramid_sessioncache import FromCache, SessionCache, cached_query
from pyramid_sessioncache.engine import lookup

from .conftest import SECRET
from .models import Person


@pytest.fixture
def cache(region_options, region):
    return SessionCache(region_options, default_region=region, secret=SECRET)


def named(name):
    return select(Person).where(Person.name == name)


def one(session, statement):
    return cached_query(session, statement).scalars().one()


def test_a_new_session_hits_without_sql(Session, sql):
    with Session() as first:
        stored = one(first, named("person 3"))
    sql.reset()
    with Session() as second:
        hit = one(second, named("person 3"))
        assert sql.count == 0
        assert hit is not stored and hit in second and hit.name == "person 3"
        assert second.scalars(select(Person).where(Person.id == 3)).one() is hit


def test_a_committed_write_elsewhere_is_seen(Session, sql):
    def write(change):
        with Session() as writer:
            change(writer)
            writer.commit()
        sql.reset()
        with Session() as reader:
            return sorted(p.id for p in cached_query(reader, named("person 4")).scalars()), sql.count

    with Session() as first:
        one(first, named("person 4"))
    # The same value: no UPDATE, no new version.
    assert write(lambda s: setattr(s.get(Person, 4), "name", "person 4")) == ([4], 0)
    # Another table: the entry read person only.
    assert write(lambda s: setattr(s.get(Person, 4).addresses[0], "street", "moved")) == ([4], 0)
    # A committed write to person: the entry is stale, the query runs.
    assert write(lambda s: setattr(s.get(Person, 5), "name", "person 4")) == ([4, 5], 1)


def test_pending_changes_are_kept_and_own_writes_seen(Session, sql):
    with Session() as first:
        one(first, named("person 6"))
    with Session(autoflush=False) as second:
        held = second.get(Person, 6)
        held.name = "renamed, not flushed"
        sql.reset()
        assert one(second, named("person 6")) is held
        assert sql.count == 0 and held.name == "renamed, not flushed"
        second.flush()  # the transaction has written: shared entries are read around
        sql.reset()
        assert cached_query(second, named("person 6")).scalars().all() == []
        assert sql.count == 1
        second.rollback()


def test_the_same_entry_twice_in_a_session_reuses_its_objects(Session, sql):
    page = select(Person).where(Person.id <= 5).order_by(Person.id).options(selectinload(Person.addresses))
    with Session() as first:
        cached_query(first, page).scalars().all()
    with Session() as first:  # the shape's tables are known from the first miss onwards
        cached_query(first, page).scalars().all()
    sql.reset()
    with Session() as second:
        people = cached_query(second, page).scalars().all()
        assert cached_query(second, page).scalars().all() == people
        assert [len(p.addresses) for p in people] == [2] * 5
        assert sql.count == 0


def test_a_hit_begins_the_sessions_transaction(Session, engine):
    with Session() as first:
        one(first, named("person 7"))
    begun = []
    with Session() as second:
        event.listen(second, "after_begin", lambda session, transaction, connection: begun.append(connection))
        one(second, named("person 7"))
        assert len(begun) == 1  # as the query would have: zope.sqlalchemy joins here


def test_manual_invalidation_mode(engine, region_options, region, sql):
    cache = SessionCache(region_options, invalidation="manual", secret=SECRET)
    Session = sessionmaker(bind=engine, info=cache.session_info())
    for _ in range(2):
        with Session() as session:
            cached_query(session, named("person 8"), region).scalars().one()
    assert sql.count == 1


def test_a_miss_hands_its_decision_to_that_statement_only(Session, cache, region):
    """cached_query() hands the ORM hook its decision for the statement it executes, and for no other.

    Another statement executed with that decision (an execution option,
    which relationship loads inherit) is looked up under its own key.
    """
    with Session() as session:
        assert one(session, named("person 6")).name == "person 6"  # stored under its own key
        statement = named("person 6").options(FromCache(region))
        options = statement.get_execution_options()
        bind_arguments = {"clause": statement, "mapper": None}
        decided = lookup.decide(
            cache, cache.region(region), session, statement, None, options, bind_arguments, FromCache(region)
        )
        other = named("person 7").options(FromCache(region))
        found = session.execute(other, execution_options={lookup.DECIDED: (statement, decided)}).scalars().one()
        assert found.name == "person 7"
