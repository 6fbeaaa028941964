"""Attack s33-b: how cached results are consumed and shaped.

Every cached read here is compared with the same statement run uncached
(``conftest.truth()`` or a plain Session on the same database), on the
miss that stores it and on the hit that follows, in ``ext:local_session``,
``memory``, ``file`` and ``ext:redis``; a hit is proved by counting SQL.
A caller that reads part of a miss (``.first()``, ``fetchone()``, a
``break``, an exception) must leave an entry that gives every row; a
Result must be read as the uncached one is (by column, by entity, by
label, in partitions); values must come back of the same types and
values, and never as another caller left them.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import gc

import pytest
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Enum,
    ForeignKey,
    Integer,
    LargeBinary,
    Numeric,
    PickleType,
    String,
    Text,
    TypeDecorator,
    bindparam,
    event,
    func,
    lambda_stmt,
    literal_column,
    select,
    text,
    tuple_,
    union_all,
)
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Result
from sqlalchemy.orm import (
    Bundle,
    DeclarativeBase,
    Mapped,
    aliased,
    column_property,
    deferred,
    joinedload,
    load_only,
    mapped_column,
    relationship,
    selectin_polymorphic,
    selectinload,
    sessionmaker,
    undefer,
    with_loader_criteria,
    with_polymorphic,
)
from sqlalchemy.orm import Session as PlainSession

from pyramid_sessioncache import FromCache, SessionCache, cached_query

from .conftest import SECRET, SQLCounter, truth, use_region
from .models import Address, Person

REGIONS = ["local", "memory", "file", "redis", "near"]


@pytest.fixture(params=REGIONS)
def reg(request) -> str:
    """Each region in turn: ``ext:local_session``, ``memory``, ``file``, ``ext:redis``, ``ext:redis`` with a near cache."""
    return request.param


@pytest.fixture
def Sess(request, engine, reg, region_options):
    """A sessionmaker caching into a cache that has region ``reg`` (Redis started when asked for)."""
    if reg == "near":
        region_options["near"] = {"type": "ext:redis", "url": request.getfixturevalue("redis_url"), "near": True}
    else:
        use_region(request, region_options, reg)
    cache = SessionCache(region_options, default_region="local", secret=SECRET)
    yield sessionmaker(bind=engine, info=cache.session_info())
    cache.close()


def _through(session, statement, region: str, entrance: str):
    if entrance == "cached_query()":
        return cached_query(session, statement, region)
    return session.execute(statement.options(FromCache(region)))


def check_served(engine, Sess, reg, statement, use, entrance="FromCache option"):
    """``use(result)`` of ``statement`` read through ``reg``: equal to uncached on the miss and on the hits, which send no SQL."""
    with PlainSession(engine) as plain:
        expected = use(plain.execute(statement))
    with Sess() as session:
        assert use(_through(session, statement, reg, entrance)) == expected  # the miss that stores
        with SQLCounter(engine) as sql:
            assert use(_through(session, statement, reg, entrance)) == expected  # a hit
        assert sql.count == 0, sql.statements
    if reg != "local":
        with Sess() as session, SQLCounter(engine) as sql:
            assert use(_through(session, statement, reg, entrance)) == expected  # a hit in another Session
        assert sql.count == 0, sql.statements


def ent(obj):
    """An ORM object as plain data: class and primary key (None stays None)."""
    return None if obj is None else (type(obj).__name__, sa_inspect(obj).identity)


# --- Defects ---------------------------------------------------------------------------------

PERSON = Person.__table__
_OTHER = aliased(Person)

#: Statements, and how a caller reads their rows by what they select rather than by name.
BY_ELEMENT = {
    "row._mapping[Entity]": (
        lambda: select(Person, Address.street).join(Person.addresses).where(Person.id <= 2).order_by(Address.id),
        lambda result: [(ent(m[Person]), m[Address.street]) for m in result.mappings()],
    ),
    "row._mapping[Class.attr]": (
        lambda: select(Person.id, Person.name).where(Person.id <= 3).order_by(Person.id),
        lambda result: [row._mapping[Person.name] for row in result],
    ),
    "Result.columns(Class.attr)": (
        lambda: select(Person.id, Person.name).where(Person.id <= 3).order_by(Person.id),
        lambda result: [tuple(row) for row in result.columns(Person.name, Person.id)],
    ),
    "Result.scalars(Class.attr)": (
        lambda: select(Person.id, Person.name).where(Person.id <= 3).order_by(Person.id),
        lambda result: result.scalars(Person.name).all(),
    ),
    "row._mapping[aliased(Class)]": (
        lambda: select(Person, _OTHER).join(_OTHER, _OTHER.id == Person.id + 1).where(Person.id <= 2),
        lambda result: [(ent(m[Person]), ent(m[_OTHER])) for m in result.mappings()],
    ),
    "row._mapping[table.c.col] (Core)": (
        lambda: select(PERSON.c.id, PERSON.c.name).where(PERSON.c.id <= 3).order_by(PERSON.c.id),
        lambda result: [row._mapping[PERSON.c.name] for row in result],
    ),
    "Class.attr in row._mapping": (
        lambda: select(Person.id, Person.name).where(Person.id <= 3).order_by(Person.id),
        lambda result: [Person.name in row._mapping for row in result],
    ),
}


@pytest.mark.parametrize("shape", BY_ELEMENT)
def test_a_row_is_read_by_the_entity_or_column_it_selects(engine, Sess, reg, shape):
    """A cached Result is read by the entities and columns it selects, as the uncached one is."""
    make, use = BY_ELEMENT[shape]
    check_served(engine, Sess, reg, make(), use)


@pytest.mark.parametrize("kind", ["aliased(Class)", "label"])
def test_a_hit_is_read_by_the_objects_of_its_own_statement_not_those_that_stored_it(engine, Sess, reg, kind):
    """A new ``aliased()`` or label per statement: each hit's rows are found by its own statement's objects."""

    def made():
        if kind == "label":
            label = Person.name.label("n")
            return select(label).where(Person.id <= 2).order_by(Person.id), label
        alias = aliased(Person)
        return select(alias).where(alias.id <= 2).order_by(alias.id), alias

    statement, element = made()
    expected = [row._mapping[element] for row in PlainSession(engine).execute(statement)]
    expected = [ent(value) if kind != "label" else value for value in expected]
    with Sess() as session:
        for call in range(3):
            statement, element = made()
            with SQLCounter(engine) as sql:
                rows = _through(session, statement, reg, "cached_query()").all()
            assert [
                ent(row._mapping[element]) if kind != "label" else row._mapping[element] for row in rows
            ] == expected
            assert call == 0 or sql.count == 0, sql.statements  # hits after the first


def test_sql_text_rows_are_read_by_the_columns_given_to_it(engine, Sess, reg):
    """``text().columns(person.c.id, person.c.name)``: its rows are read by those columns, as uncached."""
    statement = text("SELECT id, name FROM person WHERE id <= 3 ORDER BY id").columns(PERSON.c.id, PERSON.c.name)
    check_served(engine, Sess, reg, statement, lambda r: [row._mapping[PERSON.c.name] for row in r], "cached_query()")


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: text("SELECT id, name FROM person WHERE id <= 3"), id="text()"),
        pytest.param(lambda: select(PERSON.c.id).where(PERSON.c.id <= 3), id="select(table.c.id)"),
    ],
)
def test_a_core_read_gives_a_result_of_the_same_rows(engine, Sess, reg, make):
    """A Core or SQL text read gives a ``Result`` of the same rows; not the driver's ``CursorResult`` (docs/hits.md)."""
    check_served(engine, Sess, reg, make(), lambda r: (isinstance(r, Result), r.keys(), r.all()), "cached_query()")


# --- Extra models: value types, inheritance, deferred columns -----------------------------------


class XBase(DeclarativeBase):
    pass


class Color(enum.Enum):
    red = "r"
    blue = "b"


class UTCDateTime(TypeDecorator):
    """A timezone-aware datetime stored as naive UTC (SQLite keeps no zone)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else value.astimezone(datetime.timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value, dialect):
        return None if value is None else value.replace(tzinfo=datetime.timezone.utc)


#: What :class:`Flaky` raises on: the value it is set to, or None.
FAIL_ON: dict[str, str | None] = {"value": None}


class Flaky(TypeDecorator):
    """A string whose result processor raises on one chosen value: a load that fails half way."""

    impl = String
    cache_ok = True

    def process_result_value(self, value, dialect):
        if value is not None and value == FAIL_ON["value"]:
            raise ValueError(f"cannot read {value}")
        return value


class Doc(XBase):
    __tablename__ = "x_doc"
    id: Mapped[int] = mapped_column(primary_key=True)
    data = Column(JSON)
    pickled = Column(PickleType)
    amount = Column(Numeric(10, 2))
    blob = Column(LargeBinary)
    when = Column(UTCDateTime)
    color = Column(Enum(Color))
    label = Column(Flaky(20))


class Employee(XBase):
    __tablename__ = "x_employee"
    id: Mapped[int] = mapped_column(primary_key=True)
    type: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_on": "type", "polymorphic_identity": "employee"}


class Engineer(Employee):
    __tablename__ = "x_engineer"
    id: Mapped[int] = mapped_column(ForeignKey("x_employee.id"), primary_key=True)
    language: Mapped[str] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_identity": "engineer"}


class Manager(Employee):
    __tablename__ = "x_manager"
    id: Mapped[int] = mapped_column(ForeignKey("x_employee.id"), primary_key=True)
    budget: Mapped[int] = mapped_column(Integer)
    __mapper_args__ = {"polymorphic_identity": "manager"}


class Thing(XBase):
    __tablename__ = "x_thing"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "thing"}


class Gadget(Thing):
    volts: Mapped[int] = mapped_column(Integer, nullable=True)
    __mapper_args__ = {"polymorphic_identity": "gadget"}


class Post(XBase):
    __tablename__ = "x_post"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(20))
    body = deferred(Column(Text))
    comments = relationship("Comment", order_by="Comment.id", back_populates="post")


class Comment(XBase):
    __tablename__ = "x_comment"
    id: Mapped[int] = mapped_column(primary_key=True)
    post_id: Mapped[int] = mapped_column(ForeignKey("x_post.id"))
    text: Mapped[str] = mapped_column(String(20))
    post = relationship(Post, back_populates="comments")


Post.comment_count = column_property(
    select(func.count(Comment.id)).where(Comment.post_id == Post.id).correlate_except(Comment).scalar_subquery()
)


class DictBundle(Bundle):
    """A Bundle whose values are dicts: a mutable value the ORM makes per row."""

    def create_row_processor(self, query, procs, labels):
        def proc(row):
            return dict(zip(labels, (p(row) for p in procs), strict=True))

        return proc


@pytest.fixture
def extra(engine):
    """The extra tables, created and filled in the test's database."""
    XBase.metadata.create_all(engine)
    with PlainSession(engine) as session:
        for i in range(1, 5):
            session.add(
                Doc(
                    id=i,
                    data={"tags": [i], "n": i},
                    pickled={"set": {i}},
                    amount=decimal.Decimal("1.25") * i,
                    blob=bytes(range(i)),
                    when=datetime.datetime(2024, 1, i, 12, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
                    color=Color.red if i % 2 else Color.blue,
                    label=f"label {i}",
                )
            )
            session.add(Post(id=i, title=f"t{i}", body=f"body {i}", comments=[]))
            session.add_all(Comment(id=10 * i + j, post_id=i, text=f"c{i}{j}") for j in range(i))
        session.add_all(
            [
                Engineer(id=1, name="e1", language="py"),
                Manager(id=2, name="m1", budget=5),
                Employee(id=3, name="x"),
                Engineer(id=4, name="e2", language="c"),
            ]
        )
        session.add_all([Thing(id=1), Gadget(id=2, volts=3), Gadget(id=3, volts=9)])
        session.commit()
    return engine


#: Statements of a value that a caller may change in place, and how to change what it got.
CHANGEABLE = {
    "select(Doc.data)": (lambda: select(Doc.data).where(Doc.id == 1), lambda r: r.scalar_one()["tags"].append(99)),
    "select(Doc.pickled)": (lambda: select(Doc.pickled).where(Doc.id == 1), lambda r: r.scalar_one()["set"].add(99)),
    "select(Doc, Doc.data)": (
        lambda: select(Doc, Doc.data).where(Doc.id == 1),
        lambda r: r.one()[1]["tags"].append(99),
    ),
    "a Bundle of dicts": (
        lambda: select(DictBundle("b", Doc.id, Doc.label)).where(Doc.id == 1),
        lambda r: r.scalar_one().update(label="changed"),
    ),
}


@pytest.mark.parametrize("shape", CHANGEABLE)
@pytest.mark.parametrize("reg", ["local", "memory", "file", "redis", "near"])
def test_a_value_changed_in_place_by_its_reader_is_not_what_the_next_hit_gives(extra, Sess, reg, shape):
    """A non-entity column value the caller changed in place never reaches the next hit of the same statement."""
    make, change = CHANGEABLE[shape]
    statement = make()
    expected = [tuple(_plain(v) for v in row) for row in truth(extra, statement)]
    with Sess() as session:
        change(_through(session, statement, reg, "FromCache option"))
        with SQLCounter(extra) as sql:
            again = session.execute(statement.options(FromCache(reg))).all()
        assert sql.count == 0, sql.statements
        assert [tuple(_plain(v) for v in row) for row in again] == expected


def _plain(value):
    return ent(value) if hasattr(value, "_sa_instance_state") else value


# --- Guards: partial reads ---------------------------------------------------------------------

WHOLE = select(Person.name).where(Person.id <= 8).order_by(Person.id)


def _raise_mid_iteration(result):
    with pytest.raises(RuntimeError):
        for index, _ in enumerate(result):
            if index == 2:
                raise RuntimeError("the caller gave up")


def _abandon_a_generator(result):
    names = (row.name for row in result)
    next(names)
    del names


def _break_out(result):
    for _ in result:
        break


PARTIAL_READS = {
    ".first()": lambda r: r.first(),
    ".scalars().first()": lambda r: r.scalars().first(),
    "fetchone() then close()": lambda r: (r.fetchone(), r.close()),
    ".fetchmany(2)": lambda r: r.fetchmany(2),
    "next(partitions(3))": lambda r: next(r.partitions(3)),
    "next(scalars().partitions(3))": lambda r: next(r.scalars().partitions(3)),
    "break out of iteration": _break_out,
    "an exception mid-iteration": _raise_mid_iteration,
    "an abandoned generator": _abandon_a_generator,
    "yield_per(2) then first()": lambda r: r.yield_per(2).first(),
}


@pytest.mark.parametrize("entrance", ["FromCache option", "cached_query()"])
@pytest.mark.parametrize("read", PARTIAL_READS)
def test_a_miss_read_in_part_stores_every_row(engine, Sess, reg, read, entrance):
    """A miss its caller reads only in part stores the whole result: the next read gives every row, with no SQL."""
    expected = truth(engine, WHOLE)
    with Sess() as session:
        PARTIAL_READS[read](_through(session, WHOLE, reg, entrance))
        with SQLCounter(engine) as sql:
            assert [tuple(row) for row in _through(session, WHOLE, reg, entrance)] == expected
        assert sql.count == 0, sql.statements


@pytest.mark.parametrize(
    "query",
    [
        pytest.param(lambda q: q.first(), id="Query.first()"),
        pytest.param(lambda q: q.limit(2).all(), id="Query.limit(2).all()"),
        pytest.param(lambda q: next(iter(q)), id="next(iter(Query))"),
        pytest.param(lambda q: q.filter(Person.id == 2).one_or_none(), id="Query.one_or_none()"),
    ],
)
def test_a_legacy_query_read_in_part_leaves_the_whole_query_whole(engine, Sess, reg, query):
    """``Query.first()`` (LIMIT 1) and friends: the whole query, run next, still gives every row."""
    with Sess() as session:
        query(session.query(Person.name).filter(Person.id <= 8).order_by(Person.id).options(FromCache(reg)))
        whole = session.query(Person.name).filter(Person.id <= 8).order_by(Person.id).options(FromCache(reg))
        assert [tuple(row) for row in whole.all()] == truth(engine, WHOLE)


STREAMED = {
    "execution_options(yield_per=3)": lambda s, st, reg: s.execute(
        st.options(FromCache(reg)).execution_options(yield_per=3)
    ),
    "execute(..., yield_per=3)": lambda s, st, reg: s.execute(
        st.options(FromCache(reg)), execution_options={"yield_per": 3}
    ),
    "stream_results, max_row_buffer": lambda s, st, reg: s.execute(
        st.options(FromCache(reg)).execution_options(stream_results=True, max_row_buffer=2)
    ),
    "max_row_buffer alone": lambda s, st, reg: s.execute(
        st.options(FromCache(reg)).execution_options(max_row_buffer=2)
    ),
    "session.scalars()": lambda s, st, reg: s.scalars(st.options(FromCache(reg))),
}


@pytest.mark.parametrize("how", STREAMED)
def test_streamed_and_partitioned_reads_give_every_row_each_time(engine, Sess, reg, how):
    """``yield_per``, ``stream_results``, ``max_row_buffer``, ``scalars()``: read in partitions, every row, each time."""
    expected = [name for (name,) in truth(engine, WHOLE)]
    with Sess() as session:
        for _ in range(3):
            result = STREAMED[how](session, WHOLE, reg)
            partitions = list(result.scalars().partitions(3) if how != "session.scalars()" else result.partitions(3))
            assert [name for part in partitions for name in part] == expected
            assert all(len(part) <= 3 for part in partitions)


def test_query_yield_per_read_in_part_then_whole(engine, Sess, reg):
    """``Query.yield_per()`` read in part, then the query whole: every row."""
    with Sess() as session:
        streamed = session.query(Person.name).filter(Person.id <= 8).order_by(Person.id).options(FromCache(reg))
        next(iter(streamed.yield_per(2)))
        whole = session.query(Person.name).filter(Person.id <= 8).order_by(Person.id).options(FromCache(reg))
        assert [tuple(row) for row in whole] == truth(engine, WHOLE)


def test_a_load_that_fails_half_way_stores_nothing(extra, Sess, reg):
    """A result processor raising on the third row of a miss: nothing stored; the next read gives every row, then hits."""
    for statement in (select(Doc).order_by(Doc.id), select(Doc.id, Doc.label).order_by(Doc.id)):
        expected = truth(extra, statement)
        with Sess() as session:
            FAIL_ON["value"] = "label 3"
            try:
                with pytest.raises(ValueError):
                    session.execute(statement.options(FromCache(reg))).all()
            finally:
                FAIL_ON["value"] = None
            first = session.execute(statement.options(FromCache(reg))).all()
            with SQLCounter(extra) as sql:
                second = session.execute(statement.options(FromCache(reg))).all()
            assert sql.count == 0, sql.statements
            for got in (first, second):
                assert [tuple(_plain(v) for v in row) for row in got] == [
                    tuple(_plain(v) for v in row) for row in expected
                ]


# --- Guards: shapes ------------------------------------------------------------------------------

SHAPES = {
    ".mappings() by name": (
        lambda: select(Person.id, Person.name.label("who")).where(Person.id <= 3).order_by(Person.id),
        lambda r: [dict(m) for m in r.mappings()],
    ),
    ".columns() by index and name": (
        lambda: select(Person.id, Person.name).where(Person.id <= 3).order_by(Person.id),
        lambda r: [tuple(row) for row in r.columns(1, "id")],
    ),
    ".keys(), ._fields": (
        lambda: (
            select(Person.id, Address.id, func.count(Address.id), literal_column("7").label("seven"))
            .join(Person.addresses)
            .group_by(Person.id, Address.id)
            .where(Person.id <= 2)
        ),
        lambda r: (list(r.keys()), [row._fields for row in r]),
    ),
    "duplicate column names": (
        lambda: select(Person.id, Address.id).join(Person.addresses).where(Person.id <= 2).order_by(Address.id),
        lambda r: [(row.id, row.id_1, tuple(row)) for row in r],
    ),
    ".freeze()": (
        lambda: select(Person.id, Person.name).where(Person.id <= 3).order_by(Person.id),
        lambda r: [tuple(row) for row in r.freeze()()],
    ),
    "entity and column, outer join without a match": (
        lambda: (
            select(Person, Address.street)
            .outerjoin(Address, (Address.person_id == Person.id) & (Address.id > 1000))
            .where(Person.id <= 3)
            .order_by(Person.id)
        ),
        lambda r: [(ent(p), street) for p, street in r],
    ),
    "an entity only None (outer join)": (
        lambda: (
            select(Address)
            .select_from(Person)
            .outerjoin(Address, (Address.person_id == Person.id) & (Address.id > 1000))
            .where(Person.id <= 3)
        ),
        lambda r: [ent(a) for a in r.scalars()],
    ),
    "one entity twice": (
        lambda: select(Person, Person.name, Person).where(Person.id <= 2).order_by(Person.id),
        lambda r: [(ent(a), name, a is b) for a, name, b in r],
    ),
    "Bundle": (
        lambda: select(Bundle("b", Person.id, Person.name)).where(Person.id <= 2).order_by(Person.id),
        lambda r: [(b.id, b.name, b._fields) for b in r.scalars()],
    ),
    "union_all of columns": (
        lambda: union_all(select(Person.id).where(Person.id < 3), select(Address.id).where(Address.id < 3)),
        lambda r: sorted(r.scalars().all()),
    ),
    "expanding IN, three": (
        lambda: select(Person.name).where(Person.id.in_([3, 1, 2])).order_by(Person.id),
        lambda r: r.scalars().all(),
    ),
    "expanding IN, two": (
        lambda: select(Person.name).where(Person.id.in_([2, 1])).order_by(Person.id),
        lambda r: r.scalars().all(),
    ),
    "expanding IN, empty": (
        lambda: select(Person.name).where(Person.id.in_([])).order_by(Person.id),
        lambda r: r.scalars().all(),
    ),
    "tuple_().in_()": (
        lambda: select(Person.name).where(tuple_(Person.id, Person.name).in_([(1, "person 1"), (2, "person 3")])),
        lambda r: r.scalars().all(),
    ),
    "tuple_().in_(), other values": (
        lambda: select(Person.name).where(tuple_(Person.id, Person.name).in_([(1, "person 1"), (3, "person 3")])),
        lambda r: r.scalars().all(),
    ),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_a_result_is_read_as_uncached(engine, Sess, reg, shape):
    """Each shape of Result reads the same on the miss and on the hit as uncached."""
    make, use = SHAPES[shape]
    entrance = "cached_query()" if shape == "union_all of columns" else "FromCache option"
    check_served(engine, Sess, reg, make(), use, entrance)


def test_execute_and_scalars_of_one_statement_share_an_entry(engine, Sess, reg):
    """``session.execute()``, ``session.scalars()`` and ``session.scalar()`` of one statement read one entry alike."""
    expected = [ent(p) for (p,) in truth(engine, select(Person).where(Person.id <= 3).order_by(Person.id))]
    statement = select(Person).where(Person.id <= 3).order_by(Person.id).options(FromCache(reg))
    with Sess() as session:
        assert [ent(p) for p in session.execute(statement).scalars()] == expected
        with SQLCounter(engine) as sql:
            assert [ent(p) for p in session.scalars(statement)] == expected
            assert ent(session.scalar(statement)) == expected[0]
            assert [ent(m["Person"]) for m in session.execute(statement).mappings()] == expected
        assert sql.count == 0, sql.statements


def test_an_expanding_bindparam_gives_the_rows_of_each_list(engine, Sess, reg):
    """One statement with ``bindparam(expanding=True)``, lists of other lengths and orders: each its own rows."""
    statement = select(Person.name).where(Person.id.in_(bindparam("ids", expanding=True))).order_by(Person.id)
    with Sess() as session:
        for ids in ([1, 2], [4, 3, 2], [1], [2, 1], [1, 2], [4, 3, 2]):
            got = session.execute(statement.options(FromCache(reg)), {"ids": ids}).scalars().all()
            assert got == [f"person {i}" for i in sorted(ids)]


def test_session_get_through_the_cache(engine, Sess, reg):
    """``session.get(..., options=[FromCache()])``: the object, None for a missing key, and a hit in another Session."""
    with Sess() as session:
        person = session.get(Person, 3, options=[FromCache(reg)])
        assert (person.id, person.name) == (3, "person 3")
        assert session.get(Person, 999, options=[FromCache(reg)]) is None
    with Sess() as session, SQLCounter(engine) as sql:
        person = session.get(Person, 3, options=[FromCache(reg)])
        assert (person.id, person.name, person.loaded_by_orm) == (3, "person 3", True)
    if reg != "local":
        assert sql.count == 0, sql.statements


LEGACY = {
    "count()": lambda q: q.count(),
    "first()": lambda q: ent(q.order_by(Person.id).first()),
    "one_or_none()": lambda q: ent(q.filter(Person.id == 2).one_or_none()),
    "[1:3]": lambda q: [ent(p) for p in q.order_by(Person.id)[1:3]],
    "scalar() of a column": lambda q: q.with_entities(func.max(Person.id)).scalar(),
    "rows with keys": lambda q: [
        (row.Person.id, row.street) for row in q.add_columns(Address.street).join(Person.addresses).order_by(Address.id)
    ],
}


@pytest.mark.parametrize("how", LEGACY)
def test_legacy_query_shapes(engine, Sess, reg, how):
    """The legacy ``Query``'s ``count()``, ``first()``, ``one_or_none()``, slices, ``scalar()``: as uncached, then hits."""
    with PlainSession(engine) as plain:
        expected = LEGACY[how](plain.query(Person).filter(Person.id <= 5))
    with Sess() as session:
        assert LEGACY[how](session.query(Person).filter(Person.id <= 5).options(FromCache(reg))) == expected
        with SQLCounter(engine) as sql:
            assert LEGACY[how](session.query(Person).filter(Person.id <= 5).options(FromCache(reg))) == expected
        assert sql.count == 0, sql.statements


_ALIAS = aliased(Person)
LABELLED = {
    "two ids": lambda q: q(Person.id, Address.id).join(Person.addresses),
    "count": lambda q: q(func.count(Person.id)),
    "functions": lambda q: q(func.lower(Person.name), func.upper(Person.name)),
    "expressions": lambda q: q(Person.id + 1, Person.id * 2),
    "aliased": lambda q: q(Person.id, _ALIAS.id).join(_ALIAS, _ALIAS.id == Person.id),
    "entity and column": lambda q: q(Person, Address.street).join(Person.addresses),
}


@pytest.mark.parametrize("first", ["Query first", "select() first"])
@pytest.mark.parametrize("shape", LABELLED)
def test_a_query_and_a_select_sharing_an_entry_keep_their_own_row_keys(engine, Sess, reg, shape, first):
    """A legacy ``Query`` and the ``select()`` it equals share an entry, yet each gets its own row keys."""
    with PlainSession(engine) as plain:
        legacy_keys = [row._fields for row in LABELLED[shape](plain.query).limit(3)]
        select_keys = [row._fields for row in plain.execute(LABELLED[shape](select).limit(3))]
    with Sess() as session:

        def legacy():
            assert [row._fields for row in LABELLED[shape](session.query).limit(3).options(FromCache(reg))] == (
                legacy_keys
            )

        def new():
            rows = session.execute(LABELLED[shape](select).limit(3).options(FromCache(reg)))
            assert [row._fields for row in rows] == select_keys

        for read in (legacy, new) if first == "Query first" else (new, legacy):
            read()
            read()


# --- Guards: options that change results ---------------------------------------------------------


def test_loader_criteria_closing_over_a_variable_keys_each_value(engine, Sess, reg):
    """``with_loader_criteria(Person, lambda cls: cls.id < limit)``: each ``limit`` its own rows, and the first again."""

    def read(session, limit):
        statement = select(Person).options(with_loader_criteria(Person, lambda cls: cls.id < limit), FromCache(reg))
        return [p.id for p in session.execute(statement.order_by(Person.id)).scalars()]

    with Sess() as session:
        assert [read(session, limit) for limit in (3, 5, 3, 5)] == [[1, 2], [1, 2, 3, 4]] * 2


def test_a_listener_adding_criteria_unless_an_option_asks_for_all(engine, Sess, reg):
    """An ``include_deleted``-style listener: the option given (on the statement or to ``execute()``) gives every row."""

    def criteria(state):
        if state.is_select and not state.is_column_load and not state.execution_options.get("include_all", False):
            state.statement = state.statement.options(with_loader_criteria(Person, Person.id < 5))

    event.listen(PlainSession, "do_orm_execute", criteria)
    try:
        statement = select(Person.id).order_by(Person.id)
        with Sess() as session:
            for _ in range(2):
                assert len(session.execute(statement.options(FromCache(reg))).all()) == 4
                assert (
                    len(session.execute(statement.options(FromCache(reg)).execution_options(include_all=True)).all())
                    == 20
                )
                assert (
                    len(
                        session.execute(
                            statement.options(FromCache(reg)), execution_options={"include_all": True}
                        ).all()
                    )
                    == 20
                )
                assert len(cached_query(session, statement, reg).all()) == 4
                assert len(cached_query(session, statement.execution_options(include_all=True), reg).all()) == 20
    finally:
        event.remove(PlainSession, "do_orm_execute", criteria)


def test_identity_tokens_give_objects_of_their_own(engine, Sess, reg):
    """``execution_options(identity_token=...)``: each token its own object, as uncached."""
    statement = select(Person).where(Person.id == 1)
    with Sess() as session:
        for _ in range(2):
            a = session.execute(statement.options(FromCache(reg)).execution_options(identity_token="a")).scalar_one()
            b = session.execute(statement.options(FromCache(reg)).execution_options(identity_token="b")).scalar_one()
            assert (sa_inspect(a).identity_token, sa_inspect(b).identity_token) == ("a", "b")
            assert a is not b


# --- Guards: value types --------------------------------------------------------------------------


def _typed(result):
    return [tuple((type(value).__name__, _plain(value)) for value in row) for row in result]


TYPED = {
    "columns": lambda: select(Doc.amount, Doc.blob, Doc.when, Doc.color, Doc.data, Doc.pickled).order_by(Doc.id),
    "entities": lambda: select(Doc).order_by(Doc.id),
}


@pytest.mark.parametrize("shape", TYPED)
def test_values_come_back_of_their_types(extra, Sess, reg, shape):
    """``Numeric`` (Decimal), ``LargeBinary``, an aware datetime, ``Enum``, JSON, ``PickleType``: same types, same values."""
    if shape == "entities":

        def use(result):
            return [
                tuple(
                    (type(v).__name__, v) for v in (d.amount, d.blob, d.when, d.when.tzinfo, d.color, d.data, d.pickled)
                )
                for d in result.scalars()
            ]

    else:
        use = _typed
    check_served(extra, Sess, reg, TYPED[shape](), use)


# --- Guards: inheritance, deferred columns, eager loads -----------------------------------------------

_ANY_EMPLOYEE = with_polymorphic(Employee, "*")


def _described(result):
    return [
        (type(o).__name__, sorted((k, v) for k, v in vars(o).items() if not k.startswith("_")))
        for o in result.scalars()
    ]


POLYMORPHIC = {
    "joined, base class": lambda: select(Employee).order_by(Employee.id),
    "with_polymorphic('*')": lambda: select(_ANY_EMPLOYEE).order_by(_ANY_EMPLOYEE.id),
    "with_polymorphic, filtered on a subclass": lambda: select(_ANY_EMPLOYEE).where(
        _ANY_EMPLOYEE.Engineer.language == "py"
    ),
    "selectin_polymorphic": lambda: (
        select(Employee).options(selectin_polymorphic(Employee, [Engineer, Manager])).order_by(Employee.id)
    ),
    "joined, subclass": lambda: select(Engineer).order_by(Engineer.id),
    "single table, base class": lambda: select(Thing).order_by(Thing.id),
    "single table, subclass": lambda: select(Gadget).order_by(Gadget.id),
}


@pytest.mark.parametrize("shape", POLYMORPHIC)
def test_polymorphic_loads(extra, Sess, reg, shape):
    """Joined and single-table inheritance: each object of its class, its loaded attributes as uncached."""
    check_served(extra, Sess, reg, POLYMORPHIC[shape](), _described)


#: Statements of one class read in turn in one Session, each changing what the next finds loaded.
IN_TURN = [
    lambda: select(Post).order_by(Post.id),
    lambda: select(Post).options(undefer(Post.body)).order_by(Post.id),
    lambda: select(Post).options(load_only(Post.title)).order_by(Post.id),
    lambda: select(Post).options(selectinload(Post.comments)).order_by(Post.id),
    lambda: select(Post).options(joinedload(Post.comments)).order_by(Post.id),
    lambda: select(Comment).options(joinedload(Comment.post).undefer(Post.body)).order_by(Comment.id),
    lambda: select(Post.id, Post.comment_count).order_by(Post.id),
]


def _loaded(objects):
    out = []
    for o in objects:
        d = vars(o)
        comments = [c.id for c in d["comments"]] if "comments" in d else "-"
        out.append(
            (type(o).__name__, o.id, d.get("title", "-"), d.get("body", "-"), d.get("comment_count", "-"), comments)
        )
    return out


def _read_in_turn(session, order, region):
    seen, held = [], []
    for index in order * 2:
        statement = IN_TURN[index]()
        if region is not None:
            statement = statement.options(FromCache(region))
        rows = session.execute(statement).unique().all()
        objects = [v for row in rows for v in row if hasattr(v, "_sa_instance_state")]
        held.extend(objects)  # kept, as a view holds what it read
        seen.append(_loaded(objects) if objects else [tuple(row) for row in rows])
    return seen


@pytest.mark.parametrize(
    "order", [[0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0], [2, 4, 1, 5, 0, 3, 6], [3, 0, 5, 2, 6, 1, 4]]
)
@pytest.mark.parametrize("autoflush", [True, False])
def test_deferred_columns_column_properties_and_eager_loads_read_in_turn(extra, Sess, reg, order, autoflush):
    """Deferred, undeferred, ``load_only``, a ``column_property``, selectin and joined loads in turn: what each read finds loaded is as uncached."""
    with sessionmaker(extra, autoflush=autoflush)() as plain:
        expected = _read_in_turn(plain, order, None)
    with Sess(autoflush=autoflush) as session:
        assert _read_in_turn(session, order, reg) == expected


HELD_SHAPES = {
    "one entity": lambda: select(Person).where(Person.id <= 4).order_by(Person.id),
    "entity and column": lambda: select(Person, Person.name).where(Person.id <= 4).order_by(Person.id),
    "selectin collection": lambda: (
        select(Person).options(selectinload(Person.addresses)).where(Person.id <= 4).order_by(Person.id)
    ),
    "joined many-to-one": lambda: select(Address).options(joinedload(Address.person)).where(Address.id <= 4),
}


@pytest.mark.parametrize("shape", HELD_SHAPES)
def test_hits_while_the_caller_holds_some_of_the_objects_of_the_last_one(engine, Sess, reg, shape):
    """Hits of one entry in one Session, the caller keeping only some objects of the last: every row, every time."""
    statement = HELD_SHAPES[shape]()
    expected = [tuple(_plain(v) for v in row) for row in truth(engine, statement)]
    with Sess() as session:
        kept = []
        for keep in (0, 1, 2, None):
            with SQLCounter(engine) as sql:
                rows = session.execute(statement.options(FromCache(reg))).all()
            assert [tuple(_plain(v) for v in row) for row in rows] == expected
            assert keep == 0 or sql.count == 0, sql.statements  # hits after the first
            kept = [] if keep is None else [rows[keep]]
            del rows
            gc.collect()
        del kept


def test_a_lambda_statement_is_keyed_by_what_its_closure_holds_now(engine, Sess, reg):
    """``lambda_stmt()`` through ``cached_query()``: a bound closure value and an IN list of other lengths each give their rows."""

    def below(limit):
        statement = lambda_stmt(lambda: select(Person.id))
        statement += lambda s: s.where(Person.id < limit)
        return statement + (lambda s: s.order_by(Person.id))

    def among(ids):
        statement = lambda_stmt(lambda: select(Person.id))
        statement += lambda s: s.where(Person.id.in_(ids))
        return statement + (lambda s: s.order_by(Person.id))

    with Sess() as session:
        for _ in range(2):
            assert [cached_query(session, below(n), reg).scalars().all() for n in (3, 5)] == [[1, 2], [1, 2, 3, 4]]
            assert [cached_query(session, among(ids), reg).scalars().all() for ids in ([2], [3, 1], [4, 2, 3])] == [
                [2],
                [1, 3],
                [2, 3, 4],
            ]
        with SQLCounter(engine) as sql:
            cached_query(session, below(5), reg).scalars().all()
            cached_query(session, among([3, 1]), reg).scalars().all()
        assert sql.count == 0, sql.statements
