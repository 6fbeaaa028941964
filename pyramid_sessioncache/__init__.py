"""pyramid_sessioncache: SQLAlchemy ORM query results cached in Beaker regions.

Include it in a Pyramid application::

    config.include("pyramid_sessioncache")

then, in a view::

    people = request.cached_query(select(Person).where(Person.name == name)).scalars().all()

The package has two layers and the Pyramid add-on on top:

- ``engine/``: the caching engine (:class:`SessionCache`, :class:`FromCache`,
  :class:`RelationshipCache`, :func:`cached_query`, keys, the ORM hook,
  invalidation).  It needs no Pyramid and works in any SQLAlchemy program.
- ``storage/``: cache regions and their Beaker backends
  (:class:`ScopedSessionNamespace` for ``ext:local_session``, bounded
  memory, signed Redis).  It knows nothing of queries.
- ``addon/``: ``includeme``, settings, ``request.dbsession``,
  ``request.cached_query()``, the toolbar panel: the only code that
  imports Pyramid.  Its public names here are imported on first use, so
  the engine works where Pyramid is not installed.

Importing the package installs nothing: the engine's Session listeners are
installed, once per process, when the first :class:`SessionCache` or
caching option is made.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .engine.cache import SessionCache, cache_of
from .engine.early import cached_query
from .engine.entries import cache_parameters, invalidate, invalidate_all, invalidate_region
from .engine.invalidation.writes import invalidate_tables
from .engine.options import FromCache, RelationshipCache
from .errors import (
    DatabaseNameError,
    InvalidOptionError,
    NoRegionsError,
    NotCacheableError,
    SessionCacheError,
    UnknownRegionError,
    UnpicklableResultError,
)
from .storage import signing
from .storage.backends.local_session import ScopedSessionNamespace
from .storage.region import CacheRegions, Region

__all__ = [
    "CacheRegions",
    "DatabaseNameError",
    "FromCache",
    "InvalidOptionError",
    "NoRegionsError",
    "NotCacheableError",
    "Region",
    "RelationshipCache",
    "RequestCache",
    "ScopedSessionNamespace",
    "Session",
    "SessionCache",
    "SessionCacheError",
    "Settings",
    "UnknownRegionError",
    "UnpicklableResultError",
    "cache_of",
    "cache_parameters",
    "cached_query",
    "get_engine",
    "get_session_cache",
    "includeme",
    "invalidate",
    "invalidate_all",
    "invalidate_region",
    "invalidate_tables",
    "parse_settings",
    "request_cached_query",
    "signing",
]

#: The public names of the Pyramid add-on, imported when first used.
_ADDON_NAMES = {
    "RequestCache": "pyramid_sessioncache.addon.request",
    "Session": "pyramid_sessioncache.addon.session",
    "Settings": "pyramid_sessioncache.addon.settings",
    "parse_settings": "pyramid_sessioncache.addon.settings",
    "get_engine": "pyramid_sessioncache.addon",
    "get_session_cache": "pyramid_sessioncache.addon",
    "includeme": "pyramid_sessioncache.addon",
}


def __getattr__(name: str) -> Any:
    if name == "request_cached_query":
        return import_module("pyramid_sessioncache.addon.request").cached_query
    module = _ADDON_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'pyramid_sessioncache' has no attribute {name!r}")
    return getattr(import_module(module), name)
