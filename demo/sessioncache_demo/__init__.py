"""The pyramid_sessioncache demo: people and their addresses, cached three ways.

- ``local_session`` (``ext:local_session``): the person page runs one query
  twice in a request; the second run is served from the request's Session.
- ``short_term`` (memory, or any shared backend): the paginated list of
  people, with the lazy loads of their addresses.
- ``long_term``: postal codes, cities and countries, which never change.

Serve it with ``pserve development.ini``; it creates and seeds its SQLite
database on first start.
"""

from __future__ import annotations

from typing import Any

from pyramid.config import Configurator
from pyramid.csrf import CookieCSRFStoragePolicy
from pyramid.exceptions import ConfigurationError
from sqlalchemy import Engine

from pyramid_sessioncache import get_engine, get_session_cache

from . import seed, sqlcount

#: The regions the demo's views use.
REGIONS = ("local_session", "short_term", "long_term")

#: Cache settings used when the settings name no regions, so that
#: ``sessioncache_demo.main({}, **{"sqlalchemy.url": url})`` is enough.
DEFAULT_CACHE_SETTINGS = {
    "cache.regions": ", ".join(REGIONS),
    "cache.type": "memory",
    "cache.local_session.type": "ext:local_session",
    "cache.short_term.expire": "60",
    "cache.long_term.expire": "3600",
    "sessioncache.default_region": "local_session",
}


def main(global_config: Any, **settings: Any) -> Any:
    """Return the demo's WSGI application.

    The ``paste.app_factory`` behind ``use = egg:sessioncache_demo``.
    Needs ``sqlalchemy.url``; ``cache.*`` settings default to
    :data:`DEFAULT_CACHE_SETTINGS`.  ``demo.people`` (default 300) is how
    many people to seed into an empty database at start-up.
    """
    if "cache.regions" not in settings:
        settings = {**DEFAULT_CACHE_SETTINGS, **settings}
    if not settings.get("sqlalchemy.url"):
        raise ConfigurationError("the demo needs a database: set sqlalchemy.url (e.g. sqlite:///%(here)s/demo.sqlite)")
    people = _people(settings.get("demo.people", seed.PEOPLE))
    settings.setdefault("jinja2.undefined", "strict")
    with Configurator(settings=settings) as config:
        config.include("pyramid_jinja2")
        config.add_jinja2_search_path("sessioncache_demo:templates")
        config.include("pyramid_sessioncache")
        config.include(".sqlcount")
        config.include(".panel")
        config.include(".routes")
        config.set_csrf_storage_policy(CookieCSRFStoragePolicy(httponly=True, samesite="Lax"))
        config.set_default_csrf_options(require_csrf=True)
        config.scan(".views")
        config.commit()
        _check_regions(config.registry)
        engine = engine_of(config.registry)
        sqlcount.watch(engine)
        seed.initialize(engine, people)
        return config.make_wsgi_app()


def engine_of(registry: Any) -> Engine:
    """Return the engine behind ``request.dbsession``."""
    return get_engine(registry)


def _people(value: Any) -> int:
    try:
        people = int(value)
    except (TypeError, ValueError):
        people = -1
    if people < 0:
        raise ConfigurationError(f"invalid setting demo.people = {value!r}: must be a whole number, 0 or more")
    return people


def _check_regions(registry: Any) -> None:
    configured = get_session_cache(registry).regions
    missing = [name for name in REGIONS if name not in configured]
    if missing:
        raise ConfigurationError(
            f"the demo uses the cache regions {', '.join(REGIONS)}: "
            f"add {', '.join(missing)} to cache.regions (now: {', '.join(configured)})"
        )
