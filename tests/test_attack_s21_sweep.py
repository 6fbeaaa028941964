"""Session 21, a sweep of the differential fuzzer over many more seeds: each test is a defect it found.

Each compares a cached read with the same read uncached, on a SQLite file.
"""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, inspect, select, update
from sqlalchemy.orm import joinedload, selectinload, sessionmaker, subqueryload
from sqlalchemy.pool import SingletonThreadPool, StaticPool

from pyramid_sessioncache import FromCache

from .models import Address, Person


@pytest.mark.parametrize("loader", [selectinload, joinedload])
@pytest.mark.parametrize("region", [None, "local", "memory"])
def test_a_hit_loads_again_a_relationship_expired_since_it_was_stored(Session, loader, region):
    """``session.expire(obj, ["rel"])`` unloads a relationship without marking it expired.

    The query's eager load fills it again; a local hit (or a shared one
    the Session had built objects for) served the stored objects as they
    are, the relationship left unloaded (seed 1731).
    """
    stmt = select(Person).options(loader(Person.addresses)).where(Person.id <= 2).order_by(Person.id)
    if region is not None:
        stmt = stmt.options(FromCache(region))
    with Session() as session:
        person = session.execute(stmt).unique().scalars().all()[0]
        session.execute(stmt).unique().scalars().all()  # a shared hit builds the Session's objects once
        addresses = list(person.addresses)  # held, as an application may: still in the Session
        session.expire(person, ["addresses"])
        assert "addresses" not in person.__dict__
        people = session.execute(stmt).unique().scalars().all()
        assert people[0] is person
        assert "addresses" in person.__dict__
        assert person.addresses == addresses
        assert "addresses" in inspect(people[1]).dict


@pytest.mark.parametrize("pool", [StaticPool, SingletonThreadPool])
@pytest.mark.parametrize("region", [None, "memory"])
def test_a_commit_after_a_shared_hit_commits_the_one_connection_of_a_static_pool(db_url, cache, region, pool):
    """On a ``StaticPool`` every Session shares one DBAPI connection: committing one commits what another wrote.

    Uncached, the read began Session ``a``'s transaction on the connection,
    so ``a.commit()`` committed ``b``'s flushed write, and ``b``'s rollback
    then had nothing left to undo.  A shared hit began no connection: the
    commit sent nothing, the rollback undid the write (seed 5343).
    """
    engine = create_engine(db_url, poolclass=pool)
    Session = sessionmaker(engine, info=cache.session_info())
    stmt = select(Person).where(Person.id == 2)
    if region is not None:
        stmt = stmt.options(FromCache(region))
    try:
        with Session() as warm:
            warm.execute(stmt).scalars().all()
        a, b = Session(), Session()
        assert [person.name for person in a.execute(stmt).scalars()] == ["person 2"]
        b.get(Person, 3).name = "renamed"
        b.flush()
        a.commit()
        b.rollback()
        a.close()
        b.close()
        with engine.connect() as conn:
            assert conn.execute(select(Person.name).where(Person.id == 3)).scalar_one() == "renamed"
    finally:
        engine.dispose()


@pytest.mark.parametrize("expire", ["part", "whole"])
@pytest.mark.parametrize("loader", [joinedload, subqueryload])
@pytest.mark.parametrize("region", [None, "local", "memory"])
def test_a_local_hit_refreshes_an_object_the_joined_rows_hold_outside_a_stale_collection(
    engine, Session, region, loader, expire
):
    """A joined (or subquery) eager load refreshes every object its rows hold, even one a stale collection lacks.

    Person 1's addresses were loaded before another program moved address
    3 to it: the collection stays as loaded, but the rows hold address 3,
    whose expired attributes the query loads again.  A part expired drops
    the Session's local entries; the whole object, marked expired, is seen
    by the entry's check of the Session (``eager_rows.py``).
    """
    stmt = select(Person).options(loader(Person.addresses)).where(Person.id == 1)
    if region is not None:
        stmt = stmt.options(FromCache(region))
    with Session() as session:
        person = session.get(Person, 1)
        assert [address.id for address in person.addresses] == [1, 2]
        moved = session.get(Address, 3)
        with engine.begin() as conn:
            conn.execute(update(Address).where(Address.id == 3).values(person_id=1))
        session.execute(stmt).unique().scalars().all()
        session.expire(moved, ["street"] if expire == "part" else None)
        session.execute(stmt).unique().scalars().all()
        assert "street" in moved.__dict__
        assert [address.id for address in person.addresses] == [1, 2]  # stale, as the ORM leaves it
