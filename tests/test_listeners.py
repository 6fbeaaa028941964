"""The application's own ``do_orm_execute`` listeners shape what is cached.

A common one adds ``with_loader_criteria()`` per tenant, or hides soft-deleted
rows.  The add-on's listener is installed when it is imported, so it usually
comes first; it must still key and store the statement as the application's
later listeners make it, or one tenant would be served another's rows.
"""

from __future__ import annotations

import pytest
from sqlalchemy import event, select
from sqlalchemy.orm import Session, sessionmaker, with_loader_criteria

from pyramid_sessioncache import FromCache, SessionCache, cached_query

from .conftest import SECRET, use_region
from .models import Person


def visible_to_tenant(state) -> None:
    """The application's listener: a Session sees the people up to its ``max_id`` (3 without one)."""
    if state.is_select:
        max_id = state.session.info.get("max_id", 3)
        state.statement = state.statement.options(
            with_loader_criteria(Person, Person.id <= max_id, include_aliases=True)
        )


@pytest.fixture(params=["local", "memory", "file", "redis"])
def region(request, region_options) -> str:
    return use_region(request, region_options, request.param)


@pytest.fixture(params=["sqlalchemy.orm.Session", "the factory's class", "sessionmaker"])
def tenants(request, engine, region_options, region):
    """A sessionmaker whose Sessions take a ``max_id``, with the listener on either class or the factory.

    On ``sqlalchemy.orm.Session`` it also runs for the add-on's loader
    Session, which must neither apply it twice nor without the caller's ``info``.
    """
    cache = SessionCache(region_options, secret=SECRET)
    factory = sessionmaker(bind=engine, info=cache.session_info())
    target = {"sqlalchemy.orm.Session": Session, "the factory's class": factory.class_}.get(request.param, factory)
    event.listen(target, "do_orm_execute", visible_to_tenant)
    yield lambda max_id: factory(info={**cache.session_info(), "max_id": max_id})
    event.remove(target, "do_orm_execute", visible_to_tenant)


@pytest.fixture(params=["FromCache option", "cached_query()"])
def ids(request, region):
    """``ids(session)``: the ids of everyone the session sees, through ``region``, either way."""
    everyone = select(Person).order_by(Person.id)
    if request.param == "cached_query()":
        return lambda session: [p.id for p in cached_query(session, everyone, region).scalars()]
    return lambda session: [p.id for p in session.scalars(everyone.options(FromCache(region)))]


def test_a_tenant_is_never_served_another_tenants_rows(tenants, ids, sql, region):
    with tenants(2) as first:
        assert ids(first) == [1, 2]
        sql.reset()
        assert ids(first) == [1, 2]
        assert sql.count == 0  # still cached
    with tenants(5) as second:
        assert ids(second) == [1, 2, 3, 4, 5]
    with tenants(2) as third:
        sql.reset()
        assert ids(third) == [1, 2]
        assert sql.count == (1 if region == "local" else 0)


@pytest.mark.parametrize("first", [False, True], ids=["after the add-on's", "before the add-on's"])
def test_the_listeners_run_once_per_execution(tenants, region, first):
    calls = []

    def count(state):
        calls.append(state.session.info.get("max_id"))

    event.listen(Session, "do_orm_execute", count, insert=first)
    try:
        with tenants(4) as session:
            people = session.scalars(select(Person).order_by(Person.id).options(FromCache(region))).all()
    finally:
        event.remove(Session, "do_orm_execute", count)
    assert [p.id for p in people] == [1, 2, 3, 4]
    assert calls == [4]  # the miss: once, with the caller's info, also when a loader Session reads the rows


def test_a_session_info_with_keys_of_any_kind(tenants, region):
    marker = object()
    with tenants(2) as session:
        session.info[marker] = "the application's"
        session.info[("a", "tuple")] = True
        assert [p.id for p in session.scalars(select(Person).order_by(Person.id).options(FromCache(region)))] == [1, 2]


@pytest.mark.parametrize("setting", ["update_execution_options()", "a new statement"])
@pytest.mark.parametrize("how", ["FromCache option", "cached_query()"])
def test_execution_options_set_by_a_later_listener_count(engine, region_options, region, sql, how, setting):
    """Options a later listener sets: bypass options are obeyed, the others keyed."""
    cache = SessionCache(region_options, secret=SECRET)
    factory = sessionmaker(bind=engine, info=cache.session_info())

    def options_of_the_session(state):
        options = state.session.info.get("options", {})
        if not state.is_select:
            return
        if setting == "a new statement":
            state.statement = state.statement.execution_options(**options)
        else:
            state.update_execution_options(**options)

    def run(options):
        with factory(info={**cache.session_info(), "options": options}) as session:
            statement = select(Person).where(Person.id == 1)
            if how == "cached_query()":
                return cached_query(session, statement, region).scalars().one().name
            return session.scalars(statement.options(FromCache(region))).one().name

    event.listen(factory, "do_orm_execute", options_of_the_session)
    try:
        run({"tenant": "a"})
        run({"tenant": "a"})
        sql.reset()
        run({"tenant": "a"})
        assert sql.count == (1 if region == "local" else 0)
        run({"tenant": "b"})  # another key
        assert sql.count == (2 if region == "local" else 1)
        sql.reset()
        run({"tenant": "a", "populate_existing": True})  # no cache at all
        run({"tenant": "a", "populate_existing": True})
        assert sql.count == 2
    finally:
        event.remove(factory, "do_orm_execute", options_of_the_session)
