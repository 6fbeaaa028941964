"""The Pyramid layer, through real requests (WebTest)."""

from __future__ import annotations

import pytest
import transaction
import zope.sqlalchemy
from pyramid.config import Configurator
from pyramid.httpexceptions import HTTPInternalServerError
from pyramid.request import Request
from sqlalchemy import event, select, text, update
from sqlalchemy.orm import sessionmaker
from webtest import TestApp

import pyramid_sessioncache
from pyramid_sessioncache import NotCacheableError, UnknownRegionError
from pyramid_sessioncache.addon.interfaces import IDBSessionFactory
from pyramid_sessioncache.addon.session import dbsession
from pyramid_sessioncache.addon.transaction import EVENTS, register
from pyramid_sessioncache.storage.backends.local_session import INFO_KEY

from .conftest import SQLCounter
from .models import Person

SETTINGS = {
    "cache.regions": "local_session, short_term",
    "cache.type": "memory",
    "cache.local_session.type": "ext:local_session",
    "cache.short_term.expire": "60",
    "sessioncache.default_region": "local_session",
}


def by_name(request):
    return select(Person).where(Person.name == request.matchdict["name"])


def twice(request):
    first = request.cached_query(by_name(request)).scalars().one()
    second = request.cached_query(by_name(request)).scalars().one()
    request.seen.append(request.dbsession)
    return {"name": first.name, "same": first is second}


def legacy(request):
    query = request.dbsession.query(Person).filter(Person.name == request.matchdict["name"])
    first = request.cached_query(query).one()
    second = request.cached_query(query, region="local_session").one()
    return {"name": first.name, "same": first is second}


def shared(request):
    people = request.cached_query(by_name(request), region="short_term").scalars().all()
    return {"names": [p.name for p in people]}


def boom(request):
    request.cached_query(by_name(request)).scalars().one()
    request.seen.append(request.dbsession)
    raise RuntimeError("boom")


def error_response(request):
    request.cached_query(by_name(request)).scalars().one()
    request.seen.append(request.dbsession)
    return HTTPInternalServerError()


def scoped(request):
    session = pyramid_sessioncache.Session()
    person = session.scalars(by_name(request).options(pyramid_sessioncache.FromCache())).one()
    request.seen.append(session)
    return {"is_dbsession": session is request.dbsession, "name": person.name}


def rename(request):
    person = request.cached_query(by_name(request), region="short_term").scalars().one()
    person.name = request.params["to"]
    request.sessioncache.invalidate(by_name(request), region="short_term")
    return {"renamed": person.id}


def bad_input(request):
    request.dbsession.add(Person(id=100, name="kept"))
    errors = []
    for call in (
        lambda: request.cached_query(by_name(request), region="nowhere"),
        lambda: request.cached_query(update(Person).values(name="x")),
        lambda: request.cached_query(42),
        lambda: request.dbsession.execute(by_name(request).options(pyramid_sessioncache.FromCache("nowhere"))),
    ):
        try:
            call()
        except (UnknownRegionError, NotCacheableError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    return {"errors": errors}


def invalidations(request):
    stmt = by_name(request)
    request.cached_query(stmt, region="short_term").scalars().one()
    cache, how = request.sessioncache, request.params["how"]
    if how == "query":
        cache.invalidate(stmt, region="short_term")
    elif how == "legacy query":
        cache.invalidate(request.dbsession.query(Person).filter(Person.name == request.matchdict["name"]), "short_term")
    elif how == "region":
        cache.invalidate_region("short_term")
    elif how == "all":
        cache.invalidate_all()
    return {"lookups": [(lookup.region, lookup.hit) for lookup in cache.lookups]}


def raw(request):
    request.dbsession.connection().execute(
        text("UPDATE person SET name = :name WHERE name = :old"), {"name": "raw", "old": request.matchdict["name"]}
    )
    if request.params.get("mark"):
        request.sessioncache.mark_changed("person")
    return {}


VIEWS = {
    "raw": raw,
    "twice": twice,
    "legacy": legacy,
    "shared": shared,
    "boom": boom,
    "error": error_response,
    "scoped": scoped,
    "rename": rename,
    "bad": bad_input,
    "invalidations": invalidations,
}


def make_app(db_url, own_dbsession=False, **settings):
    config = Configurator(settings={"sqlalchemy.url": db_url, **SETTINGS, **settings})
    config.include("pyramid_sessioncache")
    if own_dbsession:
        config.include(cookiecutter_models)
    seen: list = []
    config.add_request_method(lambda request: seen, "seen", reify=True)
    for name, view in VIEWS.items():
        config.add_route(name, f"/{name}/{{name}}")
        config.add_view(view, route_name=name, renderer="json")
    app = config.make_wsgi_app()
    app.seen = seen
    return app


def cookiecutter_models(config):
    """request.dbsession as pyramid-cookiecutter-starter's models/__init__.py makes it."""
    from sqlalchemy import engine_from_config

    factory = sessionmaker(bind=engine_from_config(config.get_settings(), "sqlalchemy."))
    config.registry["dbsession_factory"] = factory

    def dbsession(request):
        session = factory(info={"request": request})
        zope.sqlalchemy.register(session, transaction_manager=request.tm)
        session.info["made_by"] = "app"
        return session

    config.add_request_method(dbsession, "dbsession", reify=True)


@pytest.fixture
def app(db_url):
    return make_app(db_url)


@pytest.fixture
def app_sql(app):
    return SQLCounter(app.registry.getUtility(IDBSessionFactory).kw["bind"])


def test_local_session_twice_in_a_request_runs_once(app, app_sql):
    web = TestApp(app)
    assert web.get("/twice/person 3").json == {"name": "person 3", "same": True}
    assert app_sql.count == 1
    assert web.get("/twice/person 3").json["same"]
    assert app_sql.count == 2  # a new request, a new Session: the local cache is gone
    assert INFO_KEY not in app.seen[0].info


def test_legacy_query(app, app_sql):
    assert TestApp(app).get("/legacy/person 4").json == {"name": "person 4", "same": True}
    assert app_sql.count == 1


def test_shared_region_survives_requests(app, app_sql):
    web = TestApp(app)
    assert web.get("/shared/person 5").json == {"names": ["person 5"]}
    assert web.get("/shared/person 5").json == {"names": ["person 5"]}
    assert app_sql.count == 1


@pytest.mark.parametrize("path", ["/boom/person 1", "/error/person 1"])
def test_local_cache_is_dropped_when_a_request_fails(app, path):
    web = TestApp(app)
    if path.startswith("/boom"):
        with pytest.raises(RuntimeError):
            web.get(path)
    else:
        web.get(path, status=500)
    session = app.seen[0]
    assert INFO_KEY not in session.info
    assert not session.in_transaction()


def test_scoped_session_is_the_request_session_and_is_removed(app, app_sql):
    web = TestApp(app)
    assert web.get("/scoped/person 6").json == {"is_dbsession": True, "name": "person 6"}
    assert not pyramid_sessioncache.Session.registry.registry
    assert INFO_KEY not in app.seen[0].info


def test_scoped_session_outside_a_request_says_so():
    with pytest.raises(pyramid_sessioncache.SessionCacheError, match="no request is active"):
        pyramid_sessioncache.Session()


def test_an_apps_own_dbsession_wins_and_still_caches(db_url):
    app = make_app(db_url, own_dbsession=True)
    sql = SQLCounter(app.registry["dbsession_factory"].kw["bind"])
    assert TestApp(app).get("/twice/person 7").json == {"name": "person 7", "same": True}
    assert sql.count == 1
    assert app.seen[0].info["made_by"] == "app"
    assert TestApp(app).get("/shared/person 7").json == {"names": ["person 7"]}
    assert TestApp(app).get("/shared/person 7").json == {"names": ["person 7"]}
    assert sql.count == 2


def test_write_then_explicit_invalidation(app, app_sql):
    web = TestApp(app)
    assert web.get("/shared/person 8").json == {"names": ["person 8"]}
    web.get("/rename/person 8", params={"to": "Eight"})
    assert web.get("/shared/Eight").json == {"names": ["Eight"]}
    assert web.get("/shared/person 8").json == {"names": []}


def test_bad_input_raises_at_the_call_site_and_keeps_the_transaction(app, db_url):
    errors = TestApp(app).get("/bad/person 1").json["errors"]
    assert errors[0].startswith("UnknownRegionError: unknown cache region 'nowhere'")
    assert errors[1].startswith("NotCacheableError: only SELECT statements can be cached, not Update")
    assert errors[2].startswith("NotCacheableError: cached_query() expects a select() or a Query, got 42")
    assert errors[3].startswith("UnknownRegionError")
    factory = app.registry.getUtility(IDBSessionFactory)
    with factory() as session:
        assert session.get(Person, 100).name == "kept"


@pytest.mark.parametrize(
    ("how", "second_hit"),
    [("none", True), ("query", False), ("legacy query", False), ("region", False), ("all", False)],
)
def test_invalidation(app, app_sql, how, second_hit):
    web = TestApp(app)
    assert web.get("/invalidations/person 9", params={"how": how}).json["lookups"] == [["short_term", False]]
    assert web.get("/invalidations/person 9", params={"how": how}).json["lookups"] == [["short_term", second_hit]]
    assert app_sql.count == (1 if second_hit else 2)


def test_raw_sql_with_mark_changed_commits_and_invalidates(app):
    web = TestApp(app)
    assert web.get("/shared/person 11").json == {"names": ["person 11"]}
    web.get("/raw/person 11")  # no mark_changed: zope.sqlalchemy rolls the raw write back
    assert web.get("/shared/person 11").json == {"names": ["person 11"]}
    web.get("/raw/person 11", params={"mark": "1"})
    assert web.get("/shared/person 11").json == {"names": []}
    assert web.get("/shared/raw").json == {"names": ["raw"]}


class CheckoutCounter:
    """Counts the connections an engine's pool hands out."""

    def __init__(self, engine) -> None:
        self.count = 0
        event.listen(engine, "checkout", self._checkout)

    def _checkout(self, dbapi_connection, connection_record, connection_proxy) -> None:
        self.count += 1


def test_a_shared_hit_in_a_request_checks_out_no_connection(app):
    web = TestApp(app)
    checkouts = CheckoutCounter(app.registry.getUtility(IDBSessionFactory).kw["bind"])
    assert web.get("/shared/person 12").json == {"names": ["person 12"]}
    # The pool's first look-up looks at what its connections open (one
    # checked out and back: see connection_state.state_text), then the miss.
    assert checkouts.count == 2
    assert web.get("/shared/person 12").json == {"names": ["person 12"]}
    assert checkouts.count == 2  # the hit: none


def test_a_change_to_an_object_of_a_connectionless_hit_is_committed(app, app_sql):
    web = TestApp(app)
    checkouts = CheckoutCounter(app.registry.getUtility(IDBSessionFactory).kw["bind"])
    assert web.get("/shared/person 13").json == {"names": ["person 13"]}
    web.get("/rename/person 13", params={"to": "Thirteen"})  # a hit, then a change, committed by pyramid_tm
    assert checkouts.count == 3  # the pool's first look, the miss, then the rename's flush: the hit itself took none
    assert web.get("/shared/Thirteen").json == {"names": ["Thirteen"]}


def test_request_sessions_get_no_listeners_of_their_own(app):
    request = Request.blank("/")
    request.registry = app.registry
    request.tm = transaction.TransactionManager()
    session = dbsession(request)
    factory = app.registry.getUtility(IDBSessionFactory)
    assert list(session.dispatch.after_begin) == list(factory().dispatch.after_begin)
    joins = [listener for listener in session.dispatch.after_begin if hasattr(listener, "__self__")]
    assert [listener.__self__ for listener in joins] == [EVENTS]  # the factory's, not zope's per Session
    register(factory)  # a second time: no second set
    assert sum(1 for listener in factory().dispatch.after_begin if listener == EVENTS.after_begin) == 1


def test_a_session_of_the_factory_outside_a_request_joins_nothing(app):
    manager = transaction.TransactionManager()
    manager.begin()
    session = app.registry.getUtility(IDBSessionFactory)()
    session.add(Person(id=200, name="script"))
    session.flush()
    assert manager.get()._resources == []  # not joined: the script commits itself
    session.commit()
    manager.abort()
    with app.registry.getUtility(IDBSessionFactory)() as fresh:
        assert fresh.get(Person, 200).name == "script"


def test_request_sessions_join_the_manager_of_tm_manager_hook(db_url):
    app = make_app(db_url, **{"tm.manager_hook": "pyramid_tm.explicit_manager"})
    web = TestApp(app)
    assert web.get("/shared/person 14").json == {"names": ["person 14"]}
    web.get("/rename/person 14", params={"to": "Fourteen"})  # joined to the request's own manager
    assert web.get("/shared/Fourteen").json == {"names": ["Fourteen"]}
