"""Automatic invalidation: committed writes invalidate the entries that read the written tables."""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import selectinload, sessionmaker

from pyramid_sessioncache import (
    FromCache,
    InvalidOptionError,
    RelationshipCache,
    SessionCache,
    cached_query,
    invalidate_tables,
)

from .conftest import SECRET
from .models import Address, Person, Tag, person_tag


@pytest.fixture
def cache(region_options, region):
    return SessionCache(region_options, default_region=region, secret=SECRET)


def read(Session, stmt, sql=None):
    """Run ``stmt`` twice in fresh Sessions (learn, store), return the result and the SQL count of a third."""
    for _ in range(2):
        with Session() as session:
            session.execute(stmt).all()
    if sql is not None:
        sql.reset()
    with Session() as session:
        rows = [tuple(row) for row in session.execute(stmt).unique().all()]
        return rows, (sql.count if sql is not None else None)


def names(region):
    return select(Person.id, Person.name).order_by(Person.id).options(FromCache(region))


def test_update_insert_delete_through_the_orm(Session, sql, region):
    stmt = names(region)
    rows, count = read(Session, stmt, sql)
    assert count == 0 and len(rows) == 20
    with Session() as session:
        session.get(Person, 1).name = "renamed"
        session.commit()
    rows, _ = read(Session, stmt)
    assert rows[0] == (1, "renamed")
    with Session() as session:
        session.add(Person(id=30, name="new"))
        session.commit()
    assert read(Session, stmt)[0][-1] == (30, "new")
    with Session() as session:
        session.delete(session.get(Person, 30))
        session.commit()
    assert len(read(Session, stmt)[0]) == 20


def test_bulk_update_and_delete(Session, region):
    stmt = names(region)
    read(Session, stmt)
    with Session() as session:
        session.execute(update(Person).where(Person.id == 2).values(name="bulk"))
        session.commit()
    assert read(Session, stmt)[0][1] == (2, "bulk")
    with Session() as session:
        session.execute(delete(Address).where(Address.person_id == 20))
        session.execute(delete(person_tag).where(person_tag.c.person_id == 20))
        session.execute(delete(Person).where(Person.id == 20))
        session.commit()
    assert len(read(Session, stmt)[0]) == 19


def test_eager_loaded_children_invalidate_their_parents_entry(Session, sql, region):
    stmt = select(Person).where(Person.id == 3).options(FromCache(region), selectinload(Person.addresses))

    def streets():
        with Session() as session:
            return [a.street for a in session.scalars(stmt).one().addresses]

    streets(), streets()
    sql.reset()
    assert streets() == ["3 Main St", "3 High St"] and sql.count == 0
    with Session() as session:
        session.get(Address, 5).street = "moved"  # person 3's first address
        session.commit()
    assert streets() == ["moved", "3 High St"]


def test_relationship_lazy_loads_are_invalidated(Session, region):
    stmt = select(Person).where(Person.id == 4).options(RelationshipCache(Person.addresses, region))

    def streets():
        with Session() as session:
            return [a.street for a in session.scalars(stmt).one().addresses]

    streets(), streets()
    with Session() as session:
        session.add(Address(person_id=4, street="new street", postal_code_id=1))
        session.commit()
    assert streets() == ["4 Main St", "4 High St", "new street"]


def test_many_to_many_association_changes(Session, region):
    stmt = (
        select(Person.id, func.count(Tag.id))
        .join(Person.tags)
        .group_by(Person.id)
        .order_by(Person.id)
        .options(FromCache(region))
    )
    before = dict(read(Session, stmt)[0])
    with Session() as session:
        person = session.get(Person, 1)
        person.tags.append(session.get(Tag, 3))
        session.commit()
    after = dict(read(Session, stmt)[0])
    assert after[1] == before[1] + 1


def test_selectinload_of_a_many_to_many(Session, region):
    stmt = select(Person).where(Person.id == 2).options(FromCache(region), selectinload(Person.tags))

    def tags():
        with Session() as session:
            return [t.name for t in session.scalars(stmt).one().tags]

    tags(), tags()
    with Session() as session:
        person = session.get(Person, 2)
        person.tags.clear()
        session.commit()
    assert tags() == []


def test_rollback_leaves_no_trace(Session, sql, region):
    stmt = names(region)
    read(Session, stmt)
    with Session() as session:
        session.get(Person, 5).name = "never"
        assert session.execute(stmt).all()[4].name == "never"  # sees its own write
        session.rollback()
    rows, count = read(Session, stmt, sql)
    assert rows[4] == (5, "person 5")
    assert count == 0  # the rolled-back write bumped no version: the entry still serves


def test_savepoint_rolled_back(Session, region):
    stmt = names(region)
    read(Session, stmt)
    with Session() as session:
        session.get(Person, 6).name = "kept"
        nested = session.begin_nested()
        session.get(Person, 7).name = "undone"
        session.flush()
        nested.rollback()
        session.commit()
    rows = dict(read(Session, stmt)[0])
    assert rows[6] == "kept" and rows[7] == "person 7"


def test_raw_sql_is_seen_on_the_connection(Session, region):
    stmt = names(region)
    read(Session, stmt)
    with Session() as session:
        session.connection().execute(text("UPDATE person SET name = 'raw' WHERE id = 8"))
        session.commit()
    assert dict(read(Session, stmt)[0])[8] == "raw"


def test_declared_writes_are_published_at_commit(Session, region):
    stmt = names(region)
    read(Session, stmt)
    with Session() as session:
        session.connection().execute(text("UPDATE person SET name = 'declared' WHERE id = 8"))
        invalidate_tables(session, "person")
        session.commit()
    assert dict(read(Session, stmt)[0])[8] == "declared"


def test_invalidate_tables_outside_a_session(Session, cache, region):
    stmt = names(region)
    read(Session, stmt)
    with Session() as session:
        session.connection().execute(text("UPDATE person SET name = 'cron' WHERE id = 9"))
        session.commit()
    cache.invalidate_tables()  # everything
    assert dict(read(Session, stmt)[0])[9] == "cron"


def _behind_the_cache(engine, sql: str) -> None:
    """A write by another program: no connection of this process sees it."""
    connection = sqlite3.connect(engine.url.database)
    with connection:
        connection.execute(sql)
    connection.close()


@pytest.mark.parametrize("declared", [Person, Person.__table__, "person", " Person ", "main.person"])
def test_invalidate_tables_takes_names_tables_and_mapped_classes(Session, cache, engine, region, declared):
    stmt = names(region)
    read(Session, stmt)
    _behind_the_cache(engine, "UPDATE person SET name = 'behind' WHERE id = 4")
    assert dict(read(Session, stmt)[0])[4] == "person 4"  # unseen: still served
    cache.invalidate_tables(declared)
    assert dict(read(Session, stmt)[0])[4] == "behind"


@pytest.mark.parametrize(
    "declared",
    ["", "  ", "person, address", "person address", Person.name, Person.__table__.c.id, 3, None, Person(id=1)],
    ids=["empty", "blank", "two names with a comma", "two names", "attribute", "column", "int", "None", "instance"],
)
def test_invalidate_tables_refuses_what_names_no_table(Session, cache, engine, region, declared):
    stmt = names(region)
    read(Session, stmt)
    with pytest.raises(InvalidOptionError, match="table"):
        cache.invalidate_tables(declared)
    with Session() as session, pytest.raises(InvalidOptionError, match="table"):
        invalidate_tables(session, "person", declared)
    _behind_the_cache(engine, "UPDATE person SET name = 'behind' WHERE id = 4")
    assert dict(read(Session, stmt)[0])[4] == "person 4"  # nothing was invalidated by the refused calls


def test_writes_also_names_its_tables_in_one_string_as_the_ini_does(region_options):
    cache = SessionCache(region_options, secret=SECRET, writes_also={"person": "audit, log"})
    assert cache.writes_also["person"] == frozenset({"audit", "log"})


def test_manual_mode_never_invalidates(engine, region_options):
    cache = SessionCache(region_options, invalidation="manual", secret=SECRET)
    Session = sessionmaker(bind=engine, info=cache.session_info())
    stmt = names("memory")
    read(Session, stmt)
    with Session() as session:
        session.get(Person, 10).name = "unseen"
        session.commit()
    assert dict(read(Session, stmt)[0])[10] == "person 10"
    with pytest.raises(ValueError, match="auto' or 'manual"):
        SessionCache(region_options, invalidation="sometimes")


def test_tables_are_found_in_joins_subqueries_and_ctes():
    from sqlalchemy import exists

    from pyramid_sessioncache.engine.invalidation.reads import statement_tables

    from .models import City, PostalCode

    moved = select(Address.person_id).where(Address.street.like("%High%")).cte("moved")
    stmt = (
        select(Person.name)
        .join(moved, moved.c.person_id == Person.id)
        .where(exists().where(person_tag.c.person_id == Person.id))
        .where(
            Person.id.in_(
                select(Address.person_id).join(PostalCode).join(City).where(City.name == "x").scalar_subquery()
            )
        )
    )
    assert statement_tables(stmt) == {"person", "address", "person_tag", "postal_code", "city"}


@pytest.mark.parametrize("loader", ["joinedload", "subqueryload"])
def test_other_eager_loaders(Session, region, loader):
    from sqlalchemy import orm

    stmt = select(Person).where(Person.id == 5).options(FromCache(region), getattr(orm, loader)(Person.addresses))

    def streets():
        with Session() as session:
            return [a.street for a in session.scalars(stmt).unique().one().addresses]

    streets(), streets()
    with Session() as session:
        session.get(Address, 9).street = "elsewhere"  # person 5's first address
        session.commit()
    assert streets() == ["elsewhere", "5 High St"]


def test_subquery_in_where_is_a_dependency(Session, region):
    stmt = (
        select(Person.id)
        .where(Person.id.in_(select(Address.person_id).where(Address.street == "moved here")))
        .options(FromCache(region))
    )
    assert read(Session, stmt)[0] == []
    with Session() as session:
        session.get(Address, 1).street = "moved here"
        session.commit()
    assert read(Session, stmt)[0] == [(1,)]


@pytest.mark.parametrize(
    ("invalidation", "how", "commands"),
    [
        # The entry and its tables' versions, in one command.
        ("auto", "FromCache option", {"cmdstat_mget": 1}),
        ("auto", "cached_query()", {"cmdstat_mget": 1}),
        # No versions to check: the entry alone (MGET: a key of another type reads as nil).
        ("manual", "FromCache option", {"cmdstat_mget": 1}),
        ("manual", "cached_query()", {"cmdstat_mget": 1}),
    ],
)
def test_a_redis_hit_costs_one_command(engine, redis_url, invalidation, how, commands):
    import redis

    client = redis.Redis.from_url(redis_url)
    cache = SessionCache({"redis": {"type": "ext:redis", "url": redis_url}}, secret=SECRET, invalidation=invalidation)
    Session = sessionmaker(bind=engine, info=cache.session_info())
    stmt = select(Person).where(Person.id == 1)

    def hit() -> None:
        with Session() as session:
            if how == "cached_query()":
                cached_query(session, stmt, "redis").scalars().one()
            else:
                session.scalars(stmt.options(FromCache("redis"))).one()

    def calls() -> dict:
        stats = client.info("commandstats")
        return {name: value["calls"] for name, value in stats.items()}

    hit()
    hit()
    before = calls()
    hit()
    after = calls()
    spent = {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}
    spent.pop("cmdstat_info", None)
    assert spent == commands
