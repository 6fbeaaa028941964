"""Attack s26 (review): s25's fixes attacked again, and PostgreSQL's writers no statement names.

Each test compares what a cached read returns with what an uncached read
of the same query returns, after a committed write.  Hits are proven by
counting statements.
"""

from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, event, make_url, select, text
from sqlalchemy.orm import DeclarativeBase, sessionmaker

from .conftest import SQLCounter
from .test_attack_s25_review import (  # the helpers of s25's review, and its autouse fixture
    _cache,
    _logged_fresh_after,
    _no_schema_known,  # noqa: F401
    _rows,
    _run,
)
from .test_attack_s25_second import _each_served_its_own

_LOG = Table("s26_log", MetaData(), Column("id", Integer))
_LOGGED = select(_LOG.c.id)


class _Base(DeclarativeBase):
    pass


class _Item(_Base):
    """A row of ``s26_item``, mapped without the columns the database fills in."""

    __tablename__ = "s26_item"
    id = Column(Integer, primary_key=True)


def _add_item(session) -> None:
    session.add(_Item(id=1))
    session.flush()


# PostgreSQL: what a write to a table calls ------------------------------------------------------------

_WRITER = """
CREATE TABLE s26_log (id integer);
CREATE FUNCTION s26_logged() RETURNS integer LANGUAGE plpgsql AS $$
BEGIN INSERT INTO s26_log VALUES (1); RETURN 1; END $$;
CREATE FUNCTION s26_logged(a integer, b integer) RETURNS integer LANGUAGE plpgsql AS $$
BEGIN INSERT INTO s26_log VALUES (1); RETURN a + b; END $$;
CREATE OPERATOR ### (LEFTARG = integer, RIGHTARG = integer, FUNCTION = s26_logged);
"""


_CHECKED = "CREATE DOMAIN s26_checked AS integer CHECK (s26_logged() > 0);"


@pytest.mark.parametrize(
    "item",
    [
        "CREATE TABLE s26_item (id integer PRIMARY KEY, stamp integer DEFAULT s26_logged())",
        "CREATE TABLE s26_item (id integer PRIMARY KEY, stamp integer DEFAULT 1 ### 2)",
        "CREATE TABLE s26_item (id integer PRIMARY KEY CHECK (s26_logged() > 0))",
        "CREATE DOMAIN s26_stamp AS integer DEFAULT s26_logged();"
        "CREATE TABLE s26_item (id integer PRIMARY KEY, stamp s26_stamp)",
        "CREATE DOMAIN s26_id AS integer CHECK (s26_logged() > 0);CREATE TABLE s26_item (id s26_id PRIMARY KEY)",
        "CREATE TABLE s26_item (id integer PRIMARY KEY);"
        "CREATE RULE s26_logs AS ON INSERT TO s26_item DO ALSO SELECT s26_logged()",
        _CHECKED
        + "CREATE TABLE s26_item (id integer PRIMARY KEY, ids s26_checked[] DEFAULT ARRAY[ceil(random())::integer])",
        _CHECKED + "CREATE TYPE s26_pair AS (a s26_checked);"
        "CREATE TABLE s26_item (id integer PRIMARY KEY, pair s26_pair DEFAULT ROW(ceil(random())::integer))",
        "CREATE FUNCTION s26_nothing() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;"
        "CREATE TABLE s26_item (id integer PRIMARY KEY);"
        "CREATE TRIGGER s26_when AFTER INSERT ON s26_item FOR EACH ROW WHEN (s26_logged() > 0)"
        " EXECUTE FUNCTION s26_nothing()",
        "CREATE FUNCTION s26_fixed(x integer) RETURNS integer LANGUAGE plpgsql IMMUTABLE AS $$"
        " BEGIN RETURN s26_logged(); END $$;"
        "CREATE TABLE s26_item (id integer PRIMARY KEY); CREATE INDEX ON s26_item ((s26_fixed(id)))",
    ],
    ids=[
        "a column's default",
        "an operator in a default",
        "a check",
        "a domain's default",
        "a domain's check",
        "a rule",
        "an array of a domain's",
        "a composite type of a domain's",
        "a trigger's condition",
        "an index's expression",
    ],
)
def test_what_a_postgresql_insert_calls_through_its_tables_definition_is_invalidated(pg_database, item):
    # The ORM's INSERT names the table and its mapped columns only: a
    # default, or a check, that calls a function that writes another table
    # wrote it unseen, and what read that table stayed stale.
    _logged_fresh_after(pg_database, _WRITER + item, _LOGGED, _add_item)


_AGGREGATES = """
CREATE TABLE s26_log (id integer);
CREATE TABLE s26_item (id integer PRIMARY KEY);
INSERT INTO s26_item VALUES (1);
CREATE FUNCTION s26_step(state integer, x integer) RETURNS integer LANGUAGE plpgsql AS $$
BEGIN INSERT INTO s26_log VALUES (1); RETURN coalesce(state, 0) + x; END $$;
CREATE FUNCTION s26_final(state integer) RETURNS integer LANGUAGE plpgsql AS $$
BEGIN INSERT INTO s26_log VALUES (1); RETURN state; END $$;
CREATE FUNCTION s26_add(state integer, x integer) RETURNS integer LANGUAGE sql AS 'SELECT coalesce(state, 0) + x';
CREATE AGGREGATE s26_stepped(integer) (SFUNC = s26_step, STYPE = integer);
CREATE AGGREGATE s26_finished(integer) (SFUNC = s26_add, STYPE = integer, FINALFUNC = s26_final);
CREATE VIEW s26_totals AS SELECT s26_stepped(id) AS total FROM s26_item;
CREATE FUNCTION s26_totalled() RETURNS integer LANGUAGE sql AS 'SELECT s26_finished(id) FROM s26_item';
"""


@pytest.mark.parametrize(
    "write",
    [
        "SELECT s26_stepped(id) FROM s26_item",
        "SELECT s26_finished(id) FROM s26_item",
        "SELECT total FROM s26_totals",
        "SELECT s26_totalled()",
    ],
    ids=["its state function", "its final function", "a view over it", "a function calling it"],
)
def test_a_postgresql_aggregate_whose_support_function_writes_writes_every_table(pg_database, write):
    # An aggregate's own source is empty (its functions are in
    # pg_aggregate): it, and what calls it, were taken for readers, and
    # what its state or final function wrote stayed stale.
    _logged_fresh_after(pg_database, _AGGREGATES, _LOGGED, text(write))


_AUDITED_PEOPLE = """
CREATE TABLE s26_log (id integer);
CREATE TABLE s26_person (id integer PRIMARY KEY);
INSERT INTO s26_person VALUES (1);
CREATE FUNCTION s26_audit(s26_person) RETURNS integer LANGUAGE plpgsql AS $$
BEGIN INSERT INTO s26_log VALUES ($1.id); RETURN 1; END $$;
"""


@pytest.mark.parametrize(
    "write",
    [
        "SELECT p.s26_audit FROM s26_person p",
        "SELECT (p).s26_audit FROM s26_person p",
        'SELECT s26_person."s26_audit" FROM s26_person',
    ],
    ids=["alias.f", "(alias).f", 'table."f"'],
)
def test_a_postgresql_function_that_writes_called_in_attribute_notation_writes_every_table(pg_database, write):
    # f(person) may be called as person.f: only f( was looked for, and the
    # log it wrote stayed stale.
    _logged_fresh_after(pg_database, _AUDITED_PEOPLE, _LOGGED, text(write))


_CAST = """
CREATE TYPE s26_t AS (a integer);
CREATE FUNCTION s26_to(integer) RETURNS s26_t LANGUAGE plpgsql AS $$
BEGIN INSERT INTO s26_log VALUES (1); RETURN ROW($1); END $$;
"""
_CALLS = """
CREATE FUNCTION s26_default(x integer DEFAULT s26_logged()) RETURNS integer LANGUAGE sql RETURN x;
CREATE CAST (integer AS s26_t) WITH FUNCTION s26_to(integer);
CREATE FUNCTION s26_cast() RETURNS integer LANGUAGE sql AS 'SELECT (CAST(1 AS s26_t)).a';
CREATE FUNCTION s26_checking(x s26_checked) RETURNS integer LANGUAGE sql RETURN x;
"""


@pytest.mark.parametrize(
    "write",
    ["SELECT s26_default()", "SELECT 1::s26_t", "SELECT s26_cast()", "SELECT 1::s26_checked", "SELECT s26_checking(1)"],
    ids=["an argument's default", "a cast", "a function that casts", "a domain", "a function's argument of a domain"],
)
def test_what_a_postgresql_statement_calls_without_naming_it_writes_every_table(pg_database, write):
    # A call that leaves out an argument evaluates its default, and a cast
    # to a type calls its cast function: neither names the function that
    # writes, and the log stayed stale.
    _logged_fresh_after(pg_database, _WRITER + _CHECKED + _CAST + _CALLS, _LOGGED, text(write))


def test_a_postgresql_cast_applied_where_no_statement_names_it_writes_every_table(pg_database):
    # An assignment (or implicit) cast is applied where a value of one type
    # goes where another is wanted: INSERT INTO s26_item VALUES (1) calls
    # s26_to().  No statement can be told free of it: each writes every
    # table, and such a database's reads are never served from a shared region.
    schema_sql = (
        _WRITER + _CAST + "CREATE CAST (integer AS s26_t) WITH FUNCTION s26_to(integer) AS ASSIGNMENT;"
        "CREATE TABLE s26_item (v s26_t);"
    )
    _logged_fresh_after(pg_database, schema_sql, _LOGGED, text("INSERT INTO s26_item VALUES (1)"), served=False)


_POLICED = """
CREATE TABLE s26_item (id integer);
INSERT INTO s26_item VALUES (1);
ALTER TABLE s26_item ENABLE ROW LEVEL SECURITY;
ALTER TABLE s26_item FORCE ROW LEVEL SECURITY;
"""


@pytest.mark.parametrize(
    "policy, write",
    [
        ("USING (true) WITH CHECK (s26_logged() > 0)", "INSERT INTO s26_item VALUES (2)"),
        ("USING (s26_logged() > 0)", "SELECT id FROM s26_item"),
    ],
    ids=["a write checked", "a read"],
)
def test_a_postgresql_row_level_security_policy_that_calls_a_function_that_writes(pg_database, policy, write):
    # The policy applies to every statement of a user that is not the
    # superuser: a write its check calls the function for, and a read its
    # USING calls it for, wrote the log unseen, which stayed stale.
    role = f"s26_{uuid.uuid4().hex[:8]}"
    admin = create_engine(pg_database)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN; GRANT ALL ON SCHEMA public TO {role}; SET ROLE {role};")
        conn.exec_driver_sql(_WRITER + _POLICED + f"CREATE POLICY s26_policy ON s26_item {policy}; RESET ROLE")
    try:
        url = make_url(pg_database).set(username=role).render_as_string(hide_password=False)
        _logged_fresh_after(url, "SELECT 1", _LOGGED, text(write))
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP OWNED BY {role}; DROP ROLE {role}")
        admin.dispose()


_COUNTS = select(Table("s26_count", MetaData(), Column("n", Integer)).c.n)


# SQLite: databases a connection alone sees ----------------------------------------------------------------


def test_threads_of_an_engine_in_memory_are_not_served_each_others_rows():
    # sqlite:// gives each thread a connection of its own (SingletonThreadPool),
    # and each connection a database of its own: the look-ups of every thread
    # were keyed alike (one identity per pool), and one thread was served the
    # rows of another's database.
    engine = create_engine("sqlite://")
    Sess = sessionmaker(engine, info=_cache().session_info())
    made, read = threading.Barrier(2), threading.Event()
    found: dict[int, list] = {}
    counter = SQLCounter(engine)

    def work(n: int) -> None:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE s26_count (id INTEGER PRIMARY KEY, n INTEGER)")
            conn.exec_driver_sql(f"INSERT INTO s26_count VALUES (1, {n})")
        made.wait(timeout=10)  # both databases made: no schema change after the first read
        if n == 2:
            read.wait(timeout=10)
        with Sess() as session:  # one thread at a time
            found[n] = [_rows(session, _COUNTS), _rows(session, _COUNTS, "memory")]
            counter.reset()
            found[n] += [_rows(session, _COUNTS, "memory"), counter.count]
        read.set()

    threads = [threading.Thread(target=work, args=(n,)) for n in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    # Each thread: the truth, its own rows, then its own again from a hit.
    assert found == {1: [[(1,)], [(1,)], [(1,)], 0], 2: [[(2,)], [(2,)], [(2,)], 0]}
    engine.dispose()


def test_connections_attaching_a_database_in_memory_as_they_open_are_not_served_each_others_rows(tmp_path):
    # A connect listener attaches a scratch database in memory to each
    # connection, unseen by the statements' events: the same query on two
    # connections was keyed alike, and one was served the other's rows.
    path = tmp_path / "main.sqlite"
    _run(path, "")
    engine = create_engine(f"sqlite:///{path}")

    @event.listens_for(engine, "connect")
    def scratch(dbapi_connection, record):
        dbapi_connection.execute("ATTACH DATABASE ':memory:' AS aux")
        dbapi_connection.execute("CREATE TABLE aux.s26_count (id INTEGER PRIMARY KEY, n INTEGER)")

    aux_counts = select(Table("s26_count", MetaData(schema="aux"), Column("n", Integer)).c.n)
    _each_served_its_own(engine, aux_counts, "INSERT INTO aux.s26_count VALUES (1, {n})")


# PostgreSQL: a statement that names no function, as the catalog is to be read again ------------------


def test_a_postgresql_view_over_a_writer_read_first_after_a_schema_change_writes_every_table(pg_database):
    # A schema change (a migration, by any connection) makes every catalog
    # be read again when next needed; a statement with no "(" did not read
    # it, and was taken for calling no writer: the first one after the
    # change wrote the log unseen.
    def migrate(engine):
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE s26_other (id integer)")

    schema_sql = _WRITER + "CREATE VIEW s26_audit AS SELECT s26_logged() AS logged"
    _logged_fresh_after(pg_database, schema_sql, _LOGGED, text("SELECT logged FROM s26_audit"), between=migrate)
