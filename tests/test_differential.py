"""A seeded differential fuzzer: every cached read returns what the same read returns uncached.

Two *worlds* run one random sequence of operations, step by step, each on a
database of its own made alike: in the cached world every read goes through
the cache (``FromCache``, ``cached_query()``, ``RelationshipCache``, in
``ext:local_session`` and a shared region), in the plain world the same read
runs on Sessions that cache nothing.  Each world has two Sessions, ``a`` and
``b`` (in the cached world, with a region shared by files or Redis, two
:class:`~pyramid_sessioncache.SessionCache` instances over one storage, as two
processes would have), and reads in Sessions made for one read.  After every
step the worlds must agree: the rows of the read (values, number, order when
ordered), the state of the objects it returned and of every object the test
holds (loaded attributes and their values, relationships' contents, what is
expired or deferred), and the exception raised, if any.  Writes come by
every path (ORM unit of work, Core, ORM bulk ``update()``, ``text()``,
executemany, foreign-key cascades), with savepoints, commits, rollbacks,
``expire_all()`` and ``close()`` in between; so a read in ``b`` that showed
``a``'s uncommitted rows, or missed its committed ones, differs from the
plain world.

The sequence is drawn from ``random.Random(seed)``: a failure names its seed
and step, and runs again alike.  What the fuzzer found is kept below it as
plain tests.
"""

from __future__ import annotations

import gc
import multiprocessing
import random
import shutil
import threading
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    Column,
    ForeignKey,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    delete,
    event,
    exists,
    func,
    insert,
    make_url,
    select,
    text,
    union,
    update,
)
from sqlalchemy.ext.mutable import MutableDict
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    column_property,
    contains_eager,
    defer,
    joinedload,
    lazyload,
    load_only,
    mapped_column,
    query_expression,
    raiseload,
    relationship,
    selectinload,
    sessionmaker,
    subqueryload,
    undefer,
    with_expression,
    with_loader_criteria,
    with_polymorphic,
)
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.pool import SingletonThreadPool, StaticPool
from sqlalchemy.sql.selectable import CompoundSelect

from pyramid_sessioncache import FromCache, RelationshipCache, SessionCache, cached_query, invalidate_tables

from .conftest import SECRET, SQLCounter, read_holding


class Base(DeclarativeBase):
    """The fuzzer's own models, on a MetaData of their own."""


book_genre = Table(
    "fz_book_genre",
    Base.metadata,
    Column("book_id", ForeignKey("fz_book.id", ondelete="CASCADE"), primary_key=True),
    Column("genre_id", ForeignKey("fz_genre.id", ondelete="CASCADE"), primary_key=True),
)


class Author(Base):
    """An author; authors form a tree (``parent``), deleted with their parent by the database."""

    __tablename__ = "fz_author"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    bio: Mapped[str | None] = mapped_column(Text, deferred=True)
    #: Changed in place (a ``MutableDict``): each hit must get a copy of its own.
    meta: Mapped[dict] = mapped_column(MutableDict.as_mutable(JSON), default=dict)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("fz_author.id", ondelete="CASCADE"))
    parent: Mapped[Author | None] = relationship(remote_side=[id], back_populates="children")
    children: Mapped[list[Author]] = relationship(
        back_populates="parent", order_by="Author.id", cascade="all, delete-orphan", passive_deletes=True
    )
    books: Mapped[list[Book]] = relationship(
        back_populates="author", order_by="Book.id", cascade="all, delete-orphan", passive_deletes=True
    )


class Book(Base):
    """A book of one author, in any number of genres."""

    __tablename__ = "fz_book"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(50))
    pages: Mapped[int] = mapped_column(Integer)
    price: Mapped[Decimal] = mapped_column(Numeric(8, 2), default=Decimal("9.99"))
    author_id: Mapped[int] = mapped_column(ForeignKey("fz_author.id", ondelete="CASCADE"))
    author: Mapped[Author] = relationship(back_populates="books")
    genres: Mapped[list[Genre]] = relationship(secondary=book_genre, order_by="Genre.id", back_populates="books")
    #: Filled by ``with_expression()`` only.
    score: Mapped[int | None] = query_expression()


class Genre(Base):
    """A genre; many books, many genres."""

    __tablename__ = "fz_genre"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    books: Mapped[list[Book]] = relationship(secondary=book_genre, order_by="Book.id", back_populates="genres")


class Employee(Base):
    """The base of a joined-inheritance pair."""

    __tablename__ = "fz_employee"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    kind: Mapped[str] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "employee"}


class Manager(Employee):
    """An employee with a budget, in a table of its own."""

    __tablename__ = "fz_manager"

    id: Mapped[int] = mapped_column(ForeignKey("fz_employee.id", ondelete="CASCADE"), primary_key=True)
    budget: Mapped[int] = mapped_column(Integer)
    __mapper_args__ = {"polymorphic_identity": "manager"}


# An aggregate of another table, loaded with every author.
Author.book_count = column_property(
    select(func.count(Book.id)).where(Book.author_id == Author.id).correlate_except(Book).scalar_subquery()
)

AUTHORS, BOOKS, GENRES, EMPLOYEES = 8, 16, 4, 6


#: A view of long books, and a trigger: a new book marks its author's bio.
#: On SQLite, the cache must be told (``writes_also``); PostgreSQL's catalog
#: says what reads the view, not what the trigger writes.
long_book = Table(
    "fz_long_book",
    MetaData(),
    Column("id", Integer, primary_key=True),
    Column("title", String(50)),
    Column("author_id", Integer),
)
WRITES_ALSO = {
    "sqlite": {"fz_book": ["fz_author", "fz_long_book"]},
    "postgresql": {"fz_book": ["fz_author"]},
}


def create_view_and_trigger(conn) -> None:
    conn.execute(text("CREATE VIEW fz_long_book AS SELECT id, title, author_id FROM fz_book WHERE pages > 100"))
    if conn.dialect.name == "sqlite":
        conn.execute(
            text(
                "CREATE TRIGGER fz_new_book AFTER INSERT ON fz_book BEGIN "
                "UPDATE fz_author SET bio = 'has book ' || NEW.id WHERE id = NEW.author_id; END"
            )
        )
    else:
        conn.execute(
            text(
                "CREATE FUNCTION fz_new_book() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "UPDATE fz_author SET bio = 'has book ' || NEW.id WHERE id = NEW.author_id; RETURN NEW; END $$"
            )
        )
        conn.execute(
            text("CREATE TRIGGER fz_new_book AFTER INSERT ON fz_book FOR EACH ROW EXECUTE FUNCTION fz_new_book()")
        )


def seed_db(engine) -> None:
    """Create the tables, the view and the trigger, and fill them, alike in every database."""
    with engine.begin() as conn:
        conn.execute(text("DROP VIEW IF EXISTS fz_long_book"))
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        create_view_and_trigger(conn)
        conn.execute(
            insert(Author),
            [
                {"id": i, "name": f"author {i}", "bio": f"bio {i}", "parent_id": None if i <= 3 else (i - 1) // 2}
                for i in range(1, AUTHORS + 1)
            ],
        )
        conn.execute(
            insert(Book),
            [
                {"id": i, "title": f"book {i}", "pages": 10 * i, "author_id": (i - 1) % AUTHORS + 1}
                for i in range(1, BOOKS + 1)
            ],
        )
        conn.execute(insert(Genre), [{"id": i, "name": f"genre {i}"} for i in range(1, GENRES + 1)])
        conn.execute(
            insert(book_genre),
            [{"book_id": b, "genre_id": g} for b in range(1, BOOKS + 1) for g in range(1, GENRES + 1) if (b + g) % 3],
        )
        conn.execute(
            insert(Employee.__table__),
            [{"id": i, "name": f"employee {i}", "kind": "manager" if i % 2 else "employee"} for i in range(1, 7)],
        )
        conn.execute(insert(Manager.__table__), [{"id": i, "budget": 100 * i} for i in range(1, 7, 2)])


def sqlite_engine(path) -> Any:
    """An engine on the SQLite file ``path`` that enforces foreign keys (their cascades are tested)."""
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 2})
    event.listen(engine, "connect", lambda dbapi, record: dbapi.execute("PRAGMA foreign_keys=ON"))
    return engine


# -- the reads ---------------------------------------------------------------------------------------------------


def _reads() -> list[tuple[str, Any]]:
    """The reads, each ``(name, build(rng) -> (statement, unique))``: one draw per read, the same in both worlds."""

    def authors_by_name(rng):
        low = rng.choice([0, 4])
        return select(Author).where(Author.id > low).order_by(Author.id).limit(rng.choice([2, 50])), False

    def author_by_id(rng):
        return select(Author).where(Author.id == rng.choice([1, 4, 7, 9])), False

    def authors_with_books(rng):
        loader = rng.choice([selectinload, joinedload])
        stmt = select(Author).options(loader(Author.books)).order_by(Author.id)
        return stmt.where(Author.id <= rng.choice([3, 10])), loader is joinedload

    def authors_with_bio(rng):
        opt = rng.choice([undefer(Author.bio), defer(Author.name), load_only(Author.name)])
        return select(Author).options(opt).where(Author.id.in_(rng.choice([[1, 2, 3], [4, 7, 9]]))), False

    def authors_deep(rng):
        stmt = select(Author).options(selectinload(Author.children).selectinload(Author.books))
        return stmt.where(Author.parent_id.is_(None)).order_by(Author.id), False

    def books_with_author(rng):
        stmt = select(Book).options(joinedload(Book.author), selectinload(Book.genres)).order_by(Book.id)
        return stmt.where(Book.pages >= rng.choice([0, 100])).limit(rng.choice([3, 100])), False

    def books_of_genre(rng):
        stmt = select(Book).join(Book.genres).where(Genre.id == rng.choice([1, 2]))
        return stmt.order_by(Book.id), False

    def genre_with_books(rng):
        return select(Genre).options(selectinload(Genre.books)).order_by(Genre.id), False

    def book_columns(rng):
        stmt = select(Book.id, Book.title, Book.pages).where(Book.author_id == rng.choice([1, 7]))
        return stmt.order_by(Book.id), False

    def counts(rng):
        stmt = select(Author.name, func.count(Book.id), func.sum(Book.pages)).join(Book, isouter=True)
        return stmt.group_by(Author.id, Author.name).order_by(Author.id), False

    def total(rng):
        return select(func.count()).select_from(rng.choice([Book, Author, Genre, Employee])), False

    def entity_and_column(rng):
        return select(Book, Author.name).join(Book.author).order_by(Book.id).limit(rng.choice([5, 20])), False

    def employees(rng):
        return select(rng.choice([Employee, Manager])).order_by(Employee.id), False

    def book_count_column(rng):
        return select(Author.id, Author.book_count).order_by(Author.id), False

    def text_read(rng):
        stmt = text("SELECT id, title FROM fz_book WHERE pages > :p ORDER BY id").bindparams(p=rng.choice([0, 100]))
        return stmt, False

    def from_text(rng):
        sql = text("SELECT * FROM fz_genre WHERE id <= :g ORDER BY id").bindparams(g=rng.choice([2, 4]))
        return select(Genre).from_statement(sql), False

    def criteria_on_eager_load(rng):
        crit = with_loader_criteria(Book, Book.pages > rng.choice([50, 100]))
        return select(Author).options(selectinload(Author.books), crit).order_by(Author.id), False

    def contained(rng):
        stmt = select(Book).join(Book.author).options(contains_eager(Book.author))
        return stmt.where(Author.id <= rng.choice([2, 5])).order_by(Book.id), False

    def subquery_loaded(rng):
        stmt = select(Author).options(subqueryload(Author.books).selectinload(Book.genres))
        return stmt.where(Author.id >= rng.choice([1, 6])).order_by(Author.id), False

    def expression(rng):
        stmt = select(Book).options(with_expression(Book.score, Book.pages * rng.choice([2, 3])))
        return stmt.where(Book.id <= 6).order_by(Book.id), False

    def polymorphic(rng):
        every = with_polymorphic(Employee, "*")
        return select(every).where(every.id >= rng.choice([1, 3])).order_by(every.id), False

    def parents(rng):
        loader = rng.choice([joinedload, selectinload, lazyload])
        return select(Author).options(loader(Author.parent)).order_by(Author.id), False

    def raising(rng):
        return select(Book).options(raiseload(Book.author)).where(Book.id <= rng.choice([2, 4])).order_by(
            Book.id
        ), False

    def long_books(rng):
        return select(long_book).where(long_book.c.author_id <= rng.choice([3, 8])).order_by(long_book.c.id), False

    def authors_of_long_books(rng):
        stmt = select(Author).join(long_book, long_book.c.author_id == Author.id).options(undefer(Author.bio))
        return stmt.distinct().order_by(Author.id), False

    def prices(rng):
        stmt = select(Book.author_id, func.sum(Book.price), func.max(Book.price)).group_by(Book.author_id)
        return stmt.order_by(Book.author_id), False

    def by_meta(rng):
        return select(Author).options(undefer(Author.bio)).where(Author.id.in_(rng.choice([[], [1, 5]]))), False

    def bound_at_execution(rng):
        stmt = select(Book).where(Book.author_id == bindparam("who")).order_by(Book.id)
        return ("params", stmt, {"who": rng.choice([1, 2, 7])}), False

    def exists_books(rng):
        long = exists().where(Book.author_id == Author.id, Book.pages > rng.choice([50, 120]))
        return select(Author.id, Author.name).where(long).order_by(Author.id), False

    def union_of_ids(rng):
        short = select(Book.id).where(Book.pages < rng.choice([40, 90]))
        return union(short, select(Book.id).where(Book.author_id == 1)).order_by("id"), False

    def counted_cte(rng):
        counted = select(Book.author_id, func.count().label("n")).group_by(Book.author_id).cte("counted")
        stmt = select(Author.name, counted.c.n).join(counted, counted.c.author_id == Author.id)
        return stmt.where(counted.c.n >= rng.choice([1, 2])).order_by(Author.id), False

    def descendants(rng):
        tree = select(Author.id).where(Author.id == rng.choice([1, 2])).cte("tree", recursive=True)
        tree = tree.union(select(Author.id).where(Author.parent_id == tree.c.id))  # ends on a cycle too
        return select(Author).where(Author.id.in_(select(tree.c.id))).order_by(Author.id), False

    def in_subquery(rng):
        writers = select(Book.author_id).where(Book.pages > rng.choice([60, 150]))
        return select(Author).where(Author.id.in_(writers)).order_by(Author.id), False

    def get(rng):
        return ("get", rng.choice([Author, Book, Genre, Employee, Manager]), rng.choice([1, 2, 3, 9])), False

    def legacy_query(rng):
        return ("query", rng.choice([1, 4])), False

    return [(f.__name__, f) for f in list(locals().values()) if callable(f)]


READS = _reads()


# -- what is compared --------------------------------------------------------------------------------------------


def ident(obj) -> Any:
    """An object's name in both worlds: its class and primary key, or its id while it has none."""
    state = instance_state(obj)
    if state.key is not None:
        return (type(obj).__name__, state.key[1])
    return (type(obj).__name__, "transient", obj.__dict__.get("id"))


def plain(value) -> Any:
    """``value`` with mapped objects replaced by their names."""
    if hasattr(value, "_sa_instance_state"):
        return ident(value)
    if isinstance(value, tuple | list):
        return tuple(plain(v) for v in value)
    return value


def snapshot(obj, relationships: bool = True) -> tuple:
    """What the ORM holds of ``obj``: its status, loaded attributes and their values, loaded relationships.

    ``relationships=False``: columns only, for the objects the test holds
    besides a read's rows: whether a many-to-one is still loaded after a
    flush or a savepoint's rollback follows the unit of work's identity
    sets, ordered by memory address, not the cache.  A read's own objects
    are compared whole.
    """
    state = instance_state(obj)
    mapper = state.mapper
    values = {}
    for attr in mapper.attrs:
        key = attr.key
        if not relationships and hasattr(attr, "direction"):
            continue
        if key not in state.dict:
            values[key] = "<unloaded>"
            continue
        value = state.dict[key]
        if hasattr(attr, "direction"):
            value = plain(list(value)) if isinstance(value, list) else plain(value)
        values[key] = value
    status = next(s for s in ("persistent", "pending", "deleted", "detached", "transient") if getattr(state, s))
    if status in ("deleted", "detached"):
        # what the unit of work leaves on objects it deleted depends on the
        # order of its identity sets (memory addresses), not on the cache
        return (ident(obj), status)
    return (
        ident(obj),
        status,
        tuple(sorted(values.items())),
        # Expired keys that hold a value aside: a joinedload() finding no
        # row for a many-to-one of an object the Session holds, partly
        # expired, sets None and leaves the key expired (the cache's
        # set_committed_value() does not): bookkeeping, not a value.
        tuple(
            sorted(
                k
                for k in state.expired_attributes
                if k not in state.dict and (relationships or k not in mapper.relationships)
            )
        ),
        state.modified,
    )


def held_snapshot(session, held: list) -> list:
    held.extend(session.identity_map.values())
    seen = {}
    for obj in held:
        seen.setdefault(id(obj), obj)
    return sorted((snapshot(o, relationships=False) for o in seen.values()), key=repr)


# -- the worlds --------------------------------------------------------------------------------------------------


@dataclass
class World:
    """A database, its engine and the Sessions that run the operations; ``cached`` says how reads are made."""

    engine: Any
    makers: dict[str, Any]
    cached: bool
    regions: list[str]
    kind: str = "local"
    sessions: dict[str, Any] = field(default_factory=dict)
    held: dict[str, list] = field(default_factory=dict)
    dirty: dict[str, bool] = field(default_factory=dict)
    savepoints: dict[str, list] = field(default_factory=dict)
    #: ``outsider(step)``: run ``step``'s write in another process over the same storage, or None.
    outsider: Any = None

    def session(self, name: str):
        if name not in self.sessions:
            session = self.sessions[name] = self.makers[name]()
            self.held[name] = held = []
            # Every object the Session ever holds stays referenced: the weak
            # identity map would otherwise drop objects when the garbage
            # collector runs, at other moments in each world.
            for name_of_event in ("loaded_as_persistent", "pending_to_persistent", "detached_to_persistent"):
                event.listen(session, name_of_event, lambda _, obj, keep=held: keep.append(obj))
            self.dirty[name] = False
            self.savepoints[name] = []
        return self.sessions[name]

    def close_all(self) -> None:
        for session in self.sessions.values():
            session.close()
        self.sessions.clear()


class Step:
    """One operation, drawn once and run in each world."""

    #: How often each kind of step comes: writes often, or mostly reads (more hits).
    PROFILES = (
        [35, 15, 8, 12, 3, 10, 3, 3, 3],
        [45, 20, 10, 4, 1, 4, 1, 3, 1],
    )

    def __init__(self, rng: random.Random, number: int, profile: int = 0):
        self.number = number
        self.who = rng.choice("aab")
        self.other = "b" if self.who == "a" else "a"
        self.kind = rng.choices(
            ["read", "fresh_read", "lazy", "write", "savepoint", "commit", "rollback", "expire", "close"],
            self.PROFILES[profile],
        )[0]
        self.read = rng.choice(READS)
        self.region = rng.random()
        self.entrance = rng.choice(["option", "cached_query"])
        self.draw = rng.random()
        self.seed = rng.randrange(1 << 30)
        self.write = rng.choice(WRITES)
        self.writes = [rng.choice(WRITES) for _ in range(rng.randint(1, 3))]
        self.release = rng.random() < 0.5
        self.no_autoflush = rng.random() < 0.15
        self.outsider = rng.choice([None, None, None, None, "session", "engine"])

    @classmethod
    def ending(cls, name: str) -> Step:
        """A step whose ``other`` Session is ``name``: for :func:`end_other_writer`."""
        step = cls.__new__(cls)
        step.other = name
        return step

    def __repr__(self) -> str:
        detail = {
            "read": self.read[0],
            "fresh_read": self.read[0],
            "write": self.write.__name__ + (f" by {self.outsider}" if self.outsider else ""),
            "savepoint": [w.__name__ for w in self.writes],
        }.get(self.kind, "")
        return f"step {self.number}: {self.who}.{self.kind} {detail} ({self.entrance}, {self.region:.2f})"


def run_read(world: World, session, step: Step, held: list) -> tuple:
    _, build = step.read
    stmt, unique = build(random.Random(step.seed))
    region = world.regions[int(step.region * len(world.regions))] if world.regions else None
    if isinstance(stmt, tuple) and stmt[0] == "call":  # a read of its own: ``call(world, session, region, held)``
        return stmt[1](world, session, region, held)
    if isinstance(stmt, tuple) and stmt[0] == "params":
        options = [FromCache(region)] if world.cached else []
        result = session.execute(stmt[1].options(*options), stmt[2])
        return rows_of_result(result, unique, held)
    if isinstance(stmt, tuple):
        return run_call(world, session, stmt, region, held)
    is_text = not hasattr(stmt, "options") or isinstance(stmt, CompoundSelect)
    entrance = step.entrance
    if is_text and entrance == "option":
        entrance = "cached_query"
    if step.no_autoflush:
        with session.no_autoflush:
            return rows_of(world, session, stmt, unique, region, entrance, held)
    return rows_of(world, session, stmt, unique, region, entrance, held)


def run_call(world: World, session, call: tuple, region: str | None, held: list) -> tuple:
    """The reads that are not a statement executed: ``Session.get()``, a legacy ``Query``."""
    options = [FromCache(region)] if world.cached else []
    if call[0] == "get":
        found = session.get(call[1], call[2], options=options)
        rows = [(found,)] if found is not None else []
    else:
        query = session.query(Author).filter(Author.id >= call[1]).options(selectinload(Author.books), *options)
        rows = [(obj,) for obj in query.order_by(Author.id).all()]
    for row in rows:
        held.extend(row)
    return ("rows", plain(rows), [snapshot(v) for row in rows for v in row])


def rows_of(world: World, session, stmt, unique: bool, region, entrance: str, held: list) -> tuple:
    if not world.cached:
        result = session.execute(stmt)
    elif entrance == "option":
        result = session.execute(stmt.options(FromCache(region)))
    else:
        result = cached_query(session, stmt, region=region)
    return rows_of_result(result, unique, held)


def rows_of_result(result, unique: bool, held: list) -> tuple:
    if unique:
        result = result.unique()
    rows = [tuple(row) for row in result.all()]
    for row in rows:
        held.extend(v for v in row if hasattr(v, "_sa_instance_state"))
    objects = [snapshot(v) for row in rows for v in row if hasattr(v, "_sa_instance_state")]
    return ("rows", plain(rows), objects)


def run_lazy(world: World, session, step: Step, held: list) -> tuple:
    """Load parents with their relationships lazy, then touch one: ``RelationshipCache`` in the cached world."""
    rng = random.Random(step.seed)
    cls, attr = rng.choice(
        [
            (Author, Author.books),
            (Author, Author.children),
            (Author, Author.parent),
            (Book, Book.genres),
            (Book, Book.author),
        ]
    )
    stmt = select(cls).where(cls.id == rng.choice([1, 2, 5]))
    region = world.regions[int(step.region * len(world.regions))] if world.regions else None
    if world.cached:
        stmt = stmt.options(RelationshipCache(attr, region), FromCache(region))
    obj = session.scalars(stmt).first()
    if obj is None:
        return ("lazy", None)
    held.append(obj)
    if step.no_autoflush:
        # a foreign key changed, not flushed, then the relationship loaded
        end_other_writer(world, step)
        world.dirty[step.who] = True  # flushed by the next read
        with session.no_autoflush:
            if isinstance(obj, Book):
                obj.author_id = rng.choice([1, 2, 3])
            else:
                obj.parent_id = rng.choice([None, 1, 2])
            value = getattr(obj, attr.key)
    else:
        value = getattr(obj, attr.key)
    related = list(value) if isinstance(value, list) else [value]
    held.extend(r for r in related if r is not None)
    return ("lazy", plain(value), [snapshot(r) for r in related if r is not None])


# -- the writes: each ``write(session, rng)`` -----------------------------------------------------------------------


def orm_add_book(session, rng):
    author = session.get(Author, rng.randint(1, AUTHORS + 2))
    if author is not None:
        author.books.append(
            Book(id=rng.randint(100, 400), title=f"new {rng.randint(0, 99)}", pages=rng.randint(1, 200))
        )


def orm_add_book_by_backref(session, rng):
    author = session.get(Author, rng.randint(1, 4))
    if author is not None:  # queued on author.books, not loaded
        session.add(Book(id=rng.randint(6000, 6100), title="backref", pages=rng.randint(1, 200), author=author))


def orm_add_author(session, rng):
    session.add(Author(id=rng.randint(100, 400), name=f"new author {rng.randint(0, 9)}", parent_id=rng.randint(1, 3)))


def orm_update(session, rng):
    obj = session.get(rng.choice([Author, Book, Genre, Manager]), rng.randint(1, 8))
    if isinstance(obj, Author):
        obj.name = f"renamed {rng.randint(0, 99)}"
        if rng.random() < 0.3:
            obj.bio = "changed bio"
    elif isinstance(obj, Book):
        obj.pages = rng.randint(1, 300)
    elif isinstance(obj, Genre):
        obj.name = f"genre {rng.randint(0, 99)}"
    elif isinstance(obj, Manager):
        obj.budget = rng.randint(1, 999)
        obj.name = f"manager {rng.randint(0, 9)}"


def orm_delete(session, rng):
    obj = session.get(rng.choice([Author, Book, Genre, Employee]), rng.randint(1, 8))
    if obj is not None:
        session.delete(obj)


def orm_move_book(session, rng):
    book = session.get(Book, rng.randint(1, BOOKS))
    if book is not None:
        book.author_id = rng.randint(1, AUTHORS)


def orm_tag(session, rng):
    book, genre = session.get(Book, rng.randint(1, BOOKS)), session.get(Genre, rng.randint(1, GENRES))
    if book is not None and genre is not None:
        if genre in book.genres:
            book.genres.remove(genre)
        else:
            book.genres.append(genre)


def core_insert_book(session, rng):
    session.execute(
        insert(Book.__table__).values(
            id=rng.randint(500, 900), title="core", pages=rng.randint(1, 99), author_id=rng.randint(1, AUTHORS)
        )
    )


def core_update_on_connection(session, rng):
    session.connection().execute(
        update(Book.__table__)
        .where(Book.__table__.c.author_id == rng.randint(1, AUTHORS))
        .values(pages=rng.randint(1, 300))
    )


def core_delete(session, rng):
    table = rng.choice([Book.__table__, book_genre, Author.__table__])
    session.execute(delete(table).where(list(table.primary_key.columns)[0] == rng.randint(1, 8)))


def bulk_orm_update(session, rng):
    sync = rng.choice(["auto", "fetch", "evaluate", False])
    session.execute(
        update(Author).where(Author.id <= rng.randint(1, AUTHORS)).values(name=f"bulk {rng.randint(0, 9)}"),
        execution_options={"synchronize_session": sync},
    )


def bulk_orm_delete(session, rng):
    session.execute(
        delete(Book).where(Book.pages > rng.randint(50, 200)),
        execution_options={"synchronize_session": rng.choice(["auto", "fetch", False])},
    )


def bulk_by_primary_key(session, rng):
    session.execute(update(Book), [{"id": i, "pages": rng.randint(1, 99)} for i in rng.sample(range(1, BOOKS + 1), 3)])


def text_dml(session, rng):
    sql = rng.choice(
        [
            "UPDATE fz_book SET pages = pages + 1 WHERE id = :x",
            "DELETE FROM fz_book_genre WHERE book_id = :x",
            "UPDATE fz_manager SET budget = budget + 7 WHERE id = :x",
            "DELETE FROM fz_author WHERE id = :x",
            "UPDATE fz_author SET bio = 'text bio' WHERE id = :x",
        ]
    )
    session.execute(text(sql), {"x": rng.randint(1, 8)})


def executemany_insert(session, rng):
    base = rng.randint(1000, 5000)
    session.execute(insert(Genre), [{"id": base + i, "name": f"many {i}"} for i in range(rng.randint(1, 3))])


def text_executemany(session, rng):
    session.execute(
        text("INSERT INTO fz_book_genre (book_id, genre_id) VALUES (:b, :g)"),
        [{"b": rng.randint(1, BOOKS), "g": rng.randint(1, GENRES)} for _ in range(2)],
    )


def mutate_meta(session, rng):
    author = session.get(Author, rng.randint(1, 4))
    if author is not None:
        author.meta[rng.choice(["x", "y"])] = rng.randint(0, 9)  # in place


def reprice(session, rng):
    book = session.get(Book, rng.randint(1, BOOKS))
    if book is not None:
        book.price = Decimal(rng.randint(100, 999)) / 100


def orm_merge(session, rng):
    session.merge(Author(id=rng.choice([1, 2, 150]), name=f"merged {rng.randint(0, 9)}"))


def bulk_insert_mappings(session, rng):
    base = rng.randint(2000, 3000)
    session.bulk_insert_mappings(Genre, [{"id": base + i, "name": "bulk mapping"} for i in range(2)])


def bulk_save_objects(session, rng):
    session.bulk_save_objects([Book(id=rng.randint(3000, 3500), title="saved", pages=5, author_id=rng.randint(1, 3))])


def upsert(session, rng):
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    stmt = dialect_insert(Genre).values(id=rng.choice([1, 2, 77]), name=f"upserted {rng.randint(0, 9)}")
    session.execute(stmt.on_conflict_do_update(index_elements=["id"], set_={"name": stmt.excluded.name}))


def insert_from_select(session, rng):
    base = rng.randint(4000, 5000)
    rows = select(Genre.id + base, Genre.name).where(Genre.id <= 2)
    session.execute(insert(Genre).from_select(["id", "name"], rows))


def update_returning(session, rng):
    stmt = update(Book).where(Book.author_id == rng.randint(1, 4)).values(pages=Book.pages + 1).returning(Book.id)
    session.execute(stmt).all()


def driver_sql(session, rng):
    session.connection().exec_driver_sql(f"UPDATE fz_genre SET name = 'driver {rng.randint(0, 9)}' WHERE id = 2")


WRITES = [
    orm_add_book_by_backref,
    mutate_meta,
    reprice,
    orm_merge,
    bulk_insert_mappings,
    bulk_save_objects,
    upsert,
    insert_from_select,
    update_returning,
    driver_sql,
    orm_add_book,
    orm_add_author,
    orm_update,
    orm_update,
    orm_delete,
    orm_move_book,
    orm_tag,
    core_insert_book,
    core_update_on_connection,
    core_delete,
    bulk_orm_update,
    bulk_orm_delete,
    bulk_by_primary_key,
    text_dml,
    executemany_insert,
    text_executemany,
]


def engine_write(engine, rng) -> tuple:
    """A write on a Connection of the engine, no Session at all, committed."""
    book, author = Book.__table__, Author.__table__
    stmt = rng.choice(
        [
            update(book).where(book.c.id == rng.randint(1, BOOKS)).values(pages=rng.randint(1, 300)),
            update(author).where(author.c.id == rng.randint(1, AUTHORS)).values(name="engine"),
            delete(book_genre).where(book_genre.c.book_id == rng.randint(1, BOOKS)),
            delete(author).where(author.c.id == rng.randint(4, AUTHORS)),
        ]
    )
    with engine.begin() as conn:
        conn.execute(stmt)
    return ("wrote",)


# -- running a step ---------------------------------------------------------------------------------------------


def end_other_writer(world: World, step: Step) -> None:
    """Commit the other Session if it wrote: one writer at a time (SQLite locks, PostgreSQL row locks)."""
    if world.dirty.get(step.other):
        session = world.sessions[step.other]
        try:
            session.commit()
        except Exception:
            session.rollback()
        world.dirty[step.other] = False
        world.savepoints[step.other] = []


def guarded(session, func) -> Any:
    """Run ``func()``; an error becomes its name, and the Session's transaction is rolled back as an app would."""
    try:
        return func()
    except Exception as error:  # both worlds must fail alike
        if session is not None:
            session.rollback()
        return ("error", type(error).__name__)


def run_step(world: World, step: Step) -> Any:
    """Run ``step`` in ``world``: its outcome, and the kinds of warning it gave (as errors in neither world).

    Only the step's own warnings: ``catch_warnings`` sees every thread's
    (a thread an earlier test of the process left running), and an automatic
    garbage collection during the step would run the finalizers of earlier
    tests' cycles in this thread (an unclosed socket's ``ResourceWarning``:
    a step failed so once, in a loaded run).  Collection waits for the step's end.
    """
    caught: set[str] = set()
    thread = threading.get_ident()

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if threading.get_ident() == thread:
            caught.add(category.__name__)

    collecting = gc.isenabled()
    gc.disable()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            outcome = _run_step(world, step)
    finally:
        if collecting:
            gc.enable()
    return outcome, tuple(sorted(caught))


def _run_step(world: World, step: Step) -> Any:
    session = world.session(step.who)
    held = world.held[step.who]
    rng = random.Random(step.seed)
    if step.kind == "read":
        outcome = guarded(session, lambda: run_read(world, session, step, held))
        if outcome[0] == "error":
            world.dirty[step.who] = False
    elif step.kind == "lazy":
        outcome = guarded(session, lambda: run_lazy(world, session, step, held))
        if outcome[0] == "error":
            world.dirty[step.who] = False
    elif step.kind == "fresh_read":
        # a Session of its own, as a new request would have; in the cached world, with ``b``'s cache
        with world.makers["b"]() as fresh:
            outcome = guarded(fresh, lambda: run_read(world, fresh, step, []))
    elif step.kind == "write" and step.outsider is not None:
        # a write by another program of the process, committed at once
        for name in "ab":
            if world.dirty.get(name):
                end_other_writer(world, Step.ending(name))
        if step.outsider == "process" and world.outsider is not None:
            # another process over the same storage: its commit reaches this one through the backend alone
            outcome = world.outsider(step)
        elif step.outsider in ("session", "process"):
            writer = world.makers["c"]()

            def outside():
                with writer:
                    step.write(writer, rng)
                    writer.commit()
                return ("wrote",)

            outcome = guarded(writer, outside)
        else:
            outcome = guarded(None, lambda: engine_write(world.engine, rng))
        if step.outsider == "process":
            # what this process's Sessions read in their transactions is theirs (an ext:local_session
            # entry hears another process's commit when its transaction ends): they end
            for name in sorted(world.sessions):
                guarded(world.sessions[name], world.sessions[name].commit)
    elif step.kind == "write":
        end_other_writer(world, step)
        world.dirty[step.who] = True

        def write():
            step.write(session, rng)
            if step.draw < 0.5:
                session.flush()
            return ("wrote",)

        outcome = guarded(session, write)
        if outcome[0] == "error":
            world.dirty[step.who] = False
    elif step.kind == "savepoint":
        end_other_writer(world, step)
        world.dirty[step.who] = True

        def savepoint():
            if world.engine.dialect.name == "sqlite":
                session.flush()
                session.execute(text("UPDATE fz_genre SET name = name WHERE id = 0"))  # BEGIN on pysqlite first
            nested = session.begin_nested()
            for write in step.writes:
                write(session, rng)
            read = run_read(world, session, step, held)
            if step.release:
                nested.commit()
            else:
                nested.rollback()
            return ("savepoint", read)

        outcome = guarded(session, savepoint)
        if outcome[0] == "error":
            world.dirty[step.who] = False
    elif step.kind == "commit":
        outcome = guarded(session, session.commit)
        world.dirty[step.who] = False
    elif step.kind == "rollback":
        session.rollback()
        world.dirty[step.who] = False
        outcome = None
    elif step.kind == "expire":
        target = guarded(session, lambda: session.get(rng.choice([Author, Book]), rng.choice([1, 2, 4])))
        if isinstance(target, tuple):  # its autoflush failed, a pending write's error
            world.dirty[step.who] = False
            return ("expire", target)
        what = rng.choice(["all", "one", "attribute", "refresh", "expunge"])
        if what == "all" or target is None:
            session.expire_all()
        elif what == "one":
            session.expire(target)
        elif what == "attribute":
            session.expire(target, [rng.choice(["name", "books"]) if isinstance(target, Author) else "pages"])
        elif what == "refresh":
            outcome = guarded(session, lambda: session.refresh(target))
            return ("refresh", outcome)
        else:
            session.expunge(target)
        outcome = None
    else:
        session.close()
        held.clear()
        world.dirty[step.who] = False
        outcome = None
    return outcome


def state_of(world: World) -> dict:
    return {name: held_snapshot(world.sessions[name], world.held[name]) for name in sorted(world.sessions)}


def draw_steps(seed: int, steps: int, step_class: type[Step] = Step) -> list[Step]:
    """The scenario of ``seed``: ``steps`` operations (``step_class``: with another vocabulary)."""
    rng = random.Random(seed)
    drawn: list[Step] = []
    for number in range(steps):
        step = step_class(rng, number, seed % 2)
        if drawn and rng.random() < 0.5:  # the same read again: hits are what is tested
            again = rng.choice(drawn[-4:])
            step.read, step.seed, step.region, step.entrance = again.read, again.seed, again.region, again.entrance
            if rng.random() < 0.5:
                step.who, step.other = again.who, again.other
        drawn.append(step)
    return drawn


def outcome_difference(got: Any, expected: Any) -> str:
    """What differs between two outcomes of a step, cached world first: rows, then objects."""
    if not (
        isinstance(got[0], tuple) and isinstance(expected[0], tuple) and got[0][:1] == expected[0][:1] == ("rows",)
    ):
        return f"cached: {got}\nuncached: {expected}"
    lines = [] if got[0][1] == expected[0][1] else [f"rows cached: {got[0][1]}", f"rows uncached: {expected[0][1]}"]
    lines += [f"cached: {s}" for s in got[0][2] if s not in expected[0][2]]
    lines += [f"uncached: {s}" for s in expected[0][2] if s not in got[0][2]]
    return "\n".join(lines + [f"warnings: {got[1]} / {expected[1]}"])


def state_difference(got: dict, expected: dict) -> str:
    """The objects whose state differs, cached world first."""
    lines = []
    for name in sorted(set(got) | set(expected)):
        mine, theirs = got.get(name, []), expected.get(name, [])
        lines += [f"{name} cached: {s}" for s in mine if s not in theirs]
        lines += [f"{name} uncached: {s}" for s in theirs if s not in mine]
    return "\n".join(lines)


def run_scenario(
    seed: int, steps: list[Step], cached: World, plain: PlainProcess, url: str, draw: Any = draw_steps
) -> None:
    """Run ``steps`` in the cached world and, in ``plain``'s process, in the plain world on ``url``; both must agree.

    ``draw``: what drew ``steps``, a function the plain world's process can import.
    """
    history = []
    plain.start(seed, url, [step.number for step in steps], cached.kind, draw)
    try:
        for step in steps:
            history.append(step)
            got = run_step(cached, step)
            expected, expected_state = plain.step(step.number)
            context = f"seed {seed}, failed at {step!r}, after:\n" + "\n".join(map(repr, history[-12:-1]))
            assert got == expected, context + "\n" + outcome_difference(got, expected)
            got_state = state_of(cached)
            assert got_state == expected_state, context + "\n" + state_difference(got_state, expected_state)
    finally:
        cached.close_all()
        plain.stop()


class PlainProcess:
    """The plain world, in a process of its own: one that made no :class:`~pyramid_sessioncache.SessionCache`.

    Every ``SessionCache`` of a process hears every write of the process
    (that is how writes by any Session are seen), and version names are
    bare table names: the plain world's writes, the same as the cached
    world's, would invalidate the cached world's entries too and hide the
    writes it missed.  In another process, they reach no cache.
    """

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=serve_plain_world, args=(child,), daemon=True)
        self.process.start()
        child.close()

    def _ask(self, *message) -> Any:
        self.conn.send(message)
        if not self.conn.poll(60):
            raise TimeoutError("the plain world's process did not answer")
        answer = self.conn.recv()
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def start(self, seed: int, url: str, numbers: list[int], kind: str, draw: Any = None) -> None:
        self._ask("start", seed, url, numbers, kind, draw or draw_steps)

    def step(self, number: int) -> tuple:
        return self._ask("step", number)

    def stop(self) -> None:
        self._ask("stop")

    def close(self) -> None:
        self.conn.send(("exit",))
        self.process.join(10)
        self.conn.close()


def engine_for(url: str) -> Any:
    """The engine of ``url``; ``"static"``: a SQLite database in memory, one connection for all (``StaticPool``), seeded."""
    if url == "static":
        engine = create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", lambda dbapi, record: dbapi.execute("PRAGMA foreign_keys=ON"))
        seed_db(engine)
        return engine
    if url.startswith("sqlite"):
        return sqlite_engine(url.removeprefix("sqlite:///"))
    return create_engine(url)


def plain_world(seed: int, engine, kind: str) -> World:
    """The world whose Sessions cache nothing, with the Session settings of ``seed``."""
    makers = {name: sessionmaker(engine, **session_settings(seed)) for name in "abc"}
    return World(engine, makers, False, [], kind=kind)


def serve_plain_world(conn) -> None:
    """The plain world's process: run the steps it is asked for, answer with their outcome and the state after."""
    from pyramid_sessioncache.engine.cache import live_caches

    world = steps = None
    while True:
        message = conn.recv()
        try:
            if message[0] == "exit":
                return
            if message[0] == "start":
                _, seed, url, numbers, kind, draw = message
                drawn = draw(seed, max(numbers) + 1)
                steps = {number: drawn[number] for number in numbers}
                world = plain_world(seed, engine_for(url), kind)
                answer = None
            elif message[0] == "step":
                assert not live_caches(), "the plain world's process must hold no cache"
                answer = (run_step(world, steps[message[1]]), state_of(world))
            else:
                world.close_all()
                world.engine.dispose()
                answer = None
        except Exception as error:  # reported to the test
            answer = error
        conn.send(answer)


def session_settings(seed: int) -> dict:
    """Session settings that vary with the seed, alike in both worlds."""
    return {"expire_on_commit": seed % 3 != 0, "autoflush": seed % 4 != 1}


# -- the scenarios -----------------------------------------------------------------------------------------------


def cached_world(seed: int, kind: str, engine, tmp_path, request, writes_also: dict | None = None) -> World:
    """The world whose Sessions ``a`` and ``b`` cache, in ``local`` and a ``shared`` region of ``kind``.

    ``writes_also``: the triggers' writes, by dialect (:data:`WRITES_ALSO` by default).
    """
    regions: dict[str, dict] = {"local": {"type": "ext:local_session"}}
    if kind == "memory":
        regions["shared"] = {"type": "memory", "expire": 600}
    elif kind == "file":
        regions["shared"] = {"type": "file", "data_dir": str(tmp_path / "cache"), "lock_dir": str(tmp_path / "locks")}
    elif kind == "redis":
        regions["shared"] = {"type": "ext:redis", "url": request.getfixturevalue("redis_url")}
    elif kind == "near":
        regions["shared"] = {"type": "ext:redis", "url": request.getfixturevalue("redis_url"), "near": True}
    elif kind == "static":
        regions["shared"] = {"type": "memory", "expire": 600}
    also = (writes_also or WRITES_ALSO)[engine.dialect.name]
    first = SessionCache(regions, default_region="local", secret=SECRET, writes_also=also)
    # Two processes over one storage; a memory region is the process's own.
    # A near cache hears other processes' commits within a window (see
    # docs/backends.md): one process only, here.
    alone = kind in ("local", "memory", "near", "static")
    second = first if alone else SessionCache(regions, default_region="local", secret=SECRET, writes_also=also)
    for cache in {first, second}:
        request.addfinalizer(cache.close)  # a near cache's listening thread, a region's retries
    settings = session_settings(seed)
    makers = {
        "a": sessionmaker(engine, info=first.session_info(), **settings),
        "b": sessionmaker(engine, info=second.session_info(), **settings),
        "c": sessionmaker(engine, **settings),  # caches nothing: a script's, writing to the same database
    }
    return World(engine, makers, True, list(regions), kind=kind)


@pytest.fixture(scope="module")
def plain_process() -> Iterator[PlainProcess]:
    """The process of the plain world, for the module's scenarios."""
    process = PlainProcess()
    try:
        yield process
    finally:
        process.close()


SEEDS = [
    *((seed, "local") for seed in range(0, 4)),
    *((seed, "memory") for seed in range(10, 18)),
    *((seed, "file") for seed in range(20, 23)),
    *((seed, "redis") for seed in range(30, 33)),
    *((seed, "near") for seed in range(35, 37)),
    *((seed, "static") for seed in range(50, 53)),
]
STEPS = 140


@pytest.mark.parametrize(("seed", "kind"), SEEDS, ids=[f"{kind}-{seed}" for seed, kind in SEEDS])
def test_cached_reads_equal_uncached_reads_sqlite(seed, kind, tmp_path, request, plain_process):
    if kind == "static":
        cached_engine, url = engine_for("static"), "static"
    else:
        template = tmp_path / "template.sqlite"
        engine = sqlite_engine(template)
        seed_db(engine)
        engine.dispose()
        shutil.copyfile(template, tmp_path / "cached.sqlite")
        shutil.copyfile(template, tmp_path / "plain.sqlite")
        url = f"sqlite:///{tmp_path / 'plain.sqlite'}"
        cached_engine = sqlite_engine(tmp_path / "cached.sqlite")
    try:
        run_scenario(
            seed,
            draw_steps(seed, STEPS),
            cached_world(seed, kind, cached_engine, tmp_path, request),
            plain_process,
            url,
        )
    finally:
        cached_engine.dispose()


PG_SEEDS = [(40, "memory"), (41, "redis"), (42, "file")]


@pytest.mark.parametrize(("seed", "kind"), PG_SEEDS, ids=[f"pg-{kind}-{seed}" for seed, kind in PG_SEEDS])
def test_cached_reads_equal_uncached_reads_postgresql(seed, kind, postgres_url, tmp_path, request, plain_process):
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    names = [f"fz_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    with admin.connect() as conn:
        for name in names:
            conn.execute(text(f"CREATE DATABASE {name}"))
    urls = [make_url(postgres_url).set(database=name).render_as_string(hide_password=False) for name in names]
    engine = create_engine(urls[0])
    try:
        seed_db(engine)
        plain_seeding = create_engine(urls[1])
        seed_db(plain_seeding)
        plain_seeding.dispose()
        run_scenario(
            seed, draw_steps(seed, STEPS), cached_world(seed, kind, engine, tmp_path, request), plain_process, urls[1]
        )
    finally:
        engine.dispose()
        with admin.connect() as conn:
            for name in names:
                conn.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
        admin.dispose()


# -- what the fuzzer found ---------------------------------------------------------------------------------------


@pytest.fixture
def fz_engine(tmp_path):
    """A SQLite file with the fuzzer's models, seeded."""
    engine = sqlite_engine(tmp_path / "found.sqlite")
    seed_db(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def sql_of_fz(fz_engine) -> SQLCounter:
    return SQLCounter(fz_engine)


def test_a_local_entry_is_invalid_once_another_session_commits_a_write(fz_engine):
    # seed 0: a Session's local entry outlived another Session's commit to
    # its tables; the same read uncached (pysqlite, READ COMMITTED) shows it
    cache = SessionCache({"local": {"type": "ext:local_session"}}, secret=SECRET)
    Session = sessionmaker(fz_engine, info=cache.session_info())
    counts = select(Author.id, func.count(Book.id)).join(Book).group_by(Author.id).where(Author.id == 7)
    with Session() as reader, Session() as writer:
        assert cached_query(reader, counts).all() == [(7, 2)]
        writer.add(Book(id=100, title="new", pages=1, author_id=7))
        writer.commit()
        assert reader.execute(counts).all() == [(7, 3)]
        assert cached_query(reader, counts).all() == [(7, 3)]


def genre_names(session) -> list[str]:
    return cached_query(session, select(Genre.name).order_by(Genre.id), region="memory").scalars().all()


def test_a_released_savepoint_keeps_its_session_reading_around_shared_regions(fz_engine):
    # seed 13: releasing a savepoint (SQLAlchemy's ``after_commit`` fires for
    # it) made the Session forget it had written, and the shared region
    # served it rows without its own uncommitted writes
    cache = SessionCache({"memory": {"type": "memory"}}, secret=SECRET)
    Session = sessionmaker(fz_engine, info=cache.session_info())
    with Session() as session:
        assert genre_names(session) == ["genre 1", "genre 2", "genre 3", "genre 4"]
        session.execute(update(Genre).where(Genre.id == 1).values(name="first"))
        with session.begin_nested():
            session.execute(update(Genre).where(Genre.id == 2).values(name="second"))
        assert genre_names(session) == ["first", "second", "genre 3", "genre 4"]
        session.rollback()
        assert genre_names(session) == ["genre 1", "genre 2", "genre 3", "genre 4"]


def test_tables_declared_in_a_released_savepoint_are_published_when_the_transaction_commits(fz_engine):
    # the same cause: what ``invalidate_tables()`` declared was published at
    # the savepoint's release, then forgotten; a reader in between stored
    # the old rows again, served after the commit
    cache = SessionCache({"memory": {"type": "memory"}}, secret=SECRET)
    Session = sessionmaker(fz_engine, info=cache.session_info())
    with Session() as writer, Session() as reader:
        writer.execute(update(Book).where(Book.id == 1).values(pages=1))  # pysqlite begins
        with writer.begin_nested():
            cursor = writer.connection().connection.driver_connection.cursor()
            cursor.execute("UPDATE fz_genre SET name = 'unseen' WHERE id = 2")  # no listener sees it
            invalidate_tables(writer, "fz_genre")
        assert genre_names(reader) == ["genre 1", "genre 2", "genre 3", "genre 4"]
        writer.commit()
        assert genre_names(reader) == ["genre 1", "unseen", "genre 3", "genre 4"]


@pytest.mark.parametrize("entrance", ["FromCache option", "cached_query()"])
def test_a_shared_hit_begins_the_transaction_that_a_rollback_then_expires(fz_engine, entrance):
    # seed 128: a hit began no transaction (a plain Session has no
    # ``after_begin`` listener to join), so ``rollback()`` expired nothing and
    # the hit's objects kept values another Session's commit had changed
    cache = SessionCache({"memory": {"type": "memory"}}, secret=SECRET)
    Session = sessionmaker(fz_engine, info=cache.session_info())
    stmt = select(Author).where(Author.id == 4)

    def read(session):
        if entrance == "cached_query()":
            return cached_query(session, stmt, region="memory").scalar_one()
        return session.execute(stmt.options(FromCache("memory"))).scalar_one()

    with Session() as first:
        read(first)  # stored
    with Session() as reader, Session() as writer:
        author = read(reader)
        assert reader.in_transaction()
        writer.get(Author, 4).name = "renamed"
        writer.commit()
        reader.rollback()
        assert author.name == "renamed"


def test_a_local_hit_is_a_miss_once_an_object_its_eager_load_reached_is_expired(fz_engine, sql_of_fz):
    # seed 349: a local hit checked the objects of its rows, not those of
    # their eager loads: an expired book stayed expired, where the query
    # (its selectinload) refreshes it
    cache = SessionCache({"local": {"type": "ext:local_session"}}, secret=SECRET)
    Session = sessionmaker(fz_engine, info=cache.session_info())
    genres = select(Genre).options(selectinload(Genre.books)).order_by(Genre.id)
    with Session() as session:
        first = cached_query(session, genres).scalars().all()
        sql_of_fz.reset()
        assert cached_query(session, genres).scalars().all() == first
        assert sql_of_fz.count == 0
        book = session.get(Book, 1)
        session.expire(book)
        cached_query(session, genres).scalars().all()
        assert "title" in instance_state(book).dict


@pytest.mark.parametrize("pool", [StaticPool, SingletonThreadPool])
def test_a_shared_hit_is_not_served_over_a_connection_holding_another_sessions_writes(pool):
    # seed 50: with one DBAPI connection for every Session (SQLite in
    # memory), a Session sees another's uncommitted writes, and a hit
    # served it the rows from before them
    engine = create_engine("sqlite://", poolclass=pool, connect_args={"check_same_thread": False})
    seed_db(engine)
    cache = SessionCache({"memory": {"type": "memory"}}, secret=SECRET)
    Session = sessionmaker(engine, info=cache.session_info())
    pages = select(Book.pages).where(Book.id == 2)
    try:
        with Session() as reader:
            assert cached_query(reader, pages, region="memory").scalar_one() == 20  # stored
        # (closing a Session rolls the one connection back: the readers stay open)
        with Session() as writer, Session() as first, Session() as second, Session() as third:
            writer.execute(update(Book).where(Book.id == 2).values(pages=21))
            assert first.execute(pages).scalar_one() == 21  # the query sees it
            assert cached_query(second, pages, region="memory").scalar_one() == 21  # its first statement
            assert third.execute(pages.options(FromCache("memory"))).scalar_one() == 21
            writer.rollback()
        with Session() as reader:
            assert cached_query(reader, pages, region="memory").scalar_one() == 20
    finally:
        engine.dispose()


@pytest.mark.parametrize("pool", [StaticPool, SingletonThreadPool])
def test_a_local_entry_is_void_once_another_session_writes_on_the_one_connection(pool):
    # the same cause, ext:local_session: another Session's write, then its
    # rollback, change what the query reads on the one connection at once
    engine = create_engine("sqlite://", poolclass=pool, connect_args={"check_same_thread": False})
    seed_db(engine)
    cache = SessionCache({"local": {"type": "ext:local_session"}}, secret=SECRET)
    Session = sessionmaker(engine, info=cache.session_info())
    pages = select(Book.pages).where(Book.id == 2)
    try:
        with Session() as reader, Session() as writer:
            assert cached_query(reader, pages).scalar_one() == 20
            writer.execute(update(Book).where(Book.id == 2).values(pages=21))
            assert reader.execute(pages).scalar_one() == 21  # the query sees it
            assert cached_query(reader, pages).scalar_one() == 21
            writer.rollback()
            assert reader.execute(pages).scalar_one() == 20
            assert cached_query(reader, pages).scalar_one() == 20
    finally:
        engine.dispose()


def _parents_of_a_stale_author(fz_engine, loader, cached: bool, autoflush: bool = True):
    """Author 2 held with no parent, given parent 1 by another Session: what ``select(Author)`` with ``loader`` gives.

    Returns ``(parent_id, parent's id or None)``.
    """
    cache = SessionCache({"memory": {"type": "memory"}}, secret=SECRET)
    Session = sessionmaker(fz_engine, info=cache.session_info(), autoflush=autoflush)
    parents = select(Author).options(loader(Author.parent)).order_by(Author.id)
    with Session() as other:  # as seeded, whatever an earlier call did
        other.get(Author, 2).parent_id = None
        other.commit()
    with Session() as session:
        held = session.get(Author, 2)
        with Session() as other:
            other.get(Author, 2).parent_id = 1
            other.commit()
        with Session() as other:
            cached_query(other, parents, region="memory").scalars().all()  # stored, after the commit
        if cached:
            cached_query(session, parents, region="memory").scalars().all()
        else:
            session.execute(parents).scalars().all()
        return held.parent_id, None if held.parent is None else held.parent.id


@pytest.mark.parametrize("loader", [selectinload, joinedload], ids=["selectinload", "joinedload"])
def test_a_shared_hit_gives_a_held_objects_many_to_one_as_the_query_would(fz_engine, loader):
    # seed 2112 (selectinload, kind file or near): the Session loaded author 2
    # (no parent) before another Session gave it one; the query's
    # selectinload follows the foreign key the Session's object holds (None),
    # but the hit filled the relationship from the entry's row (parent 1).
    # joinedload takes the row (seed 2217): only the query can say, so it runs.
    uncached = _parents_of_a_stale_author(fz_engine, loader, cached=False)
    cached = _parents_of_a_stale_author(fz_engine, loader, cached=True)
    assert cached == uncached == ((None, None) if loader is selectinload else (None, 1))


def test_a_held_object_changed_without_a_flush_gets_its_many_to_one_as_the_query_gives_it(fz_engine):
    # the same disagreement made by the Session itself, autoflush off: the
    # held object's pending parent_id is not the entry's
    parents = select(Author).options(selectinload(Author.parent)).order_by(Author.id)

    def hold(session):
        held = session.get(Author, 3)
        held.parent_id = 1
        return held

    def parent(held):
        found = held.__dict__.get("parent", "unloaded")
        return None if found is None else getattr(found, "id", found)

    assert read_holding(fz_engine, parents, hold, parent, cached=True) == read_holding(
        fz_engine, parents, hold, parent, cached=False
    )


def test_a_held_object_that_agrees_with_the_entry_is_served_from_it(fz_engine, sql_of_fz):
    # the check must not turn every hit on a Session holding objects into a query
    cache = SessionCache({"memory": {"type": "memory"}}, secret=SECRET)
    Session = sessionmaker(fz_engine, info=cache.session_info())
    parents = select(Author).options(selectinload(Author.parent)).order_by(Author.id)
    with Session() as other:
        expected = [(a.id, a.parent_id, a.parent and a.parent.id) for a in other.execute(parents).scalars()]
    with Session() as other:
        cached_query(other, parents, region="memory").scalars().all()  # stored
    with Session() as session:
        held = session.get(Author, 2)
        sql_of_fz.reset()
        got = [
            (a.id, a.parent_id, a.parent and a.parent.id)
            for a in cached_query(session, parents, region="memory").scalars()
        ]
        assert sql_of_fz.count == 0
        assert got == expected
        assert held in session
