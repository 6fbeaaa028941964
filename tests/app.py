"""A small Pyramid application for the multi-process and multi-thread tests."""

from __future__ import annotations

import os
import time

from pyramid.config import Configurator
from sqlalchemy import create_engine, event, func, select
from sqlalchemy.orm import sessionmaker

from .models import Person


def names(request):
    """Every person's name, from the shared region."""
    stmt = select(Person.id, Person.name).order_by(Person.id)
    rows = request.cached_query(stmt, region="shared").all()
    return {str(id_): name for id_, name in rows}


def person(request):
    """One person, as an object from the shared region."""
    stmt = select(Person).where(Person.id == int(request.matchdict["id"]))
    return {"name": request.cached_query(stmt, region="shared").scalar_one().name}


def variant(request):
    """One person, from the shared region, under a key of its own for each ``n``: a new entry per ``n``."""
    n = request.matchdict["n"]
    stmt = select(Person).where(Person.id == int(request.matchdict["id"]), Person.name != f"nobody {n}")
    return {"name": request.cached_query(stmt, region="shared").scalar_one().name}


def rename(request):
    """Rename a person; pyramid_tm commits when the view returns."""
    found = request.dbsession.get(Person, int(request.matchdict["id"]))
    found.name = request.params["name"]
    return {"renamed": found.id}


def slow(request):
    """A person's name (``?id=``, 1 by default) through the slow SQL function ``slow()``, from the shared region."""
    stmt = select(Person.name, func.slow(Person.id)).where(Person.id == int(request.params.get("id", "1")))
    return {"name": request.cached_query(stmt, region="shared").one()[0]}


def plain(request):
    """Person 1's name, uncached: a page that only needs a connection."""
    return {"name": request.dbsession.get(Person, 1).name}


def slow_engine(db_url: str, settings: dict) -> object:
    """An engine whose connections have ``slow(x)``: returns ``x`` after ``test.query_seconds``.

    Before sleeping it appends this process's id to ``test.started_file``
    (if set); after, it fails if ``test.fail_file`` exists, or once if
    ``test.fail_once_file`` exists (the call that removes it fails), so
    that a test can make regenerations fail, or find the process that
    runs one.
    """
    engine = create_engine(
        db_url,
        **{
            key[len("sqlalchemy.") :]: int(value)
            for key, value in settings.items()
            if key in ("sqlalchemy.pool_size", "sqlalchemy.max_overflow")
        },
    )
    seconds = float(settings["test.query_seconds"])
    started, failing = settings.get("test.started_file"), settings.get("test.fail_file")
    failing_once = settings.get("test.fail_once_file")

    def slow_function(value):
        if started:
            with open(started, "a") as file:
                file.write(f"{os.getpid()}\n")
        time.sleep(seconds)
        if failing and os.path.exists(failing):
            raise RuntimeError("failing on purpose")
        if failing_once:
            try:
                os.remove(failing_once)  # one caller of all processes succeeds
            except FileNotFoundError:
                pass
            else:
                raise RuntimeError("failing once on purpose")
        return value

    @event.listens_for(engine, "connect")
    def connect(dbapi_connection, record):
        dbapi_connection.create_function("slow", 1, slow_function)

    return engine


def make_app(db_url: str, region: dict, **extra: str) -> object:
    settings = {
        **extra,
        "sqlalchemy.url": db_url,
        "cache.regions": "local_session, shared",
        "cache.local_session.type": "ext:local_session",
        "sessioncache.secret": "a test secret, long enough",
        **{f"cache.shared.{key}": value for key, value in region.items()},
    }
    config = Configurator(settings=settings)
    config.include("pyramid_sessioncache")
    if "test.query_seconds" in extra:
        config.set_sessioncache_session_factory(sessionmaker(bind=slow_engine(db_url, settings)))
        config.add_route("slow", "/slow")
        config.add_route("plain", "/plain")
        config.add_view(slow, route_name="slow", renderer="json")
        config.add_view(plain, route_name="plain", renderer="json")
    config.add_route("names", "/names")
    config.add_route("person", "/people/{id}")
    config.add_route("rename", "/people/{id}/rename")
    config.add_route("variant", "/people/{id}/variant/{n}")
    config.add_view(names, route_name="names", renderer="json")
    config.add_view(person, route_name="person", renderer="json")
    config.add_view(variant, route_name="variant", renderer="json")
    config.add_view(rename, route_name="rename", renderer="json", request_method="POST")
    return config.make_wsgi_app()
