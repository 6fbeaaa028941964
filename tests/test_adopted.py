"""A shared region's miss gives the caller the objects its load made (``hydrate.adopted``), as uncached.

A miss loads its rows in a Session of its own, snapshots them for the
region and, when the caller's Session holds none of their identities,
hands the caller those very objects instead of building them again.  Each
test compares a miss on a new Session with the same query run uncached on
a new Session: the same objects, loaded the same way, built once; and the
objects then behave as a hit's do (their own cached loads hit what a hit's
objects stored).
"""

from __future__ import annotations

import pytest
from sqlalchemy import event, inspect, select
from sqlalchemy.orm import defer, joinedload, raiseload, selectinload

from pyramid_sessioncache import FromCache, RelationshipCache

from .models import Address, Person


@pytest.fixture(params=["memory", "file"])
def region(request) -> str:
    """Adoption is the same whatever stores the entry: memory (which keeps the value itself) and file."""
    return request.param


def _statements():
    by_id = Person.id
    return {
        "page with selectinload": select(Person).order_by(by_id).limit(5).options(selectinload(Person.addresses)),
        "joinedload (unique)": select(Person).order_by(by_id).limit(3).options(joinedload(Person.addresses)),
        "two entities per row": select(Person, Address).join(Person.addresses).order_by(Address.id).limit(6),
        "raiseload": select(Person).order_by(by_id).limit(3).options(raiseload(Person.addresses)),
        "deferred column": select(Person).order_by(by_id).limit(3).options(defer(Person.name)),
        "entity and a column": select(Person, Person.name.label("n")).order_by(by_id).limit(3),
    }


def _picture(session, result) -> list:
    """What a caller can see of a result: every row's objects, their loaded state and values."""
    picture = []
    for row in result:
        for item in row:
            if not isinstance(item, (Person, Address)):
                picture.append(item)
                continue
            state = inspect(item)
            assert state.session is session and state.persistent and not state.modified
            loaded = {
                key: state.dict[key] for key in (prop.key for prop in state.mapper.column_attrs) if key in state.dict
            }
            held = {
                key: [inspect(member).key for member in state.dict[key]]
                if isinstance(state.dict[key], list)
                else inspect(state.dict[key]).key
                for key in (prop.key for prop in state.mapper.relationships)
                if key in state.dict and state.dict[key] is not None
            }
            picture.append((type(item).__name__, state.key, loaded, sorted(state.unloaded), held))
    return picture


@pytest.mark.parametrize("name", list(_statements()))
def test_a_miss_gives_what_an_uncached_load_gives(Session, region, sql, name):
    statement = _statements()[name]
    unique = "unique" in name
    with Session() as uncached_session:
        result = uncached_session.execute(statement)
        uncached = _picture(uncached_session, result.unique() if unique else result)
    sql.reset()
    with Session() as session:
        result = session.execute(statement.options(FromCache(region)))
        missed = _picture(session, result.unique() if unique else result)
        assert missed == uncached
        loads = sql.count
        sql.reset()
        first = session.scalars(statement.options(FromCache(region)))
        assert sql.count == 0 and loads >= 1  # stored, and served again
        objects = list(first.unique() if unique else first)
        assert objects and all(inspect(obj).session is session for obj in objects)
    with Session() as session:
        result = session.execute(statement.options(FromCache(region)))
        assert _picture(session, result.unique() if unique else result) == uncached  # a hit, built from the entry
        assert sql.count == 0


def test_a_miss_builds_each_object_once(Session, region):
    """The ORM makes each object once (its reconstructor runs once): so does a miss, and a hit."""
    built = []

    def loaded(target, context):
        built.append(target)

    event.listen(Person, "load", loaded)
    try:
        statement = select(Person).order_by(Person.id).limit(4)
        with Session() as session:
            uncached = len(session.scalars(statement).all())
        built.clear()
        with Session() as session:
            missed = session.scalars(statement.options(FromCache(region))).all()
            assert len(built) == uncached == len(missed) and set(map(id, built)) == set(map(id, missed))
        built.clear()
        with Session() as session:
            assert len(session.scalars(statement.options(FromCache(region))).all()) == len(built) == uncached
    finally:
        event.remove(Person, "load", loaded)


def test_objects_the_session_holds_are_the_ones_a_miss_gives(Session, region):
    with Session() as session:
        held = session.get(Person, 2)
        people = session.scalars(
            select(Person).where(Person.id.in_([1, 2, 3])).order_by(Person.id).options(FromCache(region))
        ).all()
        assert people[1] is held
        assert [inspect(person).session for person in people] == [session] * 3


def test_a_missed_object_changed_is_committed_and_the_entry_is_not(Session, region):
    statement = select(Person).where(Person.id == 4)
    with Session() as session:
        person = session.scalars(statement.options(FromCache(region))).one()
        name = person.name
        person.name = "renamed"
        assert list(session.dirty) == [person]
        session.commit()
    with Session() as session:
        assert session.scalars(statement).one().name == "renamed"  # committed
        assert session.scalars(statement.options(FromCache(region))).one().name == "renamed"  # the entry went
        session.scalars(statement).one().name = name
        session.commit()


def test_loaded_as_persistent_is_sent_for_each_object_a_miss_gives(Session, region):
    seen = []
    with Session() as session:
        event.listen(session, "loaded_as_persistent", lambda session, instance: seen.append(instance))
        people = session.scalars(select(Person).order_by(Person.id).limit(3).options(FromCache(region))).all()
    assert {id(person) for person in people} <= {id(obj) for obj in seen}


def test_a_missed_objects_cached_lazy_loads_are_a_hits(Session, region, sql):
    """Objects a miss gives carry the options and path a hit gives: their cached lazy loads share entries."""
    option = RelationshipCache(Person.addresses, region)
    statement = select(Person).where(Person.id == 5).options(FromCache(region), option)
    with Session() as session:
        assert len(session.scalars(statement).one().addresses) == 2  # a miss, then a lazy load stored
    sql.reset()
    with Session() as session:
        assert len(session.scalars(statement).one().addresses) == 2
        assert sql.count == 0
