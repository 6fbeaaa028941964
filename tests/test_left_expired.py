"""A local hit and the attributes its load left expired (``values.current()``).

A load leaves expired what it does not load: a lazy relationship after
``expire_all()`` or a commit, a deferred column.  Run again, the query
leaves them so: a hit must not take them for a miss (counted in SQL
statements), while an attribute expired since the entry was stored still
makes one (compared with the same reads uncached).
"""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import defer, joinedload, selectinload, subqueryload

from pyramid_sessioncache import FromCache

from .models import Person

LOADERS = [joinedload, subqueryload, selectinload]


def _second_read(Session, sql, stmt, prepare):
    """The statements of the second of two reads after ``prepare(session)``: 0 when the first was kept.

    What ``prepare`` returns is held until then: the Session holds its
    objects weakly, and a read would make new ones of those let go.
    """
    with Session() as session:
        held = prepare(session)  # noqa: F841
        session.execute(stmt).unique().scalars().all()
        sql.reset()
        session.execute(stmt).unique().scalars().all()
        return sql.count


def _read_then_expire_all(stmt):
    def prepare(session):
        people = session.execute(stmt).unique().scalars().all()
        session.expire_all()  # relationships too: ``tags``, never loaded, stays expired after the next read
        return people

    return prepare


@pytest.mark.parametrize("loader", LOADERS)
def test_a_load_after_expire_all_is_kept(Session, sql, loader):
    stmt = select(Person).options(loader(Person.addresses), FromCache("local")).where(Person.id <= 2)
    assert _second_read(Session, sql, stmt, _read_then_expire_all(stmt)) == 0


@pytest.mark.parametrize("loader", LOADERS)
def test_a_load_in_the_next_transaction_of_a_session_is_kept(Session, sql, loader):
    stmt = select(Person).options(loader(Person.addresses), FromCache("local")).where(Person.id <= 2)

    def prepare(session):
        people = session.execute(stmt).unique().scalars().all()
        session.commit()  # expire_on_commit
        return people

    assert _second_read(Session, sql, stmt, prepare) == 0


def test_a_deferred_column_the_load_leaves_unloaded_is_no_miss(Session, sql):
    stmt = select(Person).options(defer(Person.name), FromCache("local")).where(Person.id <= 2)
    assert _second_read(Session, sql, stmt, _read_then_expire_all(stmt)) == 0


def _person_one(region):
    stmt = select(Person).options(selectinload(Person.addresses)).where(Person.id == 1)
    return stmt if region is None else stmt.options(FromCache(region))


def _read_expire_all_read(session, stmt):
    """Person 1, read, every object expired, read again: ``tags``, never loaded, left expired."""
    (person,) = session.execute(stmt).unique().scalars().all()
    session.expire_all()
    session.execute(stmt).unique().scalars().all()
    assert "tags" not in person.__dict__
    return person


@pytest.mark.parametrize("region", [None, "local"])
@pytest.mark.parametrize("expired", ["name", "addresses"])
def test_an_attribute_expired_after_the_load_is_loaded_again(Session, region, expired):
    """Left expired: ``tags``; expired after it: ``name`` (a column) or ``addresses`` (what the query loads)."""
    stmt = _person_one(region)
    with Session() as session:
        person = _read_expire_all_read(session, stmt)
        session.expire(person, [expired])
        session.execute(stmt).unique().scalars().all()
        assert expired in person.__dict__
        assert "tags" not in person.__dict__


@pytest.mark.parametrize("region", [None, "local"])
def test_a_relationship_left_expired_and_loaded_since_is_served_loaded(Session, sql, region):
    """``tags``, left expired by the load, loaded since: the query leaves it loaded, and so does a hit."""
    stmt = _person_one(region)
    with Session() as session:
        person = _read_expire_all_read(session, stmt)
        tags = list(person.tags)
        sql.reset()
        session.execute(stmt).unique().scalars().all()
        assert person.tags == tags
        assert sql.count == (0 if region else 2)
