"""Attack s25 (second review): SQLite catalogs held by connections, manual invalidation, PostgreSQL's writers.

Each test compares what a cached read returns with what an uncached read
of the same query returns, after a realistic sequence.  Hits are proven
by counting statements.
"""

from __future__ import annotations

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, Text, create_engine, event, insert, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from pyramid_sessioncache import (
    SessionCache,
    cached_query,
    invalidate,
    invalidate_region,
    invalidate_tables,
)
from pyramid_sessioncache.engine.invalidation import schema

from .conftest import SECRET, SQLCounter
from .test_attack_s25_review import (  # the helpers of the first review, and its autouse fixture
    _cache,
    _logged_fresh_after,
    _no_schema_known,  # noqa: F401
    _rows,
    _run,
    _truth,
)

_meta = MetaData()
_ITEM = Table("s25s_item", _meta, Column("id", Integer, primary_key=True))
_COUNT = Table("s25s_count", _meta, Column("id", Integer, primary_key=True), Column("n", Integer))
_COUNTS = select(_COUNT.c.n).order_by(_COUNT.c.id)

_TABLES = (
    "CREATE TABLE {schema}s25s_item (id INTEGER PRIMARY KEY);"
    "CREATE TABLE {schema}s25s_count (id INTEGER PRIMARY KEY, n INTEGER);"
    "INSERT INTO {schema}s25s_count VALUES (1, 0);"
)
_COUNTED = "CREATE TRIGGER {schema}s25s_counted AFTER INSERT ON s25s_item BEGIN UPDATE s25s_count SET n = n + 1; END;"


# SQLite: what a connection holds alone ----------------------------------------------------------------


@pytest.mark.parametrize("disposed", [False, True], ids=["connections open", "pool disposed"])
def test_a_declared_write_is_closed_over_the_triggers_read_by_connections_with_temporary_objects(tmp_path, disposed):
    # Every connection makes a temporary table as it opens (a scratch table
    # for bulk work): each holds a catalog of its own, which was kept out of
    # what a declared write is closed over; the count kept by the main
    # database's trigger stayed stale after invalidate_tables("s25s_item").
    # And once the pool was disposed (after a fork, say), with the
    # connections went the catalogs they held (s26's review).
    path = tmp_path / "t.sqlite"
    _run(path, _TABLES.format(schema="") + _COUNTED.format(schema=""))
    engine = create_engine(f"sqlite:///{path}")

    @event.listens_for(engine, "connect")
    def scratch(dbapi_connection, record):
        dbapi_connection.execute("CREATE TEMP TABLE s25s_scratch (x)")

    cache = _cache()
    Sess = sessionmaker(engine, info=cache.session_info())
    with Sess() as session:
        assert _rows(session, _COUNTS, "memory") == [(0,)]
    if disposed:
        engine.dispose()
    _run(path, "INSERT INTO s25s_item VALUES (1)")  # another program; the application declares it
    cache.invalidate_tables("s25s_item")
    truth = _truth(engine, _COUNTS)
    assert truth == [(1,)]
    counter = SQLCounter(engine)
    with Sess() as session:
        assert _rows(session, _COUNTS, "memory") == truth
        counter.reset()
        assert _rows(session, _COUNTS, "memory") == truth
        assert counter.count == 0  # stored again, and a hit
    engine.dispose()


_AUX = MetaData(schema="aux")
_AUX_ITEM = Table("s25s_item", _AUX, Column("id", Integer, primary_key=True))
_AUX_COUNTS = select(Table("s25s_count", _AUX, Column("n", Integer)).c.n)


def test_connections_attaching_a_database_in_memory_under_one_name_keep_each_ones_triggers(tmp_path):
    # ATTACH ':memory:' gives each connection a database of its own, with
    # no file: two connections attaching one under one name, with the same
    # number of schema changes, shared one catalog, and the trigger of one
    # was unknown to the other.
    path = tmp_path / "main.sqlite"
    _run(path, "")
    engine = create_engine(f"sqlite:///{path}")
    Sess = sessionmaker(engine, info=_cache().session_info())
    with engine.connect() as counting, engine.connect() as other:
        for conn, extra in ((counting, _COUNTED), (other, "CREATE INDEX {schema}s25s_count_n ON s25s_count (n);")):
            conn.exec_driver_sql("ATTACH DATABASE ':memory:' AS aux")
            conn.connection.dbapi_connection.executescript((_TABLES + extra).format(schema="aux."))
            conn.commit()
        with Sess(bind=other) as session:  # other's schema is read first
            session.execute(select(_AUX_ITEM)).all()
        with Sess(bind=counting) as session:
            assert _rows(session, _AUX_COUNTS, "memory") == [(0,)]
        with Sess(bind=counting) as session:
            session.execute(insert(_AUX_ITEM).values(id=1))  # its trigger counts it
            session.commit()
        truth = _truth(counting, _AUX_COUNTS)
        assert truth == [(1,)]
        counter = SQLCounter(engine)
        with Sess(bind=counting) as session:
            assert _rows(session, _AUX_COUNTS, "memory") == truth
            counter.reset()
            assert _rows(session, _AUX_COUNTS, "memory") == truth
            assert counter.count == 0  # a hit
    engine.dispose()


@pytest.mark.parametrize("entrance", ["FromCache option", "cached_query()"])
@pytest.mark.parametrize("region", ["memory", "local"])
def test_a_hit_sends_nothing_to_sqlite_not_even_a_schema_check(tmp_path, region, entrance):
    # The schema is checked (PRAGMA schema_version) as a transaction begins,
    # before a load and after a commit that wrote: never for a hit, which
    # SQLCounter (SQLAlchemy's events) would not see; the driver does.
    path = tmp_path / "t.sqlite"
    _run(path, _TABLES.format(schema="") + _COUNTED.format(schema=""))
    engine = create_engine(f"sqlite:///{path}")
    sent: list[str] = []

    @event.listens_for(engine, "connect")
    def traced(dbapi_connection, record):
        dbapi_connection.set_trace_callback(sent.append)

    cache = SessionCache({"memory": {"type": "memory"}, "local": {"type": "ext:local_session"}}, secret=SECRET)
    Sess = sessionmaker(engine, info=cache.session_info())

    def read(session):
        if entrance == "cached_query()":
            return [tuple(row) for row in cached_query(session, _COUNTS, region=region).all()]
        return _rows(session, _COUNTS, region)

    with Sess() as session:
        assert read(session) == [(0,)]
        if region == "local":
            sent.clear()
            assert read(session) == [(0,)]
            assert sent == []
    if region == "memory":
        sent.clear()
        with Sess() as session:
            assert read(session) == [(0,)]
        assert sent == []
    engine.dispose()


# Manual invalidation ----------------------------------------------------------------------------------


def test_entries_stored_under_manual_invalidation_are_void_once_restarted_with_automatic(tmp_path, shared_region):
    # A manual entry records the version of every table alone; restarted
    # with automatic invalidation, the application's writes bump the
    # versions of the tables written, which such an entry never recorded:
    # it was served after every write until it expired.
    path = tmp_path / "t.sqlite"
    _run(path, _TABLES.format(schema=""))
    engine = create_engine(f"sqlite:///{path}")
    regions = {"shared": shared_region}
    manual = SessionCache(regions, invalidation="manual", secret=SECRET)
    with sessionmaker(engine, info=manual.session_info())() as session:
        assert _rows(session, _COUNTS, "shared") == [(0,)]
    manual.close()
    auto = SessionCache(regions, secret=SECRET)  # the next start, configured otherwise
    Sess = sessionmaker(engine, info=auto.session_info())
    with Sess() as session:
        session.execute(update(_COUNT).values(n=5))
        session.commit()
    truth = _truth(engine, _COUNTS)
    assert truth == [(5,)]
    counter = SQLCounter(engine)
    with Sess() as session:
        assert _rows(session, _COUNTS, "shared") == truth
        counter.reset()
        assert _rows(session, _COUNTS, "shared") == truth
        assert counter.count == 0  # stored again, and a hit
    auto.close()
    engine.dispose()


def _read_while_another_commits(tmp_path, cache, region, invalidate):
    """Read ``_COUNTS`` through ``region`` while another Session updates the count, commits, then ``invalidate()``s.

    The reader's query runs before the commit and its rows are stored
    after it (WAL: its snapshot stays while the writer commits).  Returns
    the reader's engine, the commit's ``again`` function called already.
    """
    path = tmp_path / "t.sqlite"
    _run(path, "PRAGMA journal_mode=WAL;" + _TABLES.format(schema=""))
    reader, writer = create_engine(f"sqlite:///{path}"), create_engine(f"sqlite:///{path}")
    pending = [True]

    @event.listens_for(reader, "after_cursor_execute")
    def meanwhile(conn, cursor, statement, parameters, context, executemany):
        if pending and "s25s_count" in statement:  # the query ran; its rows are not stored yet
            pending.clear()
            with sessionmaker(writer, info=cache.session_info())() as session:
                session.execute(update(_COUNT).values(n=7))
                again = invalidate(session)
                session.commit()
            if again is not None:
                again()  # as request.sessioncache does once the transaction has committed
            writer.dispose()

    with sessionmaker(reader, info=cache.session_info())() as session:
        assert _rows(session, _COUNTS, region) == [(0,)]  # read before the commit
    assert not pending
    return reader


@pytest.mark.parametrize("invalidation", ["manual", "auto"])
def test_a_region_invalidated_voids_what_a_query_begun_before_the_commit_stores_after_it(
    tmp_path, region_options, region, invalidation
):
    # invalidate_region() forgot the entries now and again after the commit;
    # a query that read the rows before the commit stored them after that:
    # with manual invalidation they were served until they expired.
    cache = SessionCache(region_options, invalidation=invalidation, secret=SECRET)
    reader = _read_while_another_commits(
        tmp_path, cache, region, lambda session: invalidate_region(cache, region, session)
    )
    truth = _truth(reader, _COUNTS)
    assert truth == [(7,)]
    Sess = sessionmaker(reader, info=cache.session_info())
    with Sess() as session:
        assert _rows(session, _COUNTS, region) == truth
    counter = SQLCounter(reader)
    with Sess() as session:  # stored again, and a hit
        assert _rows(session, _COUNTS, region) == truth
    assert counter.count == 0
    reader.dispose()


def test_a_query_invalidated_voids_what_a_query_begun_before_the_commit_stores_after_it(tmp_path, region_options):
    # invalidate(query) forgot one key, now and after the commit: a query
    # that read the rows before the commit stored them after both, valid
    # until it expired.  Manual entries now record a version of their key's
    # own, which invalidate(query) bumps (tests/test_attack_s26_manual_key.py).
    cache = SessionCache(region_options, invalidation="manual", secret=SECRET)
    reader = _read_while_another_commits(
        tmp_path, cache, "file", lambda session: invalidate(_COUNTS, session, "file", cache=cache)
    )
    truth = _truth(reader, _COUNTS)
    assert truth == [(7,)]
    with sessionmaker(reader, info=cache.session_info())() as session:
        assert _rows(session, _COUNTS, "file") == truth
    reader.dispose()


@pytest.mark.parametrize("session_ends", ["closed", "committed, read before the transaction commits"])
def test_manual_invalidation_declared_in_a_session_joined_to_a_connections_transaction(
    tmp_path, region_options, region, session_ends
):
    # A Session bound to a Connection in engine.begin() (the cookiecutter's
    # test fixtures, a script) leaves what it declares to that transaction;
    # its commit was published as writes, which manual invalidation
    # ignores: closed without committing, the invalidation was lost, and a
    # read between the Session's commit and the transaction's stored the
    # old rows for good.
    path = tmp_path / "t.sqlite"
    _run(path, _TABLES.format(schema=""))
    engine = create_engine(f"sqlite:///{path}")
    cache = SessionCache(region_options, invalidation="manual", secret=SECRET)
    Sess = sessionmaker(engine, info=cache.session_info())
    with Sess() as session:
        assert _rows(session, _COUNTS, region) == [(0,)]
    with engine.begin() as conn, Session(bind=conn, info=cache.session_info()) as session:
        session.connection().exec_driver_sql("UPDATE s25s_count SET n = 9")
        invalidate_tables(session, _COUNT)
        if session_ends != "closed":
            session.commit()
            with Sess() as reader:  # the transaction has not committed: the old rows
                assert _rows(reader, _COUNTS, region) == [(0,)]
    truth = _truth(engine, _COUNTS)
    assert truth == [(9,)]
    with Sess() as session:
        assert _rows(session, _COUNTS, region) == truth
    engine.dispose()


# PostgreSQL's event triggers and writers ---------------------------------------------------------------

_DDL_LOG = Table("s25s_ddl_log", MetaData(), Column("tag", Text))
_DDL_LOGGED = """
CREATE TABLE s25s_ddl_log (tag text);
CREATE TABLE s25s_item (id integer PRIMARY KEY);
CREATE MATERIALIZED VIEW s25s_items AS SELECT count(*) AS n FROM s25s_item;
CREATE FUNCTION s25s_log_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO s25s_ddl_log VALUES (tg_tag); END $$;
CREATE EVENT TRIGGER s25s_log_ddl ON ddl_command_end EXECUTE FUNCTION s25s_log_ddl();
"""


def test_what_a_postgresql_event_trigger_writes_at_a_materialized_view_refresh_is_invalidated(pg_database):
    # REFRESH MATERIALIZED VIEW fires event triggers, as DDL does; it was
    # taken for a write to the view alone, and the DDL log stayed stale.
    engine = create_engine(pg_database)
    with engine.begin() as conn:
        conn.exec_driver_sql(_DDL_LOGGED)
    Sess = sessionmaker(engine, info=_cache().session_info())
    logged = select(_DDL_LOG.c.tag).order_by(_DDL_LOG.c.tag)
    with Sess() as session:
        before = _rows(session, logged, "memory")
    with Sess() as session:
        session.execute(text("REFRESH MATERIALIZED VIEW s25s_items"))
        session.commit()
    truth = _truth(engine, logged)
    assert truth == [*before, ("REFRESH MATERIALIZED VIEW",)]
    with Sess() as session:
        assert _rows(session, logged, "memory") == truth
    engine.dispose()


def test_a_postgresql_chain_of_functions_calling_each_other_costs_the_catalog_read_its_length_once(
    pg_database, monkeypatch
):
    # Each round of looking for the callers of the writers found looked for
    # every one found so far: a chain of K functions cost K rounds of K
    # names (400 functions: 25 s to read the catalog, once per process and
    # after every schema change).  Measured by the names looked for.
    length = 60
    chain = [
        f"CREATE FUNCTION s25s_f{length}() RETURNS int LANGUAGE plpgsql AS $$ BEGIN DELETE FROM s25s_w; RETURN 1; END $$;"
    ]
    chain += [
        f"CREATE FUNCTION s25s_f{i}() RETURNS int LANGUAGE sql AS 'SELECT s25s_f{i + 1}()';"
        for i in reversed(range(length))
    ]
    engine = create_engine(pg_database)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE s25s_w (id integer);" + "".join(chain))
    looked_for = []
    patterns = schema._routines_pattern

    def counting(rows, *args, **kwargs):
        looked_for.append(len(rows))
        return patterns(rows, *args, **kwargs)

    monkeypatch.setattr(schema, "_routines_pattern", counting)
    with engine.connect() as conn:
        assert schema.calls_writers(conn, "SELECT s25s_f0()")  # the catalog read, and the chain's end found
    assert sum(looked_for) < 5 * length
    engine.dispose()


def test_connections_attaching_a_database_in_memory_under_one_name_are_not_served_each_others_rows(tmp_path):
    # ATTACH ':memory:' AS aux, the same statement on two connections, keyed
    # their look-ups alike: one was served the rows of the other's database.
    path = tmp_path / "main.sqlite"
    _run(path, "")
    engine = create_engine(f"sqlite:///{path}")

    def attach(conn):
        conn.exec_driver_sql("ATTACH DATABASE ':memory:' AS aux")
        conn.exec_driver_sql(_TABLES.format(schema="aux.").split(";")[1])

    _each_served_its_own(engine, _AUX_COUNTS, "INSERT INTO aux.s25s_count VALUES (1, {n})", attach)


def _each_served_its_own(engine, counts, insert, prepare=lambda conn: None):
    """Two connections of ``engine``, each ``prepare``d with a row of its own (``insert``, of ``n``): each is served its own.

    ``counts`` reads the row: cached on the first, then on the second
    (what it holds, then from the cache), then on the first again, a hit.
    """
    Sess = sessionmaker(engine, info=_cache().session_info())
    with engine.connect() as first, engine.connect() as second:
        for conn, n in ((first, 1), (second, 2)):
            prepare(conn)
            conn.exec_driver_sql(insert.format(n=n))
            conn.commit()
        with Sess(bind=first) as session:
            assert _rows(session, counts, "memory") == [(1,)]
        with Sess(bind=second) as session:
            assert _rows(session, counts) == [(2,)]
            assert _rows(session, counts, "memory") == [(2,)]
        counter = SQLCounter(engine)
        with Sess(bind=first) as session:
            assert _rows(session, counts, "memory") == [(1,)]
        assert counter.count == 0  # its own entry, a hit
    engine.dispose()


_LOG = Table("s25s_log", MetaData(), Column("id", Integer))
_AUDIT_BY_OPERATOR = """
CREATE TABLE s25s_log (id integer);
CREATE FUNCTION s25s_logged(a integer, b integer) RETURNS integer LANGUAGE plpgsql AS $$
BEGIN INSERT INTO s25s_log VALUES (a); RETURN a + b; END $$;
CREATE OPERATOR ### (LEFTARG = integer, RIGHTARG = integer, FUNCTION = s25s_logged);
CREATE VIEW s25s_audit AS SELECT 1 ### 2 AS logged;
CREATE FUNCTION s25s_audited() RETURNS integer LANGUAGE sql AS 'SELECT 1 ### 2';
"""


@pytest.mark.parametrize(
    "write",
    ["SELECT logged FROM s25s_audit", "SELECT s25s_audited()"],
    ids=["a view", "a function"],
)
def test_what_calls_a_postgresql_operator_whose_function_writes_writes_every_table(pg_database, write):
    # A view's functions were found by its dependencies on functions, and
    # the callers of a function that writes by its name: a view or a
    # function calling it as an operator (a ### b) was taken for a reader,
    # and the log stayed stale.
    _logged_fresh_after(pg_database, _AUDIT_BY_OPERATOR, select(_LOG.c.id), text(write))


_STANDARD_BODY = """
CREATE TABLE s25s_log (id integer);
CREATE FUNCTION s25s_logged() RETURNS integer LANGUAGE sql BEGIN ATOMIC INSERT INTO s25s_log VALUES (1); SELECT 1; END;
CREATE FUNCTION s25s_audited() RETURNS integer LANGUAGE sql RETURN s25s_logged();
"""


@pytest.mark.parametrize("write", ["SELECT s25s_logged()", "SELECT s25s_audited()"], ids=["it", "its caller"])
def test_a_postgresql_function_whose_body_is_in_sqls_standard_form_writes_what_it_names(pg_database, write):
    # BEGIN ATOMIC ... END and RETURN bodies (PostgreSQL 14) leave prosrc
    # empty: such a function, and its callers, were taken for readers, and
    # the log it wrote stayed stale.
    _logged_fresh_after(pg_database, _STANDARD_BODY, select(_LOG.c.id), text(write))
