"""Attack s33-review: the five fixes of session 33, read against the uncached run of the same query.

Each cached read is compared with the same statement run uncached on the
same database (SQLite files in tmp_path, PostgreSQL through pg_url, real
Pyramid applications through WebTest); hits are proved by counting SQL.
What it found is fixed; these tests guard it.
"""

# ruff: noqa: F811  (fixtures imported from test_attack_s33_requests are arguments of the tests here)
from __future__ import annotations

import gc

import pytest
from pyramid.request import Request
from pyramid.response import Response
from sqlalchemy import (
    JSON,
    LABEL_STYLE_TABLENAME_PLUS_COL,
    Column,
    String,
    TypeDecorator,
    create_engine,
    literal_column,
    make_url,
    select,
    text,
    union_all,
)
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import DeclarativeBase, Mapped, aliased, joinedload, mapped_column, selectinload, sessionmaker
from sqlalchemy.orm import Session as PlainSession
from webtest import TestApp

from pyramid_sessioncache import SessionCache, cached_query

from .conftest import SECRET, SQLCounter
from .models import Address, Person
from .test_attack_s33_requests import assert_clean, check, make_memory, name_of, scenario  # noqa: F401 (fixtures)

PERSON = Person.__table__
ADDRESS = Address.__table__
_OTHER = aliased(Person)


@pytest.fixture(params=["local", "memory"])
def reg(request) -> str:
    """``ext:local_session``, then ``memory`` (the found_by memo lives on the value either way)."""
    return request.param


@pytest.fixture
def Sess(engine, reg, region_options):
    """A sessionmaker caching into a fresh cache."""
    cache = SessionCache(region_options, default_region="local", secret=SECRET)
    yield sessionmaker(bind=engine, info=cache.session_info())
    cache.close()


def ent(obj):
    """An ORM object as plain data: class and primary key."""
    return None if obj is None else (type(obj).__name__, sa_inspect(obj).identity)


def outcome(use, result):
    """``use(result)``, or the KeyError it raised (NoSuchColumnError is one): the uncached and cached must agree."""
    try:
        return use(result)
    except KeyError:
        return "KeyError"


def served(engine, Sess, reg, make, use, before=None):
    """What ``use`` reads from ``make()``: uncached, and cached on the miss and two hits (no SQL), after ``before()`` was cached."""
    with PlainSession(engine) as plain:
        expected = outcome(use, plain.execute(make()))
    got = []
    with Sess() as session:
        if before is not None:
            cached_query(session, before(), reg).all()
        got.append(outcome(use, cached_query(session, make(), reg)))
        with SQLCounter(engine) as sql:
            got.append(outcome(use, cached_query(session, make(), reg)))
            got.append(outcome(use, cached_query(session, make(), reg)))
        assert sql.count == 0, sql.statements
    return expected, got


# --- Defects -------------------------------------------------------------------------------------

#: (statement cached first, statement read, how it is read): the first's shape is "equal" to the second's.
COLLIDING = {
    "select(table) then select(Class)": (
        lambda: select(PERSON).where(PERSON.c.id <= 2).order_by(PERSON.c.id),
        lambda: select(Person).where(Person.id <= 2).order_by(Person.id),
        lambda r: [ent(m[Person]) for m in r.mappings()],
    ),
    "select(Class) then select(table)": (
        lambda: select(Person).where(Person.id <= 2).order_by(Person.id),
        lambda: select(PERSON).where(PERSON.c.id <= 2).order_by(PERSON.c.id),
        lambda r: [row._mapping[PERSON.c.name] for row in r],
    ),
    "select(table.c) then select(Class.attr)": (
        lambda: select(PERSON.c.id, PERSON.c.name).where(PERSON.c.id <= 2).order_by(PERSON.c.id),
        lambda: select(Person.id, Person.name).where(Person.id <= 2).order_by(Person.id),
        lambda r: r.scalars(Person.name).all(),
    ),
}


@pytest.mark.parametrize("pair", COLLIDING)
def test_a_core_and_an_orm_statement_over_one_table_are_each_read_by_their_own_objects(engine, Sess, reg, pair):
    """A Core statement over a table cached first: the ORM statement over it is still read by its own entities."""
    before, make, use = COLLIDING[pair]
    expected, got = served(engine, Sess, reg, make, use, before)
    assert got == [expected] * 3


class SBase(DeclarativeBase):
    pass


class Staff(SBase):
    __tablename__ = "r_staff"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(10))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "staff"}


class Boss(Staff):
    __mapper_args__ = {"polymorphic_identity": "boss"}


@pytest.fixture
def staff_engine(engine):
    """The SQLite file of ``engine`` with a single-table hierarchy: two staff, one boss."""
    SBase.metadata.create_all(engine)
    with PlainSession(engine) as session:
        session.add_all([Staff(id=1), Boss(id=2), Staff(id=3)])
        session.commit()
    return engine


def test_single_table_subclasses_are_each_read_by_their_own_class(staff_engine, Sess, reg):
    """``select(Staff)`` cached first: ``select(Boss)``'s rows are found by ``Boss``, not by ``Staff``."""

    def use(result):
        return [(ent(row[0]), Boss in row._mapping, Staff in row._mapping) for row in result]

    expected, got = served(staff_engine, Sess, reg, lambda: select(Boss), use, lambda: select(Staff))
    assert expected == [(("Boss", (2,)), True, False)]
    assert got == [expected] * 3


NAME_ONLY = {
    "text().columns() given fewer columns than it selects": (
        lambda: text("SELECT id, name FROM person WHERE id <= 2 ORDER BY id").columns(PERSON.c.id),
        lambda r: [row._mapping[PERSON.c.id] for row in r],
    ),
    "union_all of Core selects, read by its first select's column": (
        lambda: union_all(select(PERSON.c.id).where(PERSON.c.id < 3), select(ADDRESS.c.id).where(ADDRESS.c.id < 3)),
        lambda r: sorted(row._mapping[PERSON.c.id] for row in r),
    ),
}


@pytest.mark.parametrize("shape", NAME_ONLY)
def test_core_rows_found_by_column_uncached_are_found_so_when_cached(engine, Sess, reg, shape):
    """A union or a partly-typed ``text().columns()``: read by a Core column, as the uncached ``CursorResult`` is."""
    make, use = NAME_ONLY[shape]
    expected, got = served(engine, Sess, reg, make, use)
    assert got == [expected] * 3


class Unpicklable:
    """A value that refuses to pickle (a driver handle, a lock)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __reduce__(self):
        raise TypeError("not picklable")

    def __eq__(self, other):
        return isinstance(other, Unpicklable) and other.text == self.text

    __hash__ = None


class UnpicklableType(TypeDecorator):
    impl = String
    cache_ok = True

    def process_result_value(self, value, dialect):
        return None if value is None else Unpicklable(value)


class UBase(DeclarativeBase):
    pass


class Note(UBase):
    __tablename__ = "r_note"
    id: Mapped[int] = mapped_column(primary_key=True)
    data = Column(JSON)
    handle = Column(UnpicklableType(20))


@pytest.mark.parametrize("region", ["local"])
def test_one_unpicklable_value_does_not_share_the_other_rows_values(engine, region):
    """A row with a value that does not pickle: the JSON ``dict`` of another row is still each hit's own copy."""
    UBase.metadata.create_all(engine)
    with PlainSession(engine) as session:
        session.add_all([Note(id=1, data={"a": 1}), Note(id=2, data={"b": 2}, handle="h")])
        session.commit()
    statement = select(Note.data, Note.handle).order_by(Note.id)
    with PlainSession(engine) as plain:
        expected = plain.execute(statement).all()
    cache = SessionCache({"local": {"type": "ext:local_session"}}, default_region="local", secret=SECRET)
    with sessionmaker(engine, info=cache.session_info())() as session:
        cached_query(session, statement, region).all()
        with SQLCounter(engine) as sql:
            cached_query(session, statement, region).all()[0][0]["a"] = 99  # the reader edits its copy
            assert cached_query(session, statement, region).all() == expected
        assert sql.count == 0, sql.statements


def test_a_stream_that_first_uses_the_session_leaves_nothing_checked_out(make_memory):
    """A streamed response whose generator is the first to use ``request.dbsession``: nothing checked out once sent."""
    app = make_memory()

    def view(request):
        def body():
            yield request.dbsession.execute(name_of(3)).scalar_one().encode()

        return Response(app_iter=body())

    scenario(view)
    gc.disable()  # a Session left open is found before a collection returns its connection
    try:
        assert TestApp(app).get("/run").body == b"person 3"
        assert_clean(app)
    finally:
        gc.enable()


def test_a_streamed_response_invoking_subrequests_keeps_its_session(make_memory):
    """A stream that loads objects, then invokes a subrequest per object: its objects stay usable to the end."""
    app = make_memory()

    def view(request):
        request.dbsession.execute(name_of(16)).scalar_one()

        def body():
            people = request.dbsession.execute(select(Person).where(Person.id <= 3).order_by(Person.id)).scalars()
            for person in people.all():
                sub = request.invoke_subrequest(Request.blank("/sub"))
                yield f"{person.name}:{len(person.addresses)}:{sub.status_int};".encode()

        return Response(app_iter=body())

    scenario(view, sub=lambda request: {"ok": 1})
    assert TestApp(app).get("/run").body == b"person 1:2:200;person 2:2:200;person 3:2:200;"
    assert_clean(app)


# --- Guards --------------------------------------------------------------------------------------

KEYED = {
    "two ids, by attribute": (
        lambda: select(Person.id, Address.id).join(Person.addresses).order_by(Address.id).limit(3),
        lambda r: [(m[Person.id], m[Address.id]) for m in r.mappings()],
    ),
    "two ids, Core, by column and name": (
        lambda: select(PERSON.c.id, ADDRESS.c.id).join_from(PERSON, ADDRESS).order_by(ADDRESS.c.id).limit(3),
        lambda r: [
            (row._mapping[PERSON.c.id], row._mapping[ADDRESS.c.id], row._mapping["id"], row._fields) for row in r
        ],
    ),
    "one column twice": (
        lambda: select(Person.id, Person.id).order_by(Person.id).limit(2),
        lambda r: [(row._mapping[Person.id], row._fields) for row in r],
    ),
    "table name labels": (
        lambda: (
            select(Person.id, Address.id)
            .join(Person.addresses)
            .set_label_style(LABEL_STYLE_TABLENAME_PLUS_COL)
            .limit(2)
        ),
        lambda r: [(row._fields, row._mapping[Address.id]) for row in r],
    ),
    "from_statement() of another column order": (
        lambda: select(Person.id, Person.name).from_statement(select(Person.name, Person.id).where(Person.id < 3)),
        lambda r: [(row._mapping[Person.name], row._fields) for row in r],
    ),
    "from_statement(text())": (
        lambda: select(Person).from_statement(text("SELECT * FROM person WHERE id < 3 ORDER BY id")),
        lambda r: [ent(row._mapping[Person]) for row in r],
    ),
    "joined eager load, unique().mappings()": (
        lambda: select(Person).options(joinedload(Person.addresses)).where(Person.id < 3).order_by(Person.id),
        lambda r: [ent(m[Person]) for m in r.unique().mappings()],
    ),
    "freeze() of a hit": (
        lambda: select(Person, Address.id).join(Person.addresses).order_by(Address.id).limit(3),
        lambda r: [(ent(row._mapping[Person]), row._mapping[Address.id]) for row in r.freeze()()],
    ),
    "columns() and scalars() by attribute": (
        lambda: select(Person.id, Address.id, Person.name).join(Person.addresses).order_by(Address.id).limit(3),
        lambda r: [tuple(row) for row in r.columns(Address.id, Person.name)],
    ),
    "aliased and plain ids": (
        lambda: select(_OTHER.id, Person.id).join(_OTHER, _OTHER.id == Person.id + 1).order_by(Person.id).limit(2),
        lambda r: [(m[_OTHER.id], m[Person.id]) for m in r.mappings()],
    ),
    "literal label": (
        lambda: select(literal_column("5").label("five"), Person.id).order_by(Person.id).limit(2),
        lambda r: [(m["five"], m[Person.id]) for m in r.mappings()],
    ),
    "select(table) by column": (
        lambda: select(PERSON).where(PERSON.c.id <= 2).order_by(PERSON.c.id),
        lambda r: [(row._mapping[PERSON.c.name], row._fields) for row in r],
    ),
}


@pytest.mark.parametrize("shape", KEYED)
def test_hits_are_read_by_their_statements_objects(engine, Sess, reg, shape):
    """Ambiguous names, a column twice, labels, from_statement(), eager loads, freeze(): read as uncached, on hits."""
    make, use = KEYED[shape]
    expected, got = served(engine, Sess, reg, make, use)
    assert expected != "KeyError"
    assert got == [expected] * 3


def test_orm_then_core_columns_of_one_table(engine, Sess, reg):
    """``select(Class.attr)`` cached first, then ``select(table.c.col)``: read by ``table.c`` as uncached."""
    expected, got = served(
        engine,
        Sess,
        reg,
        lambda: select(PERSON.c.id, PERSON.c.name).where(PERSON.c.id <= 2).order_by(PERSON.c.id),
        lambda r: [row._mapping[PERSON.c.name] for row in r],
        lambda: select(Person.id, Person.name).where(Person.id <= 2).order_by(Person.id),
    )
    assert got == [expected] * 3


# --- Eager loads across three SQLite binds in WAL mode ----------------------------------------------------


def _wal_engine(path):
    """An engine on SQLite file ``path`` in WAL mode, the driver leaving transactions to explicit BEGINs."""
    from sqlalchemy import event

    engine = create_engine(f"sqlite:///{path}")

    @event.listens_for(engine, "connect")
    def connect(dbapi_connection, record):
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA journal_mode=WAL")

    return engine


@pytest.fixture
def three_binds(tmp_path, seeded_sqlite):
    """Three copies of the seeded database in WAL mode: people, their addresses, and postal codes with cities."""
    import shutil

    engines = {}
    for name in ("people", "addresses", "places"):
        shutil.copyfile(seeded_sqlite, tmp_path / f"{name}.sqlite")
        engines[name] = _wal_engine(tmp_path / f"{name}.sqlite")
    yield engines
    for engine in engines.values():
        engine.dispose()


def _binds(engines):
    from .models import City, Country, PostalCode, Tag

    return {
        Person: engines["people"],
        Tag: engines["people"],
        Address: engines["addresses"],
        PostalCode: engines["places"],
        City: engines["places"],
        Country: engines["places"],
    }


@pytest.mark.parametrize("older", ["addresses", "places", None])
def test_an_eager_load_chain_on_an_older_wal_snapshot_of_a_third_bind_is_not_stored(three_binds, older):
    """Person -> selectinload addresses (bind 2) -> selectinload postal code (bind 3): a bind's older snapshot is not stored."""
    from .models import PostalCode

    cache = SessionCache({"memory": {"type": "memory"}}, default_region="memory", secret=SECRET)
    Sess = sessionmaker(binds=_binds(three_binds), info=cache.session_info())
    statement = (
        select(Person)
        .where(Person.id <= 2)
        .order_by(Person.id)
        .options(selectinload(Person.addresses).selectinload(Address.postal_code))
    )

    def seen(session, cached):
        result = cached_query(session, statement, "memory") if cached else session.execute(statement)
        return [(p.name, [(a.street, a.postal_code.code) for a in p.addresses]) for p in result.scalars()]

    with Sess() as session:
        if older is not None:
            mapper = Address if older == "addresses" else PostalCode
            session.connection(bind_arguments={"mapper": mapper.__mapper__}).exec_driver_sql("BEGIN")
            session.execute(select(mapper)).all()  # its snapshot begins
            with three_binds[older].begin() as writer:  # another Session of the process commits
                if older == "addresses":
                    writer.execute(Address.__table__.update().where(Address.id == 1).values(street="moved"))
                else:
                    writer.execute(PostalCode.__table__.update().where(PostalCode.id == 1).values(code="renamed"))
        assert seen(session, True) == seen(session, False)  # its own snapshot, as uncached
    with Sess() as plain:
        expected = seen(plain, False)
    with Sess() as fresh:
        counters = [SQLCounter(engine) for engine in three_binds.values()]
        assert seen(fresh, True) == expected
        sent = sum(counter.stop() or counter.count for counter in counters)
    assert (sent == 0) == (older is None)  # stored unless a bind read an older snapshot
    cache.close()


# --- PostgreSQL catalog read on a connection of its own ----------------------------------------------------


def _backends(url) -> int:
    """How many backends are connected to ``url``'s database, this check's own aside."""
    import psycopg

    plain = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(plain) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()[0]


@pytest.mark.parametrize("connect", ["URL", "creator=", "do_connect listener", "schema_translate_map copy"])
def test_catalog_reads_after_forgets_leave_no_backend_and_keep_the_catalog(pg_url, connect, monkeypatch):
    """Each forget() costs one connection of its own for the next read, closed at once; the catalog is kept then."""
    import psycopg
    from sqlalchemy import event

    from pyramid_sessioncache import _sqlalchemy
    from pyramid_sessioncache.engine.invalidation import schema

    plain = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    if connect == "creator=":
        engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(plain))
    else:
        engine = create_engine(pg_url)
    if connect == "do_connect listener":

        @event.listens_for(engine, "do_connect")
        def do_connect(dialect, record, cargs, cparams):
            cparams["application_name"] = "s33-review"

    if connect == "schema_translate_map copy":
        engine = engine.execution_options(schema_translate_map={None: None})
    made = []
    original = _sqlalchemy.raw_connect
    monkeypatch.setattr(_sqlalchemy, "raw_connect", lambda e: made.append(e) or original(e))
    cache = SessionCache({"memory": {"type": "memory"}}, default_region="memory", secret=SECRET)
    Sess = sessionmaker(engine, info=cache.session_info())
    statement = select(Person.name).where(Person.id == 1)
    try:
        with Sess() as session:
            assert cached_query(session, statement, "memory").scalar_one() == "person 1"
        baseline = _backends(pg_url)
        for _ in range(3):
            schema.forget_catalog()
            before = len(made)
            with Sess() as session:
                session.execute(select(Address.id).where(Address.id == 1)).all()
                assert cached_query(session, statement, "memory").scalar_one() == "person 1"
                session.execute(select(Address.id).where(Address.id == 2)).all()
            assert len(made) - before == 1  # read once, on a connection of its own, then kept
        assert _backends(pg_url) == baseline
    finally:
        cache.close()
        engine.dispose()


@pytest.mark.parametrize(
    "connect",
    ["URL", "creator(record)", "refused"],
)
def test_the_catalog_is_read_once_then_kept(pg_url, monkeypatch, connect):
    """Read once after a forget(), then kept (by URL, by a ``creator(record)``); refused a connection, once per need."""
    import psycopg

    from pyramid_sessioncache import _sqlalchemy
    from pyramid_sessioncache.engine.invalidation import schema

    plain = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)

    def creator(record):
        record.info["made by"] = "creator"
        return psycopg.connect(plain)

    engine = create_engine(pg_url) if connect == "URL" else create_engine("postgresql+psycopg://", creator=creator)
    cache = SessionCache({"memory": {"type": "memory"}}, default_region="memory", secret=SECRET)
    Sess = sessionmaker(engine, info=cache.session_info())
    read, asked = [], []
    original = schema._Schema._read_postgresql_catalog
    monkeypatch.setattr(
        schema._Schema, "_read_postgresql_catalog", staticmethod(lambda *a: read.append(1) or original(*a))
    )
    catalog = schema._Schema.catalog
    monkeypatch.setattr(schema._Schema, "catalog", lambda self, conn: asked.append(1) or catalog(self, conn))
    if connect == "refused":

        def refused(engine):
            raise OSError("FATAL: sorry, too many clients already")

        monkeypatch.setattr(_sqlalchemy, "raw_connect", refused)
    try:
        schema.forget_catalog()
        reads = []
        for person in (1, 2, 3):
            with Sess() as session:
                before = len(read)
                statement = select(Person.name).where(Person.id == person)
                assert cached_query(session, statement, "memory").scalar_one() == f"person {person}"
                reads.append(len(read) - before)
        if connect == "refused":  # read in the transaction, not kept: once for each statement that asks
            assert len(read) <= len(asked)
        else:
            assert reads == [1, 0, 0]  # read once, then kept
    finally:
        cache.close()
        engine.dispose()


# --- found_by memo under threads, and its bounds ------------------------------------------------------------


def test_threads_hitting_one_entry_with_aliases_of_their_own_each_read_by_their_own(engine, region_options):
    """Four threads hit one ``memory`` entry, each with a new ``aliased()`` per call: rows found by its own alias."""
    import threading

    cache = SessionCache(region_options, default_region="local", secret=SECRET)
    Sess = sessionmaker(bind=engine, info=cache.session_info())

    def made():
        alias = aliased(Person)
        return select(alias.id, alias.name).where(alias.id <= 3).order_by(alias.id), alias

    with Sess() as session:
        statement, _ = made()
        cached_query(session, statement, "memory").all()  # stored
    failures: list = []
    start = threading.Barrier(4)

    def reader():
        try:
            with Sess() as session, SQLCounter(engine) as sql:
                start.wait()
                for _ in range(60):
                    statement, alias = made()
                    rows = cached_query(session, statement, "memory").all()
                    assert [(r._mapping[alias.id], r._mapping[alias.name]) for r in rows] == [
                        (i, f"person {i}") for i in (1, 2, 3)
                    ]
            assert sql.count == 0, sql.statements
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    cache.close()
    assert failures == []


def test_statements_of_new_objects_each_time_are_not_kept_alive(engine, Sess, reg):
    """Hundreds of statements of new objects (a new ``aliased()`` each): none is kept but the last one's."""
    import weakref

    kept = []
    with Sess() as session:
        for _ in range(300):
            alias = aliased(Person)
            cached_query(session, select(alias.id).where(alias.id == 1), reg).all()
            kept.append(weakref.ref(alias))
            del alias
        gc.collect()
        # The last statement's (the value's), and the first one's: SQLAlchemy's compiled cache keeps it.
        assert sum(ref() is not None for ref in kept) <= 2
