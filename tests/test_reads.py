"""An entry depends on every table its result came from: what the load actually executed.

Each case warms a shared region, writes to a table the query reads without
naming it in its FROM list, commits, and compares the cache with an
uncached run of the same query.
"""

from __future__ import annotations

import pytest
from sqlalchemy import (
    ForeignKey,
    String,
    column,
    create_engine,
    event,
    func,
    insert,
    literal_column,
    select,
    text,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    column_property,
    joinedload,
    mapped_column,
    query_expression,
    relationship,
    selectinload,
    sessionmaker,
    subqueryload,
    with_expression,
    with_loader_criteria,
)
from sqlalchemy.sql.functions import GenericFunction

from pyramid_sessioncache import FromCache, SessionCache, cache_parameters
from pyramid_sessioncache.engine.invalidation.reads import ANY_TABLE, ShapeTables

from .conftest import SECRET, SQLCounter


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "r_note"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(50))


class Block(Base):
    __tablename__ = "r_block"
    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int] = mapped_column()


class Child(Base):
    __tablename__ = "r_child"
    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("r_parent.id"))
    name: Mapped[str] = mapped_column(String(50))


class Parent(Base):
    __tablename__ = "r_parent"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    children: Mapped[list[Child]] = relationship(order_by=Child.id)
    child_count: Mapped[int] = column_property(
        select(func.count(Child.id)).where(Child.parent_id == id).correlate_except(Child).scalar_subquery()
    )
    expr: Mapped[int | None] = query_expression()


class Vip(Base):
    """A table of one column: SQLite reads it in ``x IN r_vip``."""

    __tablename__ = "r_vip"
    id: Mapped[int] = mapped_column(primary_key=True)


# A relationship whose secondary is a join of three tables (SQLAlchemy's "composite secondary join").
class Holder(Base):
    __tablename__ = "r_holder"
    id: Mapped[int] = mapped_column(primary_key=True)
    link_id: Mapped[int] = mapped_column(ForeignKey("r_link.id"))
    target = relationship(
        "Target",
        secondary=lambda: Link.__table__.join(Target.__table__, Link.target_id == Target.id).join(
            Pin.__table__, Pin.target_id == Target.id
        ),
        primaryjoin="and_(Holder.link_id == Link.id, Holder.id == Pin.holder_id)",
        secondaryjoin="Target.id == Link.target_id",
        uselist=False,
        viewonly=True,
    )


class Link(Base):
    __tablename__ = "r_link"
    id: Mapped[int] = mapped_column(primary_key=True)
    target_id: Mapped[int] = mapped_column(ForeignKey("r_target.id"))


class Pin(Base):
    __tablename__ = "r_pin"
    id: Mapped[int] = mapped_column(primary_key=True)
    holder_id: Mapped[int] = mapped_column(ForeignKey("r_holder.id"))
    target_id: Mapped[int] = mapped_column(ForeignKey("r_target.id"))


class Target(Base):
    __tablename__ = "r_target"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(20))


def shout(value):
    return value.upper()


@pytest.fixture
def rengine(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'reads.sqlite'}")
    event.listen(engine, "connect", lambda dbapi, record: dbapi.create_function("r_shout", 1, shout))
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(Parent), [{"id": i, "name": f"parent {i}"} for i in (1, 2, 3)])
        conn.execute(insert(Child), [{"id": i, "parent_id": 1 + i % 2, "name": f"child {i}"} for i in range(1, 5)])
        conn.execute(insert(Note), [{"id": 1, "text": "one"}])
        conn.execute(insert(Vip), [{"id": 1}])
        conn.execute(insert(Target), [{"id": 1, "name": "target one"}, {"id": 2, "name": "target two"}])
        conn.execute(insert(Link), [{"id": 1, "target_id": 1}])
        conn.execute(insert(Holder), [{"id": 1, "link_id": 1}])
        conn.execute(insert(Pin), [{"id": 1, "holder_id": 1, "target_id": 1}])
    yield engine
    engine.dispose()


@pytest.fixture
def rcache(region_options, region):
    return SessionCache(region_options, default_region=region, secret=SECRET)


@pytest.fixture
def RSession(rengine, rcache):
    return sessionmaker(bind=rengine, info=rcache.session_info())


def shape(row) -> tuple:
    """What a row shows, objects and what they hold included."""
    out = []
    for value in row:
        if isinstance(value, Parent):
            children = [c.name for c in value.children] if "children" in value.__dict__ else None  # loaded only
            out.append((value.id, value.name, value.child_count, value.expr, children))
        elif isinstance(value, Child):
            out.append((value.id, value.name))
        else:
            out.append(value)
    return tuple(out)


def run(Session_, stmt, region=None) -> list[tuple]:
    with Session_() as session:
        if region is not None:
            stmt = stmt.options(FromCache(region))
        return [shape(row) for row in session.execute(stmt).unique().all()]


BLOCKED = select(Block.parent_id).scalar_subquery()

QUERIES = {
    "column_property": (select(Parent).order_by(Parent.id), "child"),
    "with_expression": (
        select(Parent).options(with_expression(Parent.expr, select(func.count(Note.id)).scalar_subquery())),
        "note",
    ),
    "with_loader_criteria": (
        select(Child).order_by(Child.id).options(with_loader_criteria(Child, Child.parent_id.not_in(BLOCKED))),
        "block",
    ),
    "joinedload, empty at first": (
        select(Parent).where(Parent.id == 3).options(joinedload(Parent.children)),
        "child for 3",
    ),
    "selectinload, empty at first": (
        select(Parent).where(Parent.id == 3).options(selectinload(Parent.children)),
        "child for 3",
    ),
    "subqueryload": (select(Parent).order_by(Parent.id).options(subqueryload(Parent.children)), "child"),
    "a textual FROM": (select(column("id"), column("name")).select_from(text("r_child")).order_by(text("id")), "child"),
    "a textual WHERE: x IN table": (select(Parent.id, Parent.name).where(text("r_parent.id IN r_vip")), "vip"),
    "a textual WHERE: x IN quoted table": (select(Parent.id).where(text('r_parent.id IN main."r_vip"')), "vip"),
}

WRITES = {
    "child": "INSERT INTO r_child (id, parent_id, name) VALUES (10, 1, 'new')",
    "child for 3": "INSERT INTO r_child (id, parent_id, name) VALUES (11, 3, 'late')",
    "note": "INSERT INTO r_note (id, text) VALUES (2, 'two')",
    "block": "INSERT INTO r_block (id, parent_id) VALUES (1, 1)",
    "vip": "INSERT INTO r_vip (id) VALUES (2)",
}


@pytest.mark.parametrize("case", QUERIES)
def test_a_write_to_any_table_the_load_read_invalidates(RSession, rengine, region, case):
    stmt, write = QUERIES[case]
    uncached = sessionmaker(bind=rengine)
    for _ in range(2):
        assert run(RSession, stmt, region) == run(uncached, stmt)
    sql = SQLCounter(rengine)
    run(RSession, stmt, region)
    assert sql.count == 0, "the case must be served from the cache before the write"
    before = run(uncached, stmt)
    with rengine.begin() as conn:
        conn.exec_driver_sql(WRITES[write])
    after = run(uncached, stmt)
    assert after != before, "the write must change what the query returns"
    assert run(RSession, stmt, region) == after


def test_criteria_added_by_a_listener_count(rengine, rcache, region):
    Scoped = sessionmaker(bind=rengine, info=rcache.session_info())

    @event.listens_for(Scoped, "do_orm_execute")
    def hide_blocked(state):
        if state.is_select:
            state.statement = state.statement.options(with_loader_criteria(Child, Child.parent_id.not_in(BLOCKED)))

    stmt = select(Child).order_by(Child.id)
    plain = sessionmaker(bind=rengine)
    expected = run(plain, stmt.options(with_loader_criteria(Child, Child.parent_id.not_in(BLOCKED))))
    for _ in range(3):
        assert run(Scoped, stmt, region) == expected
    with rengine.begin() as conn:
        conn.exec_driver_sql(WRITES["block"])
    expected = run(plain, stmt.options(with_loader_criteria(Child, Child.parent_id.not_in(BLOCKED))))
    assert run(Scoped, stmt, region) == expected


@pytest.mark.parametrize("loader", [selectinload, joinedload, subqueryload])
def test_a_cold_eager_load_shape_is_stored_on_its_first_miss(RSession, rengine, region, loader):
    stmt = select(Parent).order_by(Parent.id).options(loader(Parent.children))
    expected = run(sessionmaker(bind=rengine), stmt)
    assert run(RSession, stmt, region) == expected  # the first miss of this shape in this cache
    sql = SQLCounter(rengine)
    assert run(RSession, stmt, region) == expected
    assert sql.count == 0


def test_the_shape_memo_forgets_one_shape_at_a_time():
    shapes = ShapeTables(size=3)
    for name in "abc":
        shapes.learn(name, [name])
    assert shapes.get("a") == ("*", "a")  # used: now the most recent
    shapes.learn("d", ["d"])
    assert shapes.get("b") is None and shapes.get("a") is not None and len(shapes) == 3


class r_shout(GenericFunction):
    """A function of the application's database (``rengine`` defines it), declared to type its result."""

    type = String()
    inherit_cache = True


#: Statements and whether their entries depend on every table (:data:`ANY_TABLE`).
FRAGMENTS = {
    "text(), a comparison": (select(Parent.id).where(text("r_parent.name = :n").bindparams(n="parent 1")), False),
    "text(), a built-in function": (select(Parent.id).where(text("lower(r_parent.name) = 'parent 1'")), False),
    "text(), IN a list": (select(Parent.id).where(text("r_parent.id IN (1, 2)")), False),
    "text(), a cast": (select(Parent.id).where(text("CAST(r_parent.id AS varchar(10)) = '1'")), False),
    "text(), words in strings": (select(Parent.id).where(text("r_parent.name <> 'f(x) from y'")), False),
    "literal_column(), a number": (select(Parent.id, literal_column("1")), False),
    "literal_column(), count(*)": (select(literal_column("count(*)")).select_from(Parent), False),
    "func.count()": (select(func.count(Parent.id)), False),
    "text(), a function of the database": (select(Parent.id).where(text("r_shout(r_parent.name) = 'PARENT 1'")), True),
    "literal_column(), a function of the database": (select(Parent.id, literal_column("r_shout(r_parent.name)")), True),
    "a GenericFunction the application declares": (select(Parent.id, r_shout(Parent.name)), True),
    "text(), a quoted function name": (select(Parent.id).where(text("\"r_shout\"(r_parent.name) = 'PARENT 1'")), True),
}


@pytest.mark.parametrize("case", FRAGMENTS)
def test_sql_text_depends_on_every_table_only_when_it_may_read_one(RSession, rengine, region, case):
    stmt, opaque = FRAGMENTS[case]
    stmt = stmt.options(FromCache(region))
    with RSession() as session:
        session.execute(stmt).all()
        beaker_cache, key = cache_parameters(stmt, session=session)
    assert (ANY_TABLE in beaker_cache.get(key).tables) is opaque


@pytest.mark.parametrize("loader", [joinedload, selectinload])
def test_a_relationship_through_a_composite_secondary_join(RSession, rengine, region, loader):
    stmt = select(Holder).options(loader(Holder.target))

    def targets(Session_, region=None):
        with Session_() as session:
            query = stmt if region is None else stmt.options(FromCache(region))
            return [(h.id, h.target.name if h.target else None) for h in session.scalars(query).unique().all()]

    uncached = sessionmaker(bind=rengine)
    assert targets(RSession, region) == targets(uncached) == [(1, "target one")]
    sql = SQLCounter(rengine)
    assert targets(RSession, region) == [(1, "target one")]
    assert sql.count == 0, "a hit"
    with rengine.begin() as conn:  # a table only the secondary join reads
        conn.exec_driver_sql("UPDATE r_link SET target_id = 2 WHERE id = 1")
    assert targets(RSession, region) == targets(uncached) == [(1, None)]
