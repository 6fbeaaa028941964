"""A small Pyramid application for the multi-process and multi-thread tests."""

from __future__ import annotations

from pyramid.config import Configurator
from sqlalchemy import select

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
    config.add_route("names", "/names")
    config.add_route("person", "/people/{id}")
    config.add_route("rename", "/people/{id}/rename")
    config.add_route("variant", "/people/{id}/variant/{n}")
    config.add_view(names, route_name="names", renderer="json")
    config.add_view(person, route_name="person", renderer="json")
    config.add_view(variant, route_name="variant", renderer="json")
    config.add_view(rename, route_name="rename", renderer="json", request_method="POST")
    return config.make_wsgi_app()
