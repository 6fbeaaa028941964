"""Attack s18, round 4: SQL text that writes or reads past the scanner, every entrance, threads.

Every case warms a shared region, proves a hit sends no SQL, writes, and
compares what the cache serves with the same query run uncached in a fresh
Session (or counts what reached the database).  Real SQLite files, real
PostgreSQL, real Redis, real waitress servers; no mocks.  Cases that fail
on the reviewed code are left failing.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import zope.sqlalchemy
from pyramid.config import Configurator
from sqlalchemy import Column, Integer, MetaData, String, Table, literal_column, select, text, update
from sqlalchemy.orm import Session

from pyramid_sessioncache import FromCache, NotCacheableError, cached_query
from pyramid_sessioncache.engine.invalidation.statements import sql_tables

from . import test_attack_s18_invalidation as invalidation
from .conftest import ThreadServer, use_region
from .models import Person
from .test_attack_s18_invalidation import PEOPLE, SAddress, SPerson, cached, counting, rows, stale_after, uncached

# The fixtures of the first round, used here too.
PgSession, SSession, pg, region, scache, sengine = (
    invalidation.PgSession,
    invalidation.SSession,
    invalidation.pg,
    invalidation.region,
    invalidation.scache,
    invalidation.sengine,
)


def _session_text(Sess, sql, params=None):
    def write():
        with Sess() as session:
            result = session.execute(text(sql), params or {})
            if result.returns_rows:
                result.all()
            session.commit()

    return write


def _driver(engine, sql, params=None):
    def write():
        with engine.begin() as conn:
            result = conn.exec_driver_sql(sql, params) if params is not None else conn.exec_driver_sql(sql)
            if result.returns_rows:
                result.all()

    return write


# 1. SQL text that writes: PostgreSQL ------------------------------------------------------------


def test_pg_truncate_list_with_descendants_star(PgSession, pg, region):
    # TRUNCATE [TABLE] [ONLY] name [*] [, ...]: the "*" after the first name stops
    # the scanner's list, and the tables after it are never published.
    sql = "TRUNCATE s18_address *, s18_person"
    print("scanner says it writes:", sorted(sql_tables(sql)))
    served, truth = stale_after(PgSession, pg, region, PEOPLE, _session_text(PgSession, sql))
    assert served == truth


def test_pg_truncate_list_with_star_through_the_driver(PgSession, pg, region):
    sql = "TRUNCATE TABLE s18_address * , s18_person RESTART IDENTITY"
    served, truth = stale_after(PgSession, pg, region, PEOPLE, _driver(pg, sql))
    assert served == truth


PG_WRITES = [
    pytest.param(
        "SELECT 1 AS k; UPDATE s18_person SET name = name || '!' WHERE id = 1", id="SELECT first, then UPDATE"
    ),
    pytest.param("EXPLAIN ANALYZE UPDATE s18_person SET name = name || '!' WHERE id = 1", id="EXPLAIN ANALYZE UPDATE"),
    pytest.param(
        "EXPLAIN (ANALYZE, FORMAT JSON) WITH u AS (DELETE FROM s18_person WHERE id = 3 RETURNING id) SELECT * FROM u",
        id="EXPLAIN (ANALYZE) of a DML CTE",
    ),
    pytest.param(
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 2) "
        "UPDATE s18_person SET name = name || '!' FROM r WHERE s18_person.id = r.n",
        id="WITH RECURSIVE + UPDATE FROM",
    ),
    pytest.param(
        "MERGE INTO s18_person AS p USING (VALUES (1, 'merged')) AS v(id, name) ON p.id = v.id "
        "WHEN MATCHED THEN UPDATE SET name = v.name WHEN NOT MATCHED THEN INSERT VALUES (v.id, v.name)",
        id="MERGE",
    ),
    pytest.param(
        "INSERT INTO s18_person AS p VALUES (1, 'upserted') ON CONFLICT (id) DO UPDATE SET name = excluded.name",
        id="INSERT ON CONFLICT DO UPDATE",
    ),
    pytest.param("LOCK TABLE s18_person; UPDATE s18_person * SET name = 'x' WHERE id = 1", id="LOCK; UPDATE *"),
    pytest.param("LISTEN s18; NOTIFY s18, 'x'; DELETE FROM s18_person * WHERE id = 3", id="LISTEN/NOTIFY; DELETE *"),
]


@pytest.mark.parametrize("sql", PG_WRITES)
def test_pg_text_write_is_published(PgSession, pg, region, sql):
    served, truth = stale_after(PgSession, pg, region, PEOPLE, _session_text(PgSession, sql))
    assert served == truth


def test_pg_exec_driver_sql_with_parameters(PgSession, pg, region):
    sql = "UPDATE s18_person SET name = %(name)s WHERE id = %(id)s"
    served, truth = stale_after(PgSession, pg, region, PEOPLE, _driver(pg, sql, {"name": "driver", "id": 2}))
    assert served == truth


def test_pg_rule_on_a_table_writes_another(PgSession, pg, region):
    # A rule is in the catalog (pg_rewrite/pg_depend) like a view's, but only
    # views' rules are read: DO ALSO on a plain table writes a table nobody publishes.
    with pg.begin() as conn:
        conn.exec_driver_sql(
            "CREATE RULE s18_touch AS ON INSERT TO s18_address "
            "DO ALSO UPDATE s18_person SET name = name || '+' WHERE id = NEW.person_id"
        )

    def write():
        with PgSession() as session:
            session.add(SAddress(id=7, person_id=1, street="7 Main St"))
            session.commit()

    served, truth = stale_after(PgSession, pg, region, PEOPLE, write)
    assert served == truth


# 1b. SQL text that writes: SQLite --------------------------------------------------------------

SQLITE_WRITES = [
    pytest.param("REPLACE INTO s18_person (id, name) VALUES (1, 'replaced')", id="REPLACE INTO"),
    pytest.param("INSERT OR REPLACE INTO s18_person (id, name) VALUES (1, 'replaced')", id="INSERT OR REPLACE"),
    pytest.param(
        "INSERT INTO s18_person (id, name) VALUES (1, 'u') ON CONFLICT (id) DO UPDATE SET name = excluded.name",
        id="UPSERT",
    ),
    pytest.param(
        "UPDATE s18_person SET name = a.street FROM s18_address AS a WHERE a.id = s18_person.id", id="UPDATE FROM"
    ),
    pytest.param("DELETE FROM s18_person WHERE id = 3 RETURNING id, name", id="DELETE RETURNING"),
    pytest.param("UPDATE OR IGNORE main.s18_person AS p SET name = 'x' WHERE p.id = 1", id="UPDATE OR IGNORE alias"),
    pytest.param(
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 2) "
        "DELETE FROM s18_person WHERE id IN r",
        id="WITH RECURSIVE DELETE ... IN r",
    ),
]


@pytest.mark.parametrize("via", ["text", "driver"])
@pytest.mark.parametrize("sql", SQLITE_WRITES)
def test_sqlite_text_write_is_published(SSession, sengine, region, sql, via):
    write = _driver(sengine, sql) if via == "driver" else _session_text(SSession, sql)
    served, truth = stale_after(SSession, sengine, region, PEOPLE, write)
    assert served == truth


def test_sqlite_attach_same_file_write_through_other_schema(SSession, sengine, region, tmp_path):
    path = sengine.url.database

    def write():
        with sengine.connect() as conn:
            conn.exec_driver_sql(f"ATTACH DATABASE '{path}' AS other")
            try:
                conn.exec_driver_sql("UPDATE other.s18_person SET name = 'through other' WHERE id = 1")
                conn.commit()
            finally:
                conn.exec_driver_sql("DETACH DATABASE other")

    served, truth = stale_after(SSession, sengine, region, PEOPLE, write)
    assert served == truth


def test_sqlite_instead_of_trigger_on_a_view_declared(sengine, region_options, region):
    # A view with an INSTEAD OF trigger, declared with writes_also as documented.
    from sqlalchemy.orm import sessionmaker

    from pyramid_sessioncache import SessionCache

    from .conftest import SECRET

    with sengine.begin() as conn:
        conn.exec_driver_sql("CREATE VIEW s18_pv AS SELECT id, name FROM s18_person")
        conn.exec_driver_sql(
            "CREATE TRIGGER s18_pv_up INSTEAD OF UPDATE ON s18_pv "
            "BEGIN UPDATE s18_person SET name = NEW.name WHERE id = OLD.id; END"
        )
    cache = SessionCache(region_options, secret=SECRET, writes_also={"s18_pv": ["s18_person"]})
    Sess = sessionmaker(bind=sengine, info=cache.session_info())
    served, truth = stale_after(
        Sess, sengine, region, PEOPLE, _driver(sengine, "UPDATE s18_pv SET name = 'via view' WHERE id = 1")
    )
    assert served == truth


# 2. Fragments that read tables nobody names (PostgreSQL) ---------------------------------------

OPERATOR = """
CREATE FUNCTION s18_has_n(p integer, n integer) RETURNS boolean LANGUAGE sql STABLE
    AS 'SELECT count(*) >= n FROM s18_address WHERE person_id = p';
CREATE OPERATOR ### (LEFTARG = integer, RIGHTARG = integer, FUNCTION = s18_has_n);
CREATE FUNCTION s18_addr_n(s18_person) RETURNS bigint LANGUAGE sql STABLE
    AS 'SELECT count(*) FROM s18_address WHERE person_id = $1.id';
CREATE FUNCTION public.date(p integer) RETURNS bigint LANGUAGE sql STABLE
    AS 'SELECT count(*) FROM s18_address WHERE person_id = p';
"""


def _add_third_address(PgSession):
    def write():
        with PgSession() as session:
            session.add(SAddress(id=7, person_id=1, street="7 Main St"))
            session.commit()

    return write


@pytest.fixture
def pg_functions(pg):
    with pg.begin() as conn:
        conn.exec_driver_sql(OPERATOR)
    return pg


def test_pg_custom_operator_in_a_text_fragment(PgSession, pg_functions, region):
    # The operator's function reads s18_address; the fragment names no function call.
    stmt = select(SPerson.id, SPerson.name).where(text("s18_person.id ### 3")).order_by(SPerson.id)
    served, truth = stale_after(PgSession, pg_functions, region, stmt, _add_third_address(PgSession))
    assert served == truth


def test_pg_custom_operator_through_core_op(PgSession, pg_functions, region):
    # Custom operators in Core are not cached at all (the second run misses): safe.
    # What matters is that nothing stale is served after the write.
    stmt = select(SPerson.id, SPerson.name).where(SPerson.id.bool_op("###")(3)).order_by(SPerson.id)
    cached(PgSession, region, stmt)
    with counting(pg_functions) as seen:
        cached(PgSession, region, stmt)
    print("second run sent", len(seen), "statements (0 = a hit)")
    _add_third_address(PgSession)()
    assert cached(PgSession, region, stmt) == uncached(pg_functions, stmt) == [(1, "person 1")]


def test_pg_attribute_notation_calls_a_function_in_literal_column(PgSession, pg_functions, region):
    # PostgreSQL's functional notation: s18_person.s18_addr_n is s18_addr_n(s18_person), no "(".
    stmt = select(SPerson.id, literal_column("s18_person.s18_addr_n").label("n")).order_by(SPerson.id)
    served, truth = stale_after(PgSession, pg_functions, region, stmt, _add_third_address(PgSession))
    assert served == truth


def test_pg_attribute_notation_as_a_core_column(PgSession, pg_functions, region):
    # No SQL text at all: a Table whose "column" is a function of the row type.
    person = Table("s18_person", MetaData(), Column("id", Integer, primary_key=True), Column("s18_addr_n", Integer))
    stmt = select(person.c.id, person.c.s18_addr_n).order_by(person.c.id)
    served, truth = stale_after(PgSession, pg_functions, region, stmt, _add_third_address(PgSession))
    assert served == truth


@pytest.mark.parametrize("how", ["text", "func"])
def test_pg_user_function_overloading_a_pure_name(PgSession, pg_functions, region, how):
    # date(integer) is no PostgreSQL function: the application's overload of a
    # name on the "pure" list is called, and it reads s18_address.
    from sqlalchemy import func

    n = literal_column("date(s18_person.id)") if how == "text" else func.date(SPerson.id)
    stmt = select(SPerson.id, n.label("n")).order_by(SPerson.id)
    served, truth = stale_after(PgSession, pg_functions, region, stmt, _add_third_address(PgSession))
    assert served == truth


# 3. Every entrance refuses SQL text that writes, before it runs ---------------------------------


def _refused_and_not_run(Sess, engine, run, check_sql):
    before = uncached(engine, check_sql)
    with counting(engine) as seen, pytest.raises(NotCacheableError), Sess() as session:
        run(session)
        session.commit()
    assert [s for s in seen if not s.strip().upper().startswith(("SELECT", "BEGIN", "ROLLBACK", "SHOW"))] == []
    assert uncached(engine, check_sql) == before


ENTRANCE_PG = [
    pytest.param("EXPLAIN ANALYZE DELETE FROM s18_person WHERE id = 3", id="EXPLAIN ANALYZE DELETE"),
    pytest.param(
        "WITH RECURSIVE r(n) AS (SELECT 1) UPDATE s18_person SET name = 'w' FROM r WHERE id = r.n RETURNING id",
        id="WITH RECURSIVE UPDATE RETURNING",
    ),
    pytest.param("SELECT 1 AS id; DELETE FROM s18_person WHERE id = 3", id="SELECT; DELETE"),
    pytest.param("MERGE INTO s18_person p USING s18_address a ON p.id = a.id WHEN MATCHED THEN DELETE", id="MERGE"),
]


@pytest.mark.parametrize("how", ["FromCache", "cached_query", "from_statement"])
@pytest.mark.parametrize("sql", ENTRANCE_PG)
def test_pg_entrances_refuse_text_writes(PgSession, pg, region, sql, how):
    def run(session):
        columns = text(sql).columns(id=String)
        if how == "FromCache":
            session.execute(columns.options(FromCache(region))).all()
        elif how == "cached_query":
            cached_query(session, columns, region=region).all()
        else:
            session.execute(select(SPerson).from_statement(text(sql)).options(FromCache(region))).all()

    _refused_and_not_run(PgSession, pg, run, PEOPLE)


@pytest.mark.parametrize("how", ["FromCache", "cached_query"])
def test_sqlite_entrances_refuse_delete_returning(SSession, sengine, region, how):
    sql = "DELETE FROM s18_person WHERE id = 3 RETURNING id, name"

    def run(session):
        stmt = select(SPerson).from_statement(text(sql))
        if how == "FromCache":
            session.execute(stmt.options(FromCache(region))).all()
        else:
            cached_query(session, stmt, region=region).all()

    _refused_and_not_run(SSession, sengine, run, PEOPLE)


def test_sqlite_from_statement_of_update_returning_is_not_cached(SSession, sengine, region):
    # Not text: an ORM from_statement() of UPDATE ... RETURNING with FromCache.
    stmt = (
        select(SPerson)
        .from_statement(update(SPerson).where(SPerson.id == 1).values(name=SPerson.name + "!").returning(SPerson))
        .options(FromCache(region))
    )
    outcomes = []
    for _ in range(2):
        try:
            with SSession() as session:
                with counting(sengine) as seen:
                    session.execute(stmt).all()
                session.commit()
            outcomes.append([s for s in seen if s.lstrip().upper().startswith("UPDATE")])
        except NotCacheableError:
            outcomes.append("refused")
    name = uncached(sengine, select(SPerson.name).where(SPerson.id == 1))
    print(outcomes, name)
    assert outcomes == ["refused", "refused"] or name == [("person 1!!",)]


# 4. Threads: writers and readers through a real server ----------------------------------------


def _names_text(request):
    stmt = text("SELECT id, name FROM person WHERE id IN (1, 2) ORDER BY id").columns(id=Integer, name=String)
    return {str(id_): name for id_, name in request.cached_query(stmt, region="shared").all()}


def _names_orm(request):
    stmt = select(Person.id, Person.name).where(Person.id.in_([1, 2])).order_by(Person.id)
    return {str(id_): name for id_, name in request.cached_query(stmt, region="shared").all()}


def _changed(request):
    # zope.sqlalchemy's own mark_changed (not the add-on's, which would also
    # declare the tables): pyramid_tm commits, invalidation stays automatic.
    zope.sqlalchemy.mark_changed(request.dbsession, transaction_manager=request.tm)


def _write(request):
    if request.params.get("via") == "text":
        request.dbsession.execute(text("UPDATE person SET name = :n WHERE id = 2"), {"n": request.params["name"]})
    else:
        request.dbsession.connection().exec_driver_sql(
            "UPDATE person SET name = ? WHERE id = 2", (request.params["name"],)
        )
    _changed(request)
    return {"ok": True}


def _dirty(request):
    # Writes a name that is never committed, reads through the cache in the
    # same transaction (both entrances), holds it a while, then fails.
    request.dbsession.connection().exec_driver_sql("UPDATE person SET name = ? WHERE id = 2", (request.params["name"],))
    _changed(request)
    _names_text(request)
    _names_orm(request)
    time.sleep(0.01)
    raise RuntimeError("rolled back on purpose")


def _app(db_url, region):
    settings = {
        "sqlalchemy.url": db_url,
        "cache.regions": "local_session, shared",
        "cache.local_session.type": "ext:local_session",
        "sessioncache.secret": "a test secret, long enough",
        **{f"cache.shared.{key}": value for key, value in region.items()},
    }
    config = Configurator(settings=settings)
    config.include("pyramid_sessioncache")
    for name, view, method in (
        ("text", _names_text, None),
        ("orm", _names_orm, None),
        ("write", _write, "POST"),
        ("dirty", _dirty, "POST"),
    ):
        config.add_route(name, f"/{name}")
        config.add_view(view, route_name=name, renderer="json", request_method=method)
    return config.make_wsgi_app()


def _get(base, path):
    with urllib.request.urlopen(base + path, timeout=20) as response:
        return json.load(response)


def _post(base, path, **params):
    data = urllib.parse.urlencode(params).encode()
    try:
        with urllib.request.urlopen(base + path, data=data, timeout=20) as response:
            return response.status
    except urllib.error.HTTPError as failed:
        return failed.code


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_threads_text_writes_never_stale_never_uncommitted(request, db_url, region_options, kind):
    use_region(request, region_options, kind)
    region = {"type": "memory"} if kind == "memory" else region_options["redis"]
    server = ThreadServer(_app(db_url, region), threads=8)
    base = server.url
    committed = {"version": 0}
    bad: list[tuple] = []
    done = threading.Event()
    reads = {"count": 0}

    def reader(path):
        while not done.is_set():
            floor = committed["version"]
            name = _get(base, path)["2"]
            reads["count"] += 1
            if name.startswith("uncommitted"):
                bad.append(("uncommitted", path, name))
            elif int(name.split()[-1]) < floor:
                bad.append(("stale", path, name, floor))

    readers = [threading.Thread(target=reader, args=(path,)) for path in ("/text", "/orm", "/text", "/orm")]
    try:
        assert _post(base, "/write", name="version 0") == 200
        for each in readers:
            each.start()
        for version in range(1, 31):
            assert _post(base, "/dirty", name=f"uncommitted {version}") == 500
            via = "text" if version % 2 else "driver"
            assert _post(base, "/write", name=f"version {version}", via=via) == 200
            committed["version"] = version
            time.sleep(0.003)
        # Enough reads, however the machine shared its time between readers and the writer.
        deadline = time.monotonic() + 60
        while reads["count"] <= 30 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        done.set()
        for each in readers:
            each.join(timeout=30)
        server.stop()
    # The cache serves hits (no SQL on a second read), and ends on what a fresh Session reads.
    from sqlalchemy import create_engine, event
    from sqlalchemy.engine import Engine

    sent = []

    def count(conn, cursor, statement, parameters, context, executemany):
        sent.append(statement)

    server = ThreadServer(_app(db_url, region), threads=2)
    base = server.url
    try:
        for path in ("/text", "/orm"):
            first = _get(base, path)
            event.listen(Engine, "before_cursor_execute", count)
            try:
                assert _get(base, path) == first == {"1": "person 1", "2": "version 30"}
            finally:
                event.remove(Engine, "before_cursor_execute", count)
        assert [s for s in sent if "person" in s] == []
    finally:
        server.stop()

    engine = create_engine(db_url)
    truth = rows(Session(engine).execute(select(Person.name).where(Person.id == 2)))
    engine.dispose()
    assert truth == [("version 30",)]
    assert reads["count"] > 30
    assert bad == []
