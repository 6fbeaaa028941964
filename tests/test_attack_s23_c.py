"""Session 23, attack C: the read, key and connection-state fixes of session 22, attacked.

Each test runs a query cached and uncached (a plain Session, no cache) in
a realistic sequence and asserts that both give the same rows, or that a
statement run for what it does runs as often cached as uncached.
"""

from __future__ import annotations

import datetime

import pytest
from sqlalchemy import DateTime, String, Time, cast, literal, select

from .models import Person
from .test_attack_s22_b import cached_and_uncached


class MaskedInt(int):
    """An account number that hides itself from the logs: its repr is the same for every value."""

    def __repr__(self) -> str:
        return "MaskedInt(***)"


class MaskedDateTime(datetime.datetime):
    """A moment that hides itself from the logs (a birth date, say)."""

    def __repr__(self) -> str:
        return "MaskedDateTime(***)"


class MaskedTime(datetime.time):
    """A time of day that hides itself from the logs."""

    def __repr__(self) -> str:
        return "MaskedTime(***)"


UTC = datetime.timezone.utc


@pytest.mark.parametrize(
    "statement_of",
    [
        lambda number: select(Person.id).where(Person.id == MaskedInt(number)),
        lambda number: select(cast(literal(MaskedDateTime(2020, 1, number, tzinfo=UTC), DateTime), String)),
        lambda number: select(cast(literal(MaskedTime(number, 0, tzinfo=UTC), Time), String)),
    ],
    ids=["int", "aware datetime", "aware time"],
)
def test_a_value_of_any_plain_type_whose_repr_hides_it_is_keyed_by_its_value(Session, engine, statement_of):
    """Session 22 keyed a ``str`` subclass masking its repr by its value, not an ``int``'s nor an aware moment's.

    Every value of such a subclass shared one key: the second look-up was
    served the rows of the first value.
    """
    for number in (1, 2):
        cached, uncached = cached_and_uncached(Session, engine, statement_of(number))
        assert cached == uncached
