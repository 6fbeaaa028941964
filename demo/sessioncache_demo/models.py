"""The demo's tables: people and their postal addresses.

The domain of SQLAlchemy's old ``examples/beaker_caching``: a
:class:`Person` has many :class:`Address` rows; an address is in a
:class:`PostalCode`, which is in a :class:`City`, which is in a
:class:`Country`.

This module is the one definition of that domain in the repository: the
add-on's tests import these classes too (``tests/models.py`` adds only what
they need beyond it).  ``benchmarks/model.py`` and
``examples/local_session_caching.py`` keep models of their own; their
docstrings say why.
"""

from __future__ import annotations

from sqlalchemy import ForeignKey, MetaData, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, reconstructor, relationship

#: The longest name a person may have (the edit form enforces it too).
NAME_MAX_LENGTH = 100

# Named constraints, so that migrations (if the demo ever grows them) are stable.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of the demo's models."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Country(Base):
    """A country."""

    __tablename__ = "country"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)

    def __repr__(self) -> str:
        return f"Country({self.name!r})"


class City(Base):
    """A city, in a :class:`Country`."""

    __tablename__ = "city"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    country_id: Mapped[int] = mapped_column(ForeignKey("country.id"))
    country: Mapped[Country] = relationship()

    def __repr__(self) -> str:
        return f"City({self.name!r})"


class PostalCode(Base):
    """A postal code, in a :class:`City`."""

    __tablename__ = "postal_code"

    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(20))
    city_id: Mapped[int] = mapped_column(ForeignKey("city.id"))
    city: Mapped[City] = relationship()

    @property
    def country(self) -> Country:
        """The country of this postal code's city."""
        return self.city.country

    def __repr__(self) -> str:
        return f"PostalCode({self.code!r})"


class Address(Base):
    """A street address of a :class:`Person`, in a :class:`PostalCode`."""

    __tablename__ = "address"

    id: Mapped[int] = mapped_column(primary_key=True)
    person_id: Mapped[int] = mapped_column(ForeignKey("person.id"), index=True)
    street: Mapped[str] = mapped_column(String(200))
    postal_code_id: Mapped[int] = mapped_column(ForeignKey("postal_code.id"))
    person: Mapped[Person] = relationship(back_populates="addresses")
    postal_code: Mapped[PostalCode] = relationship()

    @property
    def city(self) -> City:
        """The city of this address."""
        return self.postal_code.city

    @property
    def country(self) -> Country:
        """The country of this address."""
        return self.postal_code.country

    def __str__(self) -> str:
        return f"{self.street}, {self.postal_code.code} {self.city.name}, {self.country.name}"


class Person(Base):
    """A person, with one or more :class:`Address` rows."""

    __tablename__ = "person"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_MAX_LENGTH), index=True)
    addresses: Mapped[list[Address]] = relationship(back_populates="person", order_by=Address.id)

    #: True on a person the ORM loaded (from the database, or from a cache
    #: region's copy), False on one made with ``Person(...)``.
    loaded_by_orm = False

    @reconstructor
    def _loaded(self) -> None:
        # SQLAlchemy calls a reconstructor, not __init__, on each object it
        # loads.  A cache hit must do the same, so the add-on's tests check
        # this flag on objects served from every region.
        self.loaded_by_orm = True

    def __repr__(self) -> str:
        return f"Person({self.id!r}, {self.name!r})"
