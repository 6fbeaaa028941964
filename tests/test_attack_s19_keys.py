"""Cache keys attacked: executions that return different rows never share a key."""

from __future__ import annotations

from sqlalchemy import select

from pyramid_sessioncache import FromCache

from .models import Person


def ids(session, stmt, parameters=None):
    return [p.id for p in session.execute(stmt.options(FromCache("memory")), parameters).scalars()]


def test_execute_parameters_named_as_compiled_anonymous_binds(Session):
    # ``Person.id == 1`` compiles to ``:id_1``; execute() parameters named
    # ``id_1`` replace the statement's value.
    stmt = select(Person).where(Person.id == 1)
    with Session() as s:
        assert ids(s, stmt) == [1]
        assert ids(s, stmt, {"id_1": 2}) == [2]
    with Session() as s:
        assert ids(s, stmt, {"id_1": 3}) == [3]
        assert ids(s, stmt) == [1]
