"""Attack s25 (review): the schema read for invalidation, and manual invalidation, attacked again.

Each test compares what a cached read returns with what an uncached read
of the same query returns, after a write another Session, connection or
program commits.  Hits are proven by counting statements.
"""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, event, insert, select, text, update
from sqlalchemy.orm import sessionmaker

from pyramid_sessioncache import SessionCache, invalidate_tables
from pyramid_sessioncache.engine.invalidation.schema import forget_catalog

from .conftest import SECRET, SQLCounter
from .conftest import rows as _rows
from .conftest import truth as _truth

_meta = MetaData()
_ITEM = Table("s25_item", _meta, Column("id", Integer, primary_key=True))
_COUNT = Table("s25_count", _meta, Column("id", Integer, primary_key=True), Column("n", Integer))
_COUNTS = select(_COUNT.c.n).order_by(_COUNT.c.id)

_TABLES = (
    "CREATE TABLE s25_item (id INTEGER PRIMARY KEY);"
    "CREATE TABLE s25_count (id INTEGER PRIMARY KEY, n INTEGER);"
    "INSERT INTO s25_count VALUES (1, 0);"
)
_COUNTED = "CREATE TRIGGER s25_counted AFTER INSERT ON s25_item BEGIN UPDATE s25_count SET n = n + 1; END"


@pytest.fixture(autouse=True)
def _no_schema_known():
    # What a publication is closed over includes every database's schema
    # read in the process (version names are shared): another test's
    # trigger between tables of the same names must not stand in for this one's.
    forget_catalog()


def _run(path, sql: str) -> None:
    """Run ``sql`` on the SQLite file ``path`` and commit, as another program would."""
    db = sqlite3.connect(path)
    db.executescript(sql)
    db.commit()
    db.close()


def _cache(**options):
    return SessionCache({"memory": {"type": "memory"}}, secret=SECRET, **options)


# SQLite's schema, changed by another program while a transaction is open ---------------------------


def _committed(session):
    session.commit()


def _committed_as_sql(session):
    session.connection().exec_driver_sql("COMMIT")
    session.commit()


@pytest.mark.parametrize(
    "commit, isolation",
    [(_committed, None), (_committed_as_sql, None), (_committed, "AUTOCOMMIT")],
    ids=["commit()", "COMMIT sent as SQL", "autocommit"],
)
def test_a_trigger_another_program_adds_before_the_first_write_of_an_open_transaction_invalidates(
    tmp_path, commit, isolation
):
    # The schema was read as the transaction began (SQLAlchemy's begin,
    # before SQLite's own, which the first write opens); a trigger created
    # in between fired, and what it wrote was published only if some other
    # connection happened to read the new schema first.  The s24 test of
    # this scenario passed only after tests that had read a catalog with
    # the same table names.
    path = tmp_path / "t.sqlite"
    _run(path, _TABLES)
    engine = create_engine(f"sqlite:///{path}", **({"isolation_level": isolation} if isolation else {}))
    Sess = sessionmaker(engine, info=_cache().session_info())
    with Sess() as session:
        before = _rows(session, _COUNTS, "memory")
    counter = SQLCounter(engine)
    with Sess() as session:
        assert _rows(session, _COUNTS, "memory") == before
    assert counter.count == 0  # a hit
    with Sess() as session:
        session.execute(select(_ITEM)).all()  # its transaction began: the schema is read
        _run(path, _COUNTED)  # another program: a migration
        session.execute(insert(_ITEM).values(id=1))
        commit(session)
    truth = _truth(engine, _COUNTS)
    assert truth != before
    with Sess() as session:
        assert _rows(session, _COUNTS, "memory") == truth
    engine.dispose()


def test_a_temporary_trigger_of_one_connection_survives_the_schema_read_again_on_another(tmp_path):
    path = tmp_path / "t.sqlite"
    _run(path, _TABLES)
    engine = create_engine(f"sqlite:///{path}")
    Sess = sessionmaker(engine, info=_cache().session_info())
    with engine.connect() as auditing:  # a connection that counts the items it inserts itself
        auditing.exec_driver_sql(_COUNTED.replace("CREATE TRIGGER", "CREATE TEMP TRIGGER"))
        auditing.commit()
        _run(path, "CREATE INDEX s25_count_n ON s25_count (n)")  # another program: the schema is read again...
        with Sess() as session:  # ...as the next transaction, of another connection, begins
            before = _rows(session, _COUNTS, "memory")
        with Sess(bind=auditing) as session:
            session.execute(insert(_ITEM).values(id=1))
            session.commit()
    truth = _truth(engine, _COUNTS)
    assert truth != before
    with Sess() as session:
        assert _rows(session, _COUNTS, "memory") == truth
    engine.dispose()


_AUX_COUNTS = select(Table("s25_count", MetaData(), Column("n", Integer), schema="aux").c.n)
_AUX_ITEM = Table("s25_item", MetaData(), Column("id", Integer, primary_key=True), schema="aux")


def test_connections_attaching_different_files_under_one_name_keep_each_files_triggers(tmp_path):
    # Two tenants' files, attached as "aux" by connections of one engine;
    # the same number of schema changes in each, but only b's counts its items.
    _run(tmp_path / "a.sqlite", _TABLES + "CREATE INDEX s25_count_n ON s25_count (n)")
    _run(tmp_path / "b.sqlite", _TABLES + _COUNTED)
    engine = create_engine(f"sqlite:///{tmp_path / 'main.sqlite'}")
    Sess = sessionmaker(engine, info=_cache().session_info())
    with engine.connect() as a, engine.connect() as b, engine.connect() as reader:
        versions = set()
        for conn, name in ((a, "a"), (b, "b"), (reader, "b")):
            conn.exec_driver_sql(f"ATTACH DATABASE '{tmp_path / name}.sqlite' AS aux")
            versions.add(conn.exec_driver_sql("PRAGMA aux.schema_version").scalar())
            conn.commit()  # the Sessions bound to it then begin and commit their own transactions
        assert len(versions) == 1
        with Sess(bind=a) as session:  # a's schema is read first
            assert _rows(session, _AUX_COUNTS, "memory") == [(0,)]
        with Sess(bind=reader) as session:
            assert _rows(session, _AUX_COUNTS, "memory") == [(0,)]
        with Sess(bind=b) as session:
            session.execute(insert(_AUX_ITEM).values(id=1))  # b's trigger counts it
            session.commit()
        counter = SQLCounter(engine)
        with Sess(bind=reader) as session:
            assert _rows(session, _AUX_COUNTS) == [(1,)]
            assert _rows(session, _AUX_COUNTS, "memory") == [(1,)]
            counter.reset()
            assert _rows(session, _AUX_COUNTS, "memory") == [(1,)]
            assert counter.count == 0  # a hit
    engine.dispose()


_SHOWN = select(Table("s25_shown", MetaData(), Column("n", Integer)).c.n)


def test_a_temporary_view_of_one_connection_survives_the_schema_read_again_on_another(tmp_path):
    path = tmp_path / "t.sqlite"
    _run(path, _TABLES)
    engine = create_engine(f"sqlite:///{path}")
    Sess = sessionmaker(engine, info=_cache().session_info())
    with engine.connect() as showing:
        showing.exec_driver_sql("CREATE TEMP VIEW s25_shown AS SELECT n FROM s25_count")
        showing.commit()
        _run(path, "CREATE INDEX s25_count_n ON s25_count (n)")  # another program: the schema is read again...
        with Sess() as session:  # ...as the next transaction, of another connection, begins
            session.execute(select(_COUNT)).all()
        with Sess(bind=showing) as session:
            before = _rows(session, _SHOWN, "memory")
        with Sess() as session:
            session.execute(update(_COUNT).values(n=3))
            session.commit()
        with Sess(bind=showing) as session:
            assert before == [(0,)]
            assert _rows(session, _SHOWN) == [(3,)]
            assert _rows(session, _SHOWN, "memory") == [(3,)]
    engine.dispose()


# PostgreSQL's triggers ---------------------------------------------------------------------------------

_LOG = Table("s25_log", _meta, Column("id", Integer))

_AUDIT_ON_READ = """
CREATE TABLE s25_item (id integer PRIMARY KEY);
CREATE TABLE s25_log (id integer);
CREATE FUNCTION s25_logged() RETURNS integer LANGUAGE plpgsql AS $$
BEGIN INSERT INTO s25_log VALUES (1); RETURN 1; END $$;
CREATE VIEW s25_audit AS SELECT s25_logged() AS logged;
CREATE FUNCTION s25_item_added() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM * FROM s25_audit; RETURN NULL; END $$;
CREATE TRIGGER s25_item_added AFTER INSERT ON s25_item FOR EACH ROW EXECUTE FUNCTION s25_item_added();
CREATE FUNCTION s25_audited() RETURNS integer LANGUAGE sql AS 'SELECT logged FROM s25_audit';
"""


@pytest.mark.parametrize(
    "write",
    [insert(_ITEM).values(id=1), text("SELECT s25_audited()")],
    ids=["a trigger function", "a function a SELECT calls"],
)
def test_what_reads_a_postgresql_view_calling_a_function_that_writes_writes_every_table(pg_database, write):
    # A SELECT of such a view (an audit-on-read view) counted as a write to
    # every table; a trigger function, or a function, reading it wrote only
    # what its own DML named (nothing here), and the log stayed stale.
    _logged_fresh_after(pg_database, _AUDIT_ON_READ, select(_LOG.c.id), write)


def _logged_fresh_after(url, schema_sql, logged, write, *, served=True, between=None):
    """Make ``schema_sql``; ``logged``, empty, is cached (then a hit); ``write`` logs a row: it is served.

    ``write``: a statement the Session executes, or a function given the Session (an ORM flush).
    ``served``: whether the empty ``logged`` is then a hit (not where every
    statement writes every table); ``between``: a function given the
    engine, run before ``write`` (a schema change).
    """
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(schema_sql)
    Sess = sessionmaker(engine, info=_cache().session_info())
    with Sess() as session:
        assert _rows(session, logged, "memory") == []
    counter = SQLCounter(engine)
    with Sess() as session:
        assert _rows(session, logged, "memory") == []
    assert (counter.count == 0) is served  # a hit, where one may be
    if between is not None:
        between(engine)
    with Sess() as session:
        write(session) if callable(write) else session.execute(write)
        session.commit()
    truth = _truth(engine, logged)
    assert truth == [(1,)]
    with Sess() as session:
        assert _rows(session, logged, "memory") == truth
    engine.dispose()


_DDL_LOG = Table("s25_ddl_log", _meta, Column("id", Integer))

_DDL_LOGGED = """
CREATE TABLE s25_ddl_log (id integer);
CREATE FUNCTION s25_log_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO s25_ddl_log VALUES (1); END $$;
CREATE EVENT TRIGGER s25_log_ddl ON ddl_command_end EXECUTE FUNCTION s25_log_ddl();
"""


def test_what_a_postgresql_event_trigger_writes_at_a_schema_change_is_invalidated(pg_database):
    # Event triggers (a DDL audit log) were not read: a schema change
    # wrote every entry that depends on every table, and the tables it
    # named, and the log stayed stale.
    _logged_fresh_after(pg_database, _DDL_LOGGED, select(_DDL_LOG.c.id), text("CREATE TABLE s25_made (id integer)"))


# Manual invalidation ----------------------------------------------------------------------------------


def test_manual_invalidation_voids_what_a_query_begun_before_the_commit_stores_after_it(
    tmp_path, region_options, region
):
    # A query that read the rows before a commit stored them after the
    # commit's explicit invalidation had forgotten every entry: the old
    # rows were served until they expired.  Automatic invalidation reads
    # versions before the query, and its entry is void.
    path = tmp_path / "t.sqlite"
    _run(path, "PRAGMA journal_mode=WAL;" + _TABLES)  # the reader's snapshot stays while the writer commits
    reader, writer = create_engine(f"sqlite:///{path}"), create_engine(f"sqlite:///{path}")
    cache = SessionCache(region_options, invalidation="manual", secret=SECRET)
    Sess = sessionmaker(reader, info=cache.session_info())
    pending = [True]

    @event.listens_for(reader, "after_cursor_execute")
    def meanwhile(conn, cursor, statement, parameters, context, executemany):
        if pending and "s25_count" in statement:  # the query ran; its rows are not stored yet
            pending.clear()
            with sessionmaker(writer, info=cache.session_info())() as session:
                session.execute(update(_COUNT).values(n=7))
                invalidate_tables(session, _COUNT)
                session.commit()

    with Sess() as session:
        assert _rows(session, _COUNTS, region) == [(0,)]  # read before the commit
    assert _truth(reader, _COUNTS) == [(7,)]
    with Sess() as session:
        assert _rows(session, _COUNTS, region) == [(7,)]
    counter = SQLCounter(reader)
    with Sess() as session:  # stored again, and a hit
        assert _rows(session, _COUNTS, region) == [(7,)]
    assert counter.count == 0
    reader.dispose()
    writer.dispose()
