"""The scenario of SQLAlchemy's old examples/beaker_caching/local_session_caching.py.

Run it with ``python examples/local_session_caching.py``.  No Pyramid here:
a plain ``scoped_session``, a Beaker region of type ``ext:local_session``
kept on the Session, and a ``FromCache`` query.  It prints the SQL it runs.

Its two classes are its own, not :mod:`sessioncache_demo.models` (the
definition the demo and the tests share), on purpose: the script must run
from a clone with only the library installed, and the demo is a
distribution of its own.  The demo's ``Address`` also needs a ``PostalCode``, ``City`` and
``Country`` before one row can be inserted, which the old example's
scenario never involved.  So it stays one file to read from top to bottom.
"""

from __future__ import annotations

import sys

from sqlalchemy import ForeignKey, String, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, scoped_session, sessionmaker

from pyramid_sessioncache import FromCache, ScopedSessionNamespace, SessionCache, cache_parameters


class Base(DeclarativeBase):
    pass


class Person(Base):
    __tablename__ = "person"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), index=True)
    addresses: Mapped[list[Address]] = relationship(back_populates="person")


class Address(Base):
    __tablename__ = "address"
    id: Mapped[int] = mapped_column(primary_key=True)
    person_id: Mapped[int] = mapped_column(ForeignKey("person.id"))
    street: Mapped[str] = mapped_column(String(200))
    person: Mapped[Person] = relationship(back_populates="addresses")


def main(url: str = "sqlite://") -> int:
    engine = create_engine(url)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda conn, cursor, sql, *args: statements.append(sql))
    Base.metadata.create_all(engine)

    # The regions; the Sessions find them in their info dictionary.
    cache = SessionCache({"local_session": {"type": "ext:local_session"}})
    Session = scoped_session(sessionmaker(bind=engine, info=cache.session_info()))

    # A Beaker container type called "ext:local_session" that stores on
    # the current Session of the scoped_session, as the old example had.
    ScopedSessionNamespace.create_session_container("ext:local_session", Session)

    Session.add_all(Person(name=f"person {i}", addresses=[Address(street=f"{i} Main St")]) for i in range(20))
    Session.commit()

    # query to load Person by name, with criterion of "person 10"
    q = Session.query(Person).options(FromCache("local_session", "by_name")).filter(Person.name == "person 10")

    before = len(statements)
    person10 = q.one()  # load from DB
    person10 = q.one()  # next call, the query is cached
    print(f"two q.one() calls ran {len(statements) - before} SQL statement(s)")
    assert len(statements) - before == 1

    # clear out the Session; the cache disappears with it.
    Session.remove()
    before = len(statements)
    person10 = q.one()  # query calls from DB again
    print(f"after Session.remove(), q.one() ran {len(statements) - before} SQL statement(s)")
    assert len(statements) - before == 1

    # identity is preserved: person10 is the very object in the cache.
    beaker_cache, key = cache_parameters(q)
    assert person10 is beaker_cache.get(key)[0]
    print(f"person10 is cache.get(key)[0]: {person10 is beaker_cache.get(key)[0]} ({person10.name})")
    Session.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
