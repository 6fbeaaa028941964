"""Attack s33-review2: the mended found_by, streaming close, private rows, catalog and subrequest fixes (6b400b3).

Each cached read is compared with the same statement run uncached on the same
database (SQLite files in tmp_path, real Pyramid applications through WebTest);
hits are proved by counting SQL.  What it found is fixed; these tests guard it.
"""

# ruff: noqa: F811  (fixtures imported from test_attack_s33_requests are arguments of the tests here)
from __future__ import annotations

import gc

import pytest
from pyramid.request import Request
from pyramid.response import Response
from sqlalchemy import Column, Integer, MetaData, String, Table, select, text, union_all
from sqlalchemy.orm import Bundle, aliased, sessionmaker
from sqlalchemy.orm import Session as PlainSession
from webtest import TestApp

from pyramid_sessioncache import SessionCache, cached_query

from .conftest import SECRET, SQLCounter
from .models import Address, Person
from .test_attack_s33_requests import (  # noqa: F401 (fixtures)
    assert_clean,
    cached_and_uncached,
    check,
    commit_in_another_process,
    make_memory,
    name_of,
    scenario,
    thread_local_app,
)
from .test_attack_s33_review import Sess, ent, outcome, served  # noqa: F401 (fixtures)

PERSON = Person.__table__
ADDRESS = Address.__table__
#: The ``person`` table under column keys other than its column names.
PERSON_KEYED = Table(
    "person",
    MetaData(),
    Column("id", Integer, key="pk", primary_key=True),
    Column("name", String, key="label"),
)
_P = aliased(Person, name="p")
_B = Bundle("b", Person.id, Person.name)
_SUB = select(Person.id, Person.name).where(Person.id <= 2).subquery()
_PSUB = aliased(Person, select(Person).where(Person.id <= 2).subquery())
_CTE = select(Person.id).where(Person.id <= 2).cte()


@pytest.fixture(params=["local", "memory", "file"])
def reg(request) -> str:
    """``ext:local_session``, ``memory``, then ``file`` (pickled: found_by is not stored)."""
    return request.param


# --- Defects: found_by -------------------------------------------------------------------------------

TEXTUAL_POSITIONAL = {
    "column keys other than their names": (
        lambda: text("SELECT id, name FROM person WHERE id <= 2 ORDER BY id").columns(
            PERSON_KEYED.c.pk, PERSON_KEYED.c.label
        ),
        lambda r: [(row._mapping[PERSON_KEYED.c.pk], row._mapping[PERSON_KEYED.c.label], row._fields) for row in r],
    ),
    "SQL labels other than the columns' names": (
        lambda: text("SELECT id AS a, name AS b FROM person WHERE id <= 2 ORDER BY id").columns(
            PERSON.c.id, PERSON.c.name
        ),
        lambda r: [(row._mapping[PERSON.c.id], row._mapping[PERSON.c.name], row._fields) for row in r],
    ),
    "SQL in another order than the columns": (
        lambda: text("SELECT name, id FROM person WHERE id <= 2 ORDER BY id").columns(PERSON.c.id, PERSON.c.name),
        lambda r: [(row._mapping[PERSON.c.id], row._mapping[PERSON.c.name], row._fields) for row in r],
    ),
    "fewer columns, SQL in another order": (
        lambda: text("SELECT name, id FROM person WHERE id <= 2 ORDER BY id").columns(PERSON.c.id),
        lambda r: [(row._mapping[PERSON.c.id], row._fields) for row in r],
    ),
}


@pytest.mark.parametrize("shape", TEXTUAL_POSITIONAL)
def test_text_columns_given_positionally_are_found_by_position_as_uncached(engine, Sess, reg, shape):
    """``text().columns(*cols)``: each column found at its position, whatever the SQL names it, as uncached."""
    make, use = TEXTUAL_POSITIONAL[shape]
    expected, got = served(engine, Sess, reg, make, use)
    assert got == [expected] * 3


def test_a_union_of_attributes_is_not_found_by_attribute_where_uncached_is_not(engine, Sess, reg):
    """``union_all(select(Person.id), select(Address.id))``: read by ``Person.id`` as uncached (KeyError)."""
    expected, got = served(
        engine,
        Sess,
        reg,
        lambda: union_all(select(Person.id).where(Person.id == 1), select(Address.id).where(Address.id == 2)),
        lambda r: [(row._mapping[Person.id], row._fields) for row in r],
    )
    assert got == [expected] * 3


# --- Defects: streaming ---------------------------------------------------------------------------------


def _db_stream(request, n=3):
    """A generator reading ``n`` names through ``request.dbsession`` as it is sent."""

    def body():
        for pid in range(1, n + 1):
            yield request.dbsession.execute(name_of(pid)).scalar_one().encode() + b";"

    return body()


STREAMED = b"person 1;person 2;person 3;"


def _streamed(conditional=True, length=True):
    """A view streaming :func:`_db_stream` with an ETag, conditional and of known length (Range, 304, HEAD)."""

    def view(request):
        response = Response(app_iter=_db_stream(request), conditional_response=conditional)
        if length:
            response.content_length = len(STREAMED)
        response.etag = "abc"
        return response

    return view


def test_a_range_request_to_a_stream_leaves_nothing_checked_out(make_memory):
    """A Range request to a conditional streamed response that uses the DB: nothing checked out, then or later."""
    app = make_memory()
    scenario(_streamed(), sub=lambda request: {"n": request.dbsession.execute(name_of(4)).scalar_one()})
    gc.disable()  # a Session left open is found before a collection returns its connection
    try:
        assert TestApp(app).get("/run", headers={"Range": "bytes=2-10"}, status=206).body == STREAMED[2:11]
        for _ in range(3):  # the thread's next requests
            assert TestApp(app).get("/sub").json == {"n": "person 4"}
        assert_clean(app)
    finally:
        gc.enable()


# --- Guards ------------------------------------------------------------------------------------------------

HELD = {
    "text().columns() by keyword types": (
        lambda: text("SELECT name, id FROM person WHERE id <= 2 ORDER BY id").columns(id=Integer, name=String),
        lambda r: [(row.id, row.name, row._fields) for row in r],
    ),
    "text().columns() of ORM attributes": (
        lambda: text("SELECT id, name FROM person WHERE id <= 2 ORDER BY id").columns(Person.id, Person.name),
        lambda r: [(row._mapping[Person.id], row._mapping[Person.name]) for row in r],
    ),
    "union of ORM entities": (
        lambda: union_all(select(Person).where(Person.id == 1), select(Person).where(Person.id == 2)),
        lambda r: [(row._mapping[PERSON.c.id], row._mapping[Person.id], row._fields) for row in r],
    ),
    "exists": (
        lambda: select(select(Person.id).where(Person.id == 1).exists()),
        lambda r: [tuple(row) for row in r],
    ),
    "scalar subquery": (
        lambda: select(select(Person.name).where(Person.id == 1).scalar_subquery(), Person.id).where(Person.id < 3),
        lambda r: [(row._mapping[Person.id], row._fields, tuple(row)) for row in r],
    ),
    "bundle": (
        lambda: select(_B).where(Person.id <= 2).order_by(Person.id),
        lambda r: [(row.b.id, row.b.name, row._fields) for row in r],
    ),
    "select of a subquery": (
        lambda: select(_SUB).order_by(_SUB.c.id),
        lambda r: [(row._mapping[_SUB.c.id], row._mapping[_SUB.c.name], row._fields) for row in r],
    ),
    "entity aliased to a subquery": (
        lambda: select(_PSUB).order_by(_PSUB.id),
        lambda r: [(ent(row._mapping[_PSUB]), row._fields) for row in r],
    ),
    "CTE column and attribute": (
        lambda: select(_CTE.c.id, Person.name).join(Person, Person.id == _CTE.c.id).order_by(_CTE.c.id),
        lambda r: [(row._mapping[_CTE.c.id], row._mapping[Person.name], row._fields) for row in r],
    ),
    "named alias": (
        lambda: select(_P).where(_P.id <= 2).order_by(_P.id),
        lambda r: [(ent(row.p), ent(row._mapping[_P]), row._fields) for row in r],
    ),
    "entity and column of a named alias": (
        lambda: select(_P, _P.name).where(_P.id <= 2).order_by(_P.id),
        lambda r: [(ent(row._mapping[_P]), row._mapping[_P.name], row._fields) for row in r],
    ),
}


@pytest.mark.parametrize("shape", HELD)
def test_other_shapes_are_read_as_uncached(engine, Sess, reg, shape):
    """Keyword-typed text(), unions of entities, exists, scalar subqueries, bundles, named aliases: as uncached."""
    make, use = HELD[shape]
    expected, got = served(engine, Sess, reg, make, use)
    assert got == [expected] * 3


def test_a_query_and_a_select_of_the_same_columns_are_each_read_as_uncached(engine, Sess, reg):
    """``session.query(A.x, A.y)`` then ``select(A.x, A.y)``: each read by attribute as uncached."""

    def use(r):
        return [(row._mapping[Person.id], row._mapping[Person.name], row._fields) for row in r]

    def query(session):
        return session.query(Person.id, Person.name).filter(Person.id <= 2).order_by(Person.id)

    stmt = select(Person.id, Person.name).where(Person.id <= 2).order_by(Person.id)
    with PlainSession(engine) as plain:
        expected = (outcome(use, query(plain)), outcome(use, plain.execute(stmt)))
    with Sess() as session:
        got = (outcome(use, cached_query(session, query(session), reg)), outcome(use, cached_query(session, stmt, reg)))
    assert got == expected


STREAMS = {
    "304": ({"If-None-Match": '"abc"'}, "get", 304),
    "HEAD": ({}, "head", 200),
    "GET": ({}, "get", 200),
}


@pytest.mark.parametrize("kind", STREAMS)
def test_streams_sent_whole_or_not_at_all_leave_nothing_checked_out(make_memory, kind):
    """A conditional streamed response using the DB, answered 304, to HEAD, or sent: nothing checked out."""
    headers, method, status = STREAMS[kind]
    app = make_memory()
    scenario(_streamed())
    gc.disable()
    try:
        for _ in range(2):
            res = getattr(TestApp(app), method)("/run", headers=headers, status=status)
            assert res.body == (STREAMED if kind == "GET" else b"")
            assert_clean(app)
    finally:
        gc.enable()


def test_a_stream_failing_midway_leaves_nothing_checked_out(make_memory):
    """A generator raising after its first query: nothing checked out, the next request served."""
    app = make_memory()

    def view(request):
        def body():
            yield request.dbsession.execute(name_of(1)).scalar_one().encode()
            raise RuntimeError("midway")

        return Response(app_iter=body())

    scenario(view, sub=lambda request: {})
    gc.disable()
    try:
        with pytest.raises(RuntimeError):
            TestApp(app).get("/run")
        assert_clean(app)
        assert TestApp(app).get("/sub").status_int == 200
        assert_clean(app)
    finally:
        gc.enable()


def test_a_subrequest_streaming_whose_body_is_never_read(make_memory):
    """A subrequest answering a DB stream the parent never reads: the parent's Session serves on, nothing left."""
    app = make_memory()

    def view(request):
        request.dbsession.execute(name_of(1)).scalar_one()
        request.invoke_subrequest(Request.blank("/sub"))
        return {"ok": request.dbsession.execute(name_of(2)).scalar_one()}

    scenario(view, sub=lambda request: Response(app_iter=_db_stream(request)))
    gc.disable()
    try:
        for _ in range(2):
            assert TestApp(app).get("/run").json == {"ok": "person 2"}
            assert_clean(app)
    finally:
        gc.enable()


# --- Defects: local cache of an application's own Session ---------------------------------------------------


def test_jobs_run_as_subrequests_of_a_script_do_not_read_each_others_local_entries(db_url, check):
    """A worker script (``prepare()``) running each job by ``invoke_subrequest``: each job's local cache starts empty."""
    import subprocess
    import sys

    from pyramid.scripting import prepare

    from .conftest import truth

    config, meta_session, engine = thread_local_app(db_url)
    stmt = name_of(1)

    job = cached_and_uncached(stmt)

    config.add_route("job", "/job")
    config.add_view(job, route_name="job", renderer="json")
    app = config.make_wsgi_app()
    env = prepare(registry=app.registry)
    try:
        run = app.invoke_subrequest  # the app bootstrap() returns, as a worker runs a job
        assert run(Request.blank("/job"), use_tweens=True).json == {"cached": "person 1", "uncached": "person 1"}
        code = (
            "import sys; from sqlalchemy import create_engine, text\n"
            "engine = create_engine(sys.argv[1])\n"
            "with engine.begin() as conn: conn.execute(text('UPDATE person SET name = :n WHERE id = 1'), {'n': 'job 2'})\n"
        )
        subprocess.run([sys.executable, "-c", code, db_url], check=True, timeout=60)
        assert truth(check, stmt) == [("job 2",)]
        page = run(Request.blank("/job"), use_tweens=True).json  # the next job
        assert page["uncached"] == "job 2"
        assert page["cached"] == page["uncached"]
    finally:
        env["closer"]()
        meta_session.remove()
        engine.dispose()


# --- Defects: raw_connect's record -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attribute",
    [
        "info",
        "record_info",
    ],
)
def test_the_catalog_is_kept_with_a_do_connect_listener_reading_the_record(pg_url, monkeypatch, attribute):
    """A ``do_connect`` listener reading the pool's record (``info``, ``record_info``): catalog read once, then kept."""
    from sqlalchemy import create_engine, event

    from pyramid_sessioncache.engine.invalidation import schema

    engine = create_engine(pg_url)

    @event.listens_for(engine, "do_connect")
    def _connect(dialect, conn_rec, cargs, cparams):
        getattr(conn_rec, attribute).setdefault("connects", 0)

    with engine.connect():  # the pool's own connections: the listener works
        pass
    cache = SessionCache({"memory": {"type": "memory"}}, default_region="memory", secret=SECRET)
    Sess = sessionmaker(engine, info=cache.session_info())
    read = []
    original = schema._Schema._read_postgresql_catalog
    monkeypatch.setattr(
        schema._Schema, "_read_postgresql_catalog", staticmethod(lambda *a: read.append(1) or original(*a))
    )
    try:
        schema.forget_catalog()
        reads = []
        for person in (1, 2, 3):
            with Sess() as session:
                before = len(read)
                statement = select(Person.name).where(Person.id == person)
                assert cached_query(session, statement, "memory").scalar_one() == f"person {person}"
                reads.append(len(read) - before)
        assert reads == [1, 0, 0]  # read once, then kept
    finally:
        cache.close()
        engine.dispose()


# --- found_by under threads ---------------------------------------------------------------------------------


def test_threads_alternating_a_core_and_an_orm_statement_on_one_entry_each_read_by_their_own(engine, region_options):
    """Four threads alternate ``select(table.c...)`` and ``select(Class.attr...)`` on one ``memory`` entry: no torn read."""
    import threading

    cache = SessionCache(region_options, default_region="local", secret=SECRET)
    Sess = sessionmaker(bind=engine, info=cache.session_info())
    core = select(PERSON.c.id, PERSON.c.name).where(PERSON.c.id <= 3).order_by(PERSON.c.id)
    orm = select(Person.id, Person.name).where(Person.id <= 3).order_by(Person.id)
    with PlainSession(engine) as plain:
        expected = {
            "core": [(r._mapping[PERSON.c.id], r._mapping[PERSON.c.name]) for r in plain.execute(core)],
            "orm": [(r._mapping[Person.id], r._mapping[Person.name]) for r in plain.execute(orm)],
            "orm_on_core": outcome(lambda res: [r._mapping[Person.id] for r in res], plain.execute(core)),
        }
    with Sess() as session:
        cached_query(session, core, "memory").all()
        cached_query(session, orm, "memory").all()
    failures: list = []
    start = threading.Barrier(4)

    def reader(offset):
        try:
            with Sess() as session, SQLCounter(engine) as sql:
                start.wait()
                for i in range(150):
                    if (i + offset) % 2:
                        rows = cached_query(session, core, "memory").all()
                        got = [(r._mapping[PERSON.c.id], r._mapping[PERSON.c.name]) for r in rows]
                        assert got == expected["core"]
                        assert (
                            outcome(lambda res: [r._mapping[Person.id] for r in res], rows) == expected["orm_on_core"]
                        )
                    else:
                        rows = cached_query(session, orm, "memory").all()
                        assert [(r._mapping[Person.id], r._mapping[Person.name]) for r in rows] == expected["orm"]
            assert sql.count == 0, sql.statements
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    cache.close()
    assert failures == []


# --- streaming under waitress ---------------------------------------------------------------------------------


def _waitress_run(app, requests, threads=4):
    """``requests`` ((headers, expected body), ...) sent by as many client threads to ``app`` under waitress."""
    import threading
    import urllib.request

    from .conftest import ThreadServer

    server = ThreadServer(app, threads=threads)
    failures: list = []

    def client(batch):
        try:
            for headers, body in batch:
                with urllib.request.urlopen(
                    urllib.request.Request(server.url + "/run", headers=headers), timeout=30
                ) as r:
                    assert r.read() == body
        except BaseException as exc:  # reported below
            failures.append(exc)

    batches = [requests[i::threads] for i in range(threads)]
    clients = [threading.Thread(target=client, args=(batch,)) for batch in batches]
    try:
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(60)
    finally:
        server.stop()
    assert failures == []


def test_concurrent_streams_under_waitress_leave_nothing_checked_out(make_memory):
    """Four waitress threads serving whole DB streams side by side: nothing checked out after."""
    app = make_memory()
    scenario(_streamed())
    gc.disable()
    try:
        _waitress_run(app, [({}, STREAMED)] * 24)
        assert app.engine.pool.checkedout() == 0
    finally:
        gc.enable()


def test_range_requests_under_waitress_leave_nothing_checked_out(make_memory):
    """Range requests to a DB stream under waitress, among whole GETs: nothing checked out after."""
    app = make_memory()
    scenario(_streamed())
    gc.disable()
    try:
        _waitress_run(app, [({"Range": "bytes=2-10"}, STREAMED[2:11]), ({}, STREAMED)] * 4, threads=2)
        assert app.engine.pool.checkedout() == 0
    finally:
        gc.enable()


def test_a_range_request_to_a_plain_stream_closes_a_finished_callbacks_session(make_memory):
    """A stream of constant chunks, a finished callback reading the DB, a Range request: nothing checked out after."""
    app = make_memory()

    def view(request):
        request.dbsession.execute(name_of(4)).scalar_one()  # closed by its finished callback, before the app's
        request.add_finished_callback(lambda request: request.dbsession.execute(name_of(5)).scalar_one())
        response = Response(app_iter=iter([b"abcdef", b"ghijkl"]), conditional_response=True)
        response.content_length = 12
        return response

    scenario(view, sub=lambda request: {})
    gc.disable()
    try:
        assert TestApp(app).get("/run", headers={"Range": "bytes=2-8"}, status=206).body == b"cdefghi"
        for _ in range(2):  # the thread's next requests
            TestApp(app).get("/sub")
        assert_clean(app)
    finally:
        gc.enable()


def test_a_plain_stream_closes_a_finished_callbacks_session(make_memory):
    """A stream of constant chunks, a finished callback reading the DB, a whole GET: nothing checked out after."""
    app = make_memory()

    def view(request):
        request.dbsession.execute(name_of(4)).scalar_one()  # closed by its finished callback, before the app's
        request.add_finished_callback(lambda request: request.dbsession.execute(name_of(5)).scalar_one())
        return Response(app_iter=iter([b"abcdef", b"ghijkl"]))

    scenario(view, sub=lambda request: {})
    gc.disable()
    try:
        assert TestApp(app).get("/run").body == b"abcdefghijkl"
        assert_clean(app)
    finally:
        gc.enable()


def test_a_retried_request_streaming_on_its_last_attempt_leaves_nothing_checked_out(make_memory):
    """pyramid_retry: attempt 1 reads then fails retryably, attempt 2 streams from the DB: sent whole, nothing left."""
    from pyramid_retry import RetryableException

    app = make_memory(**{"retry.attempts": "3"})
    attempts = []

    def view(request):
        attempts.append(request.dbsession.execute(name_of(1)).scalar_one())
        if len(attempts) == 1:
            raise RetryableException("again")
        return Response(app_iter=_db_stream(request))

    scenario(view, sub=lambda request: {})
    gc.disable()
    try:
        assert TestApp(app).get("/run").body == STREAMED
        assert attempts == ["person 1", "person 1"]
        assert_clean(app)
        TestApp(app).get("/sub")
        assert_clean(app)
    finally:
        gc.enable()


def test_a_stream_relaying_a_subrequests_stream_leaves_nothing_checked_out(make_memory):
    """A stream ``yield from`` a subrequest's DB stream, read whole: nothing checked out, then or later."""
    app = make_memory()

    def view(request):
        sub = request.invoke_subrequest(Request.blank("/sub"))

        def body():
            yield b"<"
            yield from sub.app_iter
            yield b">"

        return Response(app_iter=body())

    scenario(view, sub=lambda request: Response(app_iter=_db_stream(request)))
    gc.disable()
    try:
        assert TestApp(app).get("/run").body == b"<" + STREAMED + b">"
        scenario(lambda request: {}, sub=lambda request: {})
        for _ in range(2):  # the thread's next requests
            TestApp(app).get("/run")
        assert_clean(app)
    finally:
        gc.enable()
