"""Attack s33-review3: the reworked request lifecycle (tween, late Sessions, scoped registry, wrapped dbsession).

Real Pyramid applications (SQLite files, pyramid_tm) called as a WSGI server
would call them; connections left checked out are read from the pool with
the garbage collector off, so that a Session left open is seen before a
collection hands its connection back.
"""

# ruff: noqa: F811  (fixtures imported from test_attack_s33_requests are arguments of the tests here)
from __future__ import annotations

import gc
import os
import threading
import weakref

import pytest
from pyramid.config import Configurator
from pyramid.decorator import reify
from pyramid.events import NewResponse
from pyramid.request import Request
from pyramid.response import Response
from webtest import TestApp

from .conftest import SECRET, truth
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


def _db_stream(request, n=3):
    """A generator reading ``n`` names through ``request.dbsession`` as it is sent."""

    def body():
        for pid in range(1, n + 1):
            yield request.dbsession.execute(name_of(pid)).scalar_one().encode() + b";"

    return body()


STREAMED = b"person 1;person 2;person 3;"


class _NoGC:
    def __enter__(self):
        gc.disable()

    def __exit__(self, *exc):
        gc.enable()


# --- Defects: responses changed after the tween ------------------------------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="response callbacks and NewResponse subscribers run after every tween (Router.invoke_request): "
    "a stream set there is not wrapped by tween_factory, its Session keeps a connection checked out after "
    "the response was sent, until the thread's next request",
)
@pytest.mark.parametrize("where", ["response callback", "NewResponse subscriber"])
def test_a_stream_set_after_the_tween_leaves_nothing_checked_out(make_memory, where):
    """A stream put on the response by a response callback or a NewResponse subscriber: nothing checked out once sent."""
    app = make_memory()

    def stream_it(request, response):
        if request.path == "/run":
            response.app_iter = _db_stream(request)
            response.content_length = None

    if where == "NewResponse subscriber":
        app.registry.registerHandler(lambda event: stream_it(event.request, event.response), (NewResponse,))

    def view(request):
        request.dbsession.execute(name_of(4)).scalar_one()
        if where == "response callback":
            request.add_response_callback(stream_it)
        return Response(b"replaced")

    scenario(view)
    with _NoGC():
        assert TestApp(app).get("/run").body == STREAMED
        assert_clean(app)


@pytest.mark.xfail(
    strict=True,
    reason="a lazy webob encode_content() (gzip) in a response callback wraps the _ClosingSession in a plain "
    "generator: the server's close() of a partly sent response never reaches _ClosingSession.close(), and the "
    "Session the stream used keeps its connection until the thread's next request (or the garbage collector)",
)
def test_a_stream_gzipped_lazily_after_the_tween_and_cut_short_leaves_nothing_checked_out(make_memory):
    """A DB stream gzipped lazily by a response callback, the client gone after the first chunk: nothing checked out."""
    app = make_memory()

    def view(request):
        request.add_response_callback(lambda request, response: response.encode_content("gzip", lazy=True))

        def body():
            yield request.dbsession.execute(name_of(1)).scalar_one().encode()
            yield os.urandom(1 << 18)  # enough for the compressor to write a chunk
            yield request.dbsession.execute(name_of(2)).scalar_one().encode()

        return Response(app_iter=body())

    scenario(view)
    with _NoGC():
        status, headers, app_iter = Request.blank("/run").call_application(app)
        iterator = iter(app_iter)
        next(iterator)
        next(iterator)  # the first name read and compressed
        app_iter.close()
        assert_clean(app)


# --- Defects: a stream sent from another thread ------------------------------------------------------------


def test_a_stream_read_in_a_worker_thread_and_closed_by_the_server_leaves_nothing_checked_out(make_memory):
    """The body read part-way by another thread (a relaying server), closed by the request's thread: nothing left."""
    app = make_memory()
    scenario(lambda request: Response(app_iter=_db_stream(request, 3)))
    with _NoGC():
        status, headers, app_iter = Request.blank("/run").call_application(app)
        got = []
        worker = threading.Thread(target=lambda: got.append(next(iter(app_iter))))
        worker.start()
        worker.join()
        assert got == [b"person 1;"]
        app_iter.close()
        assert_clean(app)


# --- Defects: an application's own request.dbsession -------------------------------------------------------


def _app_settings(db_url):
    return {
        "sqlalchemy.url": db_url,
        "cache.regions": "local_session",
        "cache.local_session.type": "ext:local_session",
        "sessioncache.default_region": "local_session",
        "sessioncache.secret": SECRET,
    }


@pytest.mark.parametrize("when", ["before the include", "after the include and a commit"])
def test_an_apps_request_class_reified_dbsession_is_kept(db_url, when):
    """``config.set_request_factory(MyRequest)`` whose class reifies ``dbsession``: the application's Session serves."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    engine = create_engine(db_url)
    factory = sessionmaker(bind=engine)
    made = []

    class AppRequest(Request):
        @reify
        def dbsession(self):
            session = factory()
            made.append(session)
            self.add_finished_callback(lambda request: session.close())
            return session

    config = Configurator(settings=_app_settings(db_url))
    if when == "before the include":
        config.set_request_factory(AppRequest)
    config.include("pyramid_sessioncache")
    if when != "before the include":
        config.commit()  # the add-on adds its own request.dbsession here
        config.set_request_factory(AppRequest)
    config.add_route("read", "/read")

    def view(request):
        session = request.dbsession  # made first: then looked for among the application's
        return {"mine": any(session is s for s in made)}

    config.add_view(view, route_name="read", renderer="json")
    app = config.make_wsgi_app()
    try:
        assert TestApp(app).get("/read").json == {"mine": True}
    finally:
        engine.dispose()


def test_local_entries_do_not_outlive_the_request_with_a_property_dbsession(db_url, check):
    """``add_request_method(lambda r: meta_session(), 'dbsession', property=True)``: the next request reads the truth."""
    import subprocess
    import sys

    config, meta_session, engine = thread_local_app(db_url, "property")
    stmt = name_of(1)

    view = cached_and_uncached(stmt)

    config.add_route("read", "/read")
    config.add_view(view, route_name="read", renderer="json")
    web = TestApp(config.make_wsgi_app())
    try:
        assert web.get("/read").json == {"cached": "person 1", "uncached": "person 1"}
        code = (
            "import sys\nfrom sqlalchemy import create_engine, text\n"
            "engine = create_engine(sys.argv[1])\n"
            "with engine.begin() as c: c.execute(text('UPDATE person SET name = :n WHERE id = 1'), {'n': 'renamed'})\n"
        )
        subprocess.run([sys.executable, "-c", code, db_url], check=True, timeout=60)
        assert truth(check, stmt) == [("renamed",)]
        page = web.get("/read").json
        assert page["uncached"] == "renamed"
        assert page["cached"] == page["uncached"]
    finally:
        meta_session.remove()
        engine.dispose()


# --- Guards ------------------------------------------------------------------------------------------------


def test_a_stream_without_the_db_after_the_view_used_it_opens_nothing_again(make_memory):
    """The view used request.dbsession, the stream does not: no connection checked out once the view returned."""
    from sqlalchemy import event

    app = make_memory()
    checkouts = []

    def view(request):
        request.dbsession.execute(name_of(1)).scalar_one()

        def body():
            checkouts.append("streaming")
            yield b"a"
            yield b"b"

        return Response(app_iter=body())

    scenario(view)
    listener = lambda *args: checkouts.append("checkout")  # noqa: E731
    event.listen(app.engine, "checkout", listener)
    try:
        with _NoGC():
            assert TestApp(app).get("/run").body == b"ab"
            assert_clean(app)
    finally:
        event.remove(app.engine, "checkout", listener)
    assert checkouts == ["checkout", "streaming"]


def test_two_streams_in_flight_on_one_thread_each_close_their_session(make_memory):
    """Two DB streams read alternately on one thread (a multiplexing middleware): both sent, nothing left."""
    app = make_memory()
    scenario(lambda request: Response(app_iter=_db_stream(request, 3)))
    with _NoGC():
        first = Request.blank("/run").call_application(app)[2]
        second = Request.blank("/run").call_application(app)[2]
        a, b = iter(first), iter(second)
        got = [next(a), next(b), next(a), next(b)]
        assert got == [b"person 1;", b"person 1;", b"person 2;", b"person 2;"]
        rest = b"".join(a) + b"".join(b)
        assert rest == b"person 3;person 3;"
        first.close()
        second.close()
        assert_clean(app)


def test_a_finished_stream_leaves_its_session_and_request_to_the_collector(make_memory):
    """Once a DB stream is sent and closed, neither its Session nor its request is kept alive."""
    app = make_memory()
    seen = []

    def view(request):
        seen.append(weakref.ref(request))
        return Response(app_iter=_db_stream(request, 2))

    scenario(view)
    status, headers, app_iter = Request.blank("/run").call_application(app)
    assert b"".join(app_iter) == b"person 1;person 2;"
    session = weakref.ref(seen[0]().__dict__["dbsession"])
    app_iter.close()
    del app_iter
    gc.collect()
    assert seen[0]() is None and session() is None
    assert_clean(app)


def test_a_list_subclass_or_bytes_body_is_sent_as_is(make_memory):
    """A body set as bytes, or an app_iter that is a list subclass: sent unchanged, nothing left."""
    app = make_memory()

    class Chunks(list):
        pass

    def view(request):
        request.dbsession.execute(name_of(1)).scalar_one()
        if request.params.get("list"):
            return Response(app_iter=Chunks([b"x", b"y"]))
        return Response(body=b"xy")

    scenario(view)
    with _NoGC():
        assert TestApp(app).get("/run").body == b"xy"
        assert TestApp(app).get("/run", {"list": "1"}).body == b"xy"
        assert_clean(app)


@pytest.mark.parametrize("made", ["in the view", "in the stream"])
def test_local_entries_stored_by_a_stream_do_not_outlive_the_request_with_an_apps_thread_local_session(
    db_url, check, made
):
    """The seed's thread-local ``meta.Session`` as reified request.dbsession; a stream reads cached: the next request reads the truth."""

    config, meta_session, engine = thread_local_app(db_url, "reify")
    stmt = name_of(1)

    def stream(request):
        if made == "in the view":
            request.dbsession.execute(name_of(2)).scalar_one()

        def body():
            yield request.cached_query(stmt).scalar_one().encode()

        return Response(app_iter=body())

    view = cached_and_uncached(stmt)

    config.add_route("stream", "/stream")
    config.add_view(stream, route_name="stream")
    config.add_route("read", "/read")
    config.add_view(view, route_name="read", renderer="json")
    web = TestApp(config.make_wsgi_app())
    try:
        assert web.get("/stream").body == b"person 1"
        commit_in_another_process(db_url, "renamed")
        assert truth(check, stmt) == [("renamed",)]
        page = web.get("/read").json
        assert page["uncached"] == "renamed"
        assert page["cached"] == page["uncached"]
    finally:
        meta_session.remove()
        engine.dispose()


def test_including_the_add_on_twice_serves_as_once(db_url):
    """``config.include("pyramid_sessioncache")`` twice: no conflict, cached reads served."""
    config = Configurator(settings={**_app_settings(db_url), "cache.regions": "local_session"})
    config.include("pyramid_sessioncache")
    config.include("pyramid_sessioncache")
    config.add_route("r", "/r")
    config.add_view(
        lambda request: {"n": request.cached_query(name_of(1)).scalar_one()}, route_name="r", renderer="json"
    )
    app = config.make_wsgi_app()
    from pyramid_sessioncache.addon.interfaces import IDBSessionFactory

    engine = app.registry.getUtility(IDBSessionFactory).kw["bind"]
    try:
        with _NoGC():
            for _ in range(2):
                assert TestApp(app).get("/r").json == {"n": "person 1"}
                assert engine.pool.checkedout() == 0
    finally:
        engine.dispose()


def test_a_script_writing_and_reading_in_request_tm_blocks_then_closing(db_url, check):
    """``prepare()``: reads and a write in ``with request.tm:`` blocks read the truth; ``closer()`` leaves nothing."""
    from pyramid.scripting import prepare
    from sqlalchemy import update

    from pyramid_sessioncache.addon.interfaces import IDBSessionFactory

    from .models import Person

    config = Configurator(
        settings={**_app_settings(db_url), "cache.regions": "local_session, shared", "cache.shared.type": "memory"}
    )
    config.include("pyramid_sessioncache")
    app = config.make_wsgi_app()
    engine = app.registry.getUtility(IDBSessionFactory).kw["bind"]
    try:
        with _NoGC():
            env = prepare(registry=app.registry)
            request = env["request"]
            with request.tm:
                assert request.cached_query(name_of(1), region="shared").scalar_one() == "person 1"
            with request.tm:
                request.dbsession.execute(update(Person).where(Person.id == 1).values(name="job 1"))
            with request.tm:
                assert request.cached_query(name_of(1), region="shared").scalar_one() == "job 1"
            env["closer"]()
            assert engine.pool.checkedout() == 0
            env = prepare(registry=app.registry)
            with env["request"].tm:
                assert env["request"].cached_query(name_of(1), region="shared").scalar_one() == "job 1"
            env["closer"]()
            assert truth(check, name_of(1)) == [("job 1",)]
            assert engine.pool.checkedout() == 0
    finally:
        engine.dispose()


def test_a_raised_http_exceptions_stream_leaves_nothing_checked_out(make_memory):
    """A view raising ``HTTPConflict(app_iter=<DB stream>)``, rendered by the excview tween: sent, nothing checked out."""
    from pyramid.httpexceptions import HTTPConflict

    app = make_memory()

    def view(request):
        request.dbsession.execute(name_of(4)).scalar_one()
        raise HTTPConflict(app_iter=_db_stream(request, 2))

    scenario(view)
    with _NoGC():
        for _ in range(2):
            assert TestApp(app).get("/run", status=409).body == b"person 1;person 2;"
            assert_clean(app)


@pytest.mark.parametrize("content_type", ["text/html", "text/plain"])
def test_a_stream_under_the_debug_toolbar_leaves_nothing_checked_out(make_memory, content_type):
    """pyramid_debugtoolbar (its tween over pyramid_tm, reading HTML bodies): a DB stream sent, nothing checked out."""
    app = make_memory(**{"pyramid.includes": "pyramid_debugtoolbar", "debugtoolbar.hosts": "0.0.0.0/0"})

    def view(request):
        request.dbsession.execute(name_of(4)).scalar_one()
        body = _db_stream(request, 2)
        if content_type == "text/html":
            body = _html(body)
        return Response(app_iter=body, content_type=content_type)

    def _html(body):
        yield b"<html><body>"
        yield from body
        yield b"</body></html>"

    scenario(view)
    with _NoGC():
        for _ in range(2):
            res = TestApp(app).get("/run", extra_environ={"REMOTE_ADDR": "127.0.0.1"})
            assert b"person 1;person 2;" in res.body
            assert_clean(app)


def test_the_scoped_session_from_a_stream_says_no_request_is_active(make_memory):
    """``pyramid_sessioncache.Session()`` in a stream (no current request): a SessionCacheError saying so, nothing left."""
    import pyramid_sessioncache
    from pyramid_sessioncache.errors import SessionCacheError

    app = make_memory()
    seen = []

    def view(request):
        pyramid_sessioncache.Session().execute(name_of(1)).scalar_one()

        def body():
            try:
                pyramid_sessioncache.Session()
            except SessionCacheError as exc:
                seen.append(str(exc))
            yield b"done"

        return Response(app_iter=body())

    scenario(view)
    with _NoGC():
        assert TestApp(app).get("/run").body == b"done"
        assert_clean(app)
    assert seen and "no request is active" in seen[0]


def test_an_apps_dbsession_added_after_a_commit_drops_its_local_entries(db_url, check):
    """include, ``config.commit()``, then the seed's thread-local Session as reified dbsession: the next request reads the truth."""

    config, meta_session, engine = thread_local_app(db_url, commit_first=True)
    stmt = name_of(1)

    view = cached_and_uncached(stmt)

    config.add_route("read", "/read")
    config.add_view(view, route_name="read", renderer="json")
    web = TestApp(config.make_wsgi_app())
    try:
        assert web.get("/read").json == {"cached": "person 1", "uncached": "person 1"}
        commit_in_another_process(db_url, "renamed")
        assert truth(check, stmt) == [("renamed",)]
        page = web.get("/read").json
        assert page["uncached"] == "renamed"
        assert page["cached"] == page["uncached"]
    finally:
        meta_session.remove()
        engine.dispose()


def test_a_stream_paused_while_the_thread_serves_other_requests_keeps_its_session(make_memory):
    """A DB stream read part-way, two other requests of the thread served, then the rest: all read, nothing left."""
    app = make_memory()
    scenario(
        lambda request: Response(app_iter=_db_stream(request, 3)),
        sub=lambda request: {"n": request.dbsession.execute(name_of(4)).scalar_one()},
    )
    with _NoGC():
        app_iter = Request.blank("/run").call_application(app)[2]
        iterator = iter(app_iter)
        assert next(iterator) == b"person 1;"
        for _ in range(2):
            assert TestApp(app).get("/sub").json == {"n": "person 4"}
        assert b"".join(iterator) == b"person 2;person 3;"
        app_iter.close()
        assert_clean(app)
