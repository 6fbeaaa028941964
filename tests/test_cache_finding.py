"""How a Session finds its cache: its info, its request, a finder, or a cache given explicitly."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from pyramid_sessioncache import (
    FromCache,
    NoRegionsError,
    RelationshipCache,
    SessionCache,
    cache_of,
    cache_parameters,
    cached_query,
    invalidate,
)
from pyramid_sessioncache.engine import cache as cache_module

from .conftest import SECRET
from .models import Person


@pytest.fixture
def plain(engine):
    """A sessionmaker whose Sessions carry no cache."""
    return sessionmaker(bind=engine)


def named(name):
    return select(Person).where(Person.name == name)


def test_a_cache_given_to_cached_query_serves_a_session_that_carries_none(plain, cache, sql):
    with plain() as session:
        first = cached_query(session, named("person 1"), "memory", cache=cache).scalar_one()
        assert cached_query(session, named("person 1"), "memory", cache=cache).scalar_one() is first
    assert sql.count == 1
    assert cache.stats.region("memory").hits == 1
    with (
        plain() as session,
        pytest.raises(NoRegionsError, match=r"sessionmaker\(info=session_cache.session_info\(\)\)"),
    ):
        cached_query(session, named("person 1"), "memory")


def test_a_legacy_query_keeps_the_cache_it_was_given(plain, cache, sql):
    with plain() as session:
        query = session.query(Person).filter(Person.name == "person 2")
        assert (
            cached_query(session, query, "local", cache=cache).one()
            is cached_query(session, query, "local", cache=cache).one()
        )
    assert sql.count == 1


def test_a_caching_option_names_its_cache(plain, cache, sql):
    option = FromCache("memory", cache=cache)
    with plain() as session:
        session.scalars(named("person 3").options(option)).one()
    with plain() as session:
        session.scalars(named("person 3").options(option)).one()
    assert sql.count == 1
    assert repr(option) == "FromCache(region='memory', cache_key=None, expire=None)"


def test_the_cache_is_not_part_of_the_key(Session, plain, cache, sql):
    with Session() as session:  # carries the cache
        session.scalars(named("person 4").options(FromCache("memory"))).one()
    with plain() as session:
        session.scalars(named("person 4").options(FromCache("memory", cache=cache))).one()
    assert sql.count == 1


def test_entries_are_found_and_forgotten_with_an_explicit_cache(plain, cache, sql):
    with plain() as session:
        cached_query(session, named("person 5"), "memory", cache=cache).scalar_one()
        beaker_cache, key = cache_parameters(named("person 5"), session, "memory", cache=cache)
        assert beaker_cache.has_key(key)
        invalidate(named("person 5"), session, "memory", cache=cache)
        assert not beaker_cache.has_key(key)
        # The option's own cache, when none is passed.
        assert cache_parameters(named("person 5").options(FromCache("memory", cache=cache)), session)[1] == key
        with pytest.raises(NoRegionsError, match="pass cache="):
            invalidate(named("person 5"), session, "memory")


def test_a_finder_names_the_cache_of_sessions_that_carry_none(plain, cache, sql, monkeypatch):
    monkeypatch.setattr(cache_module, "_finders", [])
    known = {}

    def finder(session):
        return known.get(id(session))

    cache_module.add_cache_finder(finder)
    cache_module.add_cache_finder(finder)
    assert cache_module._finders == [finder]
    with plain() as session:
        assert cache_of(session) is None
        known[id(session)] = cache
        assert cache_of(session) is cache
        # The ORM hook finds it too: relationship loads included.
        query = named("person 6").options(FromCache("memory"), RelationshipCache(Person.addresses, "memory"))
        person = session.scalars(query).one()
        assert len(person.addresses) == 2
    with plain() as session:
        known[id(session)] = cache
        person = session.scalars(query).one()
        assert len(person.addresses) == 2
    assert sql.count == 2  # the person and its addresses, once


def test_what_the_session_carries_comes_before_any_finder(Session, monkeypatch):
    other = SessionCache({"local": {"type": "ext:local_session"}}, secret=SECRET)
    monkeypatch.setattr(cache_module, "_finders", [lambda session: other])
    with Session() as session:
        assert cache_of(session) is session.info["sessioncache"]
    session = sessionmaker()(info={"request": None})
    assert cache_of(session) is other
