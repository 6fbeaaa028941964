"""Attacks on a shared miss handing its loader's objects to the caller (``hydrate.adopted``)."""

from __future__ import annotations

import pytest
from sqlalchemy import event, inspect, orm, select
from sqlalchemy.orm import object_session

from pyramid_sessioncache import FromCache

from .models import Country, Person, Tag


@pytest.fixture(params=["memory", "file"])
def region(request) -> str:
    return request.param


def _audits(target, context):
    object_session(target).add(Tag(name=f"read {target.id}"))  # a load listener adding to the object's Session


def _notes(target, context):
    object_session(target).info.setdefault("read", []).append(target.id)  # a listener noting in the Session's info


@pytest.mark.parametrize("listener", [_audits, _notes])
def test_a_load_listener_acting_on_the_objects_session_acts_on_the_callers(Session, region, listener):
    """Uncached, a ``load`` listener's ``object_session(target)`` is the caller's: a miss's must be too."""
    statement = select(Person).where(Person.id.in_([1, 2])).order_by(Person.id)
    event.listen(Person, "load", listener)
    try:
        seen = []
        for options in ((), (FromCache(region),), (FromCache(region),)):  # uncached, a miss, a hit
            with Session() as session:
                session.scalars(statement.options(*options)).all()
                seen.append((sorted(tag.name for tag in session.new), session.info.get("read")))
        assert seen[1] == seen[0] and seen[2] == seen[0]
    finally:
        event.remove(Person, "load", listener)


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


def _shouts(target, context):
    target.name = target.name.upper()  # a load listener normalising a column: the ORM keeps it as loaded


def test_what_a_load_listener_sets_is_loaded_not_changed(Session, region):
    statement = select(Person).where(Person.id.in_([5, 6])).order_by(Person.id)
    event.listen(Person, "load", _shouts)
    try:
        seen = []
        for options in ((), (FromCache(region),), (FromCache(region),)):  # uncached, a miss, a hit
            with Session() as session:
                people = session.scalars(statement.options(*options)).all()
                seen.append(([person.name for person in people], len(session.dirty)))
    finally:
        event.remove(Person, "load", _shouts)
    assert seen == [(["PERSON 5", "PERSON 6"], 0)] * 3


def _looks_up(target, context):
    target.country = object_session(target).get(Country, 1)  # a listener keeping an object of the Session


def test_objects_a_load_listener_reads_belong_to_the_callers_session(Session, region):
    statement = select(Person).where(Person.id.in_([7, 8])).order_by(Person.id)
    event.listen(Person, "load", _looks_up)
    try:
        seen = []
        for options in ((), (FromCache(region),), (FromCache(region),)):  # uncached, a miss, a hit
            with Session() as session:
                people = session.scalars(statement.options(*options)).all()
                seen.append([inspect(person.country).session is session for person in people])
    finally:
        event.remove(Person, "load", _looks_up)
    assert seen == [[True, True]] * 3
