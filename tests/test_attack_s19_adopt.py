"""Attacks on a shared miss handing its loader's objects to the caller (``hydrate.adopted``)."""

from __future__ import annotations

import pytest
from sqlalchemy import event, select
from sqlalchemy.orm import object_session

from pyramid_sessioncache import FromCache

from .models import Person, Tag


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
