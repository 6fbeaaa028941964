"""Attacks on the miss path of commit 792bd9d.

- ``engine/loader.py`` records the tables a load reads through one
  permanent ``before_cursor_execute`` listener on ``Engine``, keyed by
  Connection in ``loader._READING``, and takes the statement's tables from
  the shape's learnt tables (``named``);
- ``engine/early.py`` hands its decision to the ORM hook as the private
  execution option ``lookup.DECIDED``.

Real SQLite files; every cached result is compared with an uncached run
of the same query.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from sqlalchemy import create_engine, delete, event, func, insert, select, text, update
from sqlalchemy.orm import Session as PlainSession
from sqlalchemy.orm import selectinload, sessionmaker, with_loader_criteria

from pyramid_sessioncache import SessionCache, cached_query
from pyramid_sessioncache.engine import loader

from .conftest import SECRET
from .models import Address, Person, PostalCode, Tag, person_tag

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cache(tmp_path):
    made = SessionCache(
        {
            "memory": {"type": "memory", "expire": 60},
            "file": {"type": "file", "data_dir": str(tmp_path / "c"), "lock_dir": str(tmp_path / "l")},
        },
        default_region="memory",
        secret=SECRET,
    )
    yield made
    made.close()


def criteria_statement(code: str = "00001"):
    """Addresses eagerly loaded with a criterion on a table only that eager load reads."""
    return (
        select(Person)
        .where(Person.id <= 3)
        .order_by(Person.id)
        .options(
            selectinload(
                Person.addresses.and_(Address.postal_code_id.in_(select(PostalCode.id).where(PostalCode.code == code)))
            )
        )
    )


def shape(people) -> list:
    return [(p.id, p.name, sorted(a.id for a in p.addresses)) for p in people]


# -- the listener: connections made before the first cache, nesting, errors, threads


PRE_EXISTING = """
import sys, tempfile
sys.path.insert(0, sys.argv[1])
from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import Session, sessionmaker, selectinload
from tests import models
from tests.models import Address, Person, PostalCode

directory = tempfile.mkdtemp()
engine = create_engine(f"sqlite:///{directory}/t.sqlite")
models.Base.metadata.create_all(engine)
with sessionmaker(engine)() as s:
    models.seed(s)
# A Connection made before any SessionCache exists (before the listener is installed).
connection = engine.connect()
from pyramid_sessioncache import SessionCache, cached_query
from pyramid_sessioncache.engine import loader

cache = SessionCache({"m": {"type": "memory"}}, default_region="m", secret="a test secret, long enough")

def statement():
    return select(Person).where(Person.id == 1).options(selectinload(
        Person.addresses.and_(Address.postal_code_id.in_(select(PostalCode.id).where(PostalCode.code == "00001")))))

def read(cached):
    s = Session(bind=connection, info=cache.session_info())
    try:
        p = (cached_query(s, statement()) if cached else s.execute(statement())).scalars().one()
        return sorted(a.id for a in p.addresses)
    finally:
        s.close()

first = read(True), read(True)
print("learnt", sorted(next(iter(cache.tables_read._tables.values()))))
with sessionmaker(engine, info=cache.session_info())() as w:
    w.execute(update(PostalCode).where(PostalCode.id == 1).values(code="changed"))
    w.commit()
print("result", first, read(True), read(False))
"""


def test_a_connection_made_before_the_first_cache_still_records_what_eager_loads_read():
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PRE_EXISTING), str(ROOT)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert "postal_code" in lines["learnt"]
    assert lines["result"] == "([1], [1]) [] []"


def test_a_load_that_fails_half_way_leaves_no_reading_and_the_next_load_records(engine, cache):
    Session = sessionmaker(bind=engine, info=cache.session_info())
    calls = {"n": 0}

    def fail_second(conn, cursor, statement, parameters, context, executemany):
        if "address" in statement and "postal_code" in statement:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("the eager load fails")

    event.listen(engine, "before_cursor_execute", fail_second)
    try:
        with Session() as session, pytest.raises(Exception, match="the eager load fails"):
            cached_query(session, criteria_statement()).scalars().all()
        assert loader._READING == {}
        with Session() as session:
            first = shape(cached_query(session, criteria_statement()).scalars().all())
    finally:
        event.remove(engine, "before_cursor_execute", fail_second)
    with Session() as session:
        session.execute(update(PostalCode).where(PostalCode.id == 1).values(code="elsewhere"))
        session.commit()
    with Session() as session:
        cached = shape(cached_query(session, criteria_statement()).scalars().all())
    with PlainSession(engine) as plain:
        expected = shape(plain.execute(criteria_statement()).scalars().all())
    assert first != expected and cached == expected


def test_threads_loading_at_once_each_record_their_own_tables(engine, cache, tmp_path):
    """Eight threads miss at once on eight shapes over different tables; a write to each table reaches each."""
    Session = sessionmaker(bind=engine, info=cache.session_info())

    def statement(i):
        if i % 2:
            return criteria_statement().where(Person.id != 100 + i)
        return (
            select(Person)
            .where(Person.id <= 3, Person.id != 100 + i)
            .order_by(Person.id)
            .options(selectinload(Person.tags.and_(Tag.name != f"nothing {i}")))
        )

    def result(people, i):
        return [(p.id, sorted(a.id for a in p.addresses) if i % 2 else [t.id for t in p.tags]) for p in people]

    barrier = threading.Barrier(8)
    errors = []

    def load(i):
        try:
            barrier.wait(60)
            with Session() as session:
                result(cached_query(session, statement(i)).scalars().all(), i)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors and loader._READING == {}
    with Session() as session:
        session.execute(update(PostalCode).where(PostalCode.id == 1).values(code="x"))
        session.execute(delete(person_tag).where(person_tag.c.person_id == 1))
        session.commit()
    for i in range(8):
        with Session() as session:
            cached = result(cached_query(session, statement(i)).scalars().all(), i)
        with PlainSession(engine) as plain:
            expected = result(plain.execute(statement(i)).scalars().all(), i)
        assert cached == expected, i


def test_a_cached_query_inside_a_listener_of_a_load_records_both(engine, cache):
    """A load within a load on one connection: a column of the outer depends on what the inner read."""
    Session = sessionmaker(bind=engine, info=cache.session_info())
    with Session() as session:
        a = shape(cached_query(session, criteria_statement()).scalars().all())
        # a second, different load on the same connection and transaction
        tags = [t.name for t in cached_query(session, select(Tag).order_by(Tag.id)).scalars()]
        b = shape(cached_query(session, criteria_statement()).scalars().all())
    assert a == b and tags
    with Session() as session:
        session.execute(update(Tag).where(Tag.id == 1).values(name="renamed tag"))
        session.execute(update(PostalCode).where(PostalCode.id == 1).values(code="moved"))
        session.commit()
    with Session() as session:
        assert [t.name for t in cached_query(session, select(Tag).order_by(Tag.id)).scalars()][0] == "renamed tag"
        cached = shape(cached_query(session, criteria_statement()).scalars().all())
    with PlainSession(engine) as plain:
        assert cached == shape(plain.execute(criteria_statement()).scalars().all())


# -- a Session bound to a Connection (the cookiecutter's test recipe)


def test_the_test_recipe_leaves_nothing_of_a_rolled_back_outer_transaction(db_url, cache):
    # SQLAlchemy's recipe for SAVEPOINT on pysqlite: the driver's own transaction handling off.
    engine = create_engine(db_url)

    @event.listens_for(engine, "connect")
    def no_driver_transactions(dbapi_connection, record):
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def begin(conn):
        conn.exec_driver_sql("BEGIN")

    connection = engine.connect()
    outer = connection.begin()
    try:
        with PlainSession(
            bind=connection, info=cache.session_info(), join_transaction_mode="create_savepoint"
        ) as session:
            session.get(Person, 1).name = "inside the test"
            session.commit()  # a savepoint released: the outer transaction still holds it
        with PlainSession(
            bind=connection, info=cache.session_info(), join_transaction_mode="create_savepoint"
        ) as session:
            inside = [p.name for p in cached_query(session, criteria_statement()).scalars()]
            assert "inside the test" in inside
    finally:
        outer.rollback()
        connection.close()
    Session = sessionmaker(bind=engine, info=cache.session_info())
    with Session() as session:
        cached = [p.name for p in cached_query(session, criteria_statement()).scalars()]
    with PlainSession(engine) as plain:
        expected = [p.name for p in plain.execute(criteria_statement()).scalars()]
    assert "inside the test" not in expected
    assert cached == expected


# -- shapes whose tables were learnt, then the statement reads others


def test_same_shape_other_schema_through_schema_translate_map(tmp_path, cache):
    """One shape, two schemas (SQLite ATTACH): a write to the other schema reaches its entries."""
    path = tmp_path / "main.sqlite"
    other = tmp_path / "other.sqlite"
    engine = create_engine(f"sqlite:///{path}")

    @event.listens_for(engine, "connect")
    def attach(dbapi_connection, record):
        dbapi_connection.execute(f"ATTACH DATABASE '{other}' AS other")

    from .models import Base, seed

    Base.metadata.create_all(engine)
    with sessionmaker(engine)() as session:
        seed(session)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE other.person AS SELECT * FROM main.person")
        conn.exec_driver_sql("UPDATE other.person SET name = 'other ' || name")
    translated = engine.execution_options(schema_translate_map={None: "other"})
    try:
        statement = lambda: select(Person.name).where(Person.id <= 2).order_by(Person.id)  # noqa: E731
        for bind in (engine, translated, engine, translated):
            with sessionmaker(bind=bind, info=cache.session_info())() as session:
                cached_query(session, statement()).scalars().all()
        with sessionmaker(bind=translated, info=cache.session_info())() as session:
            session.execute(update(Person).where(Person.id == 1).values(name="other renamed"))
            session.commit()
        for bind in (engine, translated):
            with sessionmaker(bind=bind, info=cache.session_info())() as session:
                cached = cached_query(session, statement()).scalars().all()
            with PlainSession(bind) as plain:
                assert cached == plain.execute(statement()).scalars().all()
    finally:
        engine.dispose()


def test_a_column_property_added_after_the_shape_was_learnt(engine, cache):
    """The same ``select(P)`` shape reads ``address`` once a column_property counts addresses."""
    from sqlalchemy.orm import DeclarativeBase, column_property

    from .models import Base as ModelsBase

    class Base(DeclarativeBase):
        pass

    class P(Base):
        __table__ = ModelsBase.metadata.tables["person"].to_metadata(Base.metadata)

    addresses = ModelsBase.metadata.tables["address"].to_metadata(Base.metadata)
    Session = sessionmaker(bind=engine, info=cache.session_info())
    statement = lambda: select(P).where(P.id <= 3).order_by(P.id)  # noqa: E731
    with Session() as session:
        cached_query(session, statement()).scalars().all()
    P.address_count = column_property(
        select(func.count(addresses.c.id)).where(addresses.c.person_id == P.id).scalar_subquery()
    )
    with Session() as session:
        first = [(p.id, p.address_count) for p in cached_query(session, statement()).scalars()]
    with Session() as session:
        session.execute(insert(Address).values(id=999, person_id=1, street="new", postal_code_id=1))
        session.commit()
    with Session() as session:
        cached = [(p.id, p.address_count) for p in cached_query(session, statement()).scalars()]
    with PlainSession(engine) as plain:
        expected = [(p.id, p.address_count) for p in plain.execute(statement()).scalars()]
    assert first != expected and cached == expected


def test_loader_criteria_lambda_reading_another_table_in_one_shape(engine, cache):
    """with_loader_criteria with a lambda: two bound values, one shape; a write to the table it reads."""
    Session = sessionmaker(bind=engine, info=cache.session_info())

    def statement(code):
        return (
            select(Address)
            .where(Address.id <= 6)
            .order_by(Address.id)
            .options(
                with_loader_criteria(
                    Address,
                    lambda cls: cls.postal_code_id.in_(select(PostalCode.id).where(PostalCode.code == code)),
                )
            )
        )

    for code in ("00001", "00002", "00001", "00002"):
        with Session() as session:
            cached_query(session, statement(code)).scalars().all()
    with Session() as session:
        session.execute(update(PostalCode).where(PostalCode.id == 2).values(code="00001"))
        session.commit()
    for code in ("00001", "00002"):
        with Session() as session:
            cached = [a.id for a in cached_query(session, statement(code)).scalars()]
        with PlainSession(engine) as plain:
            assert cached == [a.id for a in plain.execute(statement(code)).scalars()], code


# -- the decision handed from cached_query() to the ORM hook


@pytest.mark.parametrize("region", ["memory", "file"])
def test_pending_changes_decided_then_flushed_are_never_stored(engine, cache, region):
    Session = sessionmaker(bind=engine, info=cache.session_info())
    with Session() as session:
        session.get(Person, 2).name = "pending, never committed"
        inside = [p.name for p in cached_query(session, criteria_statement(), region).scalars()]
        assert "pending, never committed" in inside
        session.rollback()
    with Session() as session:
        cached = [p.name for p in cached_query(session, criteria_statement(), region).scalars()]
    with PlainSession(engine) as plain:
        expected = [p.name for p in plain.execute(criteria_statement()).scalars()]
    assert "pending, never committed" not in expected and cached == expected


def test_a_write_between_two_cached_queries_of_one_transaction(engine, cache):
    """Decided before the write for one statement; the next statement must be decided anew."""
    Session = sessionmaker(bind=engine, info=cache.session_info())
    with Session() as session:
        cached_query(session, criteria_statement()).scalars().all()  # a miss, stored
        session.execute(text("UPDATE person SET name = 'textual uncommitted' WHERE id = 1"))
        inside = [p.name for p in cached_query(session, criteria_statement()).scalars()]
        session.rollback()
    with Session() as session:
        cached = [p.name for p in cached_query(session, criteria_statement()).scalars()]
    with PlainSession(engine) as plain:
        expected = [p.name for p in plain.execute(criteria_statement()).scalars()]
    assert "textual uncommitted" in inside
    assert cached == expected


def test_a_session_listener_that_changes_the_statement_is_not_skipped(engine, cache):
    """An untrusted do_orm_execute listener: no decision handed; its criteria are keyed."""
    Session = sessionmaker(bind=engine, info=cache.session_info())
    tenant = {"max": 2}

    @event.listens_for(Session, "do_orm_execute")
    def only_some(state):
        if state.is_select:
            state.statement = state.statement.options(
                with_loader_criteria(Person, Person.id <= tenant["max"], include_aliases=True)
            )

    def names():
        with Session() as session:
            return [p.name for p in cached_query(session, select(Person).order_by(Person.id)).scalars()]

    assert len(names()) == 2
    tenant["max"] = 5
    assert len(names()) == 5
    tenant["max"] = 2
    assert len(names()) == 2
