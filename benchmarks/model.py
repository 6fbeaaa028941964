"""The benchmark's tables, its data, and the queries it times.

People with addresses (the domain of SQLAlchemy's caching examples), and
their purchases, which only the report reads:

- :func:`point`: one person by name (an indexed column).
- :func:`page`: a page of 50 people ordered by id, with ``selectinload`` of
  their addresses (3 each): two SQL statements uncached.
- :func:`report`: revenue per city and product, aggregated over
  person x address x purchase (3 x ``purchases`` rows per person), grouped
  and counted distinct: the kind of query worth caching.
- :func:`report_once`: the same statement, built once and reused.

This module imports nothing from ``pyramid_sessioncache``.

Its tables are its own, not :mod:`sessioncache_demo.models` (which the tests share),
because they model a different thing: customers of a shop.  A person has
an email, an address holds its city and postal code as plain columns (no
``PostalCode`` -> ``City`` -> ``Country`` tables: the page reads an
address's city without a lazy load and the report groups by
``Address.city`` without a join), and purchases exist only here.  The docs'
*Performance* figures were measured on this shape.  And importing
``sessioncache_demo.models`` imports the ``sessioncache_demo`` package, which imports
``pyramid_sessioncache``: ``wsgi_overhead.py`` times an application in a
process that must never have imported it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from sqlalchemy import ForeignKey, Integer, String, distinct, func, insert, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload

PAGE_SIZE = 50
CITIES = 25
PRODUCTS = 12


class Base(DeclarativeBase):
    pass


class Person(Base):
    __tablename__ = "person"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), index=True)
    email: Mapped[str] = mapped_column(String(200))
    addresses: Mapped[list[Address]] = relationship(back_populates="person", order_by="Address.id")


class Address(Base):
    __tablename__ = "address"
    id: Mapped[int] = mapped_column(primary_key=True)
    person_id: Mapped[int] = mapped_column(ForeignKey("person.id"), index=True)
    street: Mapped[str] = mapped_column(String(200))
    city: Mapped[str] = mapped_column(String(100))
    postal_code: Mapped[str] = mapped_column(String(20))
    person: Mapped[Person] = relationship(back_populates="addresses")


class Purchase(Base):
    __tablename__ = "purchase"
    id: Mapped[int] = mapped_column(primary_key=True)
    person_id: Mapped[int] = mapped_column(ForeignKey("person.id"), index=True)
    product: Mapped[str] = mapped_column(String(50))
    amount: Mapped[int] = mapped_column(Integer)  # cents
    day: Mapped[int] = mapped_column(Integer)  # days since the shop opened


@dataclass(frozen=True)
class Sizes:
    """How much data to make."""

    people: int = 1000
    addresses: int = 3  # per person
    purchases: int = 5  # per person

    @property
    def page_offset(self) -> int:
        """Where the page of :data:`PAGE_SIZE` people starts (a full page, not the first)."""
        return max(0, min(100, self.people - PAGE_SIZE))

    @property
    def point_name(self) -> str:
        """The name :func:`point` looks up: someone in the middle."""
        return person_name(self.people // 2 + 1)


def person_name(number: int) -> str:
    return f"person {number:05d}"


def create(engine, sizes: Sizes) -> None:
    """Create the tables on ``engine`` and fill them, committed (seeded, so always the same data)."""
    rng = random.Random(5)
    Base.metadata.create_all(engine)
    people, addresses, purchases = [], [], []
    for pid in range(1, sizes.people + 1):
        people.append({"id": pid, "name": person_name(pid), "email": f"p{pid}@example.com"})
        for n in range(sizes.addresses):
            addresses.append(
                {
                    "person_id": pid,
                    "street": f"{rng.randrange(1, 300)} {rng.choice(['Elm', 'Oak', 'Main', 'High'])} Street {n}",
                    "city": f"city {rng.randrange(CITIES):02d}",
                    "postal_code": f"{rng.randrange(10000, 99999)}",
                }
            )
        for _ in range(sizes.purchases):
            purchases.append(
                {
                    "person_id": pid,
                    "product": f"product {rng.randrange(PRODUCTS):02d}",
                    "amount": rng.randrange(100, 50000),
                    "day": rng.randrange(730),
                }
            )
    with engine.begin() as conn:
        for table, rows in ((Person, people), (Address, addresses), (Purchase, purchases)):
            if rows:
                conn.execute(insert(table), rows)
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    else:
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")


# The queries, built afresh on every call as a view would build them.
# ``options`` are the caching options of the column being timed (none when
# uncached); ``sizes`` says where the page starts and whom to look up.


def point(sizes: Sizes, options: tuple = ()):
    return select(Person).where(Person.name == sizes.point_name).options(*options)


def page(sizes: Sizes, options: tuple = ()):
    return (
        select(Person)
        .order_by(Person.id)
        .limit(PAGE_SIZE)
        .offset(sizes.page_offset)
        .options(selectinload(Person.addresses), *options)
    )


def report(sizes: Sizes, options: tuple = ()):
    revenue = func.sum(Purchase.amount)
    return (
        select(
            Address.city,
            Purchase.product,
            func.count(distinct(Person.id)).label("customers"),
            func.count(Purchase.id).label("purchases"),
            revenue.label("revenue"),
            func.avg(Purchase.amount).label("average"),
        )
        .join(Address, Address.person_id == Person.id)
        .join(Purchase, Purchase.person_id == Person.id)
        .where(Purchase.day >= 30)
        .group_by(Address.city, Purchase.product)
        .order_by(revenue.desc(), Address.city, Purchase.product)
        .limit(100)
        .options(*options)
    )


_BUILT: dict = {}


def report_once(sizes: Sizes, options: tuple = ()):
    """:func:`report`, built once per set of options and reused, as a module-level statement is.

    SQLAlchemy memoizes a statement's cache key, so a reused statement
    skips the floor's cost (see the docs' Performance advice on building statements
    once).  The options are told apart by class and region.
    """
    signature = (sizes, tuple((type(option), getattr(option, "region", None)) for option in options))
    statement = _BUILT.get(signature)
    if statement is None:
        statement = _BUILT[signature] = report(sizes, options)
    return statement


# Running a statement: what a view does to get its objects or rows.  The
# timed calls stop there; ``touch_*`` then reads every attribute and child a
# page would render, which run.py does on a check call with the SQL counted,
# so that a hit which left something to load lazily is caught.


def fetch_point(session, stmt):
    return session.execute(stmt).scalar_one()


def fetch_page(session, stmt):
    return session.execute(stmt).scalars().all()


def fetch_report(session, stmt):
    return session.execute(stmt).all()


def touch_person(person) -> int:
    return len(person.name) + len(person.email)


def touch_people(people) -> int:
    seen = 0
    for person in people:
        seen += len(person.name) + len(person.email)
        for address in person.addresses:
            seen += len(address.street) + len(address.city) + len(address.postal_code)
    return seen


def touch_rows(rows) -> int:
    return sum(len(row) for row in rows)


#: name -> (title, build the statement, run it, read what it returned)
QUERIES = {
    "point": ("point lookup", point, fetch_point, touch_person),
    "page": ("page of 50 + addresses", page, fetch_page, touch_people),
    "report": ("report (aggregates)", report, fetch_report, touch_rows),
    "report_once": ("report, built once", report_once, fetch_report, touch_rows),
}
