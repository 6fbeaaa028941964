"""Attack s18, round 3: the rewritten SQL-text scanner, the PostgreSQL catalog, Pyramid, dbm recovery.

Every case warms a shared region, proves a hit sends no SQL, writes, and
compares what the cache serves with the same query run uncached in a fresh
Session.  Real SQLite files, real PostgreSQL, real Redis; no mocks.  Cases
that fail on the reviewed code are left failing.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import pytest

# The fixtures of the first round, used here too.
from pyramid.config import Configurator
from sqlalchemy import (
    JSON,
    Column,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.ext.mutable import MutableDict
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, raiseload, selectinload, sessionmaker
from webtest import TestApp

from pyramid_sessioncache.addon.interfaces import IDBSessionFactory
from pyramid_sessioncache.engine.invalidation import sqltext
from pyramid_sessioncache.engine.invalidation.statements import sql_tables

from . import app as small_app
from . import test_attack_s18_invalidation as invalidation
from .conftest import SQLCounter
from .models import Address, Person
from .test_attack_s18_invalidation import PEOPLE, counting, stale_after, uncached, warm

PgSession, SSession, pg, region, scache, sengine = (
    invalidation.PgSession,
    invalidation.SSession,
    invalidation.pg,
    invalidation.region,
    invalidation.scache,
    invalidation.sengine,
)


def _write_text(Sess, sql, params=None):
    def write():
        with Sess() as session:
            result = session.execute(text(sql), params or {})
            if result.returns_rows:
                result.all()
            session.commit()

    return write


# 1. The scanner: SQL text whose write no reading sees ------------------------------------------

PG_HIDDEN_WRITES = [
    pytest.param("INSERT INTO U&\"s18_person\" (id, name) VALUES (4, 'person 4')", id='INSERT INTO U&"..."'),
    pytest.param('DELETE FROM U&"s18_\\0070erson" WHERE id = 3', id='DELETE FROM U&"..\\0070.."'),
    pytest.param('TRUNCATE U&"s18_person" CASCADE', id='TRUNCATE U&"..." CASCADE'),
    pytest.param(
        "WITH x AS (SELECT $é$'$é$ AS k), "
        "u AS (UPDATE s18_person SET name = name || '!' WHERE id = 1 RETURNING id) SELECT id, 'x' AS label FROM u",
        id="dollar tag starting with a non-ASCII letter",
    ),
    pytest.param(
        "WITH x AS (SELECT 1 AS k) -- a comment ended by a carriage return\r"
        ", u AS (UPDATE s18_person SET name = name || '!' WHERE id = 1 RETURNING id) SELECT id FROM u",
        id="-- comment ended by a lone CR",
    ),
    pytest.param(
        "UPDATE s18_person SET name = name || '!' WHERE id = 1 -- the end, no newline",
        id="comment at the end without newline",
    ),
    pytest.param("UPDATE\r\n  s18_person\r\nSET name = name || '!'\r\nWHERE id = 1\r\n", id="CRLF"),
    pytest.param(
        "SELECT 'a;b' AS k; /* ; */ UPDATE s18_person SET name = name || E'\\';' WHERE id = 1; SELECT $t$;$t$",
        id="several statements, ; inside strings, comments, dollar quotes",
    ),
    pytest.param(
        "WITH a AS (SELECT 1 ` 2 AS k), u AS (UPDATE s18_person SET name = name || '!' WHERE id = 1 RETURNING id) "
        "SELECT id, 3 ` 4 AS z FROM u",
        id="backtick: an operator in PostgreSQL, a quote to the scanner",
    ),
]

BACKTICK_OPERATOR = """
CREATE FUNCTION s18_bt(int, int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT $1 + $2';
CREATE OPERATOR ` (LEFTARG = int, RIGHTARG = int, PROCEDURE = s18_bt);
"""


@pytest.mark.parametrize("sql", PG_HIDDEN_WRITES)
def test_pg_text_write_is_published(PgSession, pg, region, sql):
    if "`" in sql:
        with pg.begin() as conn:
            conn.exec_driver_sql(BACKTICK_OPERATOR)
    served, truth = stale_after(PgSession, pg, region, PEOPLE, _write_text(PgSession, sql))
    print("scanner says it writes:", sorted(sql_tables(sql)))
    assert served == truth


SQLITE_DOLLAR_PARAMETER = "WITH c AS (SELECT $a$ AS k) UPDATE s18_person SET name = name || 'x' WHERE id = $a$"


def test_sqlite_dollar_named_parameter_read_as_a_dollar_quote(SSession, sengine, region):
    # In SQLite $a$ is a named parameter ($ is a name character), not a dollar-quoted string.
    def write():
        with sengine.begin() as conn:
            conn.exec_driver_sql(SQLITE_DOLLAR_PARAMETER, {"a$": 1})

    served, truth = stale_after(SSession, sengine, region, PEOPLE, write)
    print("scanner says it writes:", sorted(sql_tables(SQLITE_DOLLAR_PARAMETER)))
    assert served == truth


SQLITE_OK = [
    pytest.param("UPDATE s18_person SET name = name || 'x' WHERE id = 1 -- end without newline", id="comment at end"),
    pytest.param("UPDATE s18_person SET name = name || 'x' WHERE id = 1 /* unclosed comment", id="unclosed /*"),
    pytest.param("UPDATE\r\n[s18_person]\r\nSET name = name || 'x'\r\nWHERE id = 1", id="CRLF and [name]"),
    pytest.param("UPDATE \"main\" . `s18_person` SET name = name || ';' WHERE id = 1", id="mixed quoting"),
    pytest.param("UPDATE\ts18_person\fSET name = name || 'x' WHERE id = 1", id="tab and form feed"),
]


@pytest.mark.parametrize("sql", SQLITE_OK)
def test_sqlite_text_write_is_published(SSession, sengine, region, sql):
    def write():
        with sengine.begin() as conn:
            conn.exec_driver_sql(sql)

    served, truth = stale_after(SSession, sengine, region, PEOPLE, write)
    assert served == truth


def test_scanner_time_on_a_megabyte():
    """Prints how long clean() and sql_tables() take on 1 MB strings; no assertion on time."""
    timings = {}
    cases = {
        "plain SQL": "SELECT 1 FROM s18_person WHERE name = 'a' -- c\n" * 22000,
        "unclosed distinct $tags$": "".join(f"$t{i}$ " for i in range(110000)),
        "unclosed $a": "$a" * 500000,
        "8 readings": "SELECT '[(' || E'\\\\' /* x */ FROM s18_person; " * 24000,
    }
    for name, sql in cases.items():
        if name == "unclosed distinct $tags$":
            # Measure at 1/10 and 1/5 too: quadratic growth shows without waiting a minute.
            for part in (11000, 22000, 44000):
                small = "".join(f"$t{i}$ " for i in range(part))
                started = time.perf_counter()
                sqltext.clean(small)
                timings[f"{name} ({len(small)} chars)"] = time.perf_counter() - started
            continue
        started = time.perf_counter()
        sqltext.clean(sql)
        timings[f"clean {name} ({len(sql)} chars)"] = time.perf_counter() - started
        started = time.perf_counter()
        sql_tables(sql)
        timings[f"sql_tables {name}"] = time.perf_counter() - started
    for name, seconds in timings.items():
        print(f"{name}: {seconds:.3f} s{'  > 1 s' if seconds > 1 else ''}")


# 2. The PostgreSQL catalog ----------------------------------------------------------------------


def _pg(pg_database, scache, ddl, **engine_args):
    engine = create_engine(pg_database, **engine_args)
    if ddl:
        admin = create_engine(pg_database)
        with admin.begin() as conn:
            conn.exec_driver_sql(ddl)
        admin.dispose()
    return engine, sessionmaker(bind=engine, info=scache.session_info())


md = MetaData()
meas = Table("s18_meas", md, Column("id", Integer, primary_key=True), Column("v", Integer))
meas_1 = Table("s18_meas_1", md, Column("id", Integer, primary_key=True), Column("v", Integer))
PARTITIONS = """
CREATE TABLE s18_meas (id int, v int) PARTITION BY RANGE (id);
CREATE TABLE s18_meas_1 PARTITION OF s18_meas FOR VALUES FROM (0) TO (100);
CREATE TABLE s18_meas_2 PARTITION OF s18_meas FOR VALUES FROM (100) TO (200) PARTITION BY RANGE (id);
CREATE TABLE s18_meas_2a PARTITION OF s18_meas_2 FOR VALUES FROM (100) TO (150);
INSERT INTO s18_meas VALUES (1, 1), (2, 2), (120, 3);
"""


@pytest.mark.parametrize(
    "read, write",
    [
        pytest.param(
            meas, lambda c: c.execute(update(meas_1).values(v=meas_1.c.v + 10)), id="partition written, parent read"
        ),
        pytest.param(
            meas_1, lambda c: c.execute(update(meas).values(v=meas.c.v + 10)), id="parent written, partition read"
        ),
        pytest.param(
            meas, lambda c: c.execute(text("UPDATE s18_meas_2a SET v = v + 10")), id="sub-partition text, parent read"
        ),
        pytest.param(
            meas_1, lambda c: c.execute(text("INSERT INTO s18_meas VALUES (5, 5)")), id="insert routed by parent"
        ),
        pytest.param(meas, lambda c: c.execute(text("ALTER TABLE s18_meas DETACH PARTITION s18_meas_1")), id="detach"),
    ],
)
def test_pg_partitions(pg_database, scache, region, read, write):
    engine, Sess = _pg(pg_database, scache, PARTITIONS)
    stmt = select(read.c.id, read.c.v).order_by(read.c.id)

    def do():
        with Sess() as session:
            write(session)
            session.commit()

    try:
        served, truth = stale_after(Sess, engine, region, stmt, do)
        assert served == truth
    finally:
        engine.dispose()


animal = Table("s18_animal", MetaData(), Column("id", Integer), Column("name", String))
INHERITS = """
CREATE TABLE s18_animal (id int, name text);
CREATE TABLE s18_dog (bark text) INHERITS (s18_animal);
INSERT INTO s18_animal VALUES (1, 'cat');
INSERT INTO s18_dog VALUES (2, 'rex', 'woof');
"""


@pytest.mark.parametrize(
    "sql",
    ["INSERT INTO s18_dog VALUES (3, 'fido', 'wuf')", "UPDATE s18_dog SET name = 'max'", "DELETE FROM s18_dog"],
)
def test_pg_inheritance_child_written_parent_read(pg_database, scache, region, sql):
    engine, Sess = _pg(pg_database, scache, INHERITS)
    stmt = select(animal.c.id, animal.c.name).order_by(animal.c.id)
    try:
        served, truth = stale_after(Sess, engine, region, stmt, _write_text(Sess, sql))
        assert served == truth
    finally:
        engine.dispose()


def test_pg_rename_swap_tables(pg_database, scache, region):
    engine, Sess = _pg(
        pg_database,
        scache,
        "CREATE TABLE s18_a (id int); CREATE TABLE s18_c (id int); INSERT INTO s18_a VALUES (1); INSERT INTO s18_c VALUES (2);",
    )
    a = Table("s18_a", MetaData(), Column("id", Integer))
    stmt = select(a.c.id).order_by(a.c.id)
    swap = "ALTER TABLE s18_a RENAME TO s18_b; ALTER TABLE s18_c RENAME TO s18_a"
    try:
        served, truth = stale_after(Sess, engine, region, stmt, _write_text(Sess, swap))
        assert served == truth
    finally:
        engine.dispose()


def test_pg_rename_then_write_under_the_new_name(pg_database, scache, region):
    # The catalog was read before the rename: a view over the renamed table must still follow writes.
    engine, Sess = _pg(
        pg_database,
        scache,
        "CREATE TABLE s18_old (id int, v int); INSERT INTO s18_old VALUES (1, 1);"
        "CREATE VIEW s18_v AS SELECT id, v FROM s18_old;",
    )
    view = Table("s18_v", MetaData(), Column("id", Integer), Column("v", Integer))
    stmt = select(view.c.id, view.c.v).order_by(view.c.id)
    try:
        warm(Sess, engine, region, stmt)  # the catalog is read
        _write_text(Sess, "ALTER TABLE s18_old RENAME TO s18_new")()
        served, truth = stale_after(Sess, engine, region, stmt, _write_text(Sess, "UPDATE s18_new SET v = v + 1"))
        assert served == truth
    finally:
        engine.dispose()


SCHEMAS = """
CREATE SCHEMA s1; CREATE SCHEMA s2;
CREATE TABLE s1.s18_t (id int PRIMARY KEY, v int); CREATE TABLE s2.s18_t (id int PRIMARY KEY, v int);
INSERT INTO s1.s18_t VALUES (1, 1); INSERT INTO s2.s18_t VALUES (1, 100);
CREATE TABLE s2.s18_child (id int PRIMARY KEY, t_id int REFERENCES s1.s18_t (id) ON DELETE SET NULL ON UPDATE CASCADE);
INSERT INTO s2.s18_child VALUES (1, 1);
"""


@pytest.mark.parametrize("path, write", [("s1", "UPDATE s18_t SET v = v + 1"), ("s2", "UPDATE s2.s18_t SET v = v + 1")])
def test_pg_same_name_in_two_schemas_search_path(pg_database, scache, region, path, write):
    engine, Sess = _pg(pg_database, scache, SCHEMAS, connect_args={"options": f"-c search_path={path},public"})
    t = Table("s18_t", MetaData(), Column("id", Integer), Column("v", Integer))
    stmt = select(t.c.id, t.c.v)
    try:
        served, truth = stale_after(Sess, engine, region, stmt, _write_text(Sess, write))
        assert served == truth
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "write",
    ["DELETE FROM s1.s18_t WHERE id = 1", "UPDATE s1.s18_t SET id = 7 WHERE id = 1"],
    ids=["set null", "update cascade"],
)
def test_pg_fk_actions_across_schemas(pg_database, scache, region, write):
    engine, Sess = _pg(pg_database, scache, SCHEMAS)
    child = Table("s18_child", MetaData(), Column("id", Integer), Column("t_id", Integer), schema="s2")
    stmt = select(child.c.id, child.c.t_id)
    try:
        served, truth = stale_after(Sess, engine, region, stmt, _write_text(Sess, write))
        assert served == truth
    finally:
        engine.dispose()


RESTRICTED = """
CREATE TABLE s18_parent (id int PRIMARY KEY, v int);
CREATE TABLE s18_kid (id int PRIMARY KEY, parent_id int REFERENCES s18_parent (id) ON DELETE CASCADE);
CREATE TABLE s18_secret (id int);
INSERT INTO s18_parent VALUES (1, 1), (2, 2); INSERT INTO s18_kid VALUES (1, 1), (2, 2);
DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 's18_reader') THEN
  CREATE ROLE s18_reader LOGIN PASSWORD 'pw'; END IF; END $$;
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM PUBLIC;
GRANT SELECT, DELETE ON s18_parent TO s18_reader; GRANT SELECT ON s18_kid TO s18_reader;
"""


def test_pg_restricted_role_reads_the_catalog(pg_database, scache, region):
    from sqlalchemy import make_url

    _, _ = None, None
    admin = create_engine(pg_database)
    with admin.begin() as conn:
        conn.exec_driver_sql(RESTRICTED)
        conn.exec_driver_sql(f"GRANT CONNECT ON DATABASE {make_url(pg_database).database} TO s18_reader")
    admin.dispose()
    url = make_url(pg_database).set(username="s18_reader", password="pw")
    engine = create_engine(url)
    Sess = sessionmaker(bind=engine, info=scache.session_info())
    kid = Table("s18_kid", MetaData(), Column("id", Integer), Column("parent_id", Integer))
    stmt = select(kid.c.id, kid.c.parent_id).order_by(kid.c.id)
    try:
        served, truth = stale_after(
            Sess, engine, region, stmt, _write_text(Sess, "DELETE FROM s18_parent WHERE id = 1")
        )
        assert served == truth
    finally:
        engine.dispose()


MATVIEW = """
CREATE TABLE s18_base (id int, v int); INSERT INTO s18_base VALUES (1, 1);
CREATE MATERIALIZED VIEW s18_mv AS SELECT id, v FROM s18_base;
CREATE UNIQUE INDEX ON s18_mv (id);
CREATE VIEW s18_over_mv AS SELECT id, v FROM s18_mv;
"""


@pytest.mark.parametrize("relation", ["s18_mv", "s18_over_mv"])
@pytest.mark.parametrize(
    "refresh", ["REFRESH MATERIALIZED VIEW s18_mv", "REFRESH MATERIALIZED VIEW CONCURRENTLY public.s18_mv"]
)
def test_pg_materialized_view_refresh(pg_database, scache, region, relation, refresh):
    engine, Sess = _pg(pg_database, scache, MATVIEW)
    mv = Table(relation, MetaData(), Column("id", Integer), Column("v", Integer))
    stmt = select(mv.c.id, mv.c.v).order_by(mv.c.id)

    def write():
        _write_text(Sess, "UPDATE s18_base SET v = v + 1")()
        # the base write alone must not change the materialized view; the refresh does
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
        with Sess() as session:
            session.connection(execution_options={"isolation_level": "AUTOCOMMIT"}).exec_driver_sql(refresh)
            session.commit()

    try:
        served, truth = stale_after(Sess, engine, region, stmt, write)
        assert served == truth
    finally:
        engine.dispose()


def test_scanner_time_on_unclosed_brackets():
    """Prints how long readings() takes on many '[' with no ']': _BRACKETED.findall scans to the end from each."""
    for n in (100_000, 200_000, 400_000):
        sql = "SELECT a[1 FROM t " * (n // 18)
        started = time.perf_counter()
        sql_tables(sql)
        seconds = time.perf_counter() - started
        print(
            f"sql_tables, {len(sql)} chars, {sql.count('[')} unclosed '[': {seconds:.3f} s{'  > 1 s' if seconds > 1 else ''}"
        )


# 3. Pyramid: request.cached_query, raiseload, mark_changed(MappedClass), a dotted region -----------


class JBase(DeclarativeBase):
    pass


class JDoc(JBase):
    __tablename__ = "s18_jdoc"
    id: Mapped[int] = mapped_column(primary_key=True)
    data = mapped_column(JSON)
    tracked = mapped_column(MutableDict.as_mutable(JSON))


def _doc(request):
    stmt = select(JDoc).where(JDoc.id == 1)
    return request.cached_query(stmt, region="a.b").scalar_one()


def doc_read(request):
    doc = _doc(request)
    return {"data": doc.data, "tracked": doc.tracked}


def doc_touch(request):
    # Changes the cached object's JSON in place: untracked (no UPDATE), and tracked (an UPDATE at commit).
    doc = _doc(request)
    doc.data["touched"] = request.params["n"]
    doc.data.setdefault("list", []).append(request.params["n"])
    doc.tracked["touched"] = request.params["n"]
    return {}


def doc_touch_untracked_only(request):
    doc = _doc(request)
    doc.data["touched"] = request.params["n"]
    return {}


def people_raiseload(request):
    stmt = (
        select(Person).where(Person.id <= 3).options(selectinload(Person.addresses), raiseload("*")).order_by(Person.id)
    )
    people = request.cached_query(stmt, region="a.b").scalars().all()
    return {str(p.id): [p.name, sorted(a.id for a in p.addresses)] for p in people}


def person_names(request):
    stmt = select(Person.id, Person.name).where(Person.id <= 3).order_by(Person.id)
    return {str(i): n for i, n in request.cached_query(stmt, region="a.b").all()}


def rename_unseen(request):
    # A write the add-on cannot see (the DBAPI cursor itself), declared by mapped class.
    conn = request.dbsession.connection()
    cursor = conn.connection.dbapi_connection.cursor()
    cursor.execute("UPDATE person SET name = ? WHERE id = 1", (request.params["name"],))
    cursor.close()
    request.sessioncache.mark_changed(Person)
    return {}


def _pyramid_app(db_url, region_settings):
    settings = {
        "sqlalchemy.url": db_url,
        "cache.regions": "local_session, a.b",
        "cache.local_session.type": "ext:local_session",
        "sessioncache.secret": "a test secret, long enough",
        **{f"cache.a.b.{k}": v for k, v in region_settings.items()},
    }
    config = Configurator(settings=settings)
    config.include("pyramid_sessioncache")
    for name, view, _method in [
        ("doc", doc_read, None),
        ("touch", doc_touch, None),
        ("touch_untracked", doc_touch_untracked_only, None),
        ("raiseload", people_raiseload, None),
        ("names", person_names, None),
        ("unseen", rename_unseen, None),
    ]:
        config.add_route(name, f"/{name}")
        config.add_view(view, route_name=name, renderer="json")
    app = config.make_wsgi_app()
    engine = app.registry.getUtility(IDBSessionFactory).kw["bind"]
    return TestApp(app), engine, SQLCounter(engine)


@pytest.fixture(params=["memory", "redis", "file"])
def dotted(request, db_url, tmp_path):
    engine = create_engine(db_url)
    JBase.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(JDoc.__table__).values(id=1, data={"a": 1}, tracked={"b": 2}))
    engine.dispose()
    if request.param == "redis":
        region_settings = {"type": "ext:redis", "url": request.getfixturevalue("redis_url")}
    elif request.param == "file":
        region_settings = {"type": "file", "data_dir": str(tmp_path / "c"), "lock_dir": str(tmp_path / "l")}
    else:
        region_settings = {"type": "memory"}
    web, engine, sql = _pyramid_app(db_url, region_settings)
    yield web, engine, sql
    engine.dispose()


def _fresh(engine, stmt):
    with Session(engine) as session:
        return session.execute(stmt).all()


def _hit(web, sql, path):
    first = web.get(path).json
    sql.reset()
    again = web.get(path).json
    assert sql.count == 0, f"a hit: {sql.statements}"
    assert first == again
    return again


def test_pyramid_json_changed_in_place_then_read_by_the_next_request(dotted):
    web, engine, sql = dotted
    _hit(web, sql, "/doc")
    web.get("/touch", params={"n": "1"})
    web.get("/touch", params={"n": "2"})  # a hit or a miss, the object it changes must not be the cached one
    served = web.get("/doc").json
    with Session(engine) as session:
        doc = session.get(JDoc, 1)
        truth = {"data": doc.data, "tracked": doc.tracked}
    assert truth["tracked"] == {"b": 2, "touched": "2"}, truth
    assert served == truth
    _hit(web, sql, "/doc")


def test_pyramid_untracked_json_change_does_not_leak_into_the_cache(dotted):
    web, engine, sql = dotted
    _hit(web, sql, "/doc")
    web.get("/touch_untracked", params={"n": "leak"})
    served = web.get("/doc").json
    with Session(engine) as session:
        doc = session.get(JDoc, 1)
        truth = {"data": doc.data, "tracked": doc.tracked}
    assert served == truth


def test_pyramid_raiseload_star_in_a_view(dotted):
    web, engine, sql = dotted
    served = _hit(web, sql, "/raiseload")
    with Session(engine) as session:
        people = session.scalars(
            select(Person).where(Person.id <= 3).options(selectinload(Person.addresses)).order_by(Person.id)
        ).all()
        truth = {str(p.id): [p.name, sorted(a.id for a in p.addresses)] for p in people}
    assert served == truth
    # An address written: the eager-loaded collection must follow.
    with Session(engine) as session:
        session.get(Address, 1).person_id = 3
        session.commit()
    with Session(engine) as session:
        people = session.scalars(
            select(Person).where(Person.id <= 3).options(selectinload(Person.addresses)).order_by(Person.id)
        ).all()
        truth = {str(p.id): [p.name, sorted(a.id for a in p.addresses)] for p in people}
    assert web.get("/raiseload").json == truth


def test_pyramid_mark_changed_with_a_mapped_class(dotted):
    web, engine, sql = dotted
    _hit(web, sql, "/names")
    web.get("/unseen", params={"name": "unseen write"})
    truth = {
        str(i): n for i, n in _fresh(engine, select(Person.id, Person.name).where(Person.id <= 3).order_by(Person.id))
    }
    assert truth["1"] == "unseen write", "pyramid_tm committed the write"
    assert web.get("/names").json == truth
    _hit(web, sql, "/names")


# 4. dbm: damaged while the app runs -----------------------------------------------------------------


def _damage(directory, how):
    files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
    assert files or how == "delete directory", f"no dbm files under {directory}"
    if how == "delete directory":
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
        return
    for path in files:
        if how == "truncate":
            with open(path, "r+b") as file:
                file.truncate(max(os.path.getsize(path) // 2, 0))
        elif how == "empty":
            open(path, "wb").close()
        elif how == "garbage":
            with open(path, "r+b") as file:
                file.seek(0)
                file.write(os.urandom(max(os.path.getsize(path), 64)))
        elif how == "garbage text":
            with open(path, "wb") as file:
                file.write(b"'abc', (0, 10)\n{not python}\n" * 20)
        elif how == "delete":
            os.remove(path)


def _dbm_app(db_url, tmp_path):
    data_dir = tmp_path / "dbm"
    app = small_app.make_app(db_url, {"type": "dbm", "data_dir": str(data_dir)}, **{"sessioncache.retry_after": "0.2"})
    engine = app.registry.getUtility(IDBSessionFactory).kw["bind"]
    return TestApp(app), engine, SQLCounter(engine), str(data_dir)


def _names_truth(engine):
    from .models import Person as P

    return {str(i): n for i, n in _fresh(engine, select(P.id, P.name).order_by(P.id))}


def _resumes(web, sql, path, truth, seconds=30.0):  # polled: a loaded machine may take seconds
    deadline = time.monotonic() + seconds
    while True:
        assert web.get(path).json == truth
        sql.reset()
        assert web.get(path).json == truth
        if sql.count == 0:
            return
        assert time.monotonic() < deadline, "caching did not resume"
        time.sleep(0.1)


@pytest.mark.parametrize("how", ["truncate", "empty", "garbage", "garbage text", "delete", "delete directory"])
def test_dbm_damaged_between_requests(db_url, tmp_path, how):
    web, engine, sql, data_dir = _dbm_app(db_url, tmp_path)
    try:
        _resumes(web, sql, "/names", _names_truth(engine))
        _damage(data_dir, how)
        assert web.get("/names").json == _names_truth(engine)
        web.post("/people/1/rename", {"name": f"after {how}"})
        truth = _names_truth(engine)
        assert truth["1"] == f"after {how}"
        assert web.get("/names").json == truth
        _resumes(web, sql, "/names", truth)
        _damage(data_dir, how)  # damaged again, right after a write
        web.post("/people/2/rename", {"name": f"again {how}"})
        truth = _names_truth(engine)
        assert web.get("/names").json == truth
        _resumes(web, sql, "/names", truth)
    finally:
        engine.dispose()


def test_dbm_damaged_while_threads_read_and_write(db_url, tmp_path):
    web, engine, sql, data_dir = _dbm_app(db_url, tmp_path)
    errors: list = []
    stop = threading.Event()

    def reader(n):
        while not stop.is_set():
            try:
                got = web.get("/names").json
                web.get(f"/people/{1 + n % 3}")
                assert isinstance(got, dict) and len(got) == 20
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))
                return

    def writer():
        i = 0
        while not stop.is_set():
            i += 1
            try:
                web.post("/people/3/rename", {"name": f"w{i}"})
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))
                return
            time.sleep(0.01)

    try:
        _resumes(web, sql, "/names", _names_truth(engine))
        threads = [threading.Thread(target=reader, args=(n,)) for n in range(4)] + [threading.Thread(target=writer)]
        for t in threads:
            t.start()
        for how in ["truncate", "garbage", "delete", "garbage text", "empty", "delete directory"] * 2:
            time.sleep(0.15)
            with contextlib.suppress(AssertionError, FileNotFoundError):
                _damage(data_dir, how)
        stop.set()
        for t in threads:
            t.join(30)
        assert errors == []
        truth = _names_truth(engine)
        assert web.get("/names").json == truth
        _resumes(web, sql, "/names", truth)
        assert web.get("/people/3").json == {"name": truth["3"]}
    finally:
        stop.set()
        engine.dispose()


def test_dbm_files_restored_from_an_older_copy(db_url, tmp_path):
    """The dbm files put back as they were before a write (a backup restored, a snapshot rolled back)."""
    import shutil

    web, engine, sql, data_dir = _dbm_app(db_url, tmp_path)
    try:
        _resumes(web, sql, "/names", _names_truth(engine))
        shutil.copytree(data_dir, str(tmp_path / "copy"))
        web.post("/people/1/rename", {"name": "after the copy"})
        truth = _names_truth(engine)
        assert web.get("/names").json == truth
        shutil.rmtree(data_dir)
        shutil.copytree(str(tmp_path / "copy"), data_dir)
        assert web.get("/names").json == truth
    finally:
        engine.dispose()


# 1b. The same hidden DML, run twice through the cache: the second UPDATE must reach the database ---------

PG_HIDDEN_DML_CTE = [
    pytest.param(
        "WITH x AS (SELECT $é$'$é$ AS k), "
        "u AS (UPDATE s18_person SET name = name || '!' WHERE id = 1 RETURNING id) SELECT id, 'x' AS label FROM u",
        id="dollar tag starting with a non-ASCII letter",
    ),
    pytest.param(
        "WITH x AS (SELECT 1 AS k) -- a comment ended by a carriage return\r"
        ", u AS (UPDATE s18_person SET name = name || '!' WHERE id = 1 RETURNING id) SELECT id, 'x' AS label FROM u",
        id="-- comment ended by a lone CR",
    ),
]


@pytest.mark.parametrize("sql", PG_HIDDEN_DML_CTE)
def test_pg_hidden_dml_cte_is_not_served_from_the_cache(PgSession, pg, region, sql):
    from pyramid_sessioncache import FromCache

    refused = None
    with counting(pg) as seen:
        for _ in range(2):
            with PgSession() as session:
                try:
                    session.execute(text(sql).columns(id=Integer).options(FromCache(region))).all()
                except Exception as exc:  # a clear refusal is fine
                    refused = exc
                    break
                session.commit()
    if refused is None:
        name = uncached(pg, select(invalidation.SPerson.name).where(invalidation.SPerson.id == 1))
        assert name == [("person 1!!",)], f"the second run's UPDATE was not sent ({len(seen)} statements)"
