"""Session 22, attack surface B: what a statement reads and writes, as the ORM and SQL can express it.

Each test runs a query cached and uncached (a plain Session, no cache) in
a realistic sequence and asserts that both give the same rows.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sqlalchemy import Column, Integer, MetaData, Sequence, String, Table, bindparam, create_engine, func, select, text
from sqlalchemy.orm import Session as PlainSession
from sqlalchemy.orm import sessionmaker

from pyramid_sessioncache import FromCache, SessionCache, cached_query

from .conftest import SECRET, SQLCounter
from .models import Person


def cached_and_uncached(Session, engine, stmt, region="memory"):
    """The rows of ``stmt`` read through ``region`` (stored by another Session first), then uncached."""
    with Session() as other:
        other.execute(stmt.options(FromCache(region))).all()
    with Session() as session:
        cached = session.execute(stmt.options(FromCache(region))).all()
    with PlainSession(engine) as session:
        uncached = session.execute(stmt).all()
    return cached, uncached


class Masked(str):
    """A secret that hides itself from the logs: its repr is the same for every value."""

    def __repr__(self) -> str:
        return "Masked('***')"


def test_a_value_whose_repr_hides_it_is_keyed_by_its_value(Session, engine):
    """A ``str`` subclass masking its repr (an API token) made every value share one key.

    A look-up with the token of one account was served the rows of another's.
    """
    for name in ("person 1", "person 2"):
        stmt = select(Person.id).where(Person.name == Masked(name))
        cached, uncached = cached_and_uncached(Session, engine, stmt)
        assert cached == uncached


def test_a_sqlalchemy_symbol_is_keyed_alike_in_every_process():
    """``JSON.NULL`` is an ``int`` subclass whose value is a hash of its name: keyed by its value, no process shares a key."""
    code = "from sqlalchemy import JSON; from pyramid_sessioncache.engine.keys import value_text; print(value_text(JSON.NULL))"
    texts = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(texts) == 1


def on_two_connections(Session, prepare, stmt):
    """``stmt``'s rows, cached then uncached, on each of two pooled connections ``prepare(session, i)`` set up.

    Each connection is set up by a Session of its own, committed: the
    Sessions that read afterwards have written nothing.
    """
    first, second = Session(), Session()
    try:
        for session in (first, second):
            session.connection()  # two connections checked out at once
        for number, session in enumerate((first, second)):
            prepare(session, number)
            session.commit()
        return [
            (session.execute(stmt.options(FromCache("memory"))).all(), session.execute(stmt).all())
            for session in (first, second)
        ]
    finally:
        first.close()
        second.close()


@pytest.fixture
def tenant_files(tmp_path):
    """Two SQLite files, each with an ``item`` table holding one row naming its tenant."""
    paths = []
    for tenant in ("a", "b"):
        path = tmp_path / f"tenant_{tenant}.sqlite"
        engine = create_engine(f"sqlite:///{path}")
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE item (id INTEGER PRIMARY KEY, name VARCHAR)")
            conn.exec_driver_sql(f"INSERT INTO item VALUES (1, 'of {tenant}')")
        engine.dispose()
        paths.append(str(path))
    return paths


def test_a_database_attached_to_a_connection_keys_its_reads(Session, tenant_files):
    """SQLite's ``ATTACH 'tenant_a.db' AS tenant`` shows a tenant's tables to one connection, as a search path does.

    A connection that had attached tenant b was served the rows another,
    attached to tenant a, stored under the same key.
    """
    item = Table("item", MetaData(), Column("id", Integer, primary_key=True), Column("name", String), schema="tenant")

    def attach(session, number):
        session.execute(text("ATTACH DATABASE :path AS tenant"), {"path": tenant_files[number]})

    for cached, uncached in on_two_connections(Session, attach, select(item.c.name)):
        assert cached == uncached


def test_a_pragma_that_changes_what_a_connection_reads_keys_its_reads(Session):
    """``PRAGMA case_sensitive_like = 1`` on one connection: its LIKE no longer matches across case."""

    def case_sensitive(session, number):
        session.execute(text(f"PRAGMA case_sensitive_like = {number}"))

    stmt = select(Person.id).where(Person.name.like("PERSON 1"))
    for cached, uncached in on_two_connections(Session, case_sensitive, stmt):
        assert cached == uncached


@pytest.mark.parametrize("region", ["local", "memory"])
def test_values_given_by_params_are_keyed(Session, engine, region):
    """``select(...).params(p=2)``: SQLAlchemy 2.1 keeps these values beside the bound ones, not in them.

    Every ``.params()`` of one statement shared the key of its first, and
    was served its rows: person 1's for ``p=2``.
    """
    base = select(Person.id, Person.name).where(Person.id == bindparam("p", 0))
    with Session() as session:
        for number in (1, 2):
            cached = session.execute(base.params(p=number).options(FromCache(region))).all()
            with PlainSession(engine) as plain:
                assert cached == plain.execute(base.params(p=number)).all() == [(number, f"person {number}")]
            assert session.execute(base.params(p=number).options(FromCache(region)), {"p": 3}).all() == [
                (3, "person 3")
            ]


@pytest.mark.parametrize(
    "create",
    [
        "CREATE TABLE temp.person AS SELECT id, 'temporary' AS name FROM main.person",
        "CREATE TABLE IF NOT EXISTS \"temp\" . person AS SELECT id, 'temporary' AS name FROM main.person",
        "CREATE VIEW temp.person AS SELECT id, 'temporary' AS name FROM main.person",
    ],
)
def test_a_table_created_in_sqlites_temp_schema_by_name_keeps_its_rows_to_its_connection(Session, create):
    """``CREATE TABLE temp.person`` is SQLite's ``CREATE TEMP TABLE person``: it shadows ``person`` on one connection.

    The other connection was served the rows of the temporary table, read
    by the connection that made it.
    """

    def make(session, number):
        if number:
            session.execute(text(create))

    for cached, uncached in on_two_connections(Session, make, select(Person.id, Person.name).where(Person.id == 1)):
        assert cached == uncached


@pytest.mark.parametrize(
    "stmt",
    [select(func.currval("numbers")), select(func.lastval()), text("SELECT currval('numbers')")],
    ids=["currval", "lastval", "currval in text"],
)
def test_what_a_connection_drew_from_a_sequence_is_read_every_time(pg_database, stmt):
    """``currval()`` and ``lastval()`` give the number this connection's last ``nextval()`` drew.

    Drawing one is no write: nothing invalidated the first Session's
    number, served to every later Session instead of its own.
    """
    engine = create_engine(pg_database)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE SEQUENCE numbers"))
        cache = SessionCache({"memory": {"type": "memory"}}, secret=SECRET)
        Session = sessionmaker(engine, info=cache.session_info())
        for drawn in (1, 2):
            with Session() as session:
                assert session.execute(select(Sequence("numbers").next_value())).scalar() == drawn
                assert cached_query(session, stmt, region="memory").scalar() == drawn
    finally:
        engine.dispose()


WRITING_FUNCTIONS = """
CREATE FUNCTION rename_person(i int, n text) RETURNS int LANGUAGE sql
    AS $$ UPDATE person SET name = n WHERE id = i RETURNING id $$;
CREATE FUNCTION archive(i int) RETURNS void LANGUAGE plpgsql
    AS $$ BEGIN PERFORM rename_person(i, 'archived'); END $$;
"""


@pytest.mark.parametrize(
    "call",
    [select(func.rename_person(1, "renamed")), text("SELECT archive(1)")],
    ids=["a function that writes", "a function that calls one"],
)
@pytest.mark.parametrize("region", ["memory", "redis"])
def test_a_select_that_calls_a_function_that_writes_invalidates(pg_url, region_options, region, call, request):
    """``SELECT rename_person(1, 'renamed')``: PostgreSQL runs the function's ``UPDATE``, in a SELECT.

    Nothing was marked written: its commit left every entry of ``person``
    as it was, served until it expired.
    """
    if region == "redis":
        region_options["redis"] = {"type": "ext:redis", "url": request.getfixturevalue("redis_url")}
    engine = create_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(WRITING_FUNCTIONS)
        Session = sessionmaker(engine, info=SessionCache(region_options, secret=SECRET).session_info())
        stmt = select(Person.id, Person.name).where(Person.id <= 2).order_by(Person.id)
        with Session() as session:
            assert session.execute(stmt.options(FromCache(region))).all()[0] == (1, "person 1")
        with Session() as session:
            session.execute(call).all()
            session.commit()
        cached, uncached = cached_and_uncached(Session, engine, stmt, region)
        assert cached == uncached
        assert uncached[0] != (1, "person 1")
    finally:
        engine.dispose()


def test_a_table_renamed_to_a_name_read_further_down_the_search_path_invalidates(pg_database):
    """``ALTER TABLE tenant.staging RENAME TO item``: ``item`` now names the tenant's table, before ``public.item``.

    The schema change wrote ``staging`` (and what read SQL text), not
    ``item``: what read ``public.item`` was served after the rename.
    """
    engine = create_engine(pg_database, connect_args={"options": "-csearch_path=tenant,public"})
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE SCHEMA tenant; CREATE TABLE public.item (id int, name text); "
                "INSERT INTO public.item VALUES (1, 'public'); CREATE TABLE tenant.staging (id int, name text); "
                "INSERT INTO tenant.staging VALUES (1, 'tenant')"
            )
        Session = sessionmaker(engine, info=SessionCache({"memory": {"type": "memory"}}, secret=SECRET).session_info())
        item = Table("item", MetaData(), Column("id", Integer), Column("name", String))
        with Session() as session:
            assert session.execute(select(item.c.name).options(FromCache("memory"))).all() == [("public",)]
        with Session() as session:
            session.execute(text("ALTER TABLE tenant.staging RENAME TO item"))
            session.commit()
        assert cached_and_uncached(Session, engine, select(item.c.name)) == ([("tenant",)], [("tenant",)])
    finally:
        engine.dispose()


READING_FUNCTIONS = """
CREATE FUNCTION count_of(t text) RETURNS bigint LANGUAGE plpgsql
    AS $$ DECLARE n bigint; BEGIN EXECUTE format('SELECT count(*) FROM %%I', t) INTO n; RETURN n; END $$;
CREATE FUNCTION locked_name(i int) RETURNS text LANGUAGE sql
    AS $$ SELECT name FROM person WHERE id = i FOR UPDATE $$;
"""


@pytest.mark.parametrize("call", ["SELECT count_of('person')", "SELECT locked_name(1)"])
def test_a_function_that_only_reads_writes_nothing(pg_url, call):
    """A dynamic read (``EXECUTE format('SELECT ...')``) or a locking read in a function is no write.

    Counted as one, each request calling it would invalidate every entry
    of every shared region when it commits.
    """
    engine = create_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(READING_FUNCTIONS)
        Session = sessionmaker(engine, info=SessionCache({"memory": {"type": "memory"}}, secret=SECRET).session_info())
        stmt = select(Person.name).where(Person.id == 1).options(FromCache("memory"))
        with Session() as session:
            session.execute(stmt).all()
        with Session() as session:
            session.execute(text(call)).all()
            session.commit()
        sql = SQLCounter(engine)
        with Session() as session:
            assert session.execute(stmt).all() == [("person 1",)]
        assert sql.count == 0
    finally:
        engine.dispose()
