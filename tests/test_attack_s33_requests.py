"""Attacks on the Pyramid request lifecycle (session s33-a): retries, vetoes, exception views, subrequests.

Each test runs a real Pyramid application (WebTest or waitress, a SQLite
file, ``config.include("pyramid_sessioncache")``, pyramid_tm, and
pyramid_retry where it says so) whose view is set by the test itself
(``scenario()``), and checks what its cached reads return against the
same query run uncached (``conftest.truth()``), and hits by counting SQL
(``conftest.SQLCounter``).
"""

from __future__ import annotations

import gc
import threading
import time
import urllib.request

import pytest
import transaction
from pyramid.config import Configurator
from pyramid.httpexceptions import HTTPBadRequest
from pyramid.request import Request
from pyramid.response import Response
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as PlainSession
from webtest import TestApp

import pyramid_sessioncache
from pyramid_sessioncache.addon.interfaces import IDBSessionFactory, ISessionCache

from .conftest import SECRET, SQLCounter, ThreadServer, truth
from .models import Person

#: The view each test runs at /run: set by the test (``scenario()``).
SCENARIO: dict = {}


class Boom(Exception):
    """Raised by a view so that pyramid_tm aborts; rendered by :func:`boom_view`."""


def name_of(pid):
    return select(Person.name).where(Person.id == pid)


def person(pid):
    return select(Person).where(Person.id == pid)


def run(request):
    result = SCENARIO["view"](request)
    return result if result is not None else {}


def boom_view(exc, request):
    handler = SCENARIO.get("excview")
    if handler is not None:
        handler(request)
    return Response("aborted", status=500)


def integrity_view(exc, request):
    SCENARIO["excview"](request)
    return Response("integrity", status=409)


def region_settings(request, name, tmp_path) -> dict:
    if name == "memory":
        return {"type": "memory", "expire": "60"}
    if name == "file":
        return {"type": "file", "data_dir": str(tmp_path / "cache"), "lock_dir": str(tmp_path / "locks")}
    url = request.getfixturevalue("redis_url")
    if name == "redis":
        return {"type": "ext:redis", "url": url}
    return {"type": "ext:redis", "url": url, "near": "true"}


def make_app(db_url, shared: dict, **settings):
    config = Configurator(
        settings={
            "sqlalchemy.url": db_url,
            "cache.regions": "local_session, shared",
            "cache.local_session.type": "ext:local_session",
            "sessioncache.default_region": "local_session",
            "sessioncache.secret": SECRET,
            **{f"cache.shared.{key}": value for key, value in shared.items()},
            **settings,
        }
    )
    if settings.get("retry.attempts"):
        config.include("pyramid_retry")
    config.include("pyramid_sessioncache")
    config.add_route("run", "/run")
    config.add_view(run, route_name="run", renderer="json")
    config.add_route("sub", "/sub")
    config.add_view(lambda request: SCENARIO["sub"](request) or {}, route_name="sub", renderer="json")
    config.add_view(boom_view, context=Boom)
    config.add_view(integrity_view, context=IntegrityError)
    app = config.make_wsgi_app()
    app.engine = app.registry.getUtility(IDBSessionFactory).kw["bind"]
    return app


@pytest.fixture(params=["memory", "file", "redis"])
def shared(request, tmp_path) -> dict:
    """The options of each shared region in turn."""
    return region_settings(request, request.param, tmp_path)


def _apps(db_url, shared):
    """``make(**settings)``: the application with ``shared`` as region "shared"; caches closed, engines disposed of after."""
    made = []

    def make(**settings):
        app = make_app(db_url, shared, **settings)
        made.append(app)
        return app

    SCENARIO.clear()
    yield make
    SCENARIO.clear()
    for app in made:
        app.registry.getUtility(ISessionCache).close()
        app.engine.dispose()


@pytest.fixture
def make(db_url, shared):
    """``make(**settings)`` with each shared region in turn."""
    yield from _apps(db_url, shared)


@pytest.fixture
def app(make):
    return make()


@pytest.fixture
def make_memory(db_url):
    """``make(**settings)`` with a ``memory`` shared region only: for what does not depend on the region."""
    yield from _apps(db_url, {"type": "memory", "expire": "60"})


@pytest.fixture
def check(db_url):
    """An engine of its own on the test's database: ``truth()`` and writes by "another program" of the process."""
    engine = create_engine(db_url)
    yield engine
    engine.dispose()


def scenario(view, **more):
    SCENARIO["view"] = view
    SCENARIO.update(more)


def shared_read(request, stmt):
    return request.cached_query(stmt, region="shared").all()


def read_view(stmt):
    def view(request):
        return {"rows": [list(row) for row in shared_read(request, stmt)]}

    return view


def served(app, stmt) -> tuple[list[tuple], int]:
    """The rows a new request reads of ``stmt`` through the shared region, and the SQL statements it sent."""
    sql = SQLCounter(app.engine)
    scenario(read_view(stmt))
    rows = [tuple(row) for row in TestApp(app).get("/run").json["rows"]]
    sql.stop()
    return rows, sql.count


def assert_clean(app):
    """No connection left checked out, nothing left joined to this thread's transaction."""
    assert app.engine.pool.checkedout() == 0
    current = transaction.manager.manager._txn
    assert current is None or current._resources == []


# --- pyramid_retry ---------------------------------------------------------------------------------------


def test_a_retry_after_a_conflicting_commit_reads_the_truth(make, check):
    """Attempt 1 hits a shared entry, another Session of the process commits a change, attempt 1 writes and fails."""
    app = make(**{"retry.attempts": "3"})
    stmt = name_of(1)
    assert served(app, stmt)[0] == [("person 1",)]
    assert served(app, stmt) == ([("person 1",)], 0)  # warm: a hit
    seen = []

    def view(request):
        seen.append(shared_read(request, stmt)[0][0])
        if len(seen) == 1:
            with PlainSession(check) as other:  # the conflicting writer, uncached, in this process
                other.execute(update(Person).where(Person.id == 1).values(name="conflict"))
                other.commit()
            request.dbsession.execute(update(Person).where(Person.id == 2).values(name="attempt 1"))
            seen.append(shared_read(request, name_of(2))[0][0])
            raise transaction.interfaces.TransientError("try again")

    scenario(view)
    TestApp(app).get("/run")
    assert seen == ["person 1", "attempt 1", "conflict"]
    assert served(app, stmt)[0] == truth(check, stmt) == [("conflict",)]
    assert served(app, name_of(2))[0] == truth(check, name_of(2)) == [("person 2",)]
    assert_clean(app)


def test_a_retried_attempt_does_not_serve_what_the_failed_one_stored_after_writing(make, check):
    """Attempt 1 writes, then misses a query of the written table: nothing it read may be stored for attempt 2."""
    app = make(**{"retry.attempts": "3"})
    stmt = select(Person.id, Person.name).where(Person.id <= 3).order_by(Person.id)
    seen = []

    def view(request):
        attempt = len(seen)
        if attempt == 0:
            request.dbsession.get(Person, 3).name = "uncommitted"
            request.dbsession.flush()
        seen.append([tuple(row) for row in shared_read(request, stmt)])
        if attempt == 0:
            raise transaction.interfaces.TransientError("try again")

    scenario(view)
    TestApp(app).get("/run")
    assert seen[0][2] == (3, "uncommitted")
    assert seen[1] == truth(check, stmt) and seen[1][2] == (3, "person 3")
    assert served(app, stmt) == (truth(check, stmt), 0)  # attempt 2 stored it: a hit, the truth
    assert_clean(app)


# --- tm.commit_veto -------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["orm flush", "text()", "returned 400", "raised 400"])
def test_a_vetoed_write_leaves_no_entry_behind(make, check, how):
    """A write then reads through the shared region in a request whose response pyramid_tm's veto aborts."""
    app = make(**{"tm.commit_veto": "pyramid_tm.default_commit_veto"})
    stmt, other = name_of(4), select(Person.name).where(Person.id.in_([4, 5])).order_by(Person.id)
    assert served(app, stmt)[0] == [("person 4",)]
    seen = []

    def view(request):
        if how == "text()":
            request.dbsession.execute(text("UPDATE person SET name = 'vetoed' WHERE id = 4"))
        else:
            request.dbsession.get(Person, 4).name = "vetoed"
            request.dbsession.flush()
        seen.append(shared_read(request, stmt)[0][0])
        seen.append([row[0] for row in shared_read(request, other)])
        if how == "raised 400":
            raise HTTPBadRequest()
        return HTTPBadRequest() if how != "orm flush" else Response("no", status=422)

    scenario(view)
    TestApp(app).get("/run", status=(400, 422))
    assert seen == ["vetoed", ["vetoed", "person 5"]]
    assert served(app, stmt) == (truth(check, stmt), 0)  # the entry of before the request
    rows, count = served(app, other)
    assert rows == truth(check, other) == [("person 4",), ("person 5",)]
    assert count > 0  # nothing the vetoed request read after its write was stored
    assert_clean(app)


# --- exception views ------------------------------------------------------------------------------------


@pytest.mark.parametrize("region", ["shared", "local_session"])
def test_an_exception_view_reads_the_aborted_requests_own_writes_and_stores_none(make, check, region):
    """The view wrote and raised: the exception view (inside pyramid_tm) sees the writes; nothing outlives the abort."""
    app = make()
    stmt = name_of(6)
    assert served(app, stmt)[0] == [("person 6",)]
    seen = []

    def view(request):
        request.dbsession.get(Person, 6).name = "raised"
        request.dbsession.flush()
        seen.append(request.cached_query(stmt, region=region).scalar_one())
        raise Boom()

    def excview(request):
        seen.append(request.cached_query(stmt, region=region).scalar_one())
        seen.append(request.cached_query(name_of(7), region=region).scalar_one())

    scenario(view, excview=excview)
    TestApp(app).get("/run", status=500)
    assert seen == ["raised", "raised", "person 7"]
    assert served(app, stmt) == (truth(check, stmt), 0)
    assert served(app, name_of(7))[0] == truth(check, name_of(7))
    assert_clean(app)


@pytest.mark.parametrize("cached", [False, True])
def test_an_exception_view_after_a_failed_flush_behaves_as_uncached(make, check, cached):
    """An IntegrityError view reads after the failed flush: a cached read does what the query does uncached."""
    app = make()
    stmt = name_of(8)
    assert served(app, stmt)[0] == [("person 8",)]
    outcome = []

    def view(request):
        request.dbsession.add(Person(id=1, name="duplicate"))
        request.dbsession.flush()

    def excview(request):
        try:
            if cached:
                outcome.append(request.cached_query(stmt, region="shared").scalar_one())
            else:
                outcome.append(request.dbsession.execute(stmt).scalar_one())
        except Exception as exc:
            outcome.append(type(exc).__name__)

    scenario(view, excview=excview)
    TestApp(app).get("/run", status=409)
    assert outcome == ["PendingRollbackError"]
    assert_clean(app)


# --- subrequests ----------------------------------------------------------------------------------------


def test_a_subrequest_with_its_own_manager_commits_and_its_parent_reads_it(make, check):
    """Explicit managers: a subrequest with tweens commits on its own; its parent's cached reads after it see it."""
    app = make(**{"tm.manager_hook": "pyramid_tm.explicit_manager"})
    stmt = name_of(9)
    assert served(app, stmt)[0] == [("person 9",)]
    seen = []

    def sub(request):
        request.dbsession.get(Person, 9).name = "by the subrequest"

    def view(request):
        seen.append(request.cached_query(stmt).scalar_one())  # local_session
        seen.append(shared_read(request, stmt)[0][0])
        request.invoke_subrequest(Request.blank("/sub"), use_tweens=True)
        seen.append(request.cached_query(stmt).scalar_one())
        seen.append(shared_read(request, stmt)[0][0])

    scenario(view, sub=sub)
    TestApp(app).get("/run")
    assert seen == ["person 9", "person 9", "by the subrequest", "by the subrequest"]
    assert served(app, stmt) == (truth(check, stmt), 0)
    assert_clean(app)


@pytest.mark.parametrize("then", ["commit", "raise"])
def test_a_subrequest_without_tweens_writes_in_its_parents_transaction(make, check, then):
    """The subrequest's Session writes in the parent's transaction: the parent's end decides, entries follow."""
    app = make()
    stmt = name_of(10)
    assert served(app, stmt)[0] == [("person 10",)]
    seen = []

    def sub(request):
        request.dbsession.get(Person, 10).name = "sub"
        request.dbsession.flush()
        seen.append(shared_read(request, stmt)[0][0])
        seen.append(request.cached_query(stmt).scalar_one())

    def view(request):
        request.invoke_subrequest(Request.blank("/sub"), use_tweens=False)
        if then == "raise":
            raise Boom()

    scenario(view, sub=sub)
    TestApp(app).get("/run", status=500 if then == "raise" else 200)
    assert seen == ["sub", "sub"]
    assert served(app, stmt)[0] == truth(check, stmt) == [("sub" if then == "commit" else "person 10",)]
    assert_clean(app)


def test_nested_subrequests_read_as_uncached_and_commit_with_the_outermost(make, check):
    """Subrequests (no tweens) two deep, the innermost writing: every level's cached read equals its uncached one."""
    app = make()
    stmt = name_of(11)
    assert served(app, stmt)[0] == [("person 11",)]
    seen = []

    def both(request, depth):
        seen.append((depth, shared_read(request, stmt)[0][0], request.dbsession.execute(stmt).scalar_one()))

    def sub(request):
        depth = int(request.params["depth"])
        both(request, depth)
        if depth == 2:
            request.dbsession.get(Person, 11).name = "depth 2"
            request.dbsession.flush()
        else:
            request.invoke_subrequest(Request.blank(f"/sub?depth={depth + 1}"), use_tweens=False)
        both(request, depth)

    def view(request):
        request.invoke_subrequest(Request.blank("/sub?depth=1"), use_tweens=False)
        both(request, 0)

    scenario(view, sub=sub)
    TestApp(app).get("/run")
    assert all(cached == uncached for _, cached, uncached in seen), seen
    assert [depth for depth, _, _ in seen] == [1, 2, 2, 1, 0]
    assert seen[2][1] == "depth 2"
    assert served(app, stmt)[0] == truth(check, stmt) == [("depth 2",)]
    assert_clean(app)


# --- request.tm by hand ---------------------------------------------------------------------------------


@pytest.mark.parametrize("manager", ["thread", "explicit"])
def test_a_view_committing_by_hand_mid_request(make, check, manager):
    """``request.tm.commit(); request.tm.begin()`` mid-view: the first part is committed and served, the rest aborted."""
    settings = {"tm.manager_hook": "pyramid_tm.explicit_manager"} if manager == "explicit" else {}
    app = make(**settings)
    stmt = name_of(12)
    assert served(app, stmt)[0] == [("person 12",)]
    seen = []

    def view(request):
        found = request.cached_query(person(12), region="shared").scalar_one()
        found.name = "first part"
        seen.append(shared_read(request, stmt)[0][0])
        request.tm.commit()
        request.tm.begin()
        seen.append(shared_read(request, stmt)[0][0])  # committed: read, and stored
        seen.append(request.cached_query(stmt).scalar_one())  # local_session
        request.dbsession.get(Person, 12).name = "second part"
        request.dbsession.flush()
        seen.append(shared_read(request, stmt)[0][0])
        raise Boom()

    scenario(view)
    TestApp(app).get("/run", status=500)
    assert seen == ["first part", "first part", "first part", "second part"]
    assert served(app, stmt) == (truth(check, stmt), 0) and truth(check, stmt) == [("first part",)]
    assert_clean(app)


@pytest.mark.parametrize("manager", ["thread", "explicit"])
def test_a_view_aborting_by_hand_then_reading(make, check, manager):
    """``request.tm.abort(); request.tm.begin()`` after a write: later cached reads are the truth, and are stored."""
    settings = {"tm.manager_hook": "pyramid_tm.explicit_manager"} if manager == "explicit" else {}
    app = make(**settings)
    stmt = name_of(13)
    seen = []

    def view(request):
        request.dbsession.get(Person, 13).name = "aborted by hand"
        request.dbsession.flush()
        seen.append(shared_read(request, stmt)[0][0])
        seen.append(request.cached_query(stmt).scalar_one())
        request.tm.abort()
        request.tm.begin()
        seen.append(shared_read(request, stmt)[0][0])
        seen.append(request.cached_query(stmt).scalar_one())

    scenario(view)
    TestApp(app).get("/run")
    assert seen == ["aborted by hand", "aborted by hand", "person 13", "person 13"]
    assert served(app, stmt) == (truth(check, stmt), 0)
    assert_clean(app)


def test_a_doomed_request_that_wrote_then_read_stores_nothing_it_wrote(make, check):
    """``request.tm.doom()`` after a flushed write: reads see the write, pyramid_tm aborts, no entry holds it."""
    app = make()
    stmt = select(Person.name).where(Person.id >= 19).order_by(Person.id)
    seen = []

    def view(request):
        request.dbsession.get(Person, 19).name = "doomed"
        request.dbsession.flush()
        request.tm.doom()
        seen.append([row[0] for row in shared_read(request, stmt)])

    scenario(view)
    TestApp(app).get("/run")
    assert seen == [["doomed", "person 20"]]
    rows, count = served(app, stmt)
    assert rows == truth(check, stmt) == [("person 19",), ("person 20",)] and count > 0
    assert_clean(app)


# --- callbacks, subscribers and the scoped Session --------------------------------------------------------


def test_response_and_finished_callbacks_read_what_the_view_committed(make, check):
    """After pyramid_tm committed the view's write, callbacks' cached reads (shared and local) see it."""
    app = make()
    stmt = name_of(14)
    assert served(app, stmt)[0] == [("person 14",)]
    seen = []

    def late(request, *args):
        seen.append(shared_read(request, stmt)[0][0])
        seen.append(request.cached_query(stmt).scalar_one())
        seen.append(pyramid_sessioncache.Session().scalar(stmt.options(pyramid_sessioncache.FromCache("shared"))))

    def view(request):
        request.cached_query(person(14), region="shared").scalar_one().name = "committed"
        request.add_response_callback(late)
        request.add_finished_callback(late)

    scenario(view)
    TestApp(app).get("/run")
    assert seen == ["committed"] * 6
    assert served(app, stmt) == (truth(check, stmt), 0)
    assert_clean(app)


def test_a_finished_callback_writing_after_pyramid_tm_leaves_nothing_joined(make, check):
    """A finished callback writes (uncommitted, as with zope.sqlalchemy) and invalidates: nothing held, nothing stale."""
    app = make()
    stmt = name_of(15)
    assert served(app, stmt)[0] == [("person 15",)]
    seen = []

    def late(request):
        session = pyramid_sessioncache.Session()
        session.get(Person, 15).name = "late"
        session.flush()
        seen.append(shared_read(request, stmt)[0][0])
        request.sessioncache.mark_changed("person")
        request.sessioncache.invalidate(stmt, region="shared")

    def view(request):
        shared_read(request, stmt)
        request.add_finished_callback(late)

    scenario(view)
    TestApp(app).get("/run")
    assert seen == ["late"]
    assert served(app, stmt)[0] == truth(check, stmt)
    assert_clean(app)


NOT_CLOSED = ["cached hit", "cached miss", "uncached"]


@pytest.mark.parametrize("how", NOT_CLOSED)
def test_a_before_retry_subscriber_using_the_session_leaves_nothing_checked_out(make_memory, check, how):
    """pyramid_retry's BeforeRetry is sent after the attempt's finished callbacks: a read there must not keep a connection."""
    from pyramid_retry import IBeforeRetry

    app = make_memory(**{"retry.attempts": "2"})
    stmt = name_of(17)
    if how == "cached hit":
        assert served(app, stmt)[0] == [("person 17",)]
    seen = []

    def before_retry(event):
        request = event.request
        seen.append(
            shared_read(request, stmt)[0][0] if how != "uncached" else request.dbsession.execute(stmt).scalar_one()
        )

    app.registry.registerHandler(before_retry, (IBeforeRetry,))

    def view(request):
        seen.append(request.dbsession.execute(name_of(16)).scalar_one())
        if len(seen) == 1:
            raise transaction.interfaces.TransientError("again")

    scenario(view)
    gc.disable()  # a Session left open is found before a collection returns its connection
    try:
        TestApp(app).get("/run")
        assert seen == ["person 16", "person 17", "person 16"]
        assert_clean(app)
    finally:
        gc.enable()


# --- concurrent requests on waitress ----------------------------------------------------------------------


@pytest.fixture(params=["memory", "file", "redis", "near"])
def any_shared(request, tmp_path) -> dict:
    """The options of each shared region in turn, the near cache in front of Redis included."""
    return region_settings(request, request.param, tmp_path)


@pytest.mark.parametrize("write", ["hit changed", "orm update", "text()"])
def test_no_request_begun_after_a_writers_response_reads_the_old_value(db_url, any_shared, check, write):
    """waitress, 6 threads: one client renames person 1 again and again; readers begun after a response see it."""
    app = make_app(db_url, any_shared)
    stmts = {"one": name_of(1), "all": select(Person.id, Person.name).where(Person.id <= 2).order_by(Person.id)}

    def view(request):
        if request.method == "POST":
            name = request.params["name"]
            if write == "hit changed":
                request.cached_query(person(1), region="shared").scalar_one().name = name
            elif write == "orm update":
                request.dbsession.execute(update(Person).where(Person.id == 1).values(name=name))
            else:
                request.dbsession.execute(text("UPDATE person SET name = :n WHERE id = 1"), {"n": name})
                request.sessioncache.mark_changed()  # zope.sqlalchemy commits text() only once told
            return {}
        rows = shared_read(request, stmts[request.params["q"]])
        local = request.cached_query(stmts["one"]).scalar_one()
        return {"rows": [list(row) for row in rows], "local": local}

    scenario(view)
    server = ThreadServer(app, threads=6)
    committed = [0]
    stale: list = []
    errors: list = []
    stop = threading.Event()

    def version(name):
        return int(name[1:]) if name.startswith("v") else 0

    def reader(q):
        try:
            while not stop.is_set():
                before = committed[0]
                with urllib.request.urlopen(f"{server.url}/run?q={q}", timeout=10) as response:
                    import json

                    body = json.loads(response.read())
                names = [row[1] if len(row) == 2 else row[0] for row in body["rows"]][:1] + [body["local"]]
                for name in names:
                    if version(name) < before:
                        stale.append((q, before, name))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    readers = [threading.Thread(target=reader, args=(q,)) for q in ("one", "all", "one", "all")]
    try:
        for thread in readers:
            thread.start()
        for n in range(1, 41):
            data = f"name=v{n}".encode()
            with urllib.request.urlopen(f"{server.url}/run", data=data, timeout=10) as response:
                response.read()
            committed[0] = n
            time.sleep(0.002)
    finally:
        stop.set()
        for thread in readers:
            thread.join(timeout=20)
        server.stop()
    try:
        assert not errors, errors[:3]
        assert not stale, stale[:5]
        for stmt in stmts.values():
            assert served(app, stmt)[0] == truth(check, stmt)
        assert truth(check, stmts["one"]) == [("v40",)]
    finally:
        app.registry.getUtility(ISessionCache).close()
        app.engine.dispose()


# --- more of request.tm and the Session by hand ------------------------------------------------------------


@pytest.mark.parametrize("cached", [False, True])
def test_a_hit_after_the_explicit_managers_transaction_ended_by_hand(make, check, cached):
    """Explicit manager, ``request.tm.commit()`` with no ``begin()``: a shared hit then raises NoTransaction, as uncached."""
    app = make(**{"tm.manager_hook": "pyramid_tm.explicit_manager"})
    stmt = person(20)
    assert served(app, select(Person.name).where(Person.id == 20))[0] == [("person 20",)]
    scenario(lambda request: {"n": request.cached_query(stmt, region="shared").scalar_one().id})
    TestApp(app).get("/run")
    outcome = []

    def view(request):
        request.dbsession.execute(name_of(1)).all()
        request.tm.commit()
        try:
            found = (
                request.cached_query(stmt, region="shared").scalar_one()
                if cached
                else request.dbsession.scalars(stmt).one()
            )
            found.name = "after the end"
            outcome.append("served")
        except Exception as exc:
            outcome.append(type(exc).__name__)
            raise

    scenario(view)
    try:
        TestApp(app).get("/run", expect_errors=True)
    except Exception as exc:
        outcome.append(type(exc).__name__)
    assert outcome == ["NoTransaction", "NoTransaction"]  # as zope.sqlalchemy's join, uncached
    assert truth(check, select(Person.name).where(Person.id == 20)) == [("person 20",)]
    assert_clean(app)


@pytest.mark.parametrize("cached", [False, True])
def test_an_exception_view_for_a_failure_at_commit_reads_the_truth(make, check, cached):
    """The flush of pyramid_tm's commit fails: its exception view's reads fail as uncached ones do, nothing is stored."""
    app = make()
    stmt = select(Person.id, Person.name).where(Person.id.in_([3, 21])).order_by(Person.id)
    assert served(app, stmt)[0] == [(3, "person 3")]
    seen = []

    def view(request):
        request.cached_query(person(3), region="shared").scalar_one().name = "never"
        request.dbsession.add(Person(id=21, name="new"))
        request.dbsession.add(Person(id=22, name=None))  # NOT NULL: fails at the flush of the commit
        return {}

    def excview(request):
        try:
            if cached:
                seen.append([tuple(row) for row in shared_read(request, stmt)])
                seen.append(request.cached_query(select(Person.name).where(Person.id == 3)).scalar_one())
            else:
                seen.append([tuple(row) for row in request.dbsession.execute(stmt)])
                seen.append(request.dbsession.execute(select(Person.name).where(Person.id == 3)).scalar_one())
        except Exception as exc:
            seen.append(type(exc).__name__)

    def view_no_autoflush(request):
        with request.dbsession.no_autoflush:
            return view(request)

    scenario(view_no_autoflush, excview=excview)
    TestApp(app).get("/run", status=409)
    # The failed transaction is still request.tm's current one: zope.sqlalchemy cannot join it, cached or not.
    assert seen == ["TransactionFailedError"]
    assert served(app, stmt) == (truth(check, stmt), 0) and truth(check, stmt) == [(3, "person 3")]
    assert_clean(app)


@pytest.mark.parametrize("manager", ["thread", "explicit"])
def test_a_request_pyramid_tm_declines_managing_its_own_transactions(make, check, manager):
    """``tm.activate_hook`` says no; the view uses ``with request.tm:`` twice: entries follow each commit and abort."""
    settings = {"tm.activate_hook": "tests.test_attack_s33_requests.never"}
    if manager == "explicit":
        settings["tm.manager_hook"] = "pyramid_tm.explicit_manager"
    app = make(**settings)
    stmt = name_of(5)
    assert served(app, stmt)[0] == [("person 5",)]
    seen = []

    def view(request):
        with request.tm:
            request.cached_query(person(5), region="shared").scalar_one().name = "managed by hand"
        with request.tm:
            seen.append(shared_read(request, stmt)[0][0])
            seen.append(request.cached_query(stmt).scalar_one())
        try:
            with request.tm:
                request.dbsession.get(Person, 5).name = "aborted by hand"
                request.dbsession.flush()
                seen.append(shared_read(request, stmt)[0][0])
                raise Boom()
        except Boom:
            pass
        with request.tm:
            seen.append(shared_read(request, stmt)[0][0])

    scenario(view)
    TestApp(app).get("/run?own=1")
    assert seen == ["managed by hand", "managed by hand", "aborted by hand", "managed by hand"]
    assert served(app, stmt) == (truth(check, stmt), 0)
    assert_clean(app)


def never(request):
    """``tm.activate_hook``: pyramid_tm manages every request but those asking to manage their own."""
    return "own" not in request.params


@pytest.mark.parametrize("how", NOT_CLOSED)
def test_a_streamed_response_reading_as_it_is_sent_leaves_nothing_checked_out(make_memory, check, how):
    """A response whose ``app_iter`` reads ``request.dbsession`` as the server sends it: after every finished callback."""
    app = make_memory()
    stmt = name_of(17)
    if how == "cached hit":
        assert served(app, stmt)[0] == [("person 17",)]

    def view(request):
        request.dbsession.execute(name_of(16)).scalar_one()

        def rows():
            name = (
                shared_read(request, stmt)[0][0] if how != "uncached" else request.dbsession.execute(stmt).scalar_one()
            )
            yield name.encode()

        return Response(app_iter=rows())

    scenario(view)
    gc.disable()  # a Session left open is found before a collection returns its connection
    try:
        assert TestApp(app).get("/run").body == b"person 17"
        assert_clean(app)
    finally:
        gc.enable()


def test_a_streamed_response_keeps_its_length_and_a_file_goes_to_the_servers_file_wrapper(make_memory, tmp_path):
    """A streamed response is wrapped to close the Session it used: its Content-Length stays; a file wrapper is left alone."""
    from pyramid.response import FileResponse

    app = make_memory()
    path = tmp_path / "sent.txt"
    path.write_bytes(b"a file")

    class FileWrapper:
        def __init__(self, file, block_size):
            self.file = file

        def __iter__(self):
            return iter([self.file.read()])

        def close(self):
            self.file.close()

    seen = []

    def view(request):
        request.dbsession.execute(name_of(16)).scalar_one()
        if request.params.get("file"):
            response = FileResponse(str(path), request=request)
        else:
            response = Response(app_iter=iter([b"12345"]), content_length=5)
        seen.append(response)
        return response

    scenario(view)
    web = TestApp(app)
    status, headers, app_iter = Request.blank("/run").call_application(app)  # as a server gets them
    assert b"".join(app_iter) == b"12345"
    app_iter.close()
    assert dict(headers)["Content-Length"] == "5"
    sent = web.get("/run", {"file": "1"}, extra_environ={"wsgi.file_wrapper": FileWrapper})
    assert sent.body == b"a file"
    assert isinstance(seen[-1].app_iter, FileWrapper)
    assert_clean(app)


def test_a_session_used_after_its_request_by_an_explicit_manager_app_is_closed_as_the_next_attempt_begins(
    make_memory, check
):
    """``tm.manager_hook = pyramid_tm.explicit_manager``: a manager per request, never begun again; the Session still ends."""
    from pyramid_retry import IBeforeRetry

    app = make_memory(**{"retry.attempts": "2", "tm.manager_hook": "pyramid_tm.explicit_manager"})
    seen = []

    def before_retry(event):
        seen.append(event.request.dbsession.execute(name_of(17)).scalar_one())

    def view(request):
        seen.append(request.dbsession.execute(name_of(16)).scalar_one())
        if len(seen) == 1:
            raise transaction.interfaces.TransientError("again")

    app.registry.registerHandler(before_retry, (IBeforeRetry,))
    scenario(view)
    gc.disable()  # a Session left open is found before a collection returns its connection
    try:
        TestApp(app).get("/run")
        assert seen == ["person 16", "person 17", "person 16"]
        assert app.engine.pool.checkedout() == 0
    finally:
        gc.enable()


def test_the_scoped_session_used_in_a_before_retry_subscriber_is_not_kept_for_ever(make_memory, check):
    """``pyramid_sessioncache.Session()`` first used by a BeforeRetry subscriber, once the attempt's finished callbacks ran."""
    from pyramid_retry import IBeforeRetry

    app = make_memory(**{"retry.attempts": "2"})
    stmt = name_of(17)
    seen = []

    def before_retry(event):
        seen.append(
            pyramid_sessioncache.Session().execute(stmt.options(pyramid_sessioncache.FromCache("shared"))).scalar_one()
        )

    def view(request):
        if not seen:
            raise transaction.interfaces.TransientError("again")

    app.registry.registerHandler(before_retry, (IBeforeRetry,))
    scenario(view)
    registry = pyramid_sessioncache.Session.registry.registry
    before = set(registry)
    try:
        TestApp(app).get("/run")
        assert seen == ["person 17"]
        gc.collect()
        assert_clean(app)
        assert set(registry) == before  # the failed attempt's request and its Session, kept for ever
    finally:
        for request in set(registry) - before:
            registry.discard(request)
            request.dbsession.close()


def test_retried_requests_whose_subscriber_uses_the_scoped_session_do_not_exhaust_the_pool(make_memory, check):
    """A pool of one connection: every retried request's BeforeRetry read through ``pyramid_sessioncache.Session``."""
    from pyramid_retry import IBeforeRetry

    app = make_memory(
        **{
            "retry.attempts": "2",
            "sqlalchemy.pool_size": "1",
            "sqlalchemy.max_overflow": "0",
            "sqlalchemy.pool_timeout": "1",
        }
    )
    attempts = []

    def before_retry(event):
        pyramid_sessioncache.Session().execute(name_of(1)).scalar_one()  # as a log line of the retry might

    def view(request):
        attempts.append(1)
        request.dbsession.execute(name_of(2)).scalar_one()
        if len(attempts) % 2:
            raise transaction.interfaces.TransientError("again")

    app.registry.registerHandler(before_retry, (IBeforeRetry,))
    scenario(view)
    registry = pyramid_sessioncache.Session.registry.registry
    before = set(registry)
    web = TestApp(app)
    try:
        for _ in range(3):
            web.get("/run")
            gc.collect()
        assert len(attempts) == 6
    finally:
        for request in set(registry) - before:
            registry.discard(request)
            request.dbsession.close()


def test_exception_views_under_an_excview_tween_placed_over_pyramid_tm(make, check):
    """``pyramid.tweens`` puts excview over pyramid_tm (pyramid_tm 1.x's order): the view runs after the abort."""
    app = make(**{"pyramid.tweens": "pyramid.tweens.excview_tween_factory\npyramid_tm.tm_tween_factory"})
    stmt = name_of(6)
    seen = []

    def view(request):
        request.dbsession.get(Person, 6).name = "raised"
        request.dbsession.flush()
        seen.append(shared_read(request, stmt)[0][0])
        raise Boom()

    def excview(request):
        seen.append(shared_read(request, stmt)[0][0])  # aborted already: the truth, stored
        seen.append(request.cached_query(stmt).scalar_one())

    scenario(view, excview=excview)
    TestApp(app).get("/run", status=500)
    assert seen == ["raised", "person 6", "person 6"]
    assert served(app, stmt) == (truth(check, stmt), 0)
    assert_clean(app)


def test_each_attempt_of_a_retried_request_has_a_scoped_session_of_its_own(make, check):
    """``pyramid_sessioncache.Session`` in a retried request: attempt 2 gets its own Session, its local cache empty."""
    app = make(**{"retry.attempts": "3"})
    stmt = name_of(3)
    sessions, seen = [], []

    def view(request):
        session = pyramid_sessioncache.Session()
        sessions.append(session)
        seen.append(session.execute(stmt.options(pyramid_sessioncache.FromCache())).scalar_one())
        if len(sessions) == 1:
            session.get(Person, 3).name = "attempt 1"
            session.flush()
            seen.append(session.execute(stmt.options(pyramid_sessioncache.FromCache())).scalar_one())
            seen.append(session.execute(stmt.options(pyramid_sessioncache.FromCache("shared"))).scalar_one())
            raise transaction.interfaces.TransientError("again")

    scenario(view)
    TestApp(app).get("/run")
    assert sessions[0] is not sessions[1]
    assert seen == ["person 3", "attempt 1", "attempt 1", "person 3"]
    assert not pyramid_sessioncache.Session.registry.registry
    assert served(app, stmt)[0] == truth(check, stmt)
    assert_clean(app)


def test_the_scoped_session_is_forgotten_when_an_earlier_finished_callback_fails(make_memory, check):
    """An application's finished callback raises: Pyramid runs no later one, and ``Session.remove()`` was one of them."""
    app = make_memory()

    def failing(request):
        raise RuntimeError("the audit service is down")

    def view(request):
        request.add_finished_callback(failing)
        pyramid_sessioncache.Session().execute(name_of(1)).scalar_one()

    scenario(view)
    registry = pyramid_sessioncache.Session.registry.registry
    before = set(registry)
    try:
        with pytest.raises(RuntimeError, match="audit"):
            TestApp(app).get("/run")
        gc.collect()
        assert set(registry) == before  # "Session.remove() is called at the end of every request, error or not"
    finally:
        for request in set(registry) - before:
            registry.discard(request)
            request.dbsession.close()


def test_a_subrequest_invoked_by_a_finished_callback_reads_and_writes_as_uncached(make, check):
    """After pyramid_tm ended, a finished callback invokes a subrequest (no tweens) that writes: nothing stale, nothing held."""
    app = make()
    stmt = name_of(2)
    assert served(app, stmt)[0] == [("person 2",)]
    seen = []

    def sub(request):
        with request.tm:
            request.cached_query(person(2), region="shared").scalar_one().name = "by a late subrequest"
        seen.append(shared_read(request, stmt)[0][0])

    def late(request):
        request.invoke_subrequest(Request.blank("/sub"), use_tweens=False)

    def view(request):
        seen.append(shared_read(request, stmt)[0][0])
        request.add_finished_callback(late)

    scenario(view, sub=sub)
    TestApp(app).get("/run")
    assert seen == ["person 2", "by a late subrequest"]
    assert served(app, stmt) == (truth(check, stmt), 0) and truth(check, stmt) == [("by a late subrequest",)]
    assert_clean(app)


def test_concurrent_readers_never_see_what_a_retried_attempt_wrote(db_url, any_shared, check):
    """waitress: each write's first attempt writes, reads it through every region and fails; readers only see commits."""
    import json

    app = make_app(db_url, any_shared, **{"retry.attempts": "2"})
    stmts = [name_of(1), select(Person.id, Person.name).where(Person.id <= 2).order_by(Person.id)]

    def view(request):
        if request.method == "POST":
            name = request.params["name"]
            first = request.environ["retry.attempt"] == 0
            request.cached_query(person(1), region="shared").scalar_one().name = (
                f"uncommitted {name}" if first else name
            )
            if first:
                request.dbsession.flush()
                for stmt in stmts:
                    shared_read(request, stmt)
                    request.cached_query(stmt).all()
                raise transaction.interfaces.TransientError("again")
            return {}
        return {"names": [row[-1] for stmt in stmts for row in shared_read(request, stmt)]}

    scenario(view)
    server = ThreadServer(app, threads=5)
    committed = [0]
    bad: list = []
    errors: list = []
    stop = threading.Event()

    def reader():
        try:
            while not stop.is_set():
                before = committed[0]
                with urllib.request.urlopen(f"{server.url}/run", timeout=10) as response:
                    names = json.loads(response.read())["names"]
                for name in (names[0], names[1]):
                    if name.startswith("uncommitted") or (int(name[1:]) if name.startswith("v") else 0) < before:
                        bad.append((before, name))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    readers = [threading.Thread(target=reader) for _ in range(4)]
    try:
        for thread in readers:
            thread.start()
        for n in range(1, 31):
            with urllib.request.urlopen(f"{server.url}/run", data=f"name=v{n}".encode(), timeout=10) as response:
                response.read()
            committed[0] = n
    finally:
        stop.set()
        for thread in readers:
            thread.join(timeout=20)
        server.stop()
    try:
        assert not errors, errors[:3]
        assert not bad, bad[:5]
        for stmt in stmts:
            assert served(app, stmt)[0] == truth(check, stmt)
        assert truth(check, stmts[0]) == [("v30",)]
    finally:
        app.registry.getUtility(ISessionCache).close()
        app.engine.dispose()


# --- an application's own request.dbsession that outlives its requests --------------------------------------


def commit_in_another_process(db_url, name):
    """Rename person 1 in a process of its own (SQLAlchemy, committed): what another worker of the site does."""
    import subprocess
    import sys

    code = (
        "import sys; from sqlalchemy import create_engine, text\n"
        "engine = create_engine(sys.argv[1])\n"
        "with engine.begin() as conn: conn.execute(text('UPDATE person SET name = :n WHERE id = 1'), {'n': sys.argv[2]})\n"
    )
    subprocess.run([sys.executable, "-c", code, db_url, name], check=True, timeout=60)


LOCAL_ONLY = {
    "cache.regions": "local_session",
    "cache.local_session.type": "ext:local_session",
    "sessioncache.default_region": "local_session",
    "sessioncache.secret": SECRET,
}


def thread_local_app(db_url, how="reify", commit_first=False):
    """``(config, meta_session, engine)``: the add-on included, the seed's thread-local ``meta.Session`` as ``request.dbsession``.

    Registered with zope.sqlalchemy's ``keep_session=True`` (it outlives each
    request), its only region ``ext:local_session``; ``how``: ``"reify"`` or
    ``"property"``; ``commit_first``: ``config.commit()`` before it is added.
    """
    import zope.sqlalchemy
    from sqlalchemy.orm import scoped_session, sessionmaker

    from pyramid_sessioncache.addon import get_engine

    config = Configurator(settings={"sqlalchemy.url": db_url, **LOCAL_ONLY})
    config.include("pyramid_sessioncache")
    if commit_first:
        config.commit()
    engine = get_engine(config.registry) if commit_first else create_engine(db_url)
    factory = sessionmaker(bind=engine)
    meta_session = scoped_session(factory)
    zope.sqlalchemy.register(meta_session, keep_session=True)
    config.set_sessioncache_session_factory(factory)
    config.add_request_method(lambda request: meta_session(), "dbsession", **{how: True})
    return config, meta_session, engine


def cached_and_uncached(stmt):
    """A view: ``stmt``'s one value read through the default region, and uncached."""

    def view(request):
        return {
            "cached": request.cached_query(stmt).scalar_one(),
            "uncached": request.dbsession.execute(stmt).scalar_one(),
        }

    return view


def test_local_entries_do_not_outlive_the_request_with_an_apps_thread_local_session(db_url, check):
    """The seed's ``meta.Session`` (thread-local) as request.dbsession, ``keep_session=True``: read-only requests."""
    config, meta_session, engine = thread_local_app(db_url)
    stmt = name_of(1)
    view = cached_and_uncached(stmt)
    config.add_route("read", "/read")
    config.add_view(view, route_name="read", renderer="json")
    web = TestApp(config.make_wsgi_app())
    try:
        assert web.get("/read").json == {"cached": "person 1", "uncached": "person 1"}
        commit_in_another_process(db_url, "renamed by another worker")
        assert truth(check, stmt) == [("renamed by another worker",)]
        page = web.get("/read").json  # a new request: its local cache must start empty
        assert page["uncached"] == "renamed by another worker"
        assert page["cached"] == page["uncached"]
    finally:
        meta_session.remove()
        engine.dispose()
