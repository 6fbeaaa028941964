"""SQLite's own tables, pragmas, virtual tables, maintenance, and views over what a connection did.

What ``test_attack_s34_paths.py`` leaves untested of the rules that fix
it: a connection's PRAGMA stays a setting (not a write), reads of
ordinary tables and views still hit (proven by counting SQL), a pragma
read runs every time, a view over a view over ``last_insert_rowid()``
is never stored, and what each maintenance statement writes.
"""

from __future__ import annotations

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, select, text
from sqlalchemy.orm import sessionmaker

from pyramid_sessioncache import SessionCache
from pyramid_sessioncache.engine.invalidation import reads
from pyramid_sessioncache.engine.invalidation.statements import EVERYTHING, NOTHING, sql_tables

from .conftest import SECRET, SQLCounter
from .test_attack_s34_paths import cached, committed_elsewhere, uncached

_META = MetaData()
PERSON = Table("person", _META, Column("id", Integer), Column("name", String))
PRAGMA_USER_VERSION = Table("pragma_user_version", _META, Column("user_version", Integer))
NAMES = Table("person_names", _META, Column("name", String))
LAST_ID_TWICE = Table("last_id_twice", _META, Column("id", Integer))


@pytest.fixture
def regions(region_options) -> SessionCache:
    return SessionCache(region_options, default_region="memory", secret=SECRET)


@pytest.mark.parametrize(
    "sql, written",
    [
        ("ANALYZE", {reads.ANY_TABLE}),
        ("analyze main.person", {reads.ANY_TABLE}),
        ("VACUUM", EVERYTHING),
        ("vacuum main", EVERYTHING),
        ("PRAGMA optimize", {reads.ANY_TABLE}),
        ("PRAGMA main.optimize(0x10002)", {reads.ANY_TABLE}),
        # Pragma reads are never stored: setting one publishes nothing.
        ("PRAGMA user_version = 7", NOTHING),
        ("PRAGMA foreign_keys = ON", NOTHING),
        ("PRAGMA user_version", NOTHING),
        ("EXPLAIN QUERY PLAN SELECT * FROM person", NOTHING),
        ("SELECT 'vacuum', 'analyze'", NOTHING),
    ],
)
def test_what_maintenance_and_pragmas_write(sql, written):
    assert sql_tables(sql) == frozenset(written)


@pytest.mark.parametrize("name", ["sqlite_master", "sqlite_schema", "sqlite_temp_master", "sqlite_stat4"])
def test_sqlite_own_tables_are_read_as_every_table(engine, name):
    """What writes SQLite's own tables names none of them: their reads depend on ANY_TABLE."""
    own = Table(name, MetaData(), Column("name", String))
    with engine.connect() as conn:
        compiled = select(own.c.name).compile(conn)
        assert reads.executed_tables(compiled) == {reads.ANY_TABLE}
        # Not every table that starts alike: ``sqlite`` alone is a name like any other.
        plain = Table("sqlitex", MetaData(), Column("name", String))
        assert reads.executed_tables(select(plain.c.name).compile(conn)) == {"sqlitex"}


def test_a_table_read_after_in_in_sql_text_that_is_sqlite_own_is_every_table(engine):
    statement = select(PERSON.c.id).where(text("'person' IN sqlite_master"))
    with engine.connect() as conn:
        assert reads.executed_tables(statement.compile(conn)) == {reads.ANY_TABLE}


def test_a_connection_pragma_stays_a_setting_and_ordinary_reads_still_hit(engine, db_url, regions):
    """``PRAGMA foreign_keys = ON`` publishes no write: what another connection stored is still served."""
    Sessions = sessionmaker(engine, info=regions.session_info())
    statement = select(PERSON.c.name).where(PERSON.c.id == 1)
    with Sessions() as first:
        stored = cached(first, statement)
    # On a connection of its own: the one that set it keys its own reads apart (connection_state.py).
    setting = create_engine(db_url)
    try:
        with sessionmaker(setting, info=regions.session_info())() as setter:
            setter.execute(text("PRAGMA foreign_keys = ON"))
            setter.execute(text("PRAGMA case_sensitive_like = 1"))
            setter.commit()
    finally:
        setting.dispose()
    sql = SQLCounter(engine)
    try:
        with Sessions() as again:
            assert cached(again, statement) == stored
        assert sql.count == 0, sql.statements
    finally:
        sql.stop()
    assert stored == uncached(db_url, statement)


@pytest.mark.parametrize(
    "statement",
    [text("PRAGMA user_version"), select(PRAGMA_USER_VERSION.c.user_version)],
    ids=["PRAGMA text", "pragma_user_version as a table"],
)
def test_a_pragma_read_runs_every_time_and_sees_it_set(engine, db_url, regions, statement):
    Sessions = sessionmaker(engine, info=regions.session_info())
    sql = SQLCounter(engine)
    try:
        for _ in range(2):
            with Sessions() as session:
                assert cached(session, statement) == [(0,)]
        assert len([each for each in sql.statements if "user_version" in each]) == 2, sql.statements
    finally:
        sql.stop()
    committed_elsewhere(db_url, "PRAGMA user_version = 3")
    with Sessions() as session:
        assert cached(session, statement) == [(3,)] == uncached(db_url, statement)


def test_a_sqlite_view_over_tables_is_still_stored(engine, db_url, regions):
    """Views depend on every table, but are stored: only those over an effect are not."""
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE VIEW person_names AS SELECT name FROM person")
    Sessions = sessionmaker(engine, info=regions.session_info())
    statement = select(NAMES.c.name).order_by(NAMES.c.name)
    with Sessions() as first:
        stored = cached(first, statement)
    sql = SQLCounter(engine)
    try:
        with Sessions() as again:
            assert cached(again, statement) == stored
        assert sql.count == 0, sql.statements
    finally:
        sql.stop()
    committed_elsewhere(db_url, "UPDATE person SET name = 'renamed' WHERE id = 1")
    with Sessions() as after:
        assert cached(after, statement) == uncached(db_url, statement)


def test_a_view_over_a_view_over_last_insert_rowid_is_never_stored(db_url, regions):
    with create_engine(db_url).begin() as conn:
        conn.exec_driver_sql("CREATE VIEW last_id AS SELECT last_insert_rowid() AS id")
        conn.exec_driver_sql("CREATE VIEW last_id_twice AS SELECT id FROM last_id")
    one, two = create_engine(db_url), create_engine(db_url)
    statement = select(LAST_ID_TWICE.c.id)
    try:
        with sessionmaker(one, info=regions.session_info())() as writer:
            writer.execute(text("INSERT INTO person (id, name) VALUES (201, 'a')"))
            writer.commit()
            assert cached(writer, statement) == [(201,)]
        with sessionmaker(two, info=regions.session_info())() as other:
            assert cached(other, statement) == [(0,)]
    finally:
        one.dispose()
        two.dispose()


@pytest.mark.parametrize("region", ["memory", "file"])
def test_a_virtual_table_over_a_table_sees_its_write_in_the_same_file(engine, db_url, regions, region):
    """An FTS5 table over external content: its read is stored, and a write to the content table voids it."""
    fts = Table("person_fts", MetaData(), Column("rowid", Integer), Column("name", String))
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE VIRTUAL TABLE person_fts USING fts5(name, content='person', content_rowid='id')")
        conn.exec_driver_sql("INSERT INTO person_fts(person_fts) VALUES ('rebuild')")
    Sessions = sessionmaker(engine, info=regions.session_info())
    statement = select(fts.c.rowid, fts.c.name).where(fts.c.rowid == 1)
    with Sessions() as first:
        before = cached(first, statement, region)
    sql = SQLCounter(engine)
    try:
        with Sessions() as again:
            assert cached(again, statement, region) == before
        assert sql.count == 0, "a virtual table's read is stored: " + repr(sql.statements)
    finally:
        sql.stop()
    committed_elsewhere(db_url, "UPDATE person SET name = 'changed' WHERE id = 1")
    with Sessions() as after:
        assert cached(after, statement, region) == uncached(db_url, statement) == [(1, "changed")]
