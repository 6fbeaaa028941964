"""Attacks on the request lifecycle around request.dbsession's cache hits (session 19, the application side).

A real Pyramid application (WebTest, a SQLite file, ``config.include("pyramid_sessioncache")``,
pyramid_tm) runs the view each test sets; what was committed is read on a connection of its own.
"""

from __future__ import annotations

import threading

import pytest
import transaction
import zope.sqlalchemy
from pyramid.config import Configurator
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Query, sessionmaker
from webtest import TestApp

import pyramid_sessioncache
from pyramid_sessioncache.addon.interfaces import IDBSessionFactory
from pyramid_sessioncache.storage.backends import local_session

from .models import Person
from .test_attack_request import names

#: The view each test runs at /run: set by the test itself.
VIEW: dict = {}


def run(request):
    found = VIEW["view"](request)
    return found if found is not None else {}


@pytest.fixture
def make(db_url):
    """Make the application, with more settings: ``make(**settings)``; disposed of after the test.

    ``dbsession``: the application's own ``request.dbsession`` (a request method), if any.
    """
    made = []

    def make(dbsession=None, **settings):
        config = Configurator(
            settings={
                "sqlalchemy.url": db_url,
                "cache.regions": "local_session, shared",
                "cache.local_session.type": "ext:local_session",
                "cache.shared.type": "memory",
                "cache.shared.expire": "60",
                **settings,
            }
        )
        config.include("pyramid_sessioncache")
        if dbsession is not None:
            config.add_request_method(dbsession, "dbsession", reify=True)
        config.add_route("run", "/run")
        config.add_view(run, route_name="run", renderer="json")
        app = config.make_wsgi_app()
        factory = app.registry.queryUtility(IDBSessionFactory)
        if factory is not None:
            made.append(factory.kw["bind"])
        return TestApp(app)

    VIEW.clear()
    yield make
    VIEW.clear()
    for engine in made:
        engine.dispose()


def person_1():
    return select(Person).where(Person.id == 1)


# --- legacy Query made without a Session ---------------------------------------------------------------------


@pytest.mark.parametrize("call", ["invalidate", "cache_parameters", "cached_query"])
def test_a_query_made_without_a_session_runs_in_the_requests(make, call):
    """``Query(Person)`` has no Session: request.sessioncache raised AttributeError ('NoneType' ... 'get_bind')."""
    web = make()

    def view(request):
        stored = request.cached_query(request.dbsession.query(Person), region="shared").all()
        if call == "invalidate":
            request.sessioncache.invalidate(Query(Person), region="shared")
            beaker_cache, key = request.sessioncache.cache_parameters(request.dbsession.query(Person), region="shared")
            return {"gone": not beaker_cache.has_key(key)}
        if call == "cache_parameters":
            beaker_cache, key = request.sessioncache.cache_parameters(Query(Person), region="shared")
            return {"gone": beaker_cache.get(key) is None, "n": len(stored)}
        return {"n": len(request.cached_query(Query(Person), region="shared").all())}

    VIEW["view"] = view
    expected = {"invalidate": {"gone": True}, "cache_parameters": {"gone": False, "n": 20}, "cached_query": {"n": 20}}
    assert web.get("/run").json == expected[call]


def test_the_engines_functions_ask_for_the_session_of_a_query_made_without_one(Session):
    with pytest.raises(TypeError, match="made without a Session .* pass session="):
        pyramid_sessioncache.cache_parameters(Query(Person), region="memory")
    pyramid_sessioncache.invalidate(Query(Person), Session(), region="memory")


# --- explicit invalidation and the request's commit ----------------------------------------------------------


@pytest.mark.parametrize("how", ["invalidate", "invalidate_region", "invalidate_all"])
def test_an_invalidation_before_the_commit_is_not_undone_by_a_concurrent_read(make, db_url, how):
    """Manual invalidation: the view renames person 1 and invalidates; another request reads before the commit.

    It missed, read the committed row ("person 1") and stored it: after the commit that entry was
    served until it expired, though the view had invalidated it.
    """
    web = make(**{"sessioncache.invalidation": "manual"})
    invalidated, committed = threading.Event(), threading.Event()

    def view(request):
        if not request.params.get("write"):
            return {"name": request.cached_query(person_1(), region="shared").scalars().one().name}
        request.cached_query(person_1(), region="shared").scalars().one().name = "renamed"
        request.dbsession.flush()
        if how == "invalidate":
            request.sessioncache.invalidate(person_1(), region="shared")
        else:
            getattr(request.sessioncache, how)(*(["shared"] if how == "invalidate_region" else []))
        invalidated.set()
        committed.wait(60)  # until the other request was served (a loaded machine may take seconds)

    VIEW["view"] = view
    assert web.get("/run").json == {"name": "person 1"}
    writer = threading.Thread(target=web.get, args=("/run?write=1",))
    writer.start()
    assert invalidated.wait(60)
    assert web.get("/run").json == {"name": "person 1"}  # not committed yet: stored again
    committed.set()
    writer.join(60)
    assert names(db_url)[1] == "renamed"
    assert web.get("/run").json == {"name": "renamed"}


def test_an_invalidation_after_the_explicit_managers_commit_is_done_at_once(make):
    """A response callback runs after pyramid_tm's commit: no transaction to wait for, none begun."""
    web = make(**{"tm.manager_hook": "pyramid_tm.explicit_manager"})

    def late(request, response):
        request.sessioncache.invalidate(person_1(), region="shared")
        beaker_cache, key = request.sessioncache.cache_parameters(person_1(), region="shared")
        response.headers["X-Gone"] = str(not beaker_cache.has_key(key))

    def view(request):
        request.add_response_callback(late)
        return {"name": request.cached_query(person_1(), region="shared").scalars().one().name}

    VIEW["view"] = view
    assert web.get("/run").headers["X-Gone"] == "True"


# --- pyramid_sessioncache.Session, in the style of meta.Session ------------------------------------------


@pytest.mark.parametrize("call", ["configure", "arguments"])
@pytest.mark.parametrize("in_request", [True, False])
def test_the_scoped_session_says_it_is_made_by_the_applications_factory(make, call, in_request):
    """Seed-style ``Session.configure(bind=engine)`` / ``Session(autoflush=False)``.

    They raised ``AttributeError: 'function' object has no attribute 'configure'``, ``TypeError:
    _request_session() got an unexpected keyword argument``, or, outside a request, that no request
    is active: none says that the Session is ``request.dbsession``, made by the application's factory.
    """

    def use():
        with pytest.raises(pyramid_sessioncache.SessionCacheError, match="request.dbsession.*factory") as caught:
            if call == "configure":
                pyramid_sessioncache.Session.configure(autoflush=False)
            else:
                pyramid_sessioncache.Session(autoflush=False)
        return {"said": str(caught.value)}

    web = make()
    if not in_request:
        use()
        return
    VIEW["view"] = lambda request: use()
    assert "autoflush" in web.get("/run").json["said"]
    assert not pyramid_sessioncache.Session.registry.registry


def test_a_test_fixtures_own_session_outlives_each_request_that_used_the_scoped_session(make, db_url):
    """pyramid-cookiecutter-starter's functional tests: one ``app.dbsession`` for every request of a test.

    It is joined to the test's doomed transaction manager, which the test aborts at its end. The
    end-of-request ``Session.remove()`` closed it: the rows the test had flushed were rolled back after
    the first request, and its objects detached.
    """
    web = make(dbsession=lambda request: request.environ["app.dbsession"])  # the starter's, in its tests
    engine = create_engine(db_url)
    tm = transaction.TransactionManager(explicit=True)
    tm.begin()
    tm.doom()
    session = sessionmaker(bind=engine)(info={"request": None})
    zope.sqlalchemy.register(session, transaction_manager=tm)
    person = Person(id=900, name="the test's")
    session.add(person)
    session.flush()

    def view(request):
        scoped = pyramid_sessioncache.Session()
        found = scoped.scalars(select(Person).options(pyramid_sessioncache.FromCache("local_session"))).all()
        return {"same": scoped is request.dbsession, "n": len(found)}

    VIEW["view"] = view
    environ = {"tm.active": True, "tm.manager": tm, "app.dbsession": session}
    try:
        for _ in range(2):
            assert web.get("/run", extra_environ=environ).json == {"same": True, "n": 21}
            assert not pyramid_sessioncache.Session.registry.registry
            assert local_session.INFO_KEY not in session.info  # Session.remove() dropped its local cache
        assert person in session and session.get(Person, 900).name == "the test's"
    finally:
        tm.abort()
        engine.dispose()
    assert 900 not in names(db_url)


def test_mark_changed_joins_an_applications_session_as_it_was_registered(make, db_url):
    """The application registered its Session with ``keep_session=True``; the view marks it changed first.

    zope.sqlalchemy's plain ``mark_changed()`` joined it with ``keep_session=False``: it was closed at
    commit, and what the view had loaded was detached.
    """
    engine = create_engine(db_url)
    made = []

    def dbsession(request):
        session = sessionmaker(bind=engine)(info={"request": request})
        zope.sqlalchemy.register(session, transaction_manager=request.tm, keep_session=True)
        made.append(session)
        return session

    def view(request):
        request.sessioncache.mark_changed(Person)
        request.dbsession.execute(text("UPDATE person SET name = 'raw' WHERE id = 1"))
        made.append(request.dbsession.get(Person, 2))

    VIEW["view"] = view
    try:
        make(dbsession=dbsession).get("/run")
        session, person = made
        assert person in session and names(db_url)[1] == "raw"
    finally:
        engine.dispose()


# --- the end of the request -------------------------------------------------------------------------------


def test_a_finished_callback_that_reads_after_the_sessions_close_leaves_no_connection_out(make):
    """request.dbsession was closed by the first finished callback; an audit callback registered after it
    reopened it with a miss, and its connection stayed checked out until the thread's next request."""
    web = make()
    seen = []

    def audit(request):
        seen.append(request.cached_query(person_1(), region="shared").scalars().one().name)

    def view(request):
        assert not request.dbsession.in_transaction()  # made first: its closing callback comes before audit
        request.add_finished_callback(audit)

    VIEW["view"] = view
    web.get("/run")
    engine = web.app.registry.getUtility(IDBSessionFactory).kw["bind"]
    assert seen == ["person 1"] and engine.pool.checkedout() == 0
    transaction.manager.abort()  # the one audit joined after pyramid_tm's commit: what the next request's begin() does
