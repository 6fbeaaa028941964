"""Session 23, attack C: the read, key and connection-state fixes of session 22, attacked.

Each test runs a query cached and uncached (a plain Session, no cache) in
a realistic sequence and asserts that both give the same rows, or that a
statement run for what it does runs as often cached as uncached.
"""

from __future__ import annotations

import datetime

import pytest
from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    MetaData,
    Sequence,
    String,
    Table,
    Time,
    cast,
    create_engine,
    func,
    insert,
    literal,
    select,
    text,
)
from sqlalchemy.orm import sessionmaker

from pyramid_sessioncache import FromCache, SessionCache

from .conftest import SECRET, SQLCounter
from .models import Person
from .test_attack_s22_b import cached_and_uncached, on_two_connections
from .test_attack_s22_b import tenant_files as tenant_files  # a fixture, used by name


class MaskedInt(int):
    """An account number that hides itself from the logs: its repr is the same for every value."""

    def __repr__(self) -> str:
        return "MaskedInt(***)"


class MaskedDateTime(datetime.datetime):
    """A moment that hides itself from the logs (a birth date, say)."""

    def __repr__(self) -> str:
        return "MaskedDateTime(***)"


class MaskedTime(datetime.time):
    """A time of day that hides itself from the logs."""

    def __repr__(self) -> str:
        return "MaskedTime(***)"


UTC = datetime.timezone.utc


@pytest.mark.parametrize(
    "statement_of",
    [
        lambda number: select(Person.id).where(Person.id == MaskedInt(number)),
        lambda number: select(cast(literal(MaskedDateTime(2020, 1, number, tzinfo=UTC), DateTime), String)),
        lambda number: select(cast(literal(MaskedTime(number, 0, tzinfo=UTC), Time), String)),
    ],
    ids=["int", "aware datetime", "aware time"],
)
def test_a_value_of_any_plain_type_whose_repr_hides_it_is_keyed_by_its_value(Session, engine, statement_of):
    """Session 22 keyed a ``str`` subclass masking its repr by its value, not an ``int``'s nor an aware moment's.

    Every value of such a subclass shared one key: the second look-up was
    served the rows of the first value.
    """
    for number in (1, 2):
        cached, uncached = cached_and_uncached(Session, engine, statement_of(number))
        assert cached == uncached


WRITERS = """
CREATE TABLE audit (id serial PRIMARY KEY, note text);
CREATE FUNCTION rename_person(i int, n text) RETURNS int LANGUAGE sql
    AS $$ UPDATE person SET name = n WHERE id = i RETURNING id $$;
CREATE FUNCTION run_sql(q text) RETURNS void LANGUAGE plpgsql
    AS $$ BEGIN EXECUTE q; END $$;
"""


@pytest.mark.parametrize(
    "call",
    [
        "INSERT INTO audit (note) SELECT rename_person(1, 'renamed')::text",
        "UPDATE audit SET note = rename_person(1, 'renamed')::text",
        "SELECT run_sql('UPDATE person SET name = ''renamed'' WHERE id = 1')",
    ],
    ids=["INSERT calling a writer", "UPDATE calling a writer", "a function EXECUTEing its argument"],
)
def test_a_statement_that_calls_a_function_that_writes_invalidates(pg_url, call):
    """A function of the database's own that writes, called by DML, or one that runs the SQL it is given.

    Session 22 made a SELECT calling a writer write every table, not an
    INSERT or UPDATE (it wrote its own table only), and no longer counted
    ``EXECUTE`` as a write: ``EXECUTE q`` of a parameter writes whatever
    the caller says.  The commit left every entry of ``person`` as it was.
    """
    engine = create_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(WRITERS)
            conn.exec_driver_sql("INSERT INTO audit (note) VALUES ('first')")
        Session = sessionmaker(engine, info=SessionCache({"memory": {"type": "memory"}}, secret=SECRET).session_info())
        stmt = select(Person.id, Person.name).where(Person.id <= 2).order_by(Person.id)
        with Session() as session:
            assert session.execute(stmt.options(FromCache("memory"))).all()[0] == (1, "person 1")
        with Session() as session:
            session.execute(text(call))
            session.commit()
        cached, uncached = cached_and_uncached(Session, engine, stmt)
        assert cached == uncached
        assert uncached[0] == (1, "renamed")
    finally:
        engine.dispose()


COUNTER = """
CREATE TABLE counter (n int);
INSERT INTO counter VALUES (0);
CREATE FUNCTION bump() RETURNS int LANGUAGE sql AS $$ UPDATE counter SET n = n + 1 RETURNING n $$;
CREATE TABLE audit (id serial PRIMARY KEY, note text);
"""

audit = Table("audit", MetaData(), Column("id", Integer, primary_key=True), Column("note", String))


@pytest.mark.parametrize(
    "stmt",
    [select(func.bump()), select(insert(audit).values(note="x").returning(audit.c.id).cte().c.id)],
    ids=["a function that writes", "DML in a CTE"],
)
@pytest.mark.parametrize("isolation_level", ["READ COMMITTED", "AUTOCOMMIT"])
@pytest.mark.parametrize("region", ["local", "memory"])
def test_a_read_that_writes_runs_once_each_time_as_uncached(pg_url, region, stmt, isolation_level):
    """A SELECT that writes (``SELECT bump()``, ``WITH i AS (INSERT ...) SELECT``) asked for through a cache.

    A miss of a shared region ran it twice (the function of the database's
    own read any table: loaded again to learn their versions), and
    ``ext:local_session`` served it again in the same transaction, writing
    nothing: an uncached run writes at every execution.  In autocommit,
    where what it wrote is published as it runs, it ran twice too.
    """
    engine = create_engine(pg_url, isolation_level=isolation_level)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(COUNTER)
        options = {"memory": {"type": "memory"}, "local": {"type": "ext:local_session"}}
        Session = sessionmaker(engine, info=SessionCache(options, secret=SECRET).session_info())
        with Session() as session:
            got = [session.execute(stmt.options(FromCache(region))).scalar() for _ in range(2)]
            session.commit()
        assert got == [1, 2]
        with engine.connect() as conn:
            assert conn.execute(text("SELECT (SELECT n FROM counter) + (SELECT count(*) FROM audit)")).scalar() == 2
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "stmt",
    [select(func.bump()), select(insert(audit).values(note="x").returning(audit.c.id).cte().c.id)],
    ids=["a function that writes", "DML in a CTE"],
)
@pytest.mark.parametrize("invalidation", ["auto", "manual"])
def test_a_read_that_wrote_is_not_stored_for_a_rollback_to_leave_valid(pg_url, stmt, invalidation):
    """A shared miss stored what a SELECT that writes returned, under the versions read before it ran.

    Its transaction rolled back: no version moved, and the next execution
    was a hit, which wrote nothing (no row in ``audit``, the counter at 0).
    With ``invalidation = manual``, a commit left it stored as well.
    """
    engine = create_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(COUNTER)
        cache = SessionCache({"memory": {"type": "memory"}}, secret=SECRET, invalidation=invalidation)
        Session = sessionmaker(engine, info=cache.session_info())
        with Session() as session:
            session.execute(stmt.options(FromCache("memory"))).scalar()
            session.rollback()
        with Session() as session:
            session.execute(stmt.options(FromCache("memory"))).scalar()
            session.commit()
        with engine.connect() as conn:
            assert conn.execute(text("SELECT (SELECT n FROM counter) + (SELECT count(*) FROM audit)")).scalar() == 1
    finally:
        engine.dispose()


@pytest.mark.parametrize("region", ["local", "memory"])
def test_a_function_that_reads_what_its_connection_drew_is_read_every_time(pg_database, region):
    """``my_currval()``, a function of the database's own, returns ``currval('numbers')``.

    Session 22 ran ``currval()`` named in a statement every time, not one
    a function calls: each Session was served the first number drawn, and
    ``ext:local_session`` served a Session the number it drew before the last.
    """
    engine = create_engine(pg_database)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE SEQUENCE numbers; "
                "CREATE FUNCTION my_currval() RETURNS bigint LANGUAGE sql AS $$ SELECT currval('numbers') $$"
            )
        options = {"memory": {"type": "memory"}, "local": {"type": "ext:local_session"}}
        Session = sessionmaker(engine, info=SessionCache(options, secret=SECRET).session_info())
        got = []
        for _ in range(2):
            with Session() as session:
                for _ in range(2):
                    drawn = session.execute(select(Sequence("numbers").next_value())).scalar()
                    got.append((drawn, session.execute(select(func.my_currval()).options(FromCache(region))).scalar()))
        assert got == [(number, number) for number in (1, 2, 3, 4)]
    finally:
        engine.dispose()


TEMPORARY_MAKER = """
CREATE FUNCTION scratch() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    CREATE TEMP TABLE person AS SELECT id, 'temporary' AS name FROM public.person;
END $$
"""


def _two_connections_agree(engine, act) -> None:
    """Two Sessions on two connections at once: after ``act(first, second, stmt)`` and both commits,
    each one's cached read of person 1 is its uncached read."""
    Session = sessionmaker(engine, info=SessionCache({"memory": {"type": "memory"}}, secret=SECRET).session_info())
    stmt = select(Person.id, Person.name).where(Person.id == 1)
    first, second = Session(), Session()
    try:
        for session in (first, second):
            session.connection()  # two connections checked out at once
        act(first, second, stmt)
        first.commit()
        second.commit()
        for session in (first, second):
            assert session.execute(stmt.options(FromCache("memory"))).all() == session.execute(stmt).all()
    finally:
        first.close()
        second.close()


def test_a_temporary_table_a_function_makes_keeps_its_rows_to_its_connection(pg_url):
    """``SELECT scratch()``, whose body runs ``CREATE TEMP TABLE person``: ``person`` is another table on that connection.

    The statement names no temporary table: the connection was keyed as
    every other, and the other connection was served the temporary rows.
    """
    engine = create_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(TEMPORARY_MAKER)
        _two_connections_agree(engine, lambda first, second, stmt: first.execute(text("SELECT scratch()")).all())
    finally:
        engine.dispose()


def test_a_setting_that_cannot_be_told_keeps_the_connection_uncached_in_its_next_transactions(pg_url):
    """``SELECT set_config(:name, :value, false)``: which setting, the text does not say; its connection's settings are unknown.

    Its look-ups run uncached, but only while the Session that made it
    held the connection: the next transaction of a Session asked whether
    the pool had connections with settings, was told no, and stored (and
    was served) the rows every other connection reads.
    """
    engine = create_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE SCHEMA tenant; CREATE TABLE tenant.person AS SELECT id, 'of the tenant' AS name FROM public.person"
            )

        def act(first, second, stmt) -> None:
            second.execute(stmt.options(FromCache("memory"))).all()  # stored: public's row
            first.execute(text("SELECT set_config(:name, :value, false)"), {"name": "search_path", "value": "tenant"})

        _two_connections_agree(engine, act)
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "detach",
    ["DETACH 'previous'", "ATTACH DATABASE ':memory:' AS 'scratch'"],
    ids=["another detached by a string", "another attached by a string"],
)
def test_a_database_attached_under_a_string_keys_its_reads(Session, tenant_files, detach):  # noqa: F811 - the fixture
    """SQLite's ``ATTACH ... AS 'tenant'``: a schema named by a string, which the cleaned SQL holds as ``''``.

    Every such name was one setting: ``DETACH 'previous'`` forgot the
    tenant's attachment, and a later ``ATTACH ... AS 'scratch'`` replaced it;
    the connections of tenants a and b shared one key.
    """
    item = Table("item", MetaData(), Column("id", Integer, primary_key=True), Column("name", String), schema="tenant")

    def attach(session, number):
        session.execute(text("ATTACH DATABASE :path AS 'previous'"), {"path": tenant_files[1 - number]})
        session.execute(text("ATTACH DATABASE :path AS 'tenant'"), {"path": tenant_files[number]})
        session.execute(text(detach))
        if "ATTACH" in detach:
            session.execute(text("DETACH 'previous'"))

    for cached, uncached in on_two_connections(Session, attach, select(item.c.name)):
        assert cached == uncached


PARTITIONS = """
CREATE TABLE measurement (taken date NOT NULL, value int) PARTITION BY RANGE (taken);
CREATE TABLE measurement_2020 PARTITION OF measurement FOR VALUES FROM ('2020-01-01') TO ('2021-01-01');
CREATE TABLE measurement_2026 PARTITION OF measurement FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
INSERT INTO measurement VALUES ('2020-06-01', 1), ('2026-06-01', 2);
CREATE FUNCTION drop_old_partitions() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    DROP TABLE measurement_2020;
END $$;
"""


def test_a_function_that_changes_the_schema_writes(pg_database):
    """``SELECT drop_old_partitions()``, a maintenance function whose body drops a partition.

    The rows of the partition left its parent; the function holds no DML,
    so it was no writer, and what read the parent was served after the commit.
    """
    engine = create_engine(pg_database)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(PARTITIONS)
        Session = sessionmaker(engine, info=SessionCache({"memory": {"type": "memory"}}, secret=SECRET).session_info())
        measurement = Table("measurement", MetaData(), Column("taken", DateTime), Column("value", Integer))
        stmt = select(measurement.c.value).order_by(measurement.c.value)
        with Session() as session:
            assert session.execute(stmt.options(FromCache("memory"))).all() == [(1,), (2,)]
        with Session() as session:
            session.execute(text("SELECT drop_old_partitions()")).all()
            session.commit()
        assert cached_and_uncached(Session, engine, stmt) == ([(2,)], [(2,)])
    finally:
        engine.dispose()


def test_an_insert_into_a_table_named_as_a_writer_writes_that_table_only(pg_url):
    """``INSERT INTO audit (note)`` beside a function ``audit(text)`` that writes: the column list calls nothing.

    Read as a call, each insert into ``audit`` would have written every
    table, and each commit emptied every shared region of its entries.
    """
    engine = create_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE TABLE audit (id serial PRIMARY KEY, note text); "
                "CREATE FUNCTION audit(t text) RETURNS void LANGUAGE sql AS $$ INSERT INTO audit (note) VALUES (t) $$"
            )
        Session = sessionmaker(engine, info=SessionCache({"memory": {"type": "memory"}}, secret=SECRET).session_info())
        stmt = select(Person.name).where(Person.id == 1).options(FromCache("memory"))
        with Session() as session:
            session.execute(stmt).all()
        with Session() as session:
            session.execute(text("INSERT INTO audit (note) VALUES ('x')"))
            session.execute(insert(audit).values(note="y"))
            session.commit()
        sql = SQLCounter(engine)
        with Session() as session:
            assert session.execute(stmt).all() == [("person 1",)]
        assert sql.count == 0
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "sql",
    ["SELECT \"currval\"('numbers')", "SELECT pg_catalog.\"currval\" ('numbers')", "SELECT \"nextval\"('numbers')"],
)
def test_an_effect_function_spelt_quoted_runs_every_time(pg_database, sql):
    """``SELECT "currval"('numbers')`` is ``currval()``: a quoted name calls the same function.

    The search for effect functions in SQL text wanted the name right
    before its parenthesis: quoted, it was cached, and each Session was
    served the number the first one drew.
    """
    engine = create_engine(pg_database)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE SEQUENCE numbers")
        Session = sessionmaker(engine, info=SessionCache({"memory": {"type": "memory"}}, secret=SECRET).session_info())
        got = []
        for _ in range(2):
            with Session() as session:
                drawn = session.execute(select(Sequence("numbers").next_value())).scalar()
                got.append(session.execute(text(sql).options(FromCache("memory"))).scalar() - drawn)
        assert got == [0, 0] if "currval" in sql else got == [1, 1]
    finally:
        engine.dispose()


def test_what_a_sqlite_connection_inserted_last_is_read_every_time(Session, engine):
    """``SELECT last_insert_rowid()`` gives the row id of its own connection's last INSERT, as ``lastval()`` does.

    No write publishes what it returns: the other connection was served
    the first connection's row id.
    """
    from .models import Tag

    first, second = Session(), Session()
    try:
        for session in (first, second):
            session.connection()  # two connections checked out at once
        first.add(Tag(id=10, name="tag 10"))
        first.commit()
        second.commit()
        for session in (first, second):
            stmt = text("SELECT last_insert_rowid()")
            assert session.execute(stmt.options(FromCache("memory"))).all() == session.execute(stmt).all()
    finally:
        first.close()
        second.close()


class MaskedTenant(str):
    """A tenant's name that hides itself from the logs."""

    def __repr__(self) -> str:
        return "MaskedTenant('***')"


def test_a_setting_made_with_a_value_whose_repr_hides_it_keys_by_the_value(pg_url):
    """``SELECT set_config('app.tenant', :tenant, false)`` with a masked value: each tenant's setting is its own.

    The setting was keyed by the statement and the repr of its
    parameters: every tenant's connection had one key, and tenant b was
    served what tenant a read.
    """
    engine = create_engine(pg_url)
    try:
        Session = sessionmaker(engine, info=SessionCache({"memory": {"type": "memory"}}, secret=SECRET).session_info())
        stmt = select(func.current_setting("app.tenant"))
        first, second = Session(), Session()
        try:
            for session in (first, second):
                session.connection()  # two connections checked out at once
            for session, tenant in ((first, "a"), (second, "b")):
                session.execute(
                    text("SELECT set_config('app.tenant', :tenant, false)"), {"tenant": MaskedTenant(tenant)}
                )
                session.commit()
            for session in (first, second):
                assert session.execute(stmt.options(FromCache("memory"))).all() == session.execute(stmt).all()
        finally:
            first.close()
            second.close()
    finally:
        engine.dispose()


VIEW_THAT_WRITES = """
CREATE TABLE counter (n int);
INSERT INTO counter VALUES (0);
CREATE FUNCTION bump() RETURNS int LANGUAGE sql AS $$ UPDATE counter SET n = n + 1 RETURNING n $$;
CREATE VIEW visits AS SELECT bump() AS n;
CREATE VIEW recent_visits AS SELECT n FROM visits;
"""


@pytest.mark.parametrize("view", ["visits", "recent_visits"])
def test_a_view_that_calls_a_function_that_writes_runs_every_time(pg_database, view):
    """``SELECT n FROM visits``, a view over ``bump()`` (an audit-on-read view): each read bumps the counter, uncached.

    The SQL that reads it names the view, not the function: nothing marked
    the read a write, its load was stored, and the hit ran nothing.
    """
    engine = create_engine(pg_database)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(VIEW_THAT_WRITES)
        Session = sessionmaker(engine, info=SessionCache({"memory": {"type": "memory"}}, secret=SECRET).session_info())
        got = []
        for _ in range(2):
            with Session() as session:
                got.append(session.execute(text(f"SELECT n FROM {view}").options(FromCache("memory"))).scalar())
                session.commit()
        assert got == [1, 2]
    finally:
        engine.dispose()


def test_a_function_that_draws_from_a_sequence_writes_nothing(pg_database):
    """``SELECT next_code()``, a function that calls ``nextval()``: its result is stored nowhere, and it writes nothing.

    Counted as a writer, each call would have invalidated every entry of
    every shared region at its commit.
    """
    engine = create_engine(pg_database)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE SEQUENCE codes; CREATE TABLE item (id int, name text); INSERT INTO item VALUES (1, 'one'); "
                "CREATE FUNCTION next_code() RETURNS bigint LANGUAGE sql AS $$ SELECT nextval('codes') $$"
            )
        Session = sessionmaker(engine, info=SessionCache({"memory": {"type": "memory"}}, secret=SECRET).session_info())
        item = Table("item", MetaData(), Column("id", Integer), Column("name", String))
        stmt = select(item.c.name).options(FromCache("memory"))
        with Session() as session:
            session.execute(stmt).all()
        codes = []
        for _ in range(2):
            with Session() as session:
                codes.append(session.execute(select(func.next_code()).options(FromCache("memory"))).scalar())
                session.commit()
        assert codes == [1, 2]
        sql = SQLCounter(engine)
        with Session() as session:
            assert session.execute(stmt).all() == [("one",)]
        assert sql.count == 0
    finally:
        engine.dispose()
