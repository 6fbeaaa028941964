"""Attack s34 review: today's fixes (unseen writes, comment-insensitive keys, pending local objects, SQLite catalog).

Every test asserts the correct outcome: what the cache serves equals the
same query run uncached at that moment, a statement run for its effect
reaches the database, and an ordinary read is still a hit (counted in SQL,
never timed).  A failing test is a defect.
"""

from __future__ import annotations

import contextlib

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, event, func, select, text, update
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from pyramid_sessioncache import FromCache, SessionCache

from .conftest import SECRET, SQLCounter
from .models import Person, Tag
from .test_attack_s34_paths import cached, uncached

_META = MetaData()
PERSON = Table("person", _META, Column("id", Integer), Column("name", String))
SQLITE_MASTER = Table("sqlite_master", _META, Column("type", String), Column("name", String))


@pytest.fixture
def regions(region_options) -> SessionCache:
    cache = SessionCache(region_options, default_region="memory", secret=SECRET)
    yield cache
    cache.close()


PEOPLE_2_3 = select(PERSON.c.id, PERSON.c.name).where(PERSON.c.id.in_([2, 3])).order_by(PERSON.c.id)
CHANGES_ALIAS = PERSON.alias("changes")
SEEDED_2_3 = [(2, "person 2"), (3, "person 3")]


def _raw_update(session) -> None:
    session.connection().connection.cursor().execute("UPDATE person SET name = 'never committed' WHERE id = 2")


def _served_after_rollback(Sessions, url, before_read, statement=PEOPLE_2_3, region="memory"):
    """Run ``before_read(session)``, read ``statement`` through ``region``, roll back; then what a fresh Session is served."""
    with Sessions() as session:
        before_read(session)
        cached(session, statement, region)
        session.rollback()
    with Sessions() as fresh:
        served = cached(fresh, statement, region)
    return served, uncached(url, statement)


# 1. Unseen writes --------------------------------------------------------------------------------


def test_sqlite_raw_write_then_a_seen_write_to_another_table(db_url, regions):
    """A raw write, then an ORM write to another table: the seen write turns off the check, the raw rows are stored."""
    engine = create_engine(db_url)
    Sessions = sessionmaker(engine, info=regions.session_info())

    def before(session):
        _raw_update(session)
        session.execute(update(Tag).where(Tag.id == 1).values(name="tag one"))

    try:
        served, truth = _served_after_rollback(Sessions, db_url, before)
        assert served == truth == SEEDED_2_3
    finally:
        engine.dispose()


def test_sqlite_static_pool_raw_write(db_url, regions):
    """StaticPool: one DBAPI connection shared; a raw write in the Session's transaction must not be stored."""
    engine = create_engine(db_url, poolclass=StaticPool)
    Sessions = sessionmaker(engine, info=regions.session_info())
    try:
        with engine.connect() as warm:  # a transaction before, so the connection has counted writes already
            warm.execute(update(PERSON).where(PERSON.c.id == 5).values(name="five"))
            warm.commit()
        served, truth = _served_after_rollback(Sessions, db_url, _raw_update)
        assert served == truth == SEEDED_2_3
    finally:
        engine.dispose()


def _explicit_begin(engine):
    @event.listens_for(engine, "connect")
    def connect(dbapi_connection, record):
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def begin(conn):
        conn.exec_driver_sql("BEGIN")


def test_sqlite_explicit_begin_recipe_raw_write(db_url, regions):
    """SQLAlchemy's SQLite recipe (isolation_level=None, BEGIN at the 'begin' event): raw rows must not be stored."""
    engine = create_engine(db_url)
    _explicit_begin(engine)
    Sessions = sessionmaker(engine, info=regions.session_info())
    try:
        served, truth = _served_after_rollback(Sessions, db_url, _raw_update)
        assert served == truth == SEEDED_2_3
    finally:
        engine.dispose()


def test_sqlite_explicit_begin_raw_ddl_then_catalog_read(db_url, regions):
    """A raw CREATE TABLE in the transaction changes no rows (total_changes stays): the catalog read must not be stored."""
    engine = create_engine(db_url)
    _explicit_begin(engine)
    Sessions = sessionmaker(engine, info=regions.session_info())
    statement = select(SQLITE_MASTER.c.name).where(SQLITE_MASTER.c.type == "table").order_by(SQLITE_MASTER.c.name)

    def before(session):
        session.connection().connection.cursor().execute("CREATE TABLE ghost (x INTEGER)")

    try:
        served, truth = _served_after_rollback(Sessions, db_url, before, statement)
        assert "ghost" not in {name for (name,) in truth}
        assert served == truth
    finally:
        engine.dispose()


def test_sqlite_explicit_begin_raw_create_view_then_read_it(db_url, regions):
    """A raw CREATE VIEW (no row changed) then a read of it, rolled back: a fresh read fails as it does uncached."""
    from sqlalchemy.exc import OperationalError

    engine = create_engine(db_url)
    _explicit_begin(engine)
    Sessions = sessionmaker(engine, info=regions.session_info())
    statement = text("SELECT id, name FROM ghost_people WHERE id < 3 ORDER BY id")
    try:
        with Sessions() as session:
            session.connection().connection.cursor().execute("CREATE VIEW ghost_people AS SELECT id, name FROM person")
            cached(session, statement)
            session.rollback()
        with Sessions() as fresh, pytest.raises(OperationalError):
            cached(fresh, statement)
    finally:
        engine.dispose()


def test_sqlite_session_bound_to_connection_recipe(db_url, regions):
    """The external-transaction test recipe: a raw write in the Session, rolled back with the outer transaction."""
    engine = create_engine(db_url)
    try:
        conn = engine.connect()
        outer = conn.begin()
        with Session(bind=conn, join_transaction_mode="create_savepoint", info=regions.session_info()) as session:
            _raw_update(session)
            cached(session, PEOPLE_2_3)
        outer.rollback()
        conn.close()
        Sessions = sessionmaker(engine, info=regions.session_info())
        with Sessions() as fresh:
            served = cached(fresh, PEOPLE_2_3)
        assert served == uncached(db_url, PEOPLE_2_3) == SEEDED_2_3
    finally:
        engine.dispose()


def test_sqlite_raw_write_through_instead_of_trigger(db_url, regions):
    """A raw INSERT into a view runs its INSTEAD OF trigger, which writes person: must not be stored."""
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE VIEW person_v AS SELECT id, name FROM person")
        conn.exec_driver_sql(
            "CREATE TRIGGER person_v_ins INSTEAD OF INSERT ON person_v BEGIN "
            "UPDATE person SET name = NEW.name WHERE id = NEW.id; END"
        )
    engine.dispose()
    engine = create_engine(db_url)
    Sessions = sessionmaker(engine, info=regions.session_info())

    def before(session):
        session.connection().connection.cursor().execute(
            "INSERT INTO person_v (id, name) VALUES (2, 'never committed')"
        )

    try:
        served, truth = _served_after_rollback(Sessions, db_url, before)
        assert served == truth == SEEDED_2_3
    finally:
        engine.dispose()


def test_sqlite_local_region_raw_write_then_seen_write_rolled_back(db_url, regions):
    """ext:local_session: the raw rows read after a seen write must not outlive the rollback in the Session."""
    engine = create_engine(db_url)
    Sessions = sessionmaker(engine, info=regions.session_info())
    try:
        with Sessions() as session:
            _raw_update(session)
            session.execute(update(Tag).where(Tag.id == 1).values(name="tag one"))
            cached(session, PEOPLE_2_3, "local")
            session.rollback()
            served = cached(session, PEOPLE_2_3, "local")
        assert served == uncached(db_url, PEOPLE_2_3) == SEEDED_2_3
    finally:
        engine.dispose()


# 2. Keys -----------------------------------------------------------------------------------------

AUDIT = Table("audit", _META, Column("id", Integer, primary_key=True), Column("changes", Integer))


@pytest.fixture
def audit_url(db_url):
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE audit (id INTEGER PRIMARY KEY, changes INTEGER)")
        conn.exec_driver_sql("INSERT INTO audit VALUES (1, 3), (2, 5)")
        conn.exec_driver_sql('CREATE TABLE settings (id INTEGER PRIMARY KEY, "pragma" TEXT, pragma_level INTEGER)')
        conn.exec_driver_sql("INSERT INTO settings VALUES (1, 'x', 2)")
        conn.exec_driver_sql("CREATE VIEW person_names AS SELECT id, name FROM person")
        conn.exec_driver_sql('CREATE VIEW setting_names AS SELECT id, "pragma" AS setting FROM settings')
        conn.exec_driver_sql("CREATE TABLE changes (id INTEGER PRIMARY KEY, what TEXT)")
        conn.exec_driver_sql("INSERT INTO changes VALUES (1, 'first')")
    engine.dispose()
    return db_url


def _second_read_is_a_hit(url, regions, statement, region="memory") -> int:
    engine = create_engine(url)
    Sessions = sessionmaker(engine, info=regions.session_info())
    try:
        with Sessions() as session:
            first = cached(session, statement, region)
        sql = SQLCounter(engine)
        with Sessions() as session:
            second = cached(session, statement, region)
        assert first == second == uncached(url, statement)
        return len([s for s in sql.statements if not s.upper().startswith(("BEGIN", "COMMIT", "ROLLBACK"))])
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "statement",
    [
        select(AUDIT.c.id, AUDIT.c.changes).order_by(AUDIT.c.id),
        select(func.count(AUDIT.c.id).label("changes")),
        select(PERSON.c.id).where(PERSON.c.id < 3).cte("changes").select(),
        select(PERSON.c.name.label("lo_get")).where(PERSON.c.id == 1),
        select(Table("changes", MetaData(), Column("id", Integer), Column("what", String))),
        select(CHANGES_ALIAS.c.id).where(CHANGES_ALIAS.c.id < 3),
        select(PERSON.c.id).where(PERSON.c.id < 3).subquery("changes").select(),
    ],
    ids=[
        "column named changes",
        "label changes",
        "cte named changes",
        "label lo_get",
        "table named changes",
        "alias named changes",
        "subquery named changes",
    ],
)
def test_an_ordinary_read_naming_changes_is_still_cached(audit_url, regions, statement):
    """``changes`` joined EFFECT_FUNCTIONS: a column, label or CTE of that name is no call, and must still hit."""
    assert _second_read_is_a_hit(audit_url, regions, statement) == 0


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT id, name FROM person WHERE name <> 'a -- b' ORDER BY id",
        "SELECT id, name FROM person /* the people */ WHERE id < 4 ORDER BY id",
        "SELECT id, name FROM person WHERE name <> '/* x' ORDER BY id -- by id",
        "SELECT id AS show, name FROM person WHERE id < 3 ORDER BY id",
    ],
)
def test_text_with_comments_or_dashes_in_strings_is_still_cached(audit_url, regions, sql):
    assert _second_read_is_a_hit(audit_url, regions, text(sql).columns(id=Integer, name=String)) == 0


@pytest.mark.parametrize(
    "statement",
    [
        text('SELECT "pragma", pragma_level FROM settings'),
        text("SELECT id, name FROM person_names WHERE id < 3 ORDER BY id"),
        text("SELECT id, setting FROM setting_names"),
    ],
    ids=["column named pragma", "ordinary view", "view over a column named pragma"],
)
def test_sqlite_ordinary_reads_still_cached(audit_url, regions, statement):
    """A column named ``pragma`` or ``pragma_level`` is no pragma read; an ordinary view is no effect view."""
    assert _second_read_is_a_hit(audit_url, regions, statement) == 0


# 1b. Unseen writes on PostgreSQL -----------------------------------------------------------------


@pytest.fixture
def pg_sessions(pg_url, regions):
    engine = create_engine(pg_url)
    yield engine, sessionmaker(engine, info=regions.session_info())
    engine.dispose()


@pytest.mark.parametrize(
    "after",
    [
        "SELECT pg_advisory_xact_lock(7)",
        "UPDATE tag SET name = 'tag one' WHERE id = 1",
        "SELECT nextval('person_id_seq')",
        "SELECT set_config('app.user', 'x', true)",
        "SET LOCAL statement_timeout = 100000",
        "LOCK TABLE tag IN SHARE MODE",
        "NOTIFY chan",
        "SELECT id FROM tag WHERE id = 1 FOR UPDATE",
    ],
    ids=[
        "advisory lock",
        "seen write elsewhere",
        "nextval",
        "set_config",
        "set local",
        "lock table",
        "notify",
        "for update",
    ],
)
def test_pg_raw_write_then_a_seen_statement(pg_url, pg_sessions, after):
    """A raw write, then a seen statement that writes or runs for its effect: the raw rows must not be stored."""
    engine, Sessions = pg_sessions

    def before(session):
        _raw_update(session)
        session.execute(text(after)).all() if after.startswith("SELECT") else session.execute(text(after))

    served, truth = _served_after_rollback(Sessions, pg_url, before)
    assert served == truth == SEEDED_2_3


def test_pg_raw_ddl_then_catalog_read(pg_url, pg_sessions):
    """A raw CREATE TABLE in the transaction: a catalog read must not store it."""
    engine, Sessions = pg_sessions
    tables = Table("pg_tables", MetaData(), Column("tablename", String), Column("schemaname", String))
    statement = select(tables.c.tablename).where(tables.c.schemaname == "public").order_by(tables.c.tablename)

    def before(session):
        session.connection().connection.cursor().execute("CREATE TABLE ghost (x int)")

    served, truth = _served_after_rollback(Sessions, pg_url, before, statement)
    assert "ghost" not in {name for (name,) in truth}
    assert served == truth


@pytest.mark.xfail(
    strict=True,
    reason="a row lock gives a PostgreSQL transaction its id, as a write does: after one, the unseen-write check "
    "(writes.wrote_unseen) cannot tell a write on the driver's connection from it, and the transaction's misses are "
    "not stored; this costs queries, never stale rows",
)
def test_pg_locking_read_does_not_stop_storing(pg_url, pg_sessions):
    """SELECT ... FOR UPDATE assigns a transaction id but writes no row: later misses must still be stored."""
    engine, Sessions = pg_sessions
    statement = select(Tag.id, Tag.name).order_by(Tag.id)
    with Sessions() as session:
        session.execute(select(Person).where(Person.id == 1).with_for_update()).all()
        cached(session, statement)
        session.commit()
    sql = SQLCounter(engine)
    with Sessions() as session:
        assert cached(session, statement) == uncached(pg_url, statement)
    assert [s for s in sql.statements if "tag" in s.lower()] == []


def test_pg_unseen_write_check_is_invisible_and_harmless(pg_url, pg_sessions):
    """The check's query appears in no SQL count of the application, and leaves its transaction usable."""
    engine, Sessions = pg_sessions
    seen = []
    event.listen(engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    with Sessions() as session:
        cached(session, PEOPLE_2_3)
        session.execute(text("SELECT 1")).all()
        session.commit()
    assert not [s for s in seen if "xact_id" in s or "txid" in s]


def test_pg_aborted_transaction_raises_as_uncached(pg_url, pg_sessions):
    """In an aborted transaction a cached read fails as the uncached one does (no other error)."""
    from sqlalchemy.exc import DBAPIError

    engine, Sessions = pg_sessions
    errors = []
    for use_cache in (False, True):
        with Sessions() as session:
            cursor = session.connection().connection.cursor()
            with contextlib.suppress(Exception):
                cursor.execute("SELECT 1/0")
            try:
                cached(session, PEOPLE_2_3) if use_cache else session.execute(PEOPLE_2_3).all()
            except DBAPIError as error:
                errors.append(type(error.orig).__name__)
    assert errors == ["InFailedSqlTransaction", "InFailedSqlTransaction"]


# 3. Local entries and pending objects ------------------------------------------------------------


def test_local_make_transient_then_read_again(Session):
    from sqlalchemy.orm import make_transient

    statement = select(Person).where(Person.id == 1)
    with Session() as session:
        (first,) = session.execute(statement.options(FromCache("local"))).scalars().all()
        make_transient(first)
        (again,) = session.execute(statement.options(FromCache("local"))).scalars().all()
        assert again is not first
        from sqlalchemy import inspect

        assert inspect(again).persistent


def test_local_add_cascades_a_detached_object_of_a_kept_identity(Session):
    """add() of a new Address whose person is a detached Person 1, while a local entry keeps the Session's Person 1."""
    from sqlalchemy.orm import make_transient_to_detached

    from .models import Address

    statement = select(Person).where(Person.id == 1)
    with Session() as session:
        session.execute(
            statement.options(FromCache("local"))
        ).scalars().all()  # the entry holds Person 1; the app lets go of it
        other = Person(id=1, name="person 1")
        make_transient_to_detached(other)
        session.add(
            Address(id=999, street="cascade st", postal_code_id=1, person=other)
        )  # uncached, the ORM accepts it
        session.flush()
        assert session.get(Person, 1) is other


def test_local_expunge_then_add_back(Session):
    statement = select(Person).where(Person.id == 1)
    with Session() as session:
        (first,) = session.execute(statement.options(FromCache("local"))).scalars().all()
        session.expunge(first)
        session.add(first)
        (again,) = session.execute(statement.options(FromCache("local"))).scalars().all()
        assert again is first


def test_local_deleted_and_flushed_is_not_served(Session):
    statement = select(Person.id).where(Person.id <= 2).order_by(Person.id)
    with Session() as session:
        session.execute(select(Person).where(Person.id <= 2).options(FromCache("local"))).scalars().all()
        session.execute(statement.options(FromCache("local"))).scalars().all()
        person = session.get(Person, 2)
        for address in person.addresses:
            session.delete(address)
        person.tags = []
        session.delete(person)
        session.flush()
        assert [tuple(r) for r in session.execute(statement.options(FromCache("local"))).all()] == [(1,)]
        assert (
            len(session.execute(select(Person).where(Person.id <= 2).options(FromCache("local"))).scalars().all()) == 1
        )


# 4. SQLite catalog -------------------------------------------------------------------------------


def _committed(url, *sql, attach=None):
    engine = create_engine(url)
    if attach:
        event.listen(engine, "connect", lambda c, r: c.execute(f"ATTACH DATABASE '{attach}' AS aux"))
    try:
        with engine.begin() as conn:
            for each in sql:
                conn.exec_driver_sql(each)
    finally:
        engine.dispose()


def _read_change_read(url, regions, statement, *sql, attach=None, region="memory"):
    engine = create_engine(url)
    if attach:
        event.listen(engine, "connect", lambda c, r: c.execute(f"ATTACH DATABASE '{attach}' AS aux"))
    Sessions = sessionmaker(engine, info=regions.session_info())
    try:
        with Sessions() as session:
            cached(session, statement, region)
        _committed(url, *sql, attach=attach)
        with Sessions() as session:
            served = cached(session, statement, region)
        with Session(engine) as session:
            truth = [tuple(r) for r in session.execute(statement).all()]
        return served, truth
    finally:
        engine.dispose()


def test_sqlite_attached_sqlite_master(db_url, regions, tmp_path):
    aux = str(tmp_path / "aux.sqlite")
    master = Table("sqlite_master", MetaData(), Column("name", String), Column("type", String), schema="aux")
    statement = select(master.c.name).where(master.c.type == "table").order_by(master.c.name)
    served, truth = _read_change_read(db_url, regions, statement, "CREATE TABLE aux.late (x)", attach=aux)
    assert truth == [("late",)]
    assert served == truth


def test_sqlite_attached_sqlite_sequence(db_url, regions, tmp_path):
    aux = str(tmp_path / "aux.sqlite")
    _committed(
        db_url,
        "CREATE TABLE aux.ticket (id INTEGER PRIMARY KEY AUTOINCREMENT, n TEXT)",
        "INSERT INTO aux.ticket (n) VALUES ('a')",
        attach=aux,
    )
    seq = Table("sqlite_sequence", MetaData(), Column("name", String), Column("seq", Integer), schema="aux")
    statement = select(seq.c.name, seq.c.seq)
    served, truth = _read_change_read(db_url, regions, statement, "INSERT INTO aux.ticket (n) VALUES ('b')", attach=aux)
    assert truth == [("ticket", 2)]
    assert served == truth


@pytest.mark.parametrize(
    "setup, statement, change",
    [
        (
            ["CREATE VIEW last_id AS SELECT last_insert_rowid() AS n"],
            "SELECT n FROM last_id",
            None,
        ),
        (
            ["CREATE VIEW uv AS SELECT user_version AS v FROM pragma_user_version"],
            "SELECT v FROM uv",
            "PRAGMA user_version = 9",
        ),
        (
            [],
            "SELECT user_version FROM main.pragma_user_version",
            "PRAGMA main.user_version = 9",
        ),
        (
            [],
            "SELECT name FROM pragma_table_info('person', 'main') ORDER BY cid",
            "ALTER TABLE person ADD COLUMN late TEXT",
        ),
        (
            [
                "CREATE VIRTUAL TABLE doc USING fts5(body)",
                "INSERT INTO doc VALUES ('alpha')",
                "CREATE VIEW doc_v AS SELECT rowid AS id, body FROM doc",
            ],
            "SELECT id, body FROM doc_v ORDER BY id",
            "INSERT INTO doc VALUES ('beta')",
        ),
        (
            ["CREATE TABLE wr (k TEXT PRIMARY KEY, v TEXT) WITHOUT ROWID", "INSERT INTO wr VALUES ('a', 'x')"],
            "SELECT k, v FROM wr",
            "VACUUM",
        ),
    ],
    ids=[
        "view last_insert_rowid",
        "view over pragma",
        "pragma with schema",
        "pragma_table_info schema",
        "view over fts5",
        "without rowid vacuum",
    ],
)
def test_sqlite_catalog_reads(db_url, regions, setup, statement, change):
    if setup:
        _committed(db_url, *setup)
    statement = text(statement)
    if change is None:
        engine = create_engine(db_url)
        Sessions = sessionmaker(engine, info=regions.session_info())
        try:
            with Sessions() as session:
                session.execute(text("INSERT INTO tag (id, name) VALUES (50, 'x')"))
                first = cached(session, statement)
                session.execute(text("INSERT INTO tag (id, name) VALUES (60, 'y')"))
                second = cached(session, statement)
                assert (first, second) == ([(50,)], [(60,)])
        finally:
            engine.dispose()
        return
    if change == "VACUUM":
        engine = create_engine(db_url, isolation_level="AUTOCOMMIT")
        Sessions = sessionmaker(engine, info=regions.session_info())
        try:
            with Sessions() as s:
                first = cached(s, statement)
            with engine.connect() as c:
                c.exec_driver_sql("VACUUM")
            with Sessions() as s:
                assert cached(s, statement) == first == [("a", "x")]
        finally:
            engine.dispose()
        return
    served, truth = _read_change_read(db_url, regions, statement, change)
    assert served == truth


def test_sqlite_temp_view_over_changing_table(db_url, regions):
    """A temp view (the connection's own) over person: a committed write to person invalidates its reads."""
    engine = create_engine(db_url, poolclass=StaticPool)
    Sessions = sessionmaker(engine, info=regions.session_info())
    statement = text("SELECT id, name FROM pv WHERE id = 2")
    try:
        with engine.begin() as c:
            c.exec_driver_sql("CREATE TEMP VIEW pv AS SELECT id, name FROM person")
        with Sessions() as s:
            cached(s, statement)
        with engine.begin() as c:
            c.exec_driver_sql("UPDATE person SET name = 'changed' WHERE id = 2")
        with Sessions() as s:
            assert cached(s, statement) == [(2, "changed")]
    finally:
        engine.dispose()


# 2b. Locking reads and effects spelt with comments, on PostgreSQL --------------------------------


def _runs_every_time(engine, Sessions, sql, region="memory", setup=()) -> list[int]:
    """How many statements other than transaction control each of two reads of ``sql`` sent."""
    counts = []
    for _ in range(2):
        with Sessions() as session:
            for each in setup:
                session.execute(text(each))
            counter = SQLCounter(engine)
            cached(session, text(sql), region)
            counts.append(
                len([s for s in counter.statements if s.strip().upper() not in ("BEGIN", "COMMIT", "ROLLBACK")])
            )
            session.commit()
    return counts


@pytest.mark.parametrize(
    "sql",
    [
        pytest.param(
            "SELECT id FROM person WHERE id = 1 FOR /* outer /* nested */ still */ UPDATE",
            marks=pytest.mark.xfail(
                strict=True,
                reason="SQL text is read both ways where a comment may nest (PostgreSQL nests them, SQLite does not) and cached_query() refuses what either reading may write, with NotCacheableError: text whose comment nests and holds a write keyword is refused, never served",
            ),
        ),
        "SELECT id FROM person WHERE id = 1 FOR--the row\nUPDATE",
        "SELECT id FROM person WHERE id = 1 FOR/**/NO/**/KEY/**/UPDATE SKIP LOCKED",
        "SELECT id FROM person WHERE id = 1 FOR /* x */ KEY SHARE",
        "SELECT id FROM person WHERE id = 1 FOR UPDATE OF person NOWAIT",
        "SELECT nextval /* a /* b */ c */ ('person_id_seq')",
        "SELECT pg_catalog . /* q */ nextval ('person_id_seq')",
    ],
)
def test_pg_locking_and_effects_with_comments_run_every_time(pg_sessions, sql):
    """Run uncached every time, as the same read without its comments is (not refused as a write)."""
    engine, Sessions = pg_sessions
    assert _runs_every_time(engine, Sessions, sql) == [1, 1]


def test_pg_execute_of_a_prepared_locking_statement_runs_every_time(pg_sessions):
    """``EXECUTE`` runs a statement PREPAREd on the connection (here a locking read): never served from the cache."""
    engine, Sessions = pg_sessions

    @event.listens_for(engine, "connect")
    def prepare(dbapi_connection, record):
        with dbapi_connection.cursor() as cursor:
            cursor.execute("PREPARE lockit AS SELECT id FROM person WHERE id = 1 FOR UPDATE")
        dbapi_connection.commit()

    from pyramid_sessioncache.errors import NotCacheableError

    try:
        counts = _runs_every_time(engine, Sessions, "EXECUTE lockit")
    except NotCacheableError:
        return  # refused as SQL that may write: never served either
    assert counts == [1, 1]


@pytest.mark.parametrize(
    "sql",
    ["/* c */ SHOW search_path", "-- c\nFETCH ALL FROM c", "show/**/search_path"],
)
def test_pg_connection_sql_with_leading_comments_runs_every_time(pg_sessions, sql):
    engine, Sessions = pg_sessions
    setup = ("DECLARE c CURSOR FOR SELECT id FROM person WHERE id < 3",) if "FETCH" in sql else ()
    assert _runs_every_time(engine, Sessions, sql, setup=setup) == [1, 1]


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT id, name FROM person WHERE name <> $$ -- x $$ AND id < 3 ORDER BY id",
        "SELECT id, name FROM person WHERE name <> E'\\' /* ' AND id < 3 ORDER BY id",
        "SELECT id, name FROM person WHERE data_path <> '$.a--b' OR id < 3 ORDER BY id".replace("data_path", "name"),
        "SELECT id AS fetch_id, name FROM person WHERE id < 3 ORDER BY id",
    ],
    ids=["dollar quoted comment", "E-string", "json path dashes", "alias fetch_id"],
)
def test_pg_ordinary_text_still_cached(pg_url, regions, sql):
    assert _second_read_is_a_hit(pg_url, regions, text(sql)) == 0


@pytest.mark.parametrize(
    "seen",
    [
        "PRAGMA user_version",
        "SELECT changes()",
        "SELECT last_insert_rowid()",
        "PRAGMA foreign_keys",
        "SELECT name FROM pragma_table_info('person')",
        "SELECT total_changes()",
        "PRAGMA optimize",
        "ANALYZE",
        "PRAGMA cache_size = 4000",
    ],
)
def test_sqlite_raw_write_then_a_seen_read_run_for_its_effect(db_url, regions, seen):
    """A raw write, then a seen read that counts as run for its effect: the raw rows must not be stored."""
    engine = create_engine(db_url)
    Sessions = sessionmaker(engine, info=regions.session_info())

    def before(session):
        _raw_update(session)
        result = session.execute(text(seen))
        if result.returns_rows:
            result.all()

    try:
        served, truth = _served_after_rollback(Sessions, db_url, before)
        assert served == truth == SEEDED_2_3
    finally:
        engine.dispose()


def test_sqlite_raw_write_on_an_eager_loads_other_bind(db_url, regions, tmp_path, seeded_sqlite):
    """Person on one file, Address on another: a raw write on Address's connection, read by a selectin load."""
    import shutil

    from sqlalchemy.orm import selectinload

    from .models import Address

    other = tmp_path / "other.sqlite"
    shutil.copyfile(seeded_sqlite, other)
    people, addresses = create_engine(db_url), create_engine(f"sqlite:///{other}")
    Sessions = sessionmaker(binds={Person: people, Address: addresses}, info=regions.session_info())
    statement = select(Person).where(Person.id == 2).options(selectinload(Person.addresses))

    def streets(session):
        (person,) = session.execute(statement.options(FromCache("memory"))).scalars().all()
        return sorted(a.street for a in person.addresses)

    try:
        with Sessions() as session:
            conn = session.connection(bind_arguments={"mapper": Address})
            conn.connection.cursor().execute("UPDATE address SET street = 'never committed' WHERE id = 3")
            assert "never committed" in streets(session)
            session.rollback()
        with Sessions() as fresh:
            assert streets(fresh) == ["2 High St", "2 Main St"]
    finally:
        people.dispose()
        addresses.dispose()


def test_sqlite_raw_write_in_a_savepoint_released(db_url, regions):
    """A raw write inside a SAVEPOINT that is released, then a read: the raw rows must not be stored."""
    engine = create_engine(db_url)
    _explicit_begin(engine)
    Sessions = sessionmaker(engine, info=regions.session_info())

    def before(session):
        with session.begin_nested():
            _raw_update(session)

    try:
        served, truth = _served_after_rollback(Sessions, db_url, before)
        assert served == truth == SEEDED_2_3
    finally:
        engine.dispose()


def test_pg_raw_write_in_a_pipeline(pg_url, pg_sessions):
    """psycopg's pipeline mode: a raw write sent in a pipeline on the Session's connection must not be stored."""
    engine, Sessions = pg_sessions

    def before(session):
        driver = session.connection().connection.driver_connection
        with driver.pipeline():
            driver.execute("UPDATE person SET name = 'never committed' WHERE id = 2")

    served, truth = _served_after_rollback(Sessions, pg_url, before)
    assert served == truth == SEEDED_2_3


def test_pg_external_transaction_recipe_raw_write(pg_url, regions):
    """The external-transaction test recipe on PostgreSQL: a raw write, rolled back with the outer transaction."""
    engine = create_engine(pg_url)
    try:
        conn = engine.connect()
        outer = conn.begin()
        with Session(bind=conn, join_transaction_mode="create_savepoint", info=regions.session_info()) as session:
            _raw_update(session)
            cached(session, PEOPLE_2_3)
        outer.rollback()
        conn.close()
        with sessionmaker(engine, info=regions.session_info())() as fresh:
            served = cached(fresh, PEOPLE_2_3)
        assert served == uncached(pg_url, PEOPLE_2_3) == SEEDED_2_3
    finally:
        engine.dispose()


# 5. The add-on: an application's dbsession found when the application is made ----------------------


@pytest.mark.parametrize("how", ["request method property", "request class property", "request class reify"])
def test_apps_long_lived_dbsession_added_after_a_commit_drops_local_entries(db_url, how):
    """After include + config.commit(), the app adds its thread-local Session as request.dbsession: next request reads the truth."""
    import zope.sqlalchemy
    from pyramid.config import Configurator
    from pyramid.decorator import reify
    from pyramid.request import Request
    from sqlalchemy.orm import scoped_session
    from webtest import TestApp

    from pyramid_sessioncache.addon import get_engine

    from .test_attack_s33_requests import LOCAL_ONLY, cached_and_uncached, commit_in_another_process, name_of

    config = Configurator(settings={"sqlalchemy.url": db_url, **LOCAL_ONLY})
    config.include("pyramid_sessioncache")
    config.commit()
    engine = get_engine(config.registry)
    factory = sessionmaker(bind=engine)
    meta_session = scoped_session(factory)
    zope.sqlalchemy.register(meta_session, keep_session=True)
    config.set_sessioncache_session_factory(factory)
    if how == "request method property":
        config.add_request_method(lambda request: meta_session(), "dbsession", property=True)
    else:
        decorate = property if how.endswith("property") else reify

        class AppRequest(Request):
            @decorate
            def dbsession(self):
                return meta_session()

        config.set_request_factory(AppRequest)
    stmt = name_of(1)
    config.add_route("read", "/read")
    config.add_view(cached_and_uncached(stmt), route_name="read", renderer="json")
    web = TestApp(config.make_wsgi_app())
    try:
        assert web.get("/read").json == {"cached": "person 1", "uncached": "person 1"}
        commit_in_another_process(db_url, "renamed by another worker")
        page = web.get("/read").json
        assert page["uncached"] == "renamed by another worker"
        assert page["cached"] == page["uncached"]
    finally:
        meta_session.remove()
        engine.dispose()


def test_local_attaching_other_identities_or_merging_keeps_entries(engine, Session):
    """Attaching a detached object of an identity the map does not hold, or merge(), costs no local entry."""
    from sqlalchemy.orm import make_transient_to_detached

    statement = select(Person).where(Person.id <= 3).order_by(Person.id)
    with Session(autoflush=False) as session:
        kept = session.execute(statement.options(FromCache("local"))).scalars().all()
        stranger = Person(id=15, name="person 15")
        make_transient_to_detached(stranger)
        session.add(stranger)
        copy = Person(id=1, name="person 1")
        make_transient_to_detached(copy)
        assert session.merge(copy, load=False) is kept[0]
        sql = SQLCounter(engine)
        again = session.execute(statement.options(FromCache("local"))).scalars().all()
        assert again == kept
        assert [s for s in sql.statements if "person" in s.lower()] == []


@pytest.mark.xfail(
    strict=True,
    reason="SQL text is read both ways where a comment may nest (PostgreSQL nests them, SQLite does not) and cached_query() refuses what either reading may write, with NotCacheableError: text whose comment nests and holds a write keyword is refused, never served",
)
def test_pg_nested_comment_mentioning_update_is_a_plain_read(pg_url, regions):
    """PostgreSQL nests comments: ``/* a /* b */ update later */`` is one comment; the read is cached as without it."""
    sql = "SELECT id, name FROM person WHERE id < 3 /* note /* inner */ update later */ ORDER BY id"
    assert _second_read_is_a_hit(pg_url, regions, text(sql)) == 0
