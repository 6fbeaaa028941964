"""Eager rows that refresh objects the result does not reach (``engine/eager_rows.py``).

A joined or subquery eager load refreshes every object its related rows
hold, even where the parent had the relationship loaded already and it
lacks that object (a stale collection: see ``test_attack_s21_sweep.py``).  Each scenario runs uncached (``None``) and cached with
the same assertions; the entries of such loads are still served while
nothing in the Session was expired since (counted in SQL statements).
"""

from __future__ import annotations

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import joinedload, selectinload, subqueryload

from pyramid_sessioncache import FromCache, _sqlalchemy
from pyramid_sessioncache.engine import values

from .models import Address, Person

REGIONS = [None, "local", "memory"]


def _cached(stmt, region):
    return stmt if region is None else stmt.options(FromCache(region))


@pytest.mark.parametrize("region", REGIONS)
def test_the_object_a_stale_many_to_one_row_holds_is_refreshed(engine, Session, region):
    """Address 1 moves to person 2 after its person was loaded: the joined row holds person 2, expired since."""
    stmt = _cached(select(Address).options(joinedload(Address.person)).where(Address.id == 1), region)
    with Session() as session:
        address = session.get(Address, 1)
        assert address.person.id == 1
        other = session.get(Person, 2)
        with engine.begin() as conn:
            conn.execute(update(Address).where(Address.id == 1).values(person_id=2))
        session.execute(stmt).scalars().all()
        session.expire(other)  # marked expired: the entry's check of the Session sees it
        session.execute(stmt).scalars().all()
        assert "name" in other.__dict__
        assert address.person.id == 1


def _second_read(Session, sql, stmt, prepare, between=None):
    """The statements of the second of two reads after ``prepare(session)``: 0 when the first was served.

    What ``prepare`` returns is held until then (the Session holds its
    objects weakly); ``between(session)`` runs between the reads.
    """
    with Session() as session:
        held = prepare(session)  # noqa: F841
        session.execute(stmt).unique().scalars().all()
        if between is not None:
            between(session)
        sql.reset()
        session.execute(stmt).unique().scalars().all()
        return sql.count


def _loaded_addresses(session):
    person = session.get(Person, 1)
    assert person.addresses
    return person


@pytest.mark.parametrize("loader", [joinedload, subqueryload])
def test_an_entry_over_a_loaded_relationship_is_served_while_nothing_is_expired(Session, sql, loader):
    stmt = select(Person).options(loader(Person.addresses), FromCache("local")).where(Person.id == 1)
    assert _second_read(Session, sql, stmt, _loaded_addresses) == 0


@pytest.mark.parametrize("loader", [joinedload, subqueryload])
def test_an_entry_over_a_loaded_relationship_is_a_miss_once_any_object_is_expired(Session, sql, loader):
    """Address 20 is in no row of person 1: the entry cannot tell, and runs its query again."""
    stmt = select(Person).options(loader(Person.addresses), FromCache("local")).where(Person.id == 1)

    def prepare(session):
        return _loaded_addresses(session), session.get(Address, 20)

    def between(session):
        session.expire(session.get(Address, 20))

    assert _second_read(Session, sql, stmt, prepare, between) >= 1


@pytest.mark.parametrize("loader", [joinedload, subqueryload])
def test_an_entry_over_a_loaded_relationship_is_a_miss_once_another_object_is_loaded(Session, sql, loader):
    """An object the rows held may have been let go and loaded again since, with a column deferred."""
    stmt = select(Person).options(loader(Person.addresses), FromCache("local")).where(Person.id == 1)

    def between(session):
        between.held = session.get(Address, 20)

    assert _second_read(Session, sql, stmt, _loaded_addresses, between) >= 1


def test_expiring_part_of_any_object_drops_the_sessions_local_entries(Session, sql):
    """``session.expire(obj, [key])`` unloads a relationship without marking it expired: every entry goes."""
    stmt = select(Person).options(selectinload(Person.addresses), FromCache("local")).where(Person.id == 1)

    def prepare(session):
        return session.get(Address, 20)

    def between(session):
        session.expire(session.get(Address, 20), ["person"])

    assert _second_read(Session, sql, stmt, prepare, between) >= 1


def test_an_entry_that_reads_no_rows_of_a_loaded_relationship_needs_no_watch(Session, sql):
    """selectinload() leaves a loaded collection alone: expiring another object changes nothing."""
    stmt = select(Person).options(selectinload(Person.addresses), FromCache("local")).where(Person.id == 1)

    def prepare(session):
        return _loaded_addresses(session), session.get(Address, 20)

    def between(session):
        session.expire(session.get(Address, 20))  # the whole object: marked expired (a part drops every entry)

    assert _second_read(Session, sql, stmt, prepare, between) == 0


def test_an_entry_over_a_loaded_relationship_in_a_session_too_large_to_watch_is_not_kept(Session, sql, monkeypatch):
    monkeypatch.setattr(values, "MAX_SCANNED", 3)
    stmt = select(Person).options(joinedload(Person.addresses), FromCache("local")).where(Person.id == 1)

    def prepare(session):
        return _loaded_addresses(session), session.get(Address, 20)

    assert _second_read(Session, sql, stmt, prepare) == 1


@pytest.mark.parametrize(
    ("options", "keys"),
    [
        ((joinedload(Person.addresses).selectinload(Address.postal_code),), {"addresses"}),
        ((selectinload(Person.addresses).joinedload(Address.postal_code),), {"postal_code"}),
        ((selectinload(Person.addresses).subqueryload(Address.postal_code),), {"postal_code"}),
        ((selectinload(Person.addresses),), set()),
        ((joinedload("*"),), None),
        ((selectinload("*"),), set()),
    ],
)
def test_the_relationships_a_statement_loads_from_rows(options, keys):
    found = _sqlalchemy.row_eager_relationship_keys(select(Person).options(*options))
    assert found == (None if keys is None else frozenset(keys))
