"""Session 19 (adversarial): the read side of the ORM, cached against uncached.

Each case runs one sequence of queries twice on equivalent fresh Sessions,
once uncached and once through a region (its entries made by another
Session first, so that the queries are hits), and compares what the
objects hold afterwards: values, what is loaded, unloaded or expired, what
each attribute gives on access (or raises) and the SQL it costs.
"""

from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy import JSON, Column, ForeignKey, Integer, String, Text, create_engine, inspect, select
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    MappedAsDataclass,
    composite,
    defer,
    deferred,
    joinedload,
    lazyload,
    load_only,
    mapped_column,
    query_expression,
    raiseload,
    relationship,
    selectinload,
    sessionmaker,
)

from pyramid_sessioncache import FromCache

from .conftest import SQLCounter


class Base(DeclarativeBase):
    pass


@dataclasses.dataclass
class Point:
    x: int
    y: int


class S19Toy(Base):
    __tablename__ = "s19_toy"
    id: Mapped[int] = mapped_column(primary_key=True)
    child_id: Mapped[int] = mapped_column(ForeignKey("s19_child.id"))
    name: Mapped[str] = mapped_column(String(50))
    colour: Mapped[str] = mapped_column(String(50))


class S19Child(Base):
    __tablename__ = "s19_child"
    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("s19_parent.id"))
    name: Mapped[str] = mapped_column(String(50))
    parent = relationship("S19Parent", back_populates="children")
    toys = relationship(S19Toy, order_by=S19Toy.id)


class S19Parent(Base):
    __tablename__ = "s19_parent"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    x: Mapped[int] = mapped_column(Integer)
    y: Mapped[int] = mapped_column(Integer)
    point = composite(Point, "x", "y")
    note = deferred(Column(Text))
    secret: Mapped[str] = mapped_column(Text, deferred=True, deferred_raiseload=True)
    expr = query_expression()
    children = relationship(S19Child, back_populates="parent", order_by=S19Child.id)


@pytest.fixture
def s19_engine(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 's19.sqlite'}")
    Base.metadata.create_all(engine)
    with sessionmaker(engine)() as session:
        for i in (1, 2, 3):
            session.add(
                S19Parent(
                    id=i,
                    name=f"p{i}",
                    x=i,
                    y=-i,
                    note=f"note {i}",
                    secret="s",
                    children=[
                        S19Child(id=10 * i + j, name=f"c{i}{j}", toys=[S19Toy(id=100 * i + j, name="t", colour="red")])
                        for j in range(i % 3)
                    ],
                )
            )
        session.commit()
    yield engine
    engine.dispose()


@pytest.fixture
def s19_sessions(s19_engine, cache):
    """(plain sessionmaker, caching sessionmaker, SQL counter)."""
    return sessionmaker(s19_engine), sessionmaker(s19_engine, info=cache.session_info()), SQLCounter(s19_engine)


def _entities(rows):
    found = []
    for row in rows:
        for value in row:
            if isinstance(value, Base) and all(value is not seen for seen in found):
                found.append(value)
    return found


def _states(objects):
    return [
        (
            type(obj).__name__,
            inspect(obj).identity,
            sorted(inspect(obj).unloaded),
            sorted(inspect(obj).expired_attributes),
        )
        for obj in objects
    ]


def _touch(objects, sql):
    """What reading every attribute of ``objects`` gives: (key, value or exception, SQL statements)."""
    seen = []
    for obj in objects:
        for attr in inspect(obj).mapper.attrs:
            sql.reset()
            try:
                value = getattr(obj, attr.key)
                value = [repr(v.id) for v in value] if isinstance(value, list) else repr(getattr(value, "id", value))
            except Exception as exc:
                value = type(exc).__name__
            seen.append((attr.key, value, sql.count))
    return seen


def _run(Session, sql, statements, option=()):
    """Run ``statements`` in order in one new Session; what the last one's objects hold, then give on access."""
    with Session() as session:
        kept = []
        for statement in statements:
            rows = session.execute(statement.options(*option)).unique().all()
            kept.append(rows)
        objects = _entities(rows)
        held = _states(objects)
        return held, _touch(objects, sql)


def _compare(s19_sessions, statements, region="memory"):
    plain, caching, sql = s19_sessions
    for statement in statements:  # the entries, made by another Session
        _run(caching, sql, [statement], (FromCache(region),))
    uncached = _run(plain, sql, statements)
    assert _run(caching, sql, statements, (FromCache(region),)) == uncached


PARENTS = select(S19Parent).order_by(S19Parent.id)


# 1. Loaders a query's options give, on objects the Session already holds -------------------------------


@pytest.mark.parametrize(
    "options",
    [
        pytest.param((raiseload("*"),), id="raiseload-star"),
        pytest.param((load_only(S19Parent.name, raiseload=True),), id="load_only-raiseload"),
        pytest.param((defer(S19Parent.x, raiseload=True), defer(S19Parent.note, raiseload=True)), id="defer-raiseload"),
        pytest.param((load_only(S19Parent.name),), id="load_only"),
    ],
)
def test_a_hit_gives_its_loaders_to_objects_the_session_holds(s19_sessions, options):
    """The Session loaded the objects first: the cached query's loaders still apply to what they have not loaded.

    Uncached, an object already in the identity map takes the query's
    per-object loaders for what it has not loaded (``raiseload`` raises);
    a shared hit left them out, and the attribute loaded silently.
    """
    _compare(s19_sessions, [select(S19Parent).where(S19Parent.id == 1), PARENTS.options(*options)])


# 2. Loaded state: unloaded is not expired ------------------------------------------------------------------


def test_deferred_columns_of_a_shared_hit_are_unloaded_not_expired(s19_sessions):
    """A deferred() column a hit lacks is unloaded, as uncached: not expired.

    Expired, it made every object of the hit one that ``ext:local_session``
    refuses (a local look-up over them missed every time, SQL each run).
    """
    plain, caching, sql = s19_sessions
    _compare(s19_sessions, [PARENTS])
    with caching() as session:
        held = session.execute(PARENTS.options(FromCache("memory"))).scalars().all()
        assert all(not inspect(obj).expired_attributes for obj in held)
        session.execute(PARENTS.options(FromCache("local"))).scalars().all()
        sql.reset()
        assert session.execute(PARENTS.options(FromCache("local"))).scalars().all() == held
        assert sql.count == 0


def test_an_expired_object_refilled_by_a_hit_keeps_its_composite_loaded(s19_sessions):
    """A hit refilling an expired object: what its ``refresh`` event fills (a composite) is loaded, as uncached."""
    plain, caching, sql = s19_sessions

    def expired_then_read(Session, option):
        with Session() as session:
            obj = session.get(S19Parent, 1)
            session.expire(obj)
            session.execute(PARENTS.options(*option)).scalars().all()
            return _states([obj]), _touch([obj], sql)

    _run(caching, sql, [PARENTS], (FromCache("memory"),))
    assert expired_then_read(caching, (FromCache("memory"),)) == expired_then_read(plain, ())


# 3. The loader path of eager-loaded objects ----------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        pytest.param(
            select(S19Child).options(joinedload(S19Child.parent).load_only(S19Parent.name)).order_by(S19Child.id),
            id="joined-load_only-then-a-deferred-column",
        ),
        pytest.param(
            PARENTS.options(selectinload(S19Parent.children).defaultload(S19Child.toys).load_only(S19Toy.name)),
            id="selectin-then-a-lazy-load-with-its-options",
        ),
    ],
)
def test_objects_a_hit_loaded_eagerly_keep_their_loader_path(s19_sessions, statement):
    """An object a query loaded through a relationship keeps that path: its own loads take the options aimed there.

    Given the path of its class alone, a parent loaded with
    ``joinedload(...).load_only(...)`` raised an AssertionError when a column
    it had not loaded was read, and options aimed at its relationships
    were not applied (the toys loaded every column).
    """
    plain, caching, sql = s19_sessions

    def loaded(Session, option):
        with Session() as session:
            rows = session.execute(statement.options(*option)).scalars().all()
            objects = _entities([(row,) for row in rows])
            reached = objects + [toy for obj in objects for child in getattr(obj, "children", ()) for toy in child.toys]
            reached += [obj.parent for obj in objects if isinstance(obj, S19Child)]
            return _states(reached), _touch(reached, sql)

    _run(caching, sql, [statement], (FromCache("memory"),))
    assert loaded(caching, (FromCache("memory"),)) == loaded(plain, ())


# 4. .unique() tells objects apart by identity, as the ORM does --------------------------------------------


class DataclassBase(MappedAsDataclass, DeclarativeBase):
    pass


class S19Card(DataclassBase):
    """``MappedAsDataclass``: ``__eq__`` by value, so ``__hash__`` is None: instances are unhashable."""

    __tablename__ = "s19_card"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    data: Mapped[dict] = mapped_column(JSON)
    marks: Mapped[list[S19Mark]] = relationship(default_factory=list, order_by="S19Mark.id")


class S19Mark(DataclassBase):
    __tablename__ = "s19_mark"
    id: Mapped[int] = mapped_column(primary_key=True)
    card_id: Mapped[int] = mapped_column(ForeignKey("s19_card.id"), default=None)


class S19Named(Base):
    """Equal (and hashed alike) by name: two rows of one name are two objects all the same."""

    __tablename__ = "s19_named"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))

    def __eq__(self, other):
        return isinstance(other, S19Named) and other.name == self.name

    def __hash__(self):
        return hash(self.name)


CARDS = select(S19Card).order_by(S19Card.id)
READS = {
    "unique-scalars": lambda session, option: session.execute(CARDS.options(*option)).unique().scalars().all(),
    "joined-unique": lambda session, option: (
        session.execute(CARDS.options(joinedload(S19Card.marks), *option)).unique().scalars().all()
    ),
    "entity-and-column": lambda session, option: (
        session.execute(select(S19Card, S19Card.name).order_by(S19Card.id).options(*option)).unique().all()
    ),
    "columns-unique": lambda session, option: (
        session.execute(select(S19Card.name, S19Card).order_by(S19Card.id).options(*option))
        .columns(1, 0)
        .unique()
        .all()
    ),
    "legacy-query": lambda session, option: session.query(S19Card).options(*option).order_by(S19Card.id).all(),
    "legacy-query-json": lambda session, option: (
        session.query(S19Card, S19Card.data).options(*option).order_by(S19Card.id).all()
    ),
    "json-unique": lambda session, option: (
        session.execute(select(S19Card.data).order_by(S19Card.id).options(*option)).unique().all()
    ),
    "equal-by-name": lambda session, option: (
        session.execute(select(S19Named).order_by(S19Named.id).options(*option)).unique().scalars().all()
    ),
}


@pytest.mark.parametrize("region", ["local", "memory", "file"])
@pytest.mark.parametrize("read", list(READS))
def test_unique_tells_objects_apart_by_identity(s19_engine, cache, read, region):
    """``.unique()`` on a hit uniques as uncached: objects by identity, a JSON value as the ORM says.

    A hit's rows were hashed by value: a dataclass's objects (unhashable)
    raised TypeError, even from a legacy ``Query`` (which uniques every
    result of entities), and two objects equal by value were made one.
    """
    DataclassBase.metadata.create_all(s19_engine)
    with sessionmaker(s19_engine)() as session:
        session.add_all([S19Card(id=1, name="same", data={"a": 1}, marks=[S19Mark(id=1), S19Mark(id=2)])])
        session.add_all([S19Card(id=2, name="same", data={"a": 1}), S19Named(id=1, name="n"), S19Named(id=2, name="n")])
        session.commit()
    caching = sessionmaker(s19_engine, info=cache.session_info())

    def outcome(Session, option):
        with Session() as session:
            try:
                rows = [row if hasattr(row, "_mapping") else (row,) for row in READS[read](session, option)]
            except Exception as exc:
                return type(exc).__name__
            ids = [[v.id if isinstance(v, (Base, DataclassBase)) else v for v in row] for row in rows]
            return [row[0] if len(row) == 1 else row for row in ids]

    expected = outcome(sessionmaker(s19_engine), ())
    assert outcome(caching, (FromCache(region),)) == expected  # a miss
    assert outcome(caching, (FromCache(region),)) == expected  # a hit (shared regions)


# 5. Loaders that do not survive pickling -----------------------------------------------------------------


@pytest.mark.parametrize("region", ["memory", "file"])
@pytest.mark.parametrize("held", [False, True], ids=["new-objects", "objects-the-session-holds"])
def test_a_lazy_load_with_criteria_never_loses_them(s19_sessions, region, held):
    """``lazyload(rel.and_(...))``: each object's lazy load keeps the criteria, from every region.

    The ORM drops them when it pickles an object's lazy loader (with a
    warning): from a file or Redis region, the lazy load returned every
    row, those the criteria leave out included.  Such a result is not
    stored where values are pickled.
    """
    statement = PARENTS.options(lazyload(S19Parent.children.and_(S19Child.id > 20)))
    _compare(s19_sessions, ([PARENTS] if held else []) + [statement], region)


# 6. always_refresh ---------------------------------------------------------------------------------------


class S19Refreshed(Base):
    """A class whose every query overwrites what the Session holds (``always_refresh``, a legacy mapper flag)."""

    __tablename__ = "s19_refreshed"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("s19_owner.id"))
    __mapper_args__ = {"always_refresh": True}


class S19Owner(Base):
    __tablename__ = "s19_owner"
    id: Mapped[int] = mapped_column(primary_key=True)
    refreshed = relationship(S19Refreshed, order_by=S19Refreshed.id)


@pytest.mark.parametrize("region", ["local", "memory", "file"])
@pytest.mark.parametrize("how", ["the class itself", "loaded eagerly through another"])
def test_always_refresh_overwrites_pending_changes_as_uncached(s19_engine, cache, region, how):
    """Uncached, a query reaching an ``always_refresh`` class overwrites the Session's pending change: so does a cached one.

    Such a query runs uncached (as ``populate_existing()`` does), and what
    reached such objects is never stored.
    """
    with sessionmaker(s19_engine)() as session:
        session.add(S19Owner(id=1, refreshed=[S19Refreshed(id=1, name="stored")]))
        session.commit()
    caching = sessionmaker(s19_engine, info=cache.session_info(), autoflush=False)
    if how == "the class itself":
        statement = select(S19Refreshed).where(S19Refreshed.id == 1)
    else:
        statement = select(S19Owner).where(S19Owner.id == 1).options(selectinload(S19Owner.refreshed))

    def name_after_query(Session, option):
        with Session() as session:
            obj = session.get(S19Refreshed, 1)
            obj.name = "pending"
            session.execute(statement.options(*option)).scalars().all()
            obj.name = "pending again"
            session.execute(statement.options(*option)).scalars().all()  # a second time: a hit, if stored
            return obj.name

    uncached = name_after_query(sessionmaker(s19_engine, autoflush=False), ())
    assert uncached == "stored"
    for _ in range(2):
        assert name_after_query(caching, (FromCache(region),)) == uncached
