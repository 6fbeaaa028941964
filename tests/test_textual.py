"""SQL text that reads is a read: cached, keyed by its text and bound values; SQL text that writes never is.

``select(Person).from_statement(text(...))``, ``text(...).columns(...)``
and ``text(...)`` say nothing of what their SQL does (``is_select`` is
False for the first, True for ``UPDATE ... RETURNING`` given
``.columns()``): the SQL itself is read.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Query

from pyramid_sessioncache import FromCache, NotCacheableError, SessionCache, cache_parameters, cached_query
from pyramid_sessioncache.engine.invalidation.reads import ALL_TABLES

from .conftest import SECRET
from .models import Address, Person

BY_NAME = "SELECT id, name FROM person WHERE name = :name"

#: Textual reads of the person called ``name``, built for a Session.
FORMS = {
    "from_statement(text())": lambda session, name: select(Person).from_statement(text(BY_NAME).bindparams(name=name)),
    "text().columns()": lambda session, name: text(BY_NAME).bindparams(name=name).columns(Person.id, Person.name),
    "from_statement(text().columns())": lambda session, name: select(Person).from_statement(
        text(BY_NAME).bindparams(name=name).columns(Person.id, Person.name)
    ),
    "text()": lambda session, name: text(BY_NAME).bindparams(name=name),
    "Query.from_statement(text())": lambda session, name: session.query(Person).from_statement(
        text(BY_NAME).bindparams(name=name)
    ),
}


@pytest.fixture
def cache(region_options, any_region):
    return SessionCache(region_options, default_region=any_region, secret=SECRET)


#: The shared regions: their entries carry the tables they depend on
#: (``ext:local_session`` entries last one transaction and carry none).
shared_regions = pytest.mark.parametrize("any_region", ["memory", "file", "redis"], indirect=True)


@pytest.fixture
def shared_region(any_region):
    """The region the test runs on, one of :data:`shared_regions`."""
    return any_region


def rows(session, query, region=None, entrance=None):
    """Run ``query`` (uncached without a region); return its rows as ``(id, name)`` tuples."""
    if isinstance(query, Query):
        if region is not None:
            query = (
                cached_query(session, query, region)
                if entrance == "cached_query()"
                else query.options(FromCache(region))
            )
        found = query.all()
    elif region is None:
        found = session.execute(query).all()
    elif entrance == "cached_query()":
        found = cached_query(session, query, region).all()
    else:
        found = session.execute(query.options(FromCache(region))).all()
    return [pair(item) for item in found]


def pair(item):
    """A person, or a row of one person or of its columns, as ``(id, name)``."""
    if not isinstance(item, Person) and isinstance(item[0], Person):
        item = item[0]
    return (item.id, item.name) if isinstance(item, Person) else tuple(item)


def entities(found):
    return [(row[0].id, row[0].name) for row in found]


@pytest.mark.parametrize("form", sorted(FORMS))
def test_a_textual_read_is_cached(Session, sql, any_region, entrance, form):
    build = FORMS[form]
    with Session() as session:
        expected = rows(session, build(session, "person 3"))
    assert expected == [(3, "person 3")]
    sql.reset()
    with Session() as session:
        assert rows(session, build(session, "person 3"), any_region, entrance) == expected
        assert rows(session, build(session, "person 3"), any_region, entrance) == expected
    assert sql.count == 1
    with Session() as session:
        assert rows(session, build(session, "person 3"), any_region, entrance) == expected
    assert sql.count == (2 if any_region == "local" else 1)


def test_a_hit_of_from_statement_gives_the_sessions_objects(Session, sql, any_region, entrance):
    statement = select(Person).from_statement(text("SELECT * FROM person WHERE id IN (2, 3) ORDER BY id"))
    for _ in range(2):
        with Session() as session:
            result = (
                cached_query(session, statement, any_region)
                if entrance == "cached_query()"
                else (session.execute(statement.options(FromCache(any_region))))
            )
            people = result.scalars().all()
            assert [(p.id, p.name) for p in people] == [(2, "person 2"), (3, "person 3")]
            assert all(p in session for p in people)
            sql.reset()
            assert [a.street for a in people[0].addresses] == ["2 Main St", "2 High St"]  # a lazy load, as uncached
            assert sql.count == 1


@pytest.mark.parametrize("form", sorted(FORMS))
def test_textual_reads_are_keyed_by_their_bound_values(Session, sql, any_region, entrance, form):
    build = FORMS[form]
    with Session() as session:
        for name, expected in [("person 3", [(3, "person 3")]), ("person 4", [(4, "person 4")]), ("nobody", [])]:
            for _ in range(2):
                assert rows(session, build(session, name), any_region, entrance) == expected
    assert sql.count == 3


def test_textual_reads_are_keyed_by_their_execution_parameters(Session, sql, any_region):
    statement = select(Person).from_statement(text(BY_NAME)).options(FromCache(any_region))
    with Session() as session:
        for name in ("person 5", "person 6", "person 5", "person 6"):
            assert entities(session.execute(statement, {"name": name})) == [(int(name[-1]), name)]
    assert sql.count == 2


def test_textual_reads_are_keyed_by_their_text(Session, sql, any_region, entrance):
    texts = [
        "SELECT id, name FROM person WHERE id = 7",
        "SELECT id, name FROM person WHERE id = 8",
        "SELECT id, name FROM person WHERE id = 7 OR id = 8 ORDER BY id",
    ]
    with Session() as session:
        for _ in range(2):
            found = [rows(session, select(Person).from_statement(text(sql)), any_region, entrance) for sql in texts]
            assert found == [[(7, "person 7")], [(8, "person 8")], [(7, "person 7"), (8, "person 8")]]
    assert sql.count == 3


def test_uncached_textual_reads_keep_the_local_cache(Session, sql):
    by_id = select(Person).where(Person.id == 9).options(FromCache("local"))
    with Session() as session:
        person = session.scalars(by_id).one()
        for form in sorted(FORMS):
            rows(session, FORMS[form](session, "person 1"))
        sql.reset()
        assert session.scalars(by_id).one() is person
        assert sql.count == 0


@shared_regions
def test_a_textual_entry_depends_on_every_table(Session, shared_region):
    statement = select(Person).from_statement(text(BY_NAME).bindparams(name="person 2"))
    statement = statement.options(FromCache(shared_region))
    with Session() as session:
        session.execute(statement).all()
        beaker_cache, key = cache_parameters(statement, session=session)
    assert ALL_TABLES in beaker_cache.get(key).tables


JOINED = "SELECT person.* FROM person JOIN address ON address.person_id = person.id WHERE address.street = :street"


def _rename_person_2(session):
    session.get(Person, 2).name = "renamed"


def _move_address_3(session):
    session.get(Address, 3).street = "moved"


@shared_regions
@pytest.mark.parametrize(
    "write, names",
    [(_rename_person_2, ["renamed"]), (_move_address_3, [])],
    ids=["a table the text names and returns", "a table only the SQL reads"],
)
def test_a_commit_to_a_table_of_the_text_invalidates(Session, shared_region, write, names):
    statement = select(Person).from_statement(text(JOINED).bindparams(street="2 Main St"))
    statement = statement.options(FromCache(shared_region))
    with Session() as session:
        assert [p.name for p in session.scalars(statement)] == ["person 2"]
    with Session() as session:
        write(session)
        session.commit()
    with Session() as session:
        assert [p.name for p in session.scalars(statement)] == names


# SQL text that writes ----------------------------------------------------------------

WRITES = {
    "text(UPDATE ... RETURNING).columns()": lambda: text(
        "UPDATE person SET name = 'changed' WHERE id = 1 RETURNING id, name"
    ).columns(Person.id, Person.name),
    "from_statement(text(UPDATE ... RETURNING))": lambda: select(Person).from_statement(
        text("UPDATE person SET name = 'changed' WHERE id = 1 RETURNING id, name")
    ),
    "text(DELETE ... RETURNING)": lambda: text("DELETE FROM person_tag WHERE person_id = 1 RETURNING tag_id"),
    "text(WITH ... UPDATE ... RETURNING)": lambda: text(
        "WITH t AS (SELECT 1) UPDATE person SET name = 'changed' WHERE id = 1 RETURNING id, name"
    ).columns(Person.id, Person.name),
    'text(WITH "quoted\'s" ... UPDATE ... RETURNING)': lambda: text(
        "WITH \"quoted's\" AS (SELECT 1 AS id) UPDATE person SET name = 'changed' "
        'WHERE id IN (SELECT id FROM "quoted\'s") RETURNING id, name'
    ).columns(Person.id, Person.name),
}


@pytest.mark.parametrize("form", sorted(WRITES))
def test_sql_text_that_writes_is_never_cached(Session, sql, any_region, entrance, form):
    with Session() as session:
        with pytest.raises(NotCacheableError, match="writ"):
            if entrance == "cached_query()":
                cached_query(session, WRITES[form](), any_region)
            else:
                session.execute(WRITES[form]().options(FromCache(any_region)))
        assert sql.count == 0  # raised before anything ran
    with Session() as session:
        assert session.get(Person, 1).name == "person 1"
        assert len(session.get(Person, 1).tags) == 2


@pytest.mark.parametrize("form", sorted(WRITES))
def test_sql_text_that_writes_runs_uncached(Session, form):
    with Session() as session:
        assert len(session.execute(WRITES[form]()).all()) >= 1
        session.commit()
    with Session() as session:
        person = session.get(Person, 1)
        assert (person.name, len(person.tags)) != ("person 1", 2)


@pytest.mark.parametrize("form", sorted(WRITES))
def test_sql_text_that_writes_has_no_entry(Session, form):
    with Session() as session, pytest.raises(NotCacheableError, match="may write"):
        cache_parameters(WRITES[form](), session=session)


SCHEMA_CHANGES = [
    "CREATE VIEW person_names AS SELECT name FROM person",
    "CREATE TABLE scratch AS SELECT id FROM person",
    "DROP INDEX IF EXISTS no_such_index",
]


@pytest.mark.parametrize("ddl", SCHEMA_CHANGES)
def test_sql_text_that_changes_the_schema_is_never_cached(Session, sql, any_region, entrance, ddl):
    with Session() as session, pytest.raises(NotCacheableError, match="writ"):
        if entrance == "cached_query()":
            cached_query(session, text(ddl), any_region)
        else:
            session.execute(text(ddl).options(FromCache(any_region)))
    assert sql.count == 0  # raised before anything ran
