"""The application's own ``do_orm_execute`` listeners shape what is cached.

A common one adds ``with_loader_criteria()`` per tenant, or hides soft-deleted
rows.  The add-on's listener is installed when it is imported, so it usually
comes first; it must still key and store the statement as the application's
later listeners make it, or one tenant would be served another's rows.
"""

from __future__ import annotations

import pytest
from sqlalchemy import event, select
from sqlalchemy.orm import sessionmaker, with_loader_criteria

from pyramid_sessioncache import FromCache, SessionCache, cached_query

from .conftest import SECRET
from .models import Person


def visible_to_tenant(state) -> None:
    """The application's listener: a Session sees the people up to its ``max_id``."""
    max_id = state.session.info.get("max_id")
    if state.is_select and max_id is not None:
        state.statement = state.statement.options(
            with_loader_criteria(Person, Person.id <= max_id, include_aliases=True)
        )


@pytest.fixture(params=["local", "memory", "file", "redis"])
def region(request, region_options) -> str:
    if request.param == "redis":
        region_options["redis"] = {"type": "ext:redis", "url": request.getfixturevalue("redis_url")}
    return request.param


@pytest.fixture(params=["Session class", "sessionmaker"])
def tenants(request, engine, region_options, region):
    """A sessionmaker whose Sessions take a ``max_id``, with the listener on the class or the factory."""
    cache = SessionCache(region_options, secret=SECRET)
    factory = sessionmaker(bind=engine, info=cache.session_info())
    target = factory if request.param == "sessionmaker" else factory.class_
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
