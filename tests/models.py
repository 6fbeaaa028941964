"""The mapped classes the tests cache: the seed's domain, trimmed."""

from __future__ import annotations

from sqlalchemy import Column, ForeignKey, String, Table
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, reconstructor, relationship


class Base(DeclarativeBase):
    pass


person_tag = Table(
    "person_tag",
    Base.metadata,
    Column("person_id", ForeignKey("person.id"), primary_key=True),
    Column("tag_id", ForeignKey("tag.id"), primary_key=True),
)


class Country(Base):
    __tablename__ = "country"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))


class City(Base):
    __tablename__ = "city"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    country_id: Mapped[int] = mapped_column(ForeignKey("country.id"))
    country: Mapped[Country] = relationship()


class Person(Base):
    __tablename__ = "person"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), index=True)
    addresses: Mapped[list[Address]] = relationship(back_populates="person", order_by="Address.id")
    tags: Mapped[list[Tag]] = relationship(secondary=person_tag, order_by="Tag.id")

    @reconstructor
    def _on_load(self) -> None:
        self.loaded_by_orm = True

    def __repr__(self) -> str:
        return f"<Person {self.id} {self.name!r}>"


class Address(Base):
    __tablename__ = "address"
    id: Mapped[int] = mapped_column(primary_key=True)
    person_id: Mapped[int] = mapped_column(ForeignKey("person.id"))
    street: Mapped[str] = mapped_column(String(200))
    city_id: Mapped[int] = mapped_column(ForeignKey("city.id"))
    person: Mapped[Person] = relationship(back_populates="addresses")
    city: Mapped[City] = relationship()


class Tag(Base):
    __tablename__ = "tag"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


def seed(session, people: int = 20) -> None:
    """Fill an empty database: ``people`` people with two addresses each."""
    country = Country(id=1, name="Country")
    cities = [City(id=i, name=f"City {i}", country=country) for i in (1, 2)]
    tags = [Tag(id=i, name=f"tag {i}") for i in (1, 2, 3)]
    for i in range(1, people + 1):
        session.add(
            Person(
                id=i,
                name=f"person {i}",
                addresses=[
                    Address(street=f"{i} Main St", city=cities[0]),
                    Address(street=f"{i} High St", city=cities[1]),
                ],
                tags=tags[: i % 3 + 1],
            )
        )
    session.commit()
