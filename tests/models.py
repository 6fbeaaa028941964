"""The mapped classes the tests cache: the demo's models, and tags.

The seed's domain (:class:`Person`, :class:`Address`, :class:`PostalCode`,
:class:`City`, :class:`Country`) is defined once, in :mod:`sessioncache_demo.models`;
the tests import it from there.  This module adds only what the tests need
beyond it: a many-to-many relationship, so that writes to an association
table are seen to invalidate.  :class:`Tag`, the ``person_tag`` table and
``Person.tags`` join the demo's ``Base`` (its MetaData and registry) when
this module is imported; the demo's own tests run in the same process and
see them too, and never read them.
"""

from __future__ import annotations

from sessioncache_demo.models import Address, Base, City, Country, Person, PostalCode
from sqlalchemy import Column, ForeignKey, String, Table
from sqlalchemy.orm import Mapped, mapped_column, relationship

__all__ = ["Address", "Base", "City", "Country", "Person", "PostalCode", "Tag", "person_tag", "seed"]

person_tag = Table(
    "person_tag",
    Base.metadata,
    Column("person_id", ForeignKey("person.id"), primary_key=True),
    Column("tag_id", ForeignKey("tag.id"), primary_key=True),
)


class Tag(Base):
    """A label; a :class:`Person` has any number of them, through ``person_tag``."""

    __tablename__ = "tag"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


# Declarative adds a relationship set on a mapped class to its mapper.
Person.tags = relationship(Tag, secondary=person_tag, order_by=Tag.id)


def seed(session, people: int = 20) -> None:
    """Fill an empty database, committed: ``people`` people with two addresses and some tags each.

    Person ``i`` is named ``"person i"``; its addresses are ``2i - 1``
    (``"i Main St"``, postal code 1 in City 1) and ``2i`` (``"i High St"``,
    postal code 2 in City 2); its tags are the first ``i % 3 + 1`` of three.
    Both cities are in one country.
    """
    country = Country(id=1, name="Country")
    postal_codes = [
        PostalCode(id=i, code=f"{i:05d}", city=City(id=i, name=f"City {i}", country=country)) for i in (1, 2)
    ]
    tags = [Tag(id=i, name=f"tag {i}") for i in (1, 2, 3)]
    for i in range(1, people + 1):
        session.add(
            Person(
                id=i,
                name=f"person {i}",
                addresses=[
                    Address(id=2 * i - 1, street=f"{i} Main St", postal_code=postal_codes[0]),
                    Address(id=2 * i, street=f"{i} High St", postal_code=postal_codes[1]),
                ],
                tags=tags[: i % 3 + 1],
            )
        )
    session.commit()
