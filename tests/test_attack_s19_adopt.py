"""Attacks on a shared miss handing its loader's objects to the caller (``hydrate.adopted``).

Each test runs one query uncached, then cached (a miss, then a hit), each
on a new Session, and compares what the caller can see.  Uncached, a
``load`` listener's ``object_session(target)`` is the caller's Session, and
what it sets on the object is what was loaded; a miss's objects load in a
Session of the add-on's own, so what such a listener does there must not
be lost, nor be seen by the caller as the loader's.
"""

from __future__ import annotations

import pytest
from sqlalchemy import event, inspect, orm, select
from sqlalchemy.orm import object_session

from pyramid_sessioncache import FromCache
from pyramid_sessioncache.engine import as_loaded

from .models import Country, Person, Tag


@pytest.fixture(params=["memory", "file"])
def region(request) -> str:
    return request.param


def _adds(target, context):
    object_session(target).add(Tag(name=f"read {target.id}"))


def _notes(target, context):
    object_session(target).info.setdefault("read", []).append(target.id)


def _reads(target, context):
    target.country = object_session(target).get(Country, 1)


def _normalises(target, context):
    target.name = target.name.upper()


def _counts(target, context):
    target.name += " (read)"  # not idempotent: applied twice, it shows


def _decodes(target, context):
    target.name = target.name.removeprefix("encoded:")
    if target.name.startswith("person"):
        target.name = (
            "person" + target.name.removeprefix("person")[::-1]
        )  # its inverse is itself: applied twice, undone


def _keeps_its_session(target, context):
    target.loaded_by = object_session(target)


#: A load listener, and what the caller sees of what it did: the same whether uncached, missed or hit.
LISTENERS = {
    "adds an object to its Session": (_adds, lambda session, people: sorted(tag.name for tag in session.new)),
    "notes in its Session's info": (_notes, lambda session, people: session.info.get("read")),
    "keeps an object of its Session": (_reads, lambda session, people: [inspect(p.country).session for p in people]),
    "keeps its Session": (_keeps_its_session, lambda session, people: [p.loaded_by is session for p in people]),
    "sets a column (loaded, not changed)": (
        _normalises,
        lambda session, people: ([p.name for p in people], len(session.dirty)),
    ),
    "changes a column, not idempotently": (_counts, lambda session, people: [p.name for p in people]),
    "decodes a column": (_decodes, lambda session, people: ([p.name for p in people], len(session.dirty))),
}


@pytest.mark.parametrize("name", list(LISTENERS))
def test_what_a_load_listener_does_is_done_as_uncached(Session, region, name):
    listener, picture = LISTENERS[name]
    statement = select(Person).where(Person.id.in_([1, 2])).order_by(Person.id)
    event.listen(Person, "load", listener)
    try:
        seen = []
        for options in ((), (FromCache(region),), (FromCache(region),)):  # uncached, a miss, a hit
            with Session() as session:
                people = session.scalars(statement.options(*options)).all()
                seen.append(repr(picture(session, people)).replace(repr(session), "the Session"))
    finally:
        event.remove(Person, "load", listener)
    assert seen == [seen[0]] * 3 and "None" not in seen[0]


def test_the_callers_objects_get_the_lifecycle_events_of_an_uncached_load(Session, region):
    """A listener on every Session sees the objects a query gives enter the caller's Session once, and never leave it."""
    seen: list = []

    def entered(session, instance):
        seen.append(("entered", instance))

    def left(session, instance):
        seen.append(("left", instance))

    statement = select(Person).where(Person.id.in_([3, 4])).order_by(Person.id)
    event.listen(orm.Session, "loaded_as_persistent", entered)
    event.listen(orm.Session, "persistent_to_detached", left)
    try:
        pictures = []
        for options in ((), (FromCache(region),), (FromCache(region),)):  # uncached, a miss, a hit
            with Session() as session:
                people = session.scalars(statement.options(*options)).all()
                pictures.append(sorted(name for name, instance in seen if any(instance is p for p in people)))
    finally:
        event.remove(orm.Session, "loaded_as_persistent", entered)
        event.remove(orm.Session, "persistent_to_detached", left)
    assert pictures == [["entered", "entered"]] * 3


def test_a_load_listener_that_changes_columns_acts_once_on_a_hit(Session, sql, region):
    # An entry holds its objects as loaded, before their class's load
    # listeners ran: a hit sends the load event, and they run once.  The
    # first load of a class with such listeners runs once more uncached
    # (the listeners had run before the add-on watched them).
    from .models import PostalCode

    def _stamps(target, context):
        target.code = target.code + "-x"

    statement = select(PostalCode).where(PostalCode.id == 1).options(FromCache(region))
    event.listen(PostalCode, "load", _stamps)
    try:
        seen = _read_in_new_sessions(Session, sql, statement, "code", times=4)
    finally:
        event.remove(PostalCode, "load", _stamps)
    assert [code for code, _, _ in seen] == ["00001-x"] * 4
    assert [dirty for _, _, dirty in seen] == [0] * 4
    assert seen[-1][1] == 0  # a hit


def test_the_first_load_of_a_listened_class_runs_uncached_once(Session, sql):
    from .models import City

    def _titles(target, context):
        target.name = target.name.title() + "!"

    statement = select(City).where(City.id == 2).options(FromCache("memory"))
    if event.contains(City, "load", as_loaded._keep):  # watched by an earlier test: not the first load
        event.remove(City, "load", as_loaded._keep)
    event.listen(City, "load", _titles)
    try:
        seen = _read_in_new_sessions(Session, sql, statement, "name", times=3)
    finally:
        event.remove(City, "load", _titles)
    # The miss and its uncached run; a miss that stores; a hit.
    assert seen == [("City 2!", 2, 0), ("City 2!", 1, 0), ("City 2!", 0, 0)]


def _read_in_new_sessions(Session, sql, statement, attribute, times):
    """``(the attribute of the one object, SQL statements, dirty objects)`` of ``statement`` run in new Sessions."""
    seen = []
    for _ in range(times):
        with Session() as session:
            sql.reset()
            value = getattr(session.scalars(statement).one(), attribute)
            seen.append((value, sql.count, len(session.dirty)))
    return seen


def test_a_listener_inserted_before_the_add_ons_later_acts_once_too(Session, region):
    from .models import PostalCode

    def _stamps(target, context):
        target.code = target.code + "-x"

    def _marks(target, context):
        target.code = target.code + "-y"

    statement = select(PostalCode).where(PostalCode.id == 2)
    event.listen(PostalCode, "load", _stamps)
    try:
        with Session() as session:  # the add-on watches the class
            session.scalars(statement.options(FromCache(region))).one()
        event.listen(PostalCode, "load", _marks, insert=True)  # runs first, before the add-on's copy
        try:
            codes = []
            for options in ((), (FromCache(region),), (FromCache(region),), (FromCache(region),)):
                with Session() as session:
                    codes.append(session.scalars(statement.options(*options)).one().code)
        finally:
            event.remove(PostalCode, "load", _marks)
    finally:
        event.remove(PostalCode, "load", _stamps)
    assert codes == ["00002-y-x"] * 4
