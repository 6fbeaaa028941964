"""Collections of every kind, built from a shared entry: what an uncached load gives, and tracked as it is.

A shared hit on a new Session makes its objects and fills their
collections itself (``hydrate.py``), a plain list at once and any other
collection class through its own appender.  Each test compares what a hit
gives with the same query run uncached on a new Session, then changes the
hit's collections and checks that the flush writes what it would have
written for objects loaded by the query.
"""

from __future__ import annotations

import pytest
from sqlalchemy import ForeignKey, String, create_engine, event, select
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    attribute_keyed_dict,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)
from sqlalchemy.orm.collections import collection

from pyramid_sessioncache import FromCache, SessionCache

from .conftest import SECRET, SQLCounter


class Base(DeclarativeBase):
    pass


class Upper(list):
    """A list collection with an appender of its own: it records each member it takes."""

    @collection.appender
    def take(self, item):
        item.seen = True
        super().append(item)

    @collection.remover
    def drop(self, item):
        super().remove(item)

    @collection.iterator
    def each(self):
        return super().__iter__()


class Shelf(Base):
    __tablename__ = "shelf"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    as_list: Mapped[list[Book]] = relationship(order_by="Book.id", viewonly=True, overlaps="as_set,by_title,custom")
    as_set: Mapped[set[Book]] = relationship(collection_class=set, overlaps="as_list,by_title,custom")
    by_title: Mapped[dict[str, Book]] = relationship(
        collection_class=attribute_keyed_dict("title"), viewonly=True, overlaps="as_list,as_set,custom"
    )
    custom: Mapped[list[Book]] = relationship(
        collection_class=Upper, order_by="Book.id", viewonly=True, overlaps="as_list,as_set,by_title"
    )


class Book(Base):
    __tablename__ = "book"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(50))
    shelf_id: Mapped[int] = mapped_column(ForeignKey("shelf.id"))
    seen = False


COLLECTIONS = ("as_list", "as_set", "by_title", "custom")


def shape(shelves) -> list:
    """What a page shows of ``shelves``: every collection, as plain data, in its own kind."""
    return [
        (
            shelf.name,
            [book.title for book in shelf.as_list],
            sorted(book.title for book in shelf.as_set),
            {title: book.title for title, book in shelf.by_title.items()},
            [book.title for book in shelf.custom],
            type(shelf.custom).__name__,
            type(shelf.as_set).__name__,
        )
        for shelf in shelves
    ]


@pytest.fixture
def factory(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'shelves.sqlite'}")
    Base.metadata.create_all(engine)
    with sessionmaker(engine)() as session:
        for number in range(3):
            shelf = Shelf(name=f"shelf {number}")
            shelf.as_set = {Book(title=f"book {number}.{index}") for index in range(number + 1)}
            session.add(shelf)
        session.commit()
    cache = SessionCache({"memory": {"type": "memory"}}, default_region="memory", secret=SECRET)
    yield sessionmaker(engine, info=cache.session_info())
    engine.dispose()


def page(*options):
    loads = [selectinload(getattr(Shelf, name)) for name in COLLECTIONS]
    return select(Shelf).options(*loads, *options).order_by(Shelf.id)


def test_every_collection_class_is_what_an_uncached_load_gives(factory):
    with factory() as session:
        expected = shape(session.scalars(page()).all())
    with factory() as session:
        session.scalars(page(FromCache("memory"))).all()  # stores
    sql = SQLCounter(factory.kw["bind"])
    with factory() as session:
        shelves = session.scalars(page(FromCache("memory"))).all()
        assert shape(shelves) == expected
    assert sql.count == 0
    assert len(expected[2][1]) == 3 and expected[2][5] == "Upper"


def test_a_custom_appender_takes_each_member_of_a_hit(factory):
    with factory() as session:
        session.scalars(page(FromCache("memory"))).all()
    with factory() as session:
        shelves = session.scalars(page(FromCache("memory"))).all()
        assert [book.seen for book in shelves[2].custom] == [True, True, True]
        assert all(type(shelf.custom) is Upper for shelf in shelves)


def test_init_collection_is_sent_for_each_collection_a_hit_fills(factory):
    made = []

    def count(target, collection, adapter):
        made.append(type(collection).__name__)

    for name in COLLECTIONS:
        event.listen(getattr(Shelf, name), "init_collection", count)
    try:
        with factory() as session:
            session.scalars(page()).all()
        uncached = sorted(made)
        with factory() as session:
            session.scalars(page(FromCache("memory"))).all()  # stores
        made.clear()
        with factory() as session:
            session.scalars(page(FromCache("memory"))).all()
        assert sorted(made) == uncached and len(made) == 3 * len(COLLECTIONS)
    finally:
        for name in COLLECTIONS:
            event.remove(getattr(Shelf, name), "init_collection", count)


def test_changes_to_a_hits_collection_are_flushed(factory):
    with factory() as session:
        session.scalars(page(FromCache("memory"))).all()
    with factory() as session:
        shelves = session.scalars(page(FromCache("memory"))).all()
        moved = next(iter(shelves[2].as_set))
        title = moved.title
        shelves[2].as_set.remove(moved)
        shelves[0].as_set.add(moved)
        shelves[1].as_set.add(Book(title="new"))
        assert session.dirty
        session.commit()
    with factory() as session:
        shelves = session.scalars(page()).all()
        assert sorted(book.title for book in shelves[0].as_set) == sorted(["book 0.0", title])
        assert sorted(book.title for book in shelves[1].as_set) == ["book 1.0", "book 1.1", "new"]
        assert len(shelves[2].as_set) == 2


def test_a_collection_the_session_loaded_is_left_as_it_is(factory):
    with factory() as session:
        session.scalars(page(FromCache("memory"))).all()
    with factory() as session:
        shelf = session.scalars(select(Shelf).where(Shelf.name == "shelf 2")).one()
        extra = Book(title="pending")
        shelf.as_set.add(extra)  # loads the collection, then changes it
        session.scalars(page(FromCache("memory"))).all()
        assert extra in shelf.as_set and len(shelf.as_set) == 4


def test_a_property_mapped_after_a_hit_is_loaded_by_the_next_hit(factory):
    """Hits remember how to build each class (``hydrate._plan``): a column mapped since then loads, never reads None."""
    from sqlalchemy import func
    from sqlalchemy.orm import column_property

    class Tagged(Base):
        __table__ = Base.metadata.tables["book"].to_metadata(type(Base.metadata)(), name="book")

    statement = lambda: select(Tagged).order_by(Tagged.id)  # noqa: E731
    with factory() as session:
        session.scalars(statement().options(FromCache("memory"))).all()  # stores
    with factory() as session:
        assert [book.title for book in session.scalars(statement().options(FromCache("memory")))]  # a hit
    Tagged.title_length = column_property(func.length(Tagged.__table__.c.title))
    with factory() as session:
        uncached = [(book.id, book.title_length) for book in session.scalars(statement())]
    with factory() as session:
        cached = [(book.id, book.title_length) for book in session.scalars(statement().options(FromCache("memory")))]
    assert uncached == cached and all(length for _, length in cached)
