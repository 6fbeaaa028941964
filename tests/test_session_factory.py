"""The application's engine and Sessions: handed over, or the add-on's own only when it makes request.dbsession."""

from __future__ import annotations

import pytest
import zope.sqlalchemy
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError
from pyramid.scripting import prepare
from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker
from webtest import TestApp

from pyramid_sessioncache import FromCache, get_engine, get_session_cache
from pyramid_sessioncache.addon import request_session_cache
from pyramid_sessioncache.addon.interfaces import IDBSessionFactory
from pyramid_sessioncache.testing import SQLCounter

from .models import Person

SETTINGS = {"cache.regions": "local_session, shared", "cache.local_session.type": "ext:local_session"}


def names(request):
    query = select(Person.name).where(Person.id <= 2).order_by(Person.id)
    return {
        "names": request.dbsession.scalars(query.options(FromCache("shared"))).all(),
        "info": sorted(key for key in request.dbsession.info if key in ("app", "request", "sessioncache")),
    }


def make_app(db_url, factory=None, own_dbsession=False, **settings):
    config = Configurator(settings={"sqlalchemy.url": db_url, **SETTINGS, **settings})
    config.include("pyramid_sessioncache")
    if factory is not None:
        config.set_sessioncache_session_factory(factory)
    if own_dbsession:
        made = factory or sessionmaker(bind=create_engine(db_url))

        def dbsession(request):
            session = made(info={"request": None})  # carries no cache
            zope.sqlalchemy.register(session, transaction_manager=request.tm)
            return session

        config.add_request_method(dbsession, "dbsession", reify=True)
    config.add_route("names", "/names")
    config.add_view(names, route_name="names", renderer="json")
    return config.make_wsgi_app()


def test_a_handed_over_factory_makes_the_add_ons_dbsession(db_url, engine):
    factory = sessionmaker(bind=engine, info={"app": "mine"})
    app = make_app(db_url, factory)
    assert get_engine(app.registry) is engine
    assert app.registry.getUtility(IDBSessionFactory) is factory
    with SQLCounter(engine) as sql:
        for _ in range(2):
            body = TestApp(app).get("/names").json
            assert body == {"names": ["person 1", "person 2"], "info": ["app", "request", "sessioncache"]}
    assert sql.count == 1


def test_sessions_of_a_handed_over_factory_carry_the_cache_everywhere(db_url, engine):
    factory = sessionmaker(bind=engine)
    app = make_app(db_url, factory, own_dbsession=True)
    cache = get_session_cache(app.registry)
    assert factory.kw["info"] == {"sessioncache": cache}
    with factory() as session:  # a script's, or a test fixture's
        query = select(Person).where(Person.id == 1).options(FromCache("local_session"))
        assert session.scalars(query).one() is session.scalars(query).one()


def test_no_engine_is_built_when_the_application_makes_request_dbsession(db_url, monkeypatch):
    built = []
    monkeypatch.setattr("pyramid_sessioncache.addon.engine_from_config", lambda *a, **k: built.append(a))
    app = make_app(db_url, own_dbsession=True)
    assert built == []
    assert get_engine(app.registry) is None
    assert app.registry.queryUtility(IDBSessionFactory) is None
    # Its Sessions carry no cache: the request they serve names it.
    assert TestApp(app).get("/names").json["names"] == ["person 1", "person 2"]


def test_the_add_on_builds_its_engine_when_it_makes_request_dbsession(db_url):
    app = make_app(db_url)
    assert str(get_engine(app.registry).url) == db_url


def test_set_sessioncache_session_factory_wants_a_sessionmaker(db_url, engine):
    config = Configurator(settings={**SETTINGS})
    config.include("pyramid_sessioncache")
    with pytest.raises(ConfigurationError, match="expects a sqlalchemy.orm.sessionmaker, got Engine\\(sqlite"):
        config.set_sessioncache_session_factory(engine)


def test_two_factories_handed_over_conflict(engine):
    config = Configurator(settings={**SETTINGS})
    config.include("pyramid_sessioncache")
    config.set_sessioncache_session_factory(sessionmaker(bind=engine))
    config.set_sessioncache_session_factory(sessionmaker(bind=engine))
    with pytest.raises(ConfigurationError, match="[Cc]onflict"):
        config.commit()


def test_the_finder_answers_for_the_request_dbsession_only(db_url, engine):
    app = make_app(db_url, own_dbsession=True)
    other = sessionmaker(bind=engine)()
    assert request_session_cache(other) is None  # no request
    with prepare(registry=app.registry) as env:
        request = env["request"]
        assert request_session_cache(other) is None  # dbsession not made yet
        session = request.dbsession
        assert request_session_cache(session) is get_session_cache(app.registry)
        assert request_session_cache(other) is None
    other.close()


def test_an_engine_that_cannot_be_built_stops_start_up(db_url):
    config = Configurator(settings={"sqlalchemy.url": db_url, "sqlalchemy.pool_size": "many", **SETTINGS})
    config.include("pyramid_sessioncache")  # the URL is fine; the engine is built when the add-on needs it
    with pytest.raises(ConfigurationError, match="invalid setting sqlalchemy.url"):
        config.commit()
