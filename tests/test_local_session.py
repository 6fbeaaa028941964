"""ext:local_session: entries on the Session, the Session's own objects, dropped in time."""

from __future__ import annotations

import importlib.metadata

import pytest
from beaker.cache import Cache
from sqlalchemy import delete, select, text, update
from sqlalchemy.orm import scoped_session

from pyramid_sessioncache import (
    FromCache,
    RelationshipCache,
    ScopedSessionNamespace,
    SessionCacheError,
    cache_parameters,
    cached_query,
)
from pyramid_sessioncache.storage.backends.local_session import INFO_KEY

from .models import Address, Person


def by_name(name):
    return select(Person).where(Person.name == name).options(FromCache("local"))


@pytest.fixture(params=["FromCache option", "cached_query()"])
def scalars(request):
    """``scalars(session, statement)``: run a statement through the ``local`` region, either way.

    ``cached_query()`` reads a local hit before ``Session.execute()``; the
    behaviour must be the same.
    """
    if request.param == "cached_query()":
        return lambda session, statement: cached_query(session, statement, "local").scalars()
    return lambda session, statement: session.scalars(statement.options(FromCache("local")))


def named(name):
    return select(Person).where(Person.name == name)


def test_same_query_twice_runs_once_and_returns_the_same_objects(Session, sql, scalars):
    with Session() as session:
        first = scalars(session, named("person 10")).one()
        second = scalars(session, named("person 10")).one()
        assert sql.count == 1
        assert first is second


def test_hit_returns_the_object_in_the_cache(Session):
    with Session() as session:
        person = session.query(Person).options(FromCache("local")).filter(Person.name == "person 10").one()
        beaker_cache, key = cache_parameters(
            session.query(Person).options(FromCache("local")).filter(Person.name == "person 10")
        )
        assert beaker_cache.get(key)[0] is person
        assert len(beaker_cache.get(key)) == 1
        assert INFO_KEY in session.info


def test_entries_live_on_the_session_only(Session, sql):
    with Session() as one, Session() as two:
        one.scalars(by_name("person 1")).one()
        two.scalars(by_name("person 1")).one()
        assert sql.count == 2
        assert one.info[INFO_KEY] is not two.info[INFO_KEY]


@pytest.mark.parametrize("end", ["commit", "rollback", "close"])
def test_dropped_when_the_transaction_ends(Session, sql, scalars, end):
    with Session() as session:
        person = scalars(session, named("person 2")).one()
        getattr(session, end)()
        assert INFO_KEY not in session.info
        again = scalars(session, named("person 2")).one()
        assert sql.count == 2
        assert again.name == "person 2"
        if end == "close":
            assert again is not person


def test_dropped_by_scoped_session_remove(engine, cache, sql):
    from sqlalchemy.orm import sessionmaker

    Session = scoped_session(sessionmaker(bind=engine, info=cache.session_info()))
    Session.scalars(by_name("person 3")).one()
    Session.scalars(by_name("person 3")).one()
    assert sql.count == 1
    Session.remove()
    Session.scalars(by_name("person 3")).one()
    assert sql.count == 2
    Session.remove()


def test_never_returns_expired_or_detached_objects(Session, sql, scalars):
    with Session() as session:
        person = scalars(session, named("person 4")).one()
        session.expire(person)
        assert scalars(session, named("person 4")).one() is person
        assert sql.count == 2  # the miss after expire() reloads the object
        assert person.name == "person 4"
        assert sql.count == 2
        session.expunge(person)
        again = scalars(session, named("person 4")).one()
        assert again is not person and again in session


def test_writes_in_the_session_drop_it(Session, sql, scalars):
    with Session() as session:
        everyone = select(Person).order_by(Person.id)
        assert len(scalars(session, everyone).all()) == 20
        doomed = session.get(Person, 20)
        for address in doomed.addresses:
            session.delete(address)
        session.delete(doomed)
        assert len(scalars(session, everyone).all()) == 19  # autoflush, then a miss
        session.add(Person(id=21, name="new"))
        assert [p.name for p in scalars(session, everyone).all()][-1] == "new"
        session.execute(update(Person).where(Person.id == 1).values(name="bulk"))
        assert scalars(session, everyone).first().name == "bulk"
        session.execute(delete(Address).where(Address.person_id == 1))
        assert INFO_KEY not in session.info
        scalars(session, everyone).all()
        session.execute(text("UPDATE person SET name = 'raw' WHERE id = 2"))
        assert INFO_KEY not in session.info
        session.rollback()


def test_namespace_registered_through_beaker_entry_point():
    names = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="beaker.backends")}
    assert names["ext:local_session"] == "pyramid_sessioncache.storage.backends.local_session:ScopedSessionNamespace"


def test_create_session_container_on_todays_beaker(engine, cache):
    from sqlalchemy.orm import sessionmaker

    Session = scoped_session(sessionmaker(bind=engine))
    container = ScopedSessionNamespace.create_session_container("ext:test_local", Session)
    beaker_cache = Cache("people", type="ext:test_local")
    assert isinstance(beaker_cache.namespace, container)
    beaker_cache.put("key", "value")
    assert beaker_cache.get("key") == "value"
    assert Session().info[INFO_KEY]["people"]
    Session.remove()
    assert INFO_KEY not in Session().info
    with pytest.raises(KeyError):
        beaker_cache.get("key")
    Session.remove()


def test_namespace_without_a_session_says_so():
    beaker_cache = Cache("people", type="ext:local_session")
    with pytest.raises(SessionCacheError, match="has no Session"):
        beaker_cache.get("key")


def test_no_autoflush_is_honoured(Session, sql, scalars):
    with Session() as session:
        person = scalars(session, named("person 5")).one()
        with session.no_autoflush:
            person.name = "pending"
            assert scalars(session, named("person 5")).one() is person
        assert sql.count == 1
        assert person in session.dirty
        session.rollback()


def test_cached_query_and_the_option_share_entries(Session, sql):
    with Session() as session:
        first = cached_query(session, named("person 6"), "local").scalars().one()
        assert session.scalars(named("person 6").options(FromCache("local"))).one() is first
        assert cached_query(session, named("person 7"), "local").scalars().one().name == "person 7"
        assert session.scalars(named("person 7").options(FromCache("local"))).one().name == "person 7"
        assert sql.count == 2


def test_cached_query_honours_populate_existing(Session, sql):
    with Session() as session:
        person = cached_query(session, named("person 8"), "local").scalars().one()
        person.name = "unflushed"
        fresh = named("person 8").execution_options(populate_existing=True, autoflush=False)
        assert cached_query(session, fresh, "local").scalars().one() is person
        assert sql.count == 2
        assert person.name == "person 8"  # overwritten from the row, as asked


def test_cached_query_checks_its_arguments(Session, engine):
    from sqlalchemy.orm import Session as PlainSession

    from pyramid_sessioncache import NoRegionsError, NotCacheableError, UnknownRegionError

    with Session() as session:
        with pytest.raises(UnknownRegionError):
            cached_query(session, named("person 1"), "nowhere")
        with pytest.raises(NotCacheableError, match="only SELECT"):
            cached_query(session, update(Person).values(name="x"), "local")
    with PlainSession(engine) as plain, pytest.raises(NoRegionsError):
        cached_query(plain, named("person 1"), "local")
    with Session() as session:
        # Two regions named for one statement: which one was meant?
        for statement in (named("person 1").options(FromCache("local")), session.query(Person).options(FromCache())):
            with pytest.raises(NotCacheableError, match="has a caching option already"):
                cached_query(session, statement, "local")

        class MyFromCache(FromCache):
            pass

        with pytest.raises(NotCacheableError, match="has a caching option already"):
            cached_query(session, named("person 1").options(MyFromCache("local")), "local")
        # A RelationshipCache names the region of the lazy loads, not of the statement.
        addresses = RelationshipCache(Person.addresses, "local")
        assert cached_query(session, named("person 1").options(addresses), "local").scalars().one().id == 1


def test_each_lookup_is_logged_at_debug(Session, scalars, caplog):
    import logging

    with caplog.at_level(logging.DEBUG, logger="pyramid_sessioncache"), Session() as session:
        scalars(session, named("person 9")).one()
        scalars(session, named("person 9")).one()
    messages = [r.getMessage() for r in caplog.records if r.name == "pyramid_sessioncache.engine.lookup"]
    assert [m.split(":")[0] for m in messages] == ["cache miss", "cache hit"]
    assert all("region local key " in m for m in messages)


def test_a_write_on_the_sessions_connection_drops_the_local_cache(Session, sql, scalars):
    with Session() as session:
        assert scalars(session, named("person 3")).one().id == 3
        session.connection().execute(update(Person).where(Person.id == 3).values(name="moved"))
        assert scalars(session, named("person 3")).one_or_none() is None
        assert sql.count == 3  # the first read, the update, the read again


def test_declared_writes_drop_the_local_cache(Session, engine, sql, scalars):
    with Session() as session:
        first = scalars(session, named("person 4")).all()
        # A write this process cannot see (another connection's, outside SQLAlchemy):
        raw = engine.raw_connection()
        try:
            raw.cursor().execute("UPDATE person SET name = 'elsewhere' WHERE id = 4")
            raw.commit()
        finally:
            raw.close()
        from pyramid_sessioncache import invalidate_tables

        invalidate_tables(session, "person")
        sql.reset()
        assert first and scalars(session, named("person 4")).all() == []
        assert sql.count == 1


def test_a_session_keeps_at_most_max_items_least_recently_used_out(engine, sql):
    from sqlalchemy.orm import sessionmaker

    from pyramid_sessioncache import SessionCache

    cache = SessionCache({"local": {"type": "ext:local_session", "max_items": 3}})
    Session = sessionmaker(bind=engine, info=cache.session_info())
    with Session() as session:
        first = session.scalars(by_name("person 1")).one()
        for n in (2, 3):
            session.scalars(by_name(f"person {n}")).one()
        session.scalars(by_name("person 1")).one()  # a hit: now the most recent
        sql.reset()
        session.scalars(by_name("person 4")).one()  # person 2 goes
        assert [len(entries) for entries in session.info[INFO_KEY].values()] == [3]
        assert session.scalars(by_name("person 1")).one() is first
        assert sql.count == 1
        session.scalars(by_name("person 2")).one()
        assert sql.count == 2


def test_the_default_bound_is_a_thousand_per_session(engine):
    from sqlalchemy.orm import sessionmaker

    from pyramid_sessioncache import SessionCache
    from pyramid_sessioncache.storage.backends.local_session import DEFAULT_MAX_ITEMS

    cache = SessionCache({"local": {"type": "ext:local_session"}, "memory": {"type": "memory"}})
    Session = sessionmaker(bind=engine, info=cache.session_info())
    assert DEFAULT_MAX_ITEMS == 1000
    with Session() as session:
        for n in range(DEFAULT_MAX_ITEMS + 5):
            statement = select(Person).where(Person.id == n % 20 + 1, Person.name != f"nobody {n}")
            cached_query(session, statement, "local").scalar_one()
            for _ in range(2):  # the second builds the objects once more, and remembers them
                cached_query(session, statement, "memory").scalar_one()
        assert sorted(len(entries) for entries in session.info[INFO_KEY].values()) == [1000, 1000]
