"""``.unique()`` is required on a hit exactly when it is uncached, and a hit gives the same rows.

A joined eager load of a collection repeats the parent once per child
row; the ORM makes such a Result demand ``.unique()`` (its methods raise
``InvalidRequestError`` without it).  Every other accessor, with or
without ``.unique()``, must behave on a hit, and on the miss that stored
it, as on the query run uncached: same rows, same collections, same
exception.
"""

from __future__ import annotations

import pytest
from sqlalchemy import exc, select
from sqlalchemy.engine import Row, RowMapping
from sqlalchemy.orm import contains_eager, joinedload, selectinload

from pyramid_sessioncache import FromCache, SessionCache, cached_query

from .conftest import SECRET
from .models import Address, Person, Tag

#: Statements of every shape: those with a joined collection require unique().
SHAPES = {
    "joined collection": lambda: (
        select(Person).options(joinedload(Person.addresses)).where(Person.id <= 3).order_by(Person.id)
    ),
    "joined collection, one parent": lambda: select(Person).options(joinedload(Person.addresses)).where(Person.id == 2),
    "joined collection, two entities": lambda: (
        select(Person, Address)
        .join(Person.addresses)
        .options(joinedload(Person.addresses))
        .where(Person.id <= 2)
        .order_by(Person.id, Address.id)
    ),
    "joined many-to-many": lambda: (
        select(Person).options(joinedload(Person.tags)).where(Person.id <= 4).order_by(Person.id)
    ),
    "contains_eager collection": lambda: (
        select(Person)
        .join(Person.addresses)
        .options(contains_eager(Person.addresses))
        .where(Person.id <= 2)
        .order_by(Person.id, Address.id)
    ),
    "joined many-to-one": lambda: (
        select(Address).options(joinedload(Address.person)).where(Address.id <= 4).order_by(Address.id)
    ),
    "selectin collection": lambda: (
        select(Person).options(selectinload(Person.addresses)).where(Person.id <= 3).order_by(Person.id)
    ),
    "a join without eager load": lambda: (
        select(Person).join(Person.addresses).where(Person.id <= 2).order_by(Person.id, Address.id)
    ),
}

#: What callers do with a Result.
ACCESSORS = {
    ".all()": lambda result: result.all(),
    ".scalars().all()": lambda result: result.scalars().all(),
    ".unique().all()": lambda result: result.unique().all(),
    ".unique().scalars().all()": lambda result: result.unique().scalars().all(),
    ".scalars().unique().all()": lambda result: result.scalars().unique().all(),
    ".first()": lambda result: result.first(),
    ".unique().first()": lambda result: result.unique().first(),
    ".scalars().first()": lambda result: result.scalars().first(),
    ".one()": lambda result: result.one(),
    ".scalar_one()": lambda result: result.scalar_one(),
    ".unique().scalar_one()": lambda result: result.unique().scalar_one(),
    ".scalar()": lambda result: result.scalar(),
    "iteration": lambda result: list(result),
    ".fetchmany(2)": lambda result: result.fetchmany(2),
    ".partitions(2)": lambda result: list(result.partitions(2)),
    ".mappings().all()": lambda result: result.mappings().all(),
    ".unique().mappings().all()": lambda result: result.unique().mappings().all(),
}


def plain(value):
    """``value`` as plain data: objects as (class, id, the ids of the collections they have loaded)."""
    if isinstance(value, (list, tuple, Row)):
        return [plain(item) for item in value]
    if isinstance(value, RowMapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (Person, Address, Tag)):
        loaded = {
            key: [item.id for item in value.__dict__[key]] for key in ("addresses", "tags") if key in value.__dict__
        }
        return (type(value).__name__, value.id, loaded)
    return value


def outcome(accessor, run, *args):
    """What ``accessor(run(*args))`` returns, as plain data, or the error it raises."""
    try:
        return plain(accessor(run(*args)))
    except exc.InvalidRequestError as error:  # MultipleResultsFound and NoResultFound too
        return (type(error).__name__, str(error))


@pytest.fixture(params=["local", "memory", "file"])
def region(request):
    return request.param


@pytest.fixture
def cache(region_options, region):
    return SessionCache(region_options, default_region=region, secret=SECRET)


@pytest.fixture(params=["FromCache option", "cached_query()"])
def execute(request, region):
    """``execute(session, statement)``: run ``statement`` through ``region``, by either entrance."""
    if request.param == "cached_query()":
        return lambda session, statement: cached_query(session, statement, region)
    return lambda session, statement: session.execute(statement.options(FromCache(region)))


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_a_hit_behaves_as_the_query_uncached(Session, sql, region, execute, shape):
    statement = SHAPES[shape]
    with Session() as session:
        sql.reset()
        session.execute(statement()).unique().all()
        one_run = sql.count  # its eager loads included
    expected = {}
    for name, accessor in ACCESSORS.items():
        with Session() as session:
            expected[name] = outcome(accessor, session.execute, statement())
    if shape.startswith(("joined collection", "joined many-to-many", "contains_eager")):
        assert expected[".all()"][0] == "InvalidRequestError", "the shape should require unique()"
        assert "unique()" in expected[".all()"][1]
    # The miss that stores, hits in the Session that stored, hits in new
    # Sessions (for a shared region: built, then reused from the Session).
    for _ in range(3):
        with Session() as session:
            for name, accessor in ACCESSORS.items():
                assert outcome(accessor, execute, session, statement()) == expected[name], name
    sql.reset()
    with Session() as session:
        for name, accessor in ACCESSORS.items():
            assert outcome(accessor, execute, session, statement()) == expected[name], name
    assert sql.count == (one_run if region == "local" else 0)


LEGACY = {
    "joined collection": lambda session: (
        session.query(Person).options(joinedload(Person.addresses)).filter(Person.id <= 3).order_by(Person.id)
    ),
    "joined collection, two entities": lambda session: (
        session.query(Person, Address)
        .join(Person.addresses)
        .options(joinedload(Person.addresses))
        .filter(Person.id <= 2)
        .order_by(Person.id, Address.id)
    ),
}

LEGACY_ACCESSORS = {
    ".all()": lambda query: query.all(),
    ".first()": lambda query: query.first(),
    "iteration": lambda query: list(query),
    ".limit(1).one()": lambda query: query.limit(1).one(),
}


@pytest.mark.parametrize("shape", sorted(LEGACY))
def test_a_legacy_query_hit_is_uniqued_as_uncached(Session, sql, region, shape):
    def cached(session):
        return LEGACY[shape](session).options(FromCache(region))

    with Session() as session:
        sql.reset()
        LEGACY[shape](session).all()
        LEGACY[shape](session).first()
        two_statements = sql.count  # .first() and .limit(1).one() run the second
    expected = {}
    for name, accessor in LEGACY_ACCESSORS.items():
        with Session() as session:
            expected[name] = outcome(accessor, LEGACY[shape], session)
    for _ in range(3):
        with Session() as session:
            for name, accessor in LEGACY_ACCESSORS.items():
                assert outcome(accessor, cached, session) == expected[name], name
    sql.reset()
    with Session() as session:
        for name, accessor in LEGACY_ACCESSORS.items():
            assert outcome(accessor, cached, session) == expected[name], name
    assert sql.count == (two_statements if region == "local" else 0)
