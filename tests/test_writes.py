"""Writes are seen on the connection, whoever makes them, and what the database changes because of them.

Each case warms a shared region (a hit sends no SQL), writes one way,
commits, and compares what the cache then serves with an uncached run of
the same query.  SQLite files with foreign keys on.
"""

from __future__ import annotations

import pytest
from sqlalchemy import Column, ForeignKey, Integer, MetaData, String, Table, create_engine, event, insert, select, text
from sqlalchemy import delete as sql_delete
from sqlalchemy import update as sql_update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from pyramid_sessioncache import FromCache, SessionCache
from pyramid_sessioncache.engine.invalidation.reads import ALL_TABLES, ANY_TABLE
from pyramid_sessioncache.engine.invalidation.statements import sql_tables

from .conftest import SECRET, SQLCounter


class Base(DeclarativeBase):
    pass


class Parent(Base):
    __tablename__ = "w_parent"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class Child(Base):
    """Goes with its parent (ON DELETE CASCADE) and follows its key (ON UPDATE CASCADE); no ORM relationship."""

    __tablename__ = "w_child"
    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("w_parent.id", ondelete="CASCADE", onupdate="CASCADE"))
    name: Mapped[str] = mapped_column(String(50))


class Orphan(Base):
    """Loses its parent (ON DELETE SET NULL)."""

    __tablename__ = "w_orphan"
    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("w_parent.id", ondelete="SET NULL"))


class Audit(Base):
    """Written by a trigger on w_parent only."""

    __tablename__ = "w_audit"
    id: Mapped[int] = mapped_column(primary_key=True)
    note: Mapped[str] = mapped_column(String(100))


class Summary(Base):
    """A mapped class over a view of w_parent and w_child."""

    __table__ = Table(
        "w_summary",
        MetaData(),  # not created by create_all: it is a view
        Column("id", Integer, primary_key=True),
        Column("name", String(50)),
        Column("children", Integer),
    )


SCHEMA = [
    """CREATE TRIGGER w_parent_audit AFTER UPDATE ON w_parent
       BEGIN INSERT INTO w_audit (note) VALUES ('renamed ' || NEW.name); END""",
    """CREATE VIEW w_summary AS SELECT p.id AS id, p.name AS name, count(c.id) AS children
       FROM w_parent p LEFT JOIN w_child c ON c.parent_id = p.id GROUP BY p.id, p.name""",
]

#: What the schema does not say, declared as an application would.
WRITES_ALSO = {"w_parent": ["w_audit", "w_summary"], "w_child": ["w_summary"]}


@pytest.fixture
def wengine(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'writes.sqlite'}")
    event.listen(engine, "connect", lambda dbapi, record: dbapi.execute("PRAGMA foreign_keys=ON"))
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        for ddl in SCHEMA:
            conn.exec_driver_sql(ddl)
        conn.execute(insert(Parent), [{"id": i, "name": f"parent {i}"} for i in (1, 2, 3)])
        conn.execute(insert(Child), [{"id": i, "parent_id": 1 + i % 3, "name": f"child {i}"} for i in range(1, 10)])
        conn.execute(insert(Orphan), [{"id": i, "parent_id": 1} for i in (1, 2, 3)])
    yield engine
    engine.dispose()


@pytest.fixture
def wcache(region_options, region):
    return SessionCache(region_options, default_region=region, secret=SECRET, writes_also=WRITES_ALSO)


@pytest.fixture
def WSession(wengine, wcache):
    return sessionmaker(bind=wengine, info=wcache.session_info())


QUERIES = {
    "children": select(Child.id, Child.parent_id, Child.name).order_by(Child.id),
    "child objects": select(Child).order_by(Child.id),
    "orphans": select(Orphan.id, Orphan.parent_id).order_by(Orphan.id),
    "audit": select(Audit.id, Audit.note).order_by(Audit.id),
    "summary": select(Summary.id, Summary.name, Summary.children).order_by(Summary.id),
}


def rows_of(result) -> list[tuple]:
    return [
        tuple((value.id, value.parent_id, value.name) if isinstance(value, Child) else value for value in row)
        for row in result
    ]


def cached(WSession, region: str, stmt) -> list[tuple]:
    with WSession() as session:
        return rows_of(session.execute(stmt.options(FromCache(region))).all())


def uncached(engine, stmt) -> list[tuple]:
    with Session(engine) as session:
        return rows_of(session.execute(stmt).all())


def warm(WSession, wengine, region, stmt) -> None:
    """Store ``stmt``'s result and prove a hit sends no SQL."""
    cached(WSession, region, stmt)
    cached(WSession, region, stmt)
    sql = SQLCounter(wengine)
    assert cached(WSession, region, stmt) == uncached(wengine, stmt)
    sql.stop()
    assert sql.count == 1  # the uncached run's only


def _orm_delete(WSession, engine):
    with WSession() as session:
        session.delete(session.get(Parent, 1))
        session.commit()


def _key_change(WSession, engine):
    with WSession() as session:
        session.execute(sql_update(Parent).where(Parent.id == 2).values(id=20))
        session.commit()


def _rename(WSession, engine):
    with WSession() as session:
        session.get(Parent, 3).name = "renamed"
        session.commit()


def _bulk_save_objects(WSession, engine):
    with WSession() as session:
        session.bulk_save_objects([Child(id=50, parent_id=1, name="bulk")])
        session.commit()


def _bulk_insert_mappings(WSession, engine):
    with WSession() as session:
        session.bulk_insert_mappings(Child, [{"id": 51, "parent_id": 2, "name": "mapped"}])
        session.commit()


def _bulk_update_mappings(WSession, engine):
    with WSession() as session:
        session.bulk_update_mappings(Child, [{"id": 1, "name": "updated in bulk"}])
        session.commit()


def _connection_execute(WSession, engine):
    with WSession() as session:
        session.connection().execute(sql_update(Child).where(Child.id == 2).values(name="by connection"))
        session.commit()


def _text(WSession, engine):
    with WSession() as session:
        session.execute(text("DELETE FROM w_child WHERE id = :id"), {"id": 3})
        session.commit()


def _driver_sql(WSession, engine):
    with WSession() as session:
        session.connection().exec_driver_sql("UPDATE \"W_CHILD\" SET name = 'driver' WHERE id = 4")
        session.commit()


def _plain_session(WSession, engine):
    with sessionmaker(engine)() as session:  # carries no cache
        session.get(Child, 5).name = "plain session"
        session.commit()


def _engine_begin(WSession, engine):
    with engine.begin() as conn:
        conn.execute(sql_update(Child).where(Child.id == 6).values(name="engine.begin"))


def _autocommit(WSession, engine):
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sql_update(Child).where(Child.id == 7).values(name="autocommit"))


def _executemany(WSession, engine):
    with engine.connect() as conn:
        conn.execute(insert(Child), [{"id": 60 + i, "parent_id": 3, "name": f"many {i}"} for i in range(3)])
        conn.commit()


def _released_savepoint(WSession, engine):
    with WSession() as session:
        with session.begin_nested():
            session.get(Child, 8).name = "in a savepoint"
        session.commit()


def _text_after_a_quoted_apostrophe(WSession, engine):
    # The apostrophe is part of a name, not a string: the UPDATE after it is SQL.
    sql = "WITH \"ids'\" AS (SELECT 4 AS id) UPDATE w_child SET name = 'quoted' WHERE id IN (SELECT id FROM \"ids'\")"
    with WSession() as session:
        session.execute(text(sql))
        session.commit()


def _driver_sql_after_quoted_dashes(WSession, engine):
    with engine.begin() as conn:
        conn.exec_driver_sql(
            'WITH x AS (SELECT name AS "a--b" FROM w_child) UPDATE "w_child" SET name = \'dashes\' WHERE id = 5'
        )


def _bracketed_and_backquoted_names(WSession, engine):
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE [w_child] SET name = 'bracketed' WHERE id = 6 AND name <> '[x'")
        conn.exec_driver_sql("UPDATE `w_child` SET name = 'it''s' WHERE id = 7 AND name <> '`'")


#: (query, write): each write changes what its query returns.
CASES = {
    "ON DELETE CASCADE": ("children", _orm_delete),
    "ON UPDATE CASCADE": ("children", _key_change),
    "ON DELETE SET NULL": ("orphans", _orm_delete),
    "trigger (declared)": ("audit", _rename),
    "view (declared)": ("summary", _text),
    "view of a parent (declared)": ("summary", _rename),
    "bulk_save_objects": ("children", _bulk_save_objects),
    "bulk_insert_mappings": ("child objects", _bulk_insert_mappings),
    "bulk_update_mappings": ("children", _bulk_update_mappings),
    "connection().execute()": ("child objects", _connection_execute),
    "text()": ("children", _text),
    "exec_driver_sql(), quoted upper case": ("children", _driver_sql),
    "a Session without a cache": ("child objects", _plain_session),
    "engine.begin()": ("children", _engine_begin),
    "autocommit": ("children", _autocommit),
    "executemany": ("children", _executemany),
    "released savepoint": ("children", _released_savepoint),
    "text(), after an apostrophe in a quoted name": ("children", _text_after_a_quoted_apostrophe),
    "exec_driver_sql(), after -- in a quoted name": ("children", _driver_sql_after_quoted_dashes),
    "[bracketed] and `backquoted` names": ("children", _bracketed_and_backquoted_names),
}


@pytest.mark.parametrize("case", CASES)
def test_a_committed_write_is_never_served_stale(WSession, wengine, region, case):
    query, write = CASES[case]
    stmt = QUERIES[query]
    warm(WSession, wengine, region, stmt)
    before = uncached(wengine, stmt)
    write(WSession, wengine)
    after = uncached(wengine, stmt)
    assert after != before, "the case must change what the query returns"
    assert cached(WSession, region, stmt) == after


#: SQL text, and the version names of what it writes.
WRITTEN = {
    'UPDATE "My Table" SET x = 1': {"my table"},
    'DELETE FROM public."We""ird" WHERE a = 1': {'we"ird'},
    "INSERT INTO `my``t` VALUES (1)": {"my`t"},
    "UPDATE [odd name] SET x = 1": {"odd name"},
    'WITH "ids\'" AS (SELECT 1 AS id) DELETE FROM person WHERE id IN (SELECT id FROM "ids\'")': {"person"},
    "WITH \"a--b\" AS (SELECT 1) UPDATE person SET name = 'x'": {"person"},
    'SELECT 1 AS "update", \'delete\' AS "a;b"': set(),
    "SELECT [x/*] FROM t; UPDATE person SET name = '*/'": {"person"},
    # Brackets quote a name (SQLite) or subscript a value (PostgreSQL): either way, the write is seen.
    "WITH a AS (SELECT [owner's name] FROM t) UPDATE person SET name = 'x'": {"person"},
    "WITH a AS (SELECT data['k]'] FROM t) UPDATE person SET name = 'x' WHERE name <> ''": {"person"},
    # Schema changes: every entry whose reads are unknown, and the tables they name.
    "CREATE POLICY hide ON person USING (id <> 2)": {ANY_TABLE, "person"},
    "DROP POLICY hide ON person": {ANY_TABLE, "person"},
    "CREATE TEMP TABLE IF NOT EXISTS scratch (id int)": {ANY_TABLE, "scratch"},
    "CREATE INDEX person_name ON person (name)": {ANY_TABLE, "person"},
    "ALTER TABLE person ENABLE ROW LEVEL SECURITY; CREATE POLICY p ON person USING (true)": {ANY_TABLE, "person"},
    "SELECT 1; CREATE VIEW v AS SELECT * FROM person": {ANY_TABLE, "v"},
    "COMMENT ON TABLE person IS 'people'": {ANY_TABLE},
    # ...or every table, when what they change cannot be told from their text.
    "CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'": {ALL_TABLES},
    "CREATE TYPE mood AS ENUM ('sad', 'ok')": {ALL_TABLES},
    "GRANT SELECT ON person TO reader": {ALL_TABLES},
    "REVOKE SELECT ON person FROM reader": {ALL_TABLES},
    "ALTER ROLE reader SET search_path = other": {ALL_TABLES},
    "DROP TABLE person CASCADE": {ALL_TABLES},
    # PostgreSQL nests comments; a word ending in e is no E'' string; a $ in a name opens no dollar quote.
    "WITH x AS (SELECT 1 /* a /* b */ ' */ AS k) UPDATE person SET name = 'x'": {"person"},
    "WITH x AS (SELECT name'C:\\' AS p) UPDATE person SET name = 'x'": {"person"},
    "WITH x AS (SELECT 1 WHERE 'a_' LIKE 'a\\_' ESCAPE'\\') UPDATE person SET name = 'x'": {"person"},
    "WITH x AS (SELECT 1 AS a$b$) UPDATE person SET name = 'x' WHERE 1 = 1 OR 2 = $1": {"person"},
    # $body$ quotes in PostgreSQL, and is a parameter in SQLite: the text is read both ways.
    "SELECT $body$ UPDATE person SET name = 'x' $body$ AS quoted": {"person"},
    # A unicode-escaped name (PostgreSQL), ended by a lone CR: comments too.
    'DELETE FROM U&"per\\0073on" WHERE id = 3': {"person"},
    "WITH x AS (SELECT 1 AS k) -- c\r, u AS (UPDATE person SET name = 'x' RETURNING id) SELECT id FROM u": {"person"},
    # A backslash escapes a quote where standard_conforming_strings is off (and in MySQL).
    "WITH s AS (SELECT 'a\\'b' AS k) UPDATE person SET name = 'x'": {"person"},
    # PostgreSQL's "and descendant tables" star, in a list.
    "TRUNCATE address *, person": {"address", "person"},
    "TRUNCATE TABLE address * , person RESTART IDENTITY": {"address", "person"},
    # SELECT ... INTO creates a table (PostgreSQL).
    "SELECT * INTO TEMP copied FROM person": {ALL_TABLES},
}


@pytest.mark.parametrize("sql", WRITTEN)
def test_what_sql_text_writes(sql):
    assert sql_tables(sql) == frozenset(WRITTEN[sql])


def _rolled_back(how):
    def write(WSession, engine, stmt, region):
        with WSession() as session:
            how(session)
            # Read inside the writing transaction: it sees its own write, stores nothing shared.
            inside = rows_of(session.execute(stmt.options(FromCache(region))).all())
            session.rollback()
        return inside

    return write


ROLLED_BACK = {
    "bulk_insert_mappings": lambda session: session.bulk_insert_mappings(
        Child, [{"id": 70, "parent_id": 1, "name": "x"}]
    ),
    "bulk_save_objects": lambda session: session.bulk_save_objects([Child(id=71, parent_id=1, name="x")]),
    "connection().execute()": lambda session: session.connection().execute(sql_delete(Child)),
    "text()": lambda session: session.execute(text("UPDATE w_child SET name = 'uncommitted'")),
    "ORM flush": lambda session: session.add(Child(id=72, parent_id=2, name="x")),
    "cascade": lambda session: session.execute(sql_delete(Parent).where(Parent.id == 1)),
}


@pytest.mark.parametrize("case", ROLLED_BACK)
def test_a_rolled_back_write_never_reaches_another_session(WSession, wengine, region, case):
    stmt = QUERIES["children"]
    warm(WSession, wengine, region, stmt)
    committed = uncached(wengine, stmt)
    inside = _rolled_back(ROLLED_BACK[case])(WSession, wengine, stmt, region)
    assert inside != committed, "the writing transaction sees its own write"
    assert uncached(wengine, stmt) == committed
    for _ in range(2):
        assert cached(WSession, region, stmt) == committed


def test_a_rolled_back_savepoint_invalidates_nothing(WSession, wengine, region):
    stmt = QUERIES["children"]
    warm(WSession, wengine, region, stmt)
    with WSession() as session:
        savepoint = session.begin_nested()
        session.get(Child, 1).name = "rolled back"
        session.flush()
        savepoint.rollback()
        session.get(Parent, 1)  # the outer transaction goes on, and commits
        session.commit()
    sql = SQLCounter(wengine)
    assert cached(WSession, region, stmt) == uncached(wengine, stmt)
    assert sql.count == 1  # the uncached run's: the entry is still valid


@pytest.mark.parametrize("how", ["deleted", "evicted"])
def test_a_missing_version_never_revives_an_entry(wengine, region_options, redis_url, how):
    import redis

    region_options["redis"] = {"type": "ext:redis", "url": redis_url}
    cache = SessionCache(region_options, default_region="redis", secret=SECRET)
    WSession = sessionmaker(bind=wengine, info=cache.session_info())
    stmt = QUERIES["children"]
    warm(WSession, wengine, "redis", stmt)  # stored with the versions it read
    _connection_execute(WSession, wengine)  # bumps w_child
    client = redis.Redis.from_url(redis_url)
    versions = [key for key in client.scan_iter("*versions*") if key.endswith(b"w_child")]
    assert versions
    if how == "deleted":
        client.delete(*versions)
    else:  # as maxmemory-policy allkeys-lru would: every version key goes
        client.delete(*client.scan_iter("*versions*"))
    assert cached(WSession, "redis", stmt) == uncached(wengine, stmt)
    # Stored again, with versions that exist: a hit once more.
    cached(WSession, "redis", stmt)
    sql = SQLCounter(wengine)
    assert cached(WSession, "redis", stmt) == uncached(wengine, stmt)
    assert sql.count == 1


def test_a_cascade_into_a_core_table_only_read(WSession, wengine, region):
    # A reporting module's Table, in a MetaData of its own that no class maps
    # and this process never writes: its foreign key says the database
    # deletes its rows with their parent's.
    with wengine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE w_note (id INTEGER PRIMARY KEY, "
            "parent_id INTEGER REFERENCES w_parent (id) ON DELETE CASCADE, body VARCHAR(50))"
        )
        conn.exec_driver_sql("INSERT INTO w_note VALUES (1, 1, 'one'), (2, 2, 'two')")
    notes = Table(
        "w_note",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("parent_id", ForeignKey(Parent.id, ondelete="CASCADE")),
        Column("body", String(50)),
    )
    stmt = select(notes.c.id, notes.c.parent_id, notes.c.body).order_by(notes.c.id)
    warm(WSession, wengine, region, stmt)
    before = uncached(wengine, stmt)
    with WSession() as session:
        session.execute(sql_delete(Parent).where(Parent.id == 1))
        session.commit()
    after = uncached(wengine, stmt)
    assert after == [(2, 2, "two")] != before
    assert cached(WSession, region, stmt) == after
    sql = SQLCounter(wengine)
    assert cached(WSession, region, stmt) == after
    assert sql.count == 0  # stored again: a hit
