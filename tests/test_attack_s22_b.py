"""Session 22, attack surface B: what a statement reads and writes, as the ORM and SQL can express it.

Each test runs a query cached and uncached (a plain Session, no cache) in
a realistic sequence and asserts that both give the same rows.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session as PlainSession

from pyramid_sessioncache import FromCache

from .models import Person


def cached_and_uncached(Session, engine, stmt, region="memory"):
    """The rows of ``stmt`` read through ``region`` (stored by another Session first), then uncached."""
    with Session() as other:
        other.execute(stmt.options(FromCache(region))).all()
    with Session() as session:
        cached = session.execute(stmt.options(FromCache(region))).all()
    with PlainSession(engine) as session:
        uncached = session.execute(stmt).all()
    return cached, uncached


class Masked(str):
    """A secret that hides itself from the logs: its repr is the same for every value."""

    def __repr__(self) -> str:
        return "Masked('***')"


def test_a_value_whose_repr_hides_it_is_keyed_by_its_value(Session, engine):
    """A ``str`` subclass masking its repr (an API token) made every value share one key.

    A look-up with the token of one account was served the rows of another's.
    """
    for name in ("person 1", "person 2"):
        stmt = select(Person.id).where(Person.name == Masked(name))
        cached, uncached = cached_and_uncached(Session, engine, stmt)
        assert cached == uncached
