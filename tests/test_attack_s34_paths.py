"""Attack s34: write paths and reads that write, which invalidation may not see.

Each test reads through a region, changes what the read shows by a path
of its own (a sequence advanced, a large object written, an FTS5 index's
content table, SQLite's schema table, a raw DBAPI write, a cursor
fetched), and checks that what the cache serves is what the same query
returns uncached at that moment, on a connection of its own; or, for a
statement run for its effect, that it reached the database (hits are
proven by counting SQL, never by timing).  A failing test is a defect.
"""

from __future__ import annotations

import os
import threading

import pytest
from sqlalchemy import (
    BigInteger,
    Column,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.elements import TextClause

from pyramid_sessioncache import SessionCache, cached_query

from .conftest import SECRET, SQLCounter, use_region
from .models import Address, Person

_META = MetaData()
#: Tables of the database's own that the models do not map, read through Core.
PERSON = Table("person", _META, Column("id", Integer), Column("name", String))
FTS = Table("doc_fts", _META, Column("rowid", Integer), Column("body", String))
SQLITE_MASTER = Table("sqlite_master", _META, Column("type", String), Column("name", String))
SQLITE_SEQUENCE = Table("sqlite_sequence", _META, Column("name", String), Column("seq", Integer))
PERSON_ID_SEQ = Table("person_id_seq", _META, Column("last_value", BigInteger), Column("is_called", String))
NEXT_TICKET = Table("next_ticket", _META, Column("n", BigInteger))
WHO_AM_I = Table("who_am_i", _META, Column("pid", Integer))


@pytest.fixture
def regions(region_options) -> SessionCache:
    """A cache with ``local`` (ext:local_session), ``memory`` and ``file`` regions."""
    return SessionCache(region_options, default_region="memory", secret=SECRET)


def cached(session, statement, region: str = "memory") -> list[tuple]:
    """The rows ``statement`` gives through ``region`` in ``session``, as plain tuples."""
    return [tuple(row) for row in cached_query(session, statement, region).all()]


def uncached(url: str, statement) -> list[tuple]:
    """What ``statement`` returns now, uncached, on a connection of a fresh engine."""
    engine = create_engine(url)
    try:
        with Session(engine) as session:
            return [tuple(row) for row in session.execute(statement).all()]
    finally:
        engine.dispose()


def committed_elsewhere(url: str, *sql: str) -> None:
    """Run ``sql`` in a transaction of a fresh engine of this process (so the add-on sees it), committed."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for each in sql:
                conn.exec_driver_sql(each)
    finally:
        engine.dispose()


def read_write_read(Sessions, url: str, statement, region: str, *sql: str) -> tuple[list, list]:
    """Read ``statement`` through ``region`` (stored), commit ``sql`` elsewhere, read again: (served, truth)."""
    with Sessions() as first:
        cached(first, statement, region)
    committed_elsewhere(url, *sql)
    with Sessions() as again:
        served = cached(again, statement, region)
    return served, uncached(url, statement)


# 1. SQLite ----------------------------------------------------------------------------------------


@pytest.fixture
def sqlite_extra(engine, db_url) -> str:
    """The seeded SQLite file with an FTS5 index over external content and an AUTOINCREMENT table."""
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE doc (id INTEGER PRIMARY KEY, body TEXT)")
        conn.exec_driver_sql("INSERT INTO doc VALUES (1, 'alpha'), (2, 'beta')")
        # External content: the index keeps the words, the values are read from doc.
        conn.exec_driver_sql("CREATE VIRTUAL TABLE doc_fts USING fts5(body, content='doc', content_rowid='id')")
        conn.exec_driver_sql("INSERT INTO doc_fts(doc_fts) VALUES ('rebuild')")
        conn.exec_driver_sql("CREATE TABLE ticket (id INTEGER PRIMARY KEY AUTOINCREMENT, note TEXT)")
        conn.exec_driver_sql("INSERT INTO ticket (note) VALUES ('first')")
    engine.dispose()
    return db_url


@pytest.mark.parametrize("region", ["local", "memory", "file"])
def test_fts5_external_content_read_sees_a_write_to_its_content_table(sqlite_extra, regions, region):
    """An FTS5 table with ``content='doc'`` reads its column values from ``doc``: a write to ``doc`` changes it."""
    engine = create_engine(sqlite_extra)
    Sessions = sessionmaker(engine, info=regions.session_info())
    statement = select(FTS.c.rowid, FTS.c.body).order_by(FTS.c.rowid)
    try:
        with Sessions() as session:
            assert cached(session, statement, region) == [(1, "alpha"), (2, "beta")]
            if region == "local":  # the same Session, after another engine's commit
                committed_elsewhere(sqlite_extra, "UPDATE doc SET body = 'ALPHA' WHERE id = 1")
                assert cached(session, statement, region) == uncached(sqlite_extra, statement)
                return
        served, truth = read_write_read(
            Sessions, sqlite_extra, statement, region, "UPDATE doc SET body = 'ALPHA' WHERE id = 2"
        )
        assert truth == [(1, "alpha"), (2, "ALPHA")]
        assert served == truth
    finally:
        engine.dispose()


@pytest.mark.parametrize("region", ["memory", "file"])
def test_sqlite_master_read_through_a_table_sees_a_table_created(sqlite_extra, regions, region):
    """``select()`` of ``sqlite_master`` (the schema table) shows a table created by a committed migration."""
    engine = create_engine(sqlite_extra)
    Sessions = sessionmaker(engine, info=regions.session_info())
    statement = select(SQLITE_MASTER.c.name).where(SQLITE_MASTER.c.type == "table").order_by(SQLITE_MASTER.c.name)
    try:
        served, truth = read_write_read(Sessions, sqlite_extra, statement, region, "CREATE TABLE extra (x INTEGER)")
        assert ("extra",) in truth
        assert served == truth
    finally:
        engine.dispose()


@pytest.mark.parametrize("region", ["memory", "file"])
def test_sqlite_sequence_read_sees_an_autoincrement_insert(sqlite_extra, regions, region):
    """SQLite writes ``sqlite_sequence`` itself at each INSERT into an AUTOINCREMENT table."""
    engine = create_engine(sqlite_extra)
    Sessions = sessionmaker(engine, info=regions.session_info())
    statement = select(SQLITE_SEQUENCE.c.name, SQLITE_SEQUENCE.c.seq).where(SQLITE_SEQUENCE.c.name == "ticket")
    try:
        served, truth = read_write_read(
            Sessions, sqlite_extra, statement, region, "INSERT INTO ticket (note) VALUES ('second')"
        )
        assert truth == [("ticket", 2)]
        assert served == truth
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "statement",
    [text("PRAGMA user_version"), select(text("user_version")).select_from(func.pragma_user_version())],
    ids=["PRAGMA text", "pragma_user_version() table-valued"],
)
def test_pragma_user_version_read_sees_it_set(sqlite_extra, regions, statement):
    """``PRAGMA user_version = 7`` (a migration tool's schema version) changes what reading it returns."""
    engine = create_engine(sqlite_extra)
    Sessions = sessionmaker(engine, info=regions.session_info())
    try:
        served, truth = read_write_read(Sessions, sqlite_extra, statement, "memory", "PRAGMA user_version = 7")
        assert truth == [(7,)]
        assert served == truth
    finally:
        engine.dispose()


SQLITE_STAT1 = Table("sqlite_stat1", _META, Column("tbl", String), Column("idx", String), Column("stat", String))


@pytest.mark.parametrize(
    "statement",
    [
        select(SQLITE_STAT1.c.stat).where(SQLITE_STAT1.c.tbl == "doc"),
        text("SELECT stat FROM sqlite_stat1 WHERE tbl = 'doc'"),
    ],
    ids=["Core table", "SQL text"],
)
def test_sqlite_stat1_read_sees_analyze(sqlite_extra, regions, statement):
    """``ANALYZE`` writes ``sqlite_stat1`` (what a query planner report reads), though no DML names it."""
    engine = create_engine(sqlite_extra)
    Sessions = sessionmaker(engine, info=regions.session_info())
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE INDEX doc_body ON doc (body)")
            conn.exec_driver_sql("ANALYZE")
            conn.exec_driver_sql("INSERT INTO doc (body) SELECT body || id FROM doc")
        served, truth = read_write_read(Sessions, sqlite_extra, statement, "memory", "ANALYZE")
        assert truth == [("4 1",)]
        assert served == truth
    finally:
        engine.dispose()


NOTE = Table("note", _META, Column("rowid", Integer), Column("body", String))


def run_autocommit(url: str, sql: str) -> None:
    """Run ``sql`` outside any transaction (VACUUM), on a fresh engine of this process."""
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(sql)
    finally:
        engine.dispose()


@pytest.mark.parametrize("region", ["memory", "file"])
def test_sqlite_vacuum_renumbers_rowids_a_cached_read_returned(sqlite_extra, regions, region):
    """``VACUUM`` may change the rowids of a table without an INTEGER PRIMARY KEY (SQLite's documentation): it does here."""
    engine = create_engine(sqlite_extra)
    Sessions = sessionmaker(engine, info=regions.session_info())
    statement = select(NOTE.c.rowid, NOTE.c.body).order_by(NOTE.c.body)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE note (body TEXT)")
            conn.exec_driver_sql("INSERT INTO note VALUES ('a'), ('b'), ('c')")
            conn.exec_driver_sql("DELETE FROM note WHERE body = 'a'")
        with Sessions() as first:
            assert cached(first, statement, region) == [(2, "b"), (3, "c")]
        run_autocommit(sqlite_extra, "VACUUM")
        with Sessions() as again:
            served = cached(again, statement, region)
        truth = uncached(sqlite_extra, statement)
        assert truth == [(1, "b"), (2, "c")]
        assert served == truth
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "statement, mine",
    [
        (select(func.changes()), 3),
        (select(Table("last_id", _META, Column("id", Integer)).c.id), 103),
    ],
    ids=["changes()", "a view over last_insert_rowid()"],
)
def test_what_one_sqlite_connection_did_is_not_served_to_another(sqlite_extra, regions, statement, mine):
    """``changes()`` and ``last_insert_rowid()`` say what the connection's own statements did: never shared."""
    with create_engine(sqlite_extra).begin() as conn:
        conn.exec_driver_sql("CREATE VIEW last_id AS SELECT last_insert_rowid() AS id")
    one, two = create_engine(sqlite_extra), create_engine(sqlite_extra)
    try:
        with sessionmaker(one, info=regions.session_info())() as writer:
            writer.execute(text("INSERT INTO person (id, name) VALUES (101, 'a'), (102, 'b'), (103, 'c')"))
            writer.commit()
            assert cached(writer, statement) == [(mine,)]
        with sessionmaker(two, info=regions.session_info())() as other:
            truth = [tuple(row) for row in other.execute(statement).all()]
            assert truth == [(0,)]
            assert cached(other, statement) == truth
    finally:
        one.dispose()
        two.dispose()


@pytest.mark.parametrize("region", ["memory", "file"])
def test_sqlite_rows_written_through_the_dbapi_cursor_and_rolled_back_are_never_stored(engine, db_url, regions, region):
    """A Session's transaction that wrote on its DBAPI connection (pysqlite's in_transaction) stores nothing shared."""
    Sessions = sessionmaker(engine, info=regions.session_info())
    statement = select(PERSON.c.name).where(PERSON.c.id == 1)
    with Sessions() as session:
        session.connection().connection.cursor().execute("UPDATE person SET name = 'never committed' WHERE id = 1")
        assert cached(session, statement, region) == [("never committed",)]  # what its transaction shows
        session.rollback()
    with Sessions() as fresh:
        assert cached(fresh, statement, region) == uncached(db_url, statement) == [("person 1",)]


# 2. PostgreSQL: sequences, large objects, cursors, connection state --------------------------------


@pytest.fixture
def pg_extra(pg_url) -> str:
    """The seeded PostgreSQL database with a view over ``nextval()`` and one over ``pg_backend_pid()``."""
    engine = create_engine(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE SEQUENCE ticket")
        conn.exec_driver_sql("CREATE VIEW next_ticket AS SELECT nextval('ticket') AS n")
        conn.exec_driver_sql("CREATE VIEW who_am_i AS SELECT pg_backend_pid() AS pid")
    engine.dispose()
    return pg_url


@pytest.fixture
def pg_sessions(pg_extra, regions):
    engine = create_engine(pg_extra)
    yield engine, sessionmaker(engine, info=regions.session_info())
    engine.dispose()


@pytest.mark.parametrize(
    "write",
    [
        "INSERT INTO person (name) VALUES ('new')",  # the serial column's default advances it
        "SELECT setval('person_id_seq', 100)",
        "SELECT nextval('person_id_seq')",
        "ALTER SEQUENCE person_id_seq RESTART WITH 500",
    ],
    ids=["insert", "setval", "nextval", "alter sequence restart"],
)
def test_a_sequence_read_as_a_relation_sees_it_advanced(pg_extra, pg_sessions, write):
    """``SELECT last_value FROM person_id_seq`` changes with every path that advances or resets the sequence."""
    engine, Sessions = pg_sessions
    with engine.begin() as conn:  # the seed gave explicit ids: draw once so that last_value means something
        conn.exec_driver_sql("SELECT setval('person_id_seq', 20)")
    statement = select(PERSON_ID_SEQ.c.last_value)
    served, truth = read_write_read(Sessions, pg_extra, statement, "file", write)
    assert truth != [(20,)]
    assert served == truth


def test_pg_sequence_last_value_sees_nextval_elsewhere(pg_extra, pg_sessions):
    """``pg_sequence_last_value()`` reads the sequence, which another Session's ``nextval()`` advanced."""
    engine, Sessions = pg_sessions
    statement = select(func.pg_sequence_last_value("ticket"))
    with engine.begin() as conn:
        conn.exec_driver_sql("SELECT nextval('ticket')")
    served, truth = read_write_read(Sessions, pg_extra, statement, "memory", "SELECT nextval('ticket')")
    assert truth == [(2,)]
    assert served == truth


@pytest.mark.parametrize("region", ["local", "memory"])
def test_a_view_over_nextval_is_run_every_time(pg_sessions, region):
    """A view that calls ``nextval()`` (PostgreSQL's own function) advances the sequence when read: never a hit."""
    engine, Sessions = pg_sessions
    statement = select(NEXT_TICKET.c.n)
    with Sessions() as session:
        first = cached(session, statement, region)
        sql = SQLCounter(engine)
        second = cached(session, statement, region)
        assert sql.count > 0, "served from the cache: the sequence was not advanced"
    assert (first, second) == ([(1,)], [(2,)])


def test_a_view_over_pg_backend_pid_is_not_served_to_another_connection(pg_extra, pg_sessions, regions):
    """A view that reads the connection's own state (``pg_backend_pid()``) is never another connection's answer."""
    engine, Sessions = pg_sessions
    other = create_engine(pg_extra)
    try:
        with Sessions() as one, sessionmaker(other, info=regions.session_info())() as two:
            mine = cached(one, select(WHO_AM_I.c.pid))
            theirs = [tuple(row) for row in two.execute(select(WHO_AM_I.c.pid)).all()]
            assert mine != theirs  # two connections, two backends
            assert cached(two, select(WHO_AM_I.c.pid)) == theirs
    finally:
        other.dispose()


@pytest.mark.parametrize(
    "setup, statement",
    [
        ("PREPARE mine AS SELECT 1", text("SELECT name FROM pg_prepared_statements WHERE name = 'mine'")),
        ("DECLARE mine CURSOR FOR SELECT 1", text("SELECT name FROM pg_cursors")),
    ],
    ids=["pg_prepared_statements", "pg_cursors"],
)
def test_catalog_views_of_the_connections_own_objects_are_not_served_to_another(
    pg_extra, pg_sessions, regions, setup, statement
):
    """``pg_prepared_statements`` and ``pg_cursors`` list what the connection itself prepared or declared."""
    engine, Sessions = pg_sessions
    other = create_engine(pg_extra)
    try:
        with Sessions() as one, sessionmaker(other, info=regions.session_info())() as two:
            one.execute(text(setup))
            assert cached(one, statement) == [("mine",)]
            truth = [tuple(row) for row in two.execute(statement).all()]
            assert truth == []
            assert cached(two, statement) == truth
    finally:
        other.dispose()


def test_show_transaction_isolation_is_not_served_across_isolation_levels(pg_sessions):
    """``SHOW transaction_isolation`` read first in a REPEATABLE READ transaction is not a READ COMMITTED one's answer."""
    engine, Sessions = pg_sessions
    statement = text("SHOW transaction_isolation")
    with Sessions() as repeatable:
        repeatable.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        assert cached(repeatable, statement) == [("repeatable read",)]
    with Sessions() as default:
        truth = [tuple(row) for row in default.execute(statement).all()]
        assert truth == [("read committed",)]
        default.rollback()
        assert cached(default, statement) == truth


def test_pg_class_reltuples_read_sees_analyze(pg_extra, pg_sessions):
    """``ANALYZE person`` rewrites ``pg_class.reltuples``, though no DML names it."""
    engine, Sessions = pg_sessions
    statement = text("SELECT reltuples::int FROM pg_class WHERE relname = 'person'")
    with engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE person")
        conn.exec_driver_sql("INSERT INTO person (id, name) SELECT id + 100, name FROM person")
    served, truth = read_write_read(Sessions, pg_extra, statement, "memory", "ANALYZE person")
    assert truth == [(40,)]
    assert served == truth


LOCKED_PERSON = Table("locked_person", _META, Column("id", Integer), Column("name", String))


def _row_locks(session) -> list[str]:
    """The table-level modes the Session's transaction holds on ``person`` (a locking read takes RowShareLock)."""
    return list(
        session.execute(
            text(
                "SELECT mode FROM pg_locks WHERE pid = pg_backend_pid() AND relation = 'person'::regclass ORDER BY mode"
            )
        ).scalars()
    )


@pytest.mark.parametrize(
    "statement",
    [
        text("SELECT id, name FROM person WHERE id = 1 FOR /* the row we change */ UPDATE"),
        text("SELECT id, name FROM person WHERE id = 1 FOR -- the row we change\nUPDATE"),
        select(PERSON.c.id).where(text("id IN (SELECT id FROM person WHERE id = 1 FOR /**/ NO KEY UPDATE)")),
        select(LOCKED_PERSON.c.id, LOCKED_PERSON.c.name).where(LOCKED_PERSON.c.id == 1),
        select(func.lock_person(1)),
    ],
    ids=[
        "FOR /* comment */ UPDATE",
        "FOR -- comment UPDATE",
        "a locking subquery in a text() fragment",
        "a view defined FOR UPDATE",
        "a function of the database's own that locks",
    ],
)
@pytest.mark.parametrize("region", ["local", "memory"])
def test_locking_reads_however_spelt_always_run(pg_sessions, statement, region):
    """A read that takes row locks runs every time: a comment between FOR and UPDATE, or a view made FOR UPDATE, locks too."""
    engine, Sessions = pg_sessions
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE VIEW locked_person AS SELECT id, name FROM person FOR UPDATE")
        conn.exec_driver_sql(
            "CREATE FUNCTION lock_person(int) RETURNS int LANGUAGE sql AS "
            "$$ SELECT id FROM person WHERE id = $1 FOR UPDATE $$"
        )
    with Sessions() as session:
        session.execute(statement).all()
        assert "RowShareLock" in _row_locks(session)  # what the statement does uncached
    with Sessions() as first:
        cached(first, statement, region)
        sql = SQLCounter(engine)
        cached(first, statement, region)
        assert sql.count > 0, "a locking read served from the cache"
    with Sessions() as second:
        cached(second, statement, region)
        assert "RowShareLock" in _row_locks(second)


@pytest.mark.parametrize(
    "call",
    [func.lo_creat(-1), func.pg_export_snapshot(), text("SELECT nextval /* draw one */ ('ticket')")],
    ids=["lo_creat (a large object made)", "pg_export_snapshot", "nextval with a comment before its parenthesis"],
)
def test_functions_run_for_their_effect_are_run_every_time(pg_sessions, call):
    """``lo_creat()`` makes a large object and ``pg_export_snapshot()`` a snapshot: a hit would do neither."""
    engine, Sessions = pg_sessions
    with Sessions() as session:
        statement = call if isinstance(call, TextClause) else select(call)
        first = cached(session, statement)
        session.commit()
        sql = SQLCounter(engine)
        second = cached(session, statement)
        assert sql.count > 0, f"served from the cache: {first} again"
    assert first != second


@pytest.mark.parametrize(
    "call",
    [
        "SELECT rename_person()",  # seen: a function of the database's own that writes (the control)
        "SELECT rename_person /* audit */ ()",
        "SELECT rename_person -- audit\n()",
    ],
    ids=["plain call", "comment before the parenthesis", "line comment before the parenthesis"],
)
@pytest.mark.parametrize("region", ["memory", "file"])
def test_a_select_calling_a_function_that_writes_is_a_write_however_spelt(pg_extra, pg_sessions, region, call):
    """``SELECT f /* c */ ()`` calls ``f()`` as the database reads it: its write is published when the Session commits."""
    engine, Sessions = pg_sessions
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE FUNCTION rename_person() RETURNS int LANGUAGE plpgsql AS "
            "$$ BEGIN UPDATE person SET name = 'renamed' WHERE id = 1; RETURN 1; END $$"
        )
    statement = select(PERSON.c.name).where(PERSON.c.id == 1)
    with Sessions() as first:
        assert cached(first, statement, region) == [("person 1",)]
    with Sessions() as writer:
        writer.execute(text(call)).all()
        writer.commit()
    with Sessions() as again:
        served = cached(again, statement, region)
    assert uncached(pg_extra, statement) == [("renamed",)]
    assert served == [("renamed",)]


CTIDS = Table("person", MetaData(), Column("ctid", String), Column("id", Integer))


def test_vacuum_full_moves_the_rows_a_cached_ctid_read_returned(pg_extra, pg_sessions):
    """``VACUUM FULL`` rewrites the table: each row's ``ctid`` changes, though no DML ran."""
    engine, Sessions = pg_sessions
    statement = select(CTIDS.c.ctid, CTIDS.c.id).where(CTIDS.c.id <= 3).order_by(CTIDS.c.id)
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM person_tag WHERE person_id <= 2")
        conn.exec_driver_sql("DELETE FROM address WHERE person_id <= 2")
        conn.exec_driver_sql("DELETE FROM person WHERE id <= 2")
    with Sessions() as first:
        before = cached(first, statement)
    run_autocommit(pg_extra, "VACUUM FULL person")
    with Sessions() as again:
        served = cached(again, statement)
    truth = uncached(pg_extra, statement)
    assert truth != before  # the rows moved
    assert served == truth


WORD_STATS = Table("word_stats", _META, Column("word", String), Column("ndoc", Integer))


@pytest.mark.parametrize("region", ["memory", "file"])
def test_a_view_over_ts_stat_sees_a_write_to_the_table_its_query_string_reads(pg_extra, pg_sessions, region):
    """``ts_stat('SELECT ... FROM doc')`` (PostgreSQL's own) runs a query given as a string: the catalog links no table."""
    engine, Sessions = pg_sessions
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE doc (id serial PRIMARY KEY, body text)")
        conn.exec_driver_sql("INSERT INTO doc (body) VALUES ('red fox'), ('red hen')")
        conn.exec_driver_sql(
            "CREATE VIEW word_stats AS SELECT word, ndoc FROM ts_stat('SELECT to_tsvector(''simple'', body) FROM doc')"
        )
    statement = select(WORD_STATS.c.word, WORD_STATS.c.ndoc).order_by(WORD_STATS.c.word)
    served, truth = read_write_read(Sessions, pg_extra, statement, region, "INSERT INTO doc (body) VALUES ('blue fox')")
    assert truth == [("blue", 1), ("fox", 2), ("hen", 1), ("red", 2)]
    assert served == truth


@pytest.mark.parametrize("region", ["memory", "file"])
def test_a_large_object_read_sees_lo_put_elsewhere(pg_extra, pg_sessions, region):
    """``lo_get(oid)`` after another Session's committed ``lo_put()`` (a large object written) shows the new bytes."""
    engine, Sessions = pg_sessions
    with engine.begin() as conn:
        oid = conn.execute(text("SELECT lo_from_bytea(0, 'abc'::bytea)")).scalar_one()
    statement = select(func.lo_get(oid, type_=LargeBinary))
    served, truth = read_write_read(Sessions, pg_extra, statement, region, f"SELECT lo_put({oid}, 0, 'X'::bytea)")
    assert truth == [(b"Xbc",)]
    assert served == truth


@pytest.mark.parametrize("region", ["local", "memory"])
@pytest.mark.parametrize("fetch", ["FETCH NEXT FROM tickets", "FETCH 1 FROM tickets"])
def test_fetch_from_a_cursor_is_run_every_time(pg_sessions, region, fetch):
    """``FETCH`` moves a cursor of the connection's own: each one returns the next row, never a hit."""
    engine, Sessions = pg_sessions
    with Sessions() as session:
        session.execute(text("DECLARE tickets CURSOR FOR SELECT id FROM person ORDER BY id"))
        first = cached(session, text(fetch), region)
        second = cached(session, text(fetch), region)
        assert (first, second) == ([(1,)], [(2,)])


def _raw_update(session) -> None:
    session.connection().connection.cursor().execute("UPDATE person SET name = 'never committed' WHERE id = 2")


def _driver_update(session) -> None:
    session.connection().connection.driver_connection.execute("UPDATE person SET name = 'never committed' WHERE id = 2")


def _copy_in(session) -> None:
    cursor = session.connection().connection.driver_connection.cursor()
    with cursor.copy("COPY person (id, name) FROM STDIN") as copy:
        copy.write_row((900, "never committed"))


@pytest.mark.parametrize("region", ["memory", "redis"])
@pytest.mark.parametrize(
    "write", [_raw_update, _driver_update, _copy_in], ids=["dbapi cursor", "psycopg execute", "COPY FROM STDIN"]
)
def test_rows_written_on_the_dbapi_connection_and_rolled_back_are_never_served(
    request, pg_extra, region_options, region, write
):
    """A miss in a transaction that wrote on the Session's DBAPI connection must not store its uncommitted rows."""
    use_region(request, region_options, region)
    cache = SessionCache(region_options, secret=SECRET)
    engine = create_engine(pg_extra)
    Sessions = sessionmaker(engine, info=cache.session_info())
    statement = select(PERSON.c.id, PERSON.c.name).where(PERSON.c.id >= 2, PERSON.c.id <= 3).order_by(PERSON.c.id)
    statement = statement.union_all(select(PERSON.c.id, PERSON.c.name).where(PERSON.c.id == 900))
    try:
        with Sessions() as session:
            write(session)
            inside = cached(session, statement, region)  # what its own transaction shows
            assert "never committed" in {name for _, name in inside}
            session.rollback()
        with Sessions() as fresh:
            assert (
                cached(fresh, statement, region) == uncached(pg_extra, statement) == [(2, "person 2"), (3, "person 3")]
            )
    finally:
        engine.dispose()
        cache.close()


# 3. PostgreSQL write paths that held (regression tests) ---------------------------------------------

PARTITIONS = """
CREATE TABLE reading (id int, at date, v text) PARTITION BY RANGE (at);
CREATE TABLE reading_2024 PARTITION OF reading FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
INSERT INTO reading VALUES (1, '2024-05-01', 'first');
CREATE TABLE reading_2025 (id int, at date, v text);
INSERT INTO reading_2025 VALUES (2, '2025-05-01', 'second');
CREATE TABLE animal (id int, name text);
INSERT INTO animal VALUES (1, 'generic');
CREATE TABLE dog (id int, name text, bark text);
INSERT INTO dog VALUES (2, 'rex', 'woof');
CREATE TABLE merge_source (id int, v text);
INSERT INTO merge_source VALUES (1, 'merged');
CREATE TYPE mood AS ENUM ('sad', 'happy');
CREATE TABLE feeling (id int, mood mood);
INSERT INTO feeling VALUES (1, 'sad'), (2, 'happy');
CREATE VIEW visible_animal WITH (security_barrier) AS SELECT id, name FROM animal WHERE id < 100;
"""
FEELING = Table("feeling", _META, Column("id", Integer), Column("mood", String))
VISIBLE_ANIMAL = Table("visible_animal", _META, Column("id", Integer), Column("name", String))
READING = Table("reading", _META, Column("id", Integer), Column("v", String))
READING_2024 = Table("reading_2024", _META, Column("id", Integer), Column("v", String))
ANIMAL = Table("animal", _META, Column("id", Integer), Column("name", String))


@pytest.mark.parametrize(
    "statement, writes, expected",
    [
        (
            select(READING.c.id, READING.c.v).order_by(READING.c.id),
            ["ALTER TABLE reading ATTACH PARTITION reading_2025 FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')"],
            [(1, "first"), (2, "second")],
        ),
        (
            select(ANIMAL.c.id, ANIMAL.c.name).order_by(ANIMAL.c.id),
            ["ALTER TABLE dog INHERIT animal"],
            [(1, "generic"), (2, "rex")],
        ),
        (
            select(READING_2024.c.id, READING_2024.c.v),
            ["MERGE INTO reading r USING merge_source s ON r.id = s.id WHEN MATCHED THEN UPDATE SET v = s.v"],
            [(1, "merged")],
        ),
        (
            select(READING.c.id, READING.c.v).order_by(READING.c.id),
            [
                "CREATE TABLE reading_late PARTITION OF reading DEFAULT",
                "INSERT INTO reading VALUES (9, '2030-01-01', 'late')",
            ],
            [(1, "first"), (9, "late")],
        ),
        (
            select(ANIMAL.c.id, ANIMAL.c.name).order_by(ANIMAL.c.id),
            ["ALTER TABLE animal RENAME TO animal_old", "CREATE TABLE animal (id int, name text)"],
            [],
        ),
        (
            select(FEELING.c.id, FEELING.c.mood).order_by(FEELING.c.id),
            ["ALTER TYPE mood RENAME VALUE 'sad' TO 'blue'"],
            [(1, "blue"), (2, "happy")],
        ),
        (
            select(VISIBLE_ANIMAL.c.id, VISIBLE_ANIMAL.c.name).order_by(VISIBLE_ANIMAL.c.id),
            ["UPDATE animal SET name = 'renamed' WHERE id = 1"],
            [(1, "renamed")],
        ),
    ],
    ids=[
        "attach partition",
        "inherit",
        "merge via partitioned parent",
        "default partition",
        "rename then recreate",
        "enum value renamed",
        "security_barrier view",
    ],
)
def test_partition_and_inheritance_paths_invalidate(pg_extra, regions, statement, writes, expected):
    """Schema and DML paths that change what a parent or a partition shows, committed by another engine."""
    committed_elsewhere(pg_extra, PARTITIONS)
    engine = create_engine(pg_extra)
    Sessions = sessionmaker(engine, info=regions.session_info())
    try:
        served, truth = read_write_read(Sessions, pg_extra, statement, "file", *writes)
        assert truth == expected
        assert served == truth
    finally:
        engine.dispose()


# 4. Any path: what held (regression tests) ----------------------------------------------------------


def _orm_bulk_insert(session) -> None:
    session.execute(insert(Person), [{"id": 100 + i, "name": f"bulk {i}"} for i in range(3)])


def _update_fetch(session) -> None:
    session.execute(
        update(Person)
        .where(Person.id.in_(select(Address.person_id).where(Address.street == "1 Main St")))
        .values(name="moved"),
        execution_options={"synchronize_session": "fetch"},
    )


def _update_evaluate(session) -> None:
    session.get(Person, 1)
    session.execute(
        update(Person).where(Person.id == 1).values(name="moved"), execution_options={"synchronize_session": "evaluate"}
    )


def _delete_by_subquery(session) -> None:
    session.execute(delete(Address).where(Address.person_id == 1))
    session.execute(
        delete(Person).where(~Person.id.in_(select(Address.person_id).where(Address.person_id.is_not(None)))),
        execution_options={"synchronize_session": False},
    )


def _driver_sql(session) -> None:
    session.connection().exec_driver_sql("UPDATE person SET name = 'moved' WHERE id = 1")


@pytest.mark.parametrize(
    "write, url_of",
    [
        (_orm_bulk_insert, "url"),
        (_update_fetch, "uri"),
        (_update_evaluate, "hard link"),
        (_delete_by_subquery, "symlink"),
        (_driver_sql, "uri"),
    ],
    ids=[
        "orm bulk insert",
        "update fetch subquery, file: uri",
        "update evaluate, hard link",
        "delete by subquery, symlink",
        "exec_driver_sql, file: uri",
    ],
)
def test_orm_write_paths_through_another_engine_on_the_same_file(db_url, regions, tmp_path, write, url_of):
    """ORM bulk and Core DML paths, committed by another engine on the same SQLite file however it is named."""
    path = db_url[len("sqlite:///") :]
    if url_of == "hard link":
        os.link(path, tmp_path / "linked.sqlite")
        writer_url = f"sqlite:///{tmp_path / 'linked.sqlite'}"
    elif url_of == "symlink":
        os.symlink(path, tmp_path / "symlinked.sqlite")
        writer_url = f"sqlite:///{tmp_path / 'symlinked.sqlite'}"
    elif url_of == "uri":
        writer_url = f"sqlite:///file:{path}?mode=rw&uri=true"
    else:
        writer_url = db_url
    reader, writer = create_engine(db_url), create_engine(writer_url)
    Sessions = sessionmaker(reader, info=regions.session_info())
    statement = select(Person.id, Person.name).where((Person.id <= 2) | (Person.id >= 100)).order_by(Person.id)
    try:
        with Sessions() as first:
            assert cached(first, statement, "file") == [(1, "person 1"), (2, "person 2")]
        with sessionmaker(writer)() as session:
            write(session)
            session.commit()
        with Sessions() as again:
            served = cached(again, statement, "file")
        assert served == uncached(db_url, statement)
        assert served != [(1, "person 1"), (2, "person 2")]
    finally:
        reader.dispose()
        writer.dispose()


def test_a_commit_in_another_thread_voids_a_local_hit_the_session_holds(pg_url, regions):
    """READ COMMITTED: a Session's next read, cached locally, shows what ``engine.begin()`` in another thread committed."""
    engine = create_engine(pg_url)
    statement = select(PERSON.c.name).where(PERSON.c.id == 1)
    try:
        with sessionmaker(engine, info=regions.session_info())() as session:
            assert cached(session, statement, "local") == [("person 1",)]
            sql = SQLCounter(engine)
            assert cached(session, statement, "local") == [("person 1",)]
            assert sql.count == 0  # a hit

            def commit() -> None:
                with engine.begin() as conn:
                    conn.exec_driver_sql("UPDATE person SET name = 'moved' WHERE id = 1")

            thread = threading.Thread(target=commit)
            thread.start()
            thread.join(30)
            assert cached(session, statement, "local") == uncached(pg_url, statement) == [("moved",)]
    finally:
        engine.dispose()


KIND_ITEM = """
CREATE TABLE kind (code TEXT PRIMARY KEY, label TEXT) WITHOUT ROWID;
CREATE TABLE item (
    id INTEGER PRIMARY KEY, kind_code TEXT REFERENCES kind (code) ON DELETE CASCADE,
    price INTEGER, total INTEGER GENERATED ALWAYS AS (price * 2) STORED
);
INSERT INTO kind VALUES ('a', 'A'), ('b', 'B');
INSERT INTO item (id, kind_code, price) VALUES (1, 'a', 10), (2, 'b', 20);
"""
ITEM = Table(
    "item",
    _META,
    Column("id", Integer, primary_key=True),
    Column("kind_code", String),
    Column("price", Integer),
    Column("total", Integer),
)


@pytest.mark.parametrize(
    "write, expected",
    [
        # REPLACE deletes the conflicting row: the foreign key (declared in SQL only) cascades into item.
        (lambda conn: conn.exec_driver_sql("REPLACE INTO kind VALUES ('a', 'A2')"), [(2, "b", 40)]),
        (
            lambda conn: conn.execute(
                sqlite_insert(ITEM)
                .values(id=2, kind_code="b", price=5)
                .on_conflict_do_update(index_elements=[ITEM.c.id], set_={"price": 7})
            ),
            [(1, "a", 20), (2, "b", 14)],
        ),
        (
            lambda conn: conn.exec_driver_sql(
                "INSERT OR REPLACE INTO item (id, kind_code, price) VALUES (2, 'b', 100)"
            ),
            [(1, "a", 20), (2, "b", 200)],
        ),
        (
            lambda conn: conn.execute(text("UPDATE item SET price = price + 1 RETURNING id").columns(ITEM.c.id)).all(),
            [(1, "a", 22), (2, "b", 42)],
        ),
    ],
    ids=[
        "REPLACE INTO a WITHOUT ROWID parent",
        "on_conflict_do_update()",
        "INSERT OR REPLACE",
        "UPDATE RETURNING as text().columns()",
    ],
)
def test_sqlite_upserts_replaces_and_generated_columns(sqlite_extra, regions, write, expected):
    """SQLite's conflict resolutions, a generated column, RETURNING as text, committed by another engine with foreign keys on."""
    committed_elsewhere_script(sqlite_extra, KIND_ITEM)
    engine = create_engine(sqlite_extra)
    Sessions = sessionmaker(engine, info=regions.session_info())
    statement = select(ITEM.c.id, ITEM.c.kind_code, ITEM.c.total).order_by(ITEM.c.id)
    writer = create_engine(sqlite_extra)
    event.listen(writer, "connect", lambda dbapi, record: dbapi.execute("PRAGMA foreign_keys = ON"))
    try:
        with Sessions() as first:
            assert cached(first, statement, "file") == [(1, "a", 20), (2, "b", 40)]
        with writer.begin() as conn:
            write(conn)
        with Sessions() as again:
            served = cached(again, statement, "file")
        assert uncached(sqlite_extra, statement) == expected
        assert served == expected
    finally:
        engine.dispose()
        writer.dispose()


def committed_elsewhere_script(url: str, script: str) -> None:
    """Run each statement of ``script`` in one committed transaction of a fresh engine."""
    committed_elsewhere(url, *(part for part in script.split(";") if part.strip()))
