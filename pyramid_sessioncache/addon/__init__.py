"""The Pyramid add-on: the only part of the package that knows Pyramid, zope and ini strings.

- ``includeme`` (here): reads the settings, builds the application's
  :class:`~pyramid_sessioncache.SessionCache` and registers it.
- ``settings.py``: the ``cache.*`` and ``sessioncache.*`` settings, checked.
- ``request.py``: ``request.cached_query()`` and ``request.sessioncache``.
- ``session.py``: ``request.dbsession`` and the request-scoped ``Session``.
- ``toolbar.py``: the pyramid_debugtoolbar panel.
"""

from __future__ import annotations

from typing import Any

from pyramid.exceptions import ConfigurationError
from pyramid.interfaces import PHASE3_CONFIG, IRequestExtensions
from pyramid.util import InstancePropertyHelper
from sqlalchemy import engine_from_config
from sqlalchemy.orm import sessionmaker
from zope.sqlalchemy.datamanager import ZopeTransactionEvents

from ..engine import hook
from ..engine.cache import SessionCache
from ..masking import hide_url_passwords, shown
from .interfaces import IDBSessionFactory, ISessionCache
from .request import RequestCache, cached_query
from .session import dbsession
from .settings import parse_settings


def get_session_cache(registry: Any) -> SessionCache:
    """Return the :class:`~pyramid_sessioncache.SessionCache` of the application owning ``registry``."""
    return registry.getUtility(ISessionCache)


def get_engine(registry: Any) -> Any:
    """Return the engine built from the ``sqlalchemy.*`` settings (None without ``sqlalchemy.url``)."""
    return registry.getUtility(IDBSessionFactory).kw.get("bind")


def includeme(config: Any) -> None:
    """Set up caching from the settings of ``config``.

    Reads ``cache.*`` (regions), ``sessioncache.*`` (add-on options) and
    ``sqlalchemy.*`` (the engine), and adds ``request.dbsession``,
    ``request.cached_query()`` and ``request.sessioncache``.  Includes
    ``pyramid_tm``.  A bad setting raises
    :class:`pyramid.exceptions.ConfigurationError` naming it.
    """
    config.include("pyramid_tm")
    # zope.sqlalchemy's do_orm_execute listener only marks the Session
    # changed after ORM DML: cached_query() may serve hits before it.
    hook.trust_listener(ZopeTransactionEvents.do_orm_execute)
    settings = parse_settings(config.registry.settings)
    try:
        cache = SessionCache(
            settings.regions,
            settings.default_region,
            settings.invalidation,
            settings.retry_after,
            settings.secret,
            writes_also=settings.writes_also,
        )
    except Exception as exc:  # Beaker reports bad options in many ways
        # Not chained: the original message may hold a URL with its password.
        raise ConfigurationError(
            f"cannot build the cache regions from the cache.* settings: "
            f"{type(exc).__name__}: {hide_url_passwords(str(exc))}"
        ) from None
    engine = _engine(config.registry.settings)
    if settings.postgresql_notify:
        if engine is None or engine.dialect.name != "postgresql":
            raise ConfigurationError(
                "invalid setting sessioncache.postgresql_notify = true: it needs sqlalchemy.url on PostgreSQL"
            )
        cache.listen(engine)
    factory = sessionmaker(bind=engine, info=cache.session_info())

    def register() -> None:
        config.registry.registerUtility(cache, ISessionCache)
        config.registry.registerUtility(factory, IDBSessionFactory)

    config.action(ISessionCache, register)
    config.add_request_method(cached_query, "cached_query")
    config.add_request_method(RequestCache, "sessioncache", reify=True)
    # An application that defines request.dbsession (as the cookiecutter
    # does) keeps its own: ours is added last, and only if none exists.
    config.action(
        ("pyramid_sessioncache", "dbsession"), _add_dbsession, args=(config.registry,), order=PHASE3_CONFIG + 1
    )


def _engine(settings: Any) -> Any:
    if not settings.get("sqlalchemy.url"):
        return None
    try:
        return engine_from_config(settings, "sqlalchemy.")
    except Exception as exc:
        # Not chained: a driver's message may hold the URL with its password.
        raise ConfigurationError(
            f"invalid setting sqlalchemy.url = {shown('sqlalchemy.url', settings['sqlalchemy.url'])}: "
            f"{type(exc).__name__}: {hide_url_passwords(str(exc))}"
        ) from None


def _add_dbsession(registry: Any) -> None:
    extensions = registry.queryUtility(IRequestExtensions)
    if "dbsession" in extensions.descriptors or "dbsession" in extensions.methods:
        return
    name, prop = InstancePropertyHelper.make_property(dbsession, name="dbsession", reify=True)
    extensions.descriptors[name] = prop
