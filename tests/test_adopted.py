"""A shared region's miss gives the caller the objects its load made (``hydrate.adopted``), as uncached.

A miss loads its rows in a Session of its own, snapshots them for the
region and, when the caller's Session holds none of their identities (and
nothing made them the loader's own: ``loader._kept_to_itself``), hands the
caller those very objects instead of building them again.  Each test
compares a miss on a new Session with the same query run uncached on a new
Session: the same objects, loaded the same way, made once; and the objects
then behave as a hit's do (their own cached loads hit what a hit's objects
stored).  The classes here have no ``load`` listener, so their objects are
handed over; the demo's ``Person`` has a reconstructor, whose misses build
objects of the caller's own (``test_attack_s19_adopt.py``).
"""

from __future__ import annotations

import pytest
from sqlalchemy import ForeignKey, String, create_engine, event, inspect, select
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    defer,
    joinedload,
    mapped_column,
    raiseload,
    relationship,
    selectinload,
    sessionmaker,
)

from pyramid_sessioncache import FromCache, RelationshipCache, SessionCache

from .conftest import SECRET


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "author"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    books: Mapped[list[Book]] = relationship(back_populates="author", order_by="Book.id")

    #: How many instances were made, whoever made them (the ORM makes them through ``__new__``).
    made = 0

    def __new__(cls, *args, **kwargs):
        Author.made += 1
        return super().__new__(cls)


class Book(Base):
    __tablename__ = "book"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("author.id"))
    title: Mapped[str] = mapped_column(String(50))
    author: Mapped[Author] = relationship(back_populates="books")


@pytest.fixture(params=["memory", "file"])
def region(request) -> str:
    """Adoption is the same whatever stores the entry: memory (which keeps the value itself) and file."""
    return request.param


@pytest.fixture
def engine(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'adopted.sqlite'}")
    Base.metadata.create_all(engine)
    with sessionmaker(bind=engine)() as session:
        for a in range(1, 7):
            session.add(Author(id=a, name=f"author {a}", books=[Book(title=f"book {a}.{b}") for b in range(2)]))
        session.commit()
    yield engine
    engine.dispose()


@pytest.fixture
def Session(engine, tmp_path):
    cache = SessionCache(
        {"memory": {"type": "memory"}, "file": {"type": "file", "data_dir": str(tmp_path / "cache")}},
        secret=SECRET,
    )
    return sessionmaker(bind=engine, info=cache.session_info())


STATEMENTS = {
    "page with selectinload": select(Author).order_by(Author.id).limit(4).options(selectinload(Author.books)),
    "joinedload (unique)": select(Author).order_by(Author.id).limit(3).options(joinedload(Author.books)),
    "two entities per row": select(Author, Book).join(Author.books).order_by(Book.id).limit(6),
    "raiseload": select(Author).order_by(Author.id).limit(3).options(raiseload(Author.books)),
    "deferred column (built, not handed over)": select(Author).order_by(Author.id).limit(3).options(defer(Author.name)),
    "entity and a column": select(Author, Author.name.label("n")).order_by(Author.id).limit(3),
}


def _picture(session, result) -> list:
    """What a caller can see of a result: every row's objects, their loaded state and values."""
    picture = []
    for row in result:
        for item in row:
            if not isinstance(item, (Author, Book)):
                picture.append(item)
                continue
            state = inspect(item)
            assert state.session is session and state.persistent and not state.modified
            columns = [prop.key for prop in state.mapper.column_attrs]
            held = {}
            for key in (prop.key for prop in state.mapper.relationships):
                value = state.dict.get(key)
                if isinstance(value, list):
                    held[key] = [inspect(member).key for member in value]
                elif value is not None:
                    held[key] = inspect(value).key
            loaded = {key: state.dict[key] for key in columns if key in state.dict}
            picture.append((type(item).__name__, state.key, loaded, sorted(state.unloaded), held))
    return picture


def _rows(session, statement, name):
    result = session.execute(statement)
    return result.unique() if "unique" in name else result


@pytest.mark.parametrize("name", list(STATEMENTS))
def test_a_miss_gives_what_an_uncached_load_gives(Session, region, sql, name):
    statement = STATEMENTS[name]
    with Session() as session:
        uncached = _picture(session, _rows(session, statement, name))
    sql.reset()
    with Session() as session:
        assert _picture(session, _rows(session, statement.options(FromCache(region)), name)) == uncached
        assert sql.count >= 1
    sql.reset()
    with Session() as session:  # a hit, built from the entry
        assert _picture(session, _rows(session, statement.options(FromCache(region)), name)) == uncached
        assert sql.count == 0


def test_a_miss_makes_each_object_once(Session, region):
    """The ORM makes one object per identity: so does a miss, whose objects are its load's, and a hit."""
    statement = select(Author).order_by(Author.id).limit(4)
    made = []
    for options in ((), (FromCache(region),), (FromCache(region),)):  # uncached, a miss, a hit
        before = Author.made
        with Session() as session:
            assert len(session.scalars(statement.options(*options)).all()) == 4
        made.append(Author.made - before)
    assert made == [4, 4, 4]


def test_objects_the_session_holds_are_the_ones_a_miss_gives(Session, region):
    with Session() as session:
        held = session.get(Author, 2)
        statement = select(Author).where(Author.id.in_([1, 2, 3])).order_by(Author.id)
        authors = session.scalars(statement.options(FromCache(region))).all()
        assert authors[1] is held
        assert [inspect(author).session for author in authors] == [session] * 3


def test_a_missed_object_changed_is_committed(Session, region):
    statement = select(Author).where(Author.id == 4)
    with Session() as session:
        author = session.scalars(statement.options(FromCache(region))).one()
        author.name = "renamed"
        assert list(session.dirty) == [author]
        session.commit()
    with Session() as session:
        assert session.scalars(statement).one().name == "renamed"
        assert session.scalars(statement.options(FromCache(region))).one().name == "renamed"  # the entry went


def test_loaded_as_persistent_is_sent_for_each_object_a_miss_gives(Session, region):
    seen = []
    with Session() as session:
        event.listen(session, "loaded_as_persistent", lambda session, instance: seen.append(instance))
        authors = session.scalars(select(Author).order_by(Author.id).limit(3).options(FromCache(region))).all()
    assert {id(author) for author in authors} <= {id(obj) for obj in seen}


def test_a_missed_objects_cached_lazy_loads_are_a_hits(Session, region, sql):
    """Objects a miss gives carry the options and path a hit gives: their cached lazy loads share entries."""
    statement = select(Author).where(Author.id == 5).options(FromCache(region), RelationshipCache(Author.books, region))
    with Session() as session:
        assert len(session.scalars(statement).one().books) == 2  # a miss, then a lazy load stored
    sql.reset()
    with Session() as session:
        assert len(session.scalars(statement).one().books) == 2
        assert sql.count == 0
