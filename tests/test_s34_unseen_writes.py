"""Rows written on the driver's own connection are never stored, and asking costs no store that is right.

``tests/test_attack_s34_paths.py`` shows the defect (a miss after a raw
write stored the rows a rollback then undid).  These show that the rule
is no broader than it must be: a transaction that wrote nothing on its
driver's connection still stores every miss, its second one too (the
database has begun its transaction by then, and is asked), and one that
follows a transaction that wrote stores again.  Hits are proven by
counting statements.
"""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

from pyramid_sessioncache import SessionCache, cached_query

from .conftest import SECRET, SQLCounter
from .models import Address, Person

PERSON_2 = select(Person.name).where(Person.id == 2)
STREETS_1 = select(Address.street).where(Address.person_id == 1).order_by(Address.id)


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request, region_options):
    """``(engine, Sessions)``: the seeded SQLite file or PostgreSQL database, Sessions caching into ``memory``."""
    url = request.getfixturevalue("db_url" if request.param == "sqlite" else "pg_url")
    engine = create_engine(url)
    cache = SessionCache(region_options, secret=SECRET)
    yield engine, sessionmaker(engine, info=cache.session_info())
    engine.dispose()
    cache.close()


def _raw_write(session, name: str) -> None:
    cursor = session.connection().connection.cursor()
    cursor.execute(f"UPDATE person SET name = '{name}' WHERE id = 2")
    cursor.close()


def _served_without_sql(engine, Sessions, statement) -> list:
    """``statement``'s rows read through ``memory`` in a fresh Session, asserting that no statement ran."""
    with Sessions() as session:
        sql = SQLCounter(engine)
        rows = cached_query(session, statement, "memory").all()
        assert sql.count == 0, f"a miss: {sql.count} statements"
        return [tuple(row) for row in rows]


def test_a_transaction_that_wrote_nothing_stores_its_second_miss_too(sessions):
    """The second miss of a read-only transaction (the database's transaction begun) is stored."""
    engine, Sessions = sessions
    with Sessions() as session:
        cached_query(session, STREETS_1, "memory").all()  # begins the database's transaction
        cached_query(session, PERSON_2, "memory").all()  # asked whether it wrote: it did not
    assert _served_without_sql(engine, Sessions, PERSON_2) == [("person 2",)]


def test_after_a_raw_write_rolled_back_the_next_transaction_stores_again(sessions):
    """A raw write voids what its own transaction would store, not what the next one reads."""
    engine, Sessions = sessions
    with Sessions() as session:
        _raw_write(session, "never committed")
        assert cached_query(session, PERSON_2, "memory").scalar_one() == "never committed"
        session.rollback()
        assert cached_query(session, PERSON_2, "memory").scalar_one() == "person 2"  # a new transaction: stored
    assert _served_without_sql(engine, Sessions, PERSON_2) == [("person 2",)]


def test_a_raw_write_committed_then_read_in_a_new_transaction_is_stored_as_committed(sessions):
    """Committed, the raw write is what the database holds: the next transaction stores it."""
    engine, Sessions = sessions
    with Sessions() as session:
        _raw_write(session, "committed raw")
        session.commit()
        assert cached_query(session, PERSON_2, "memory").scalar_one() == "committed raw"
    assert _served_without_sql(engine, Sessions, PERSON_2) == [("committed raw",)]


def test_a_raw_write_after_a_read_voids_the_next_miss_of_its_transaction(sessions):
    """Read, then write raw, then miss: the first miss is stored, the second is not."""
    engine, Sessions = sessions
    with Sessions() as session:
        cached_query(session, STREETS_1, "memory").all()
        _raw_write(session, "never committed")
        assert cached_query(session, PERSON_2, "memory").scalar_one() == "never committed"
        session.rollback()
    assert _served_without_sql(engine, Sessions, STREETS_1)  # stored before the write
    with Sessions() as session:
        sql = SQLCounter(engine)
        assert cached_query(session, PERSON_2, "memory").scalar_one() == "person 2"
        assert sql.count > 0  # never stored
