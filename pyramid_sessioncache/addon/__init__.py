"""The Pyramid add-on: the only part of the package that knows Pyramid, zope and ini strings.

- ``includeme`` (here): reads the settings, builds the application's
  :class:`~pyramid_sessioncache.SessionCache` and registers it.
- ``settings.py``: the ``cache.*`` and ``sessioncache.*`` settings, checked.
- ``request.py``: ``request.cached_query()`` and ``request.sessioncache``.
- ``session.py``: ``request.dbsession`` and the request-scoped ``Session``.
- ``toolbar.py``: the pyramid_debugtoolbar panel.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

from pyramid.exceptions import ConfigurationError
from pyramid.interfaces import PHASE3_CONFIG, INewRequest, IRequestExtensions
from pyramid.threadlocal import get_current_request
from pyramid.tweens import INGRESS
from pyramid.util import InstancePropertyHelper
from sqlalchemy import engine_from_config
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker
from zope.sqlalchemy.datamanager import ZopeTransactionEvents

from .._weak import members
from ..engine import connection_state, hook, info, lookup
from ..engine.cache import SessionCache, add_cache_finder
from ..errors import InvalidOptionError
from ..masking import hide_url_passwords, shown
from .interfaces import IDBSessionFactory, ISessionCache
from .request import RequestCache, cached_query
from .session import OWN_DBSESSION, TWEEN, dbsession, keeps_apps_dbsession, request_begins
from .settings import invalid_option, parse_settings
from .transaction import RequestTransactionEvents
from .transaction import join as join_request_transaction
from .transaction import register as register_transaction_events


def get_session_cache(registry: Any) -> SessionCache:
    """Return the :class:`~pyramid_sessioncache.SessionCache` of the application owning ``registry``."""
    return registry.getUtility(ISessionCache)


def get_engine(registry: Any) -> Any:
    """Return the engine of the application's Sessions as the add-on knows it, or None.

    The bind of the factory handed over with
    ``config.set_sessioncache_session_factory()`` (see
    :func:`~pyramid_sessioncache.addon.set_session_factory`), else of the one the add-on built from
    ``sqlalchemy.*`` for its own ``request.dbsession``; None when the
    application defines ``request.dbsession`` and handed nothing over.
    """
    factory = registry.queryUtility(IDBSessionFactory)
    return None if factory is None else factory.kw.get("bind")


def set_session_factory(config: Any, factory: sessionmaker) -> None:
    """Hand the application's ``sessionmaker`` over to the add-on.

    The config directive ``config.set_sessioncache_session_factory(factory)``.
    Call it where the application makes its factory, e.g. in the
    ``includeme`` of a pyramid-cookiecutter-starter project's
    ``models/__init__.py``::

        session_factory = get_session_factory(dbengine)
        config.registry["dbsession_factory"] = session_factory
        config.include("pyramid_sessioncache")
        config.set_sessioncache_session_factory(session_factory)

    Every Session the factory makes from then on carries the application's
    cache in its ``info`` (so it caches in views, scripts and test fixtures
    alike), :func:`~pyramid_sessioncache.get_engine` returns its engine, and the add-on builds no
    engine of its own: one connection pool, the application's (with the
    starter's ``dbengine`` test hook, the test engine).  If the application
    defines no ``request.dbsession``, the add-on's is made by this factory.
    """
    if not isinstance(factory, sessionmaker):
        raise ConfigurationError(
            f"set_sessioncache_session_factory() expects a sqlalchemy.orm.sessionmaker, got {factory!r}"
        )

    def register() -> None:
        cache = config.registry.getUtility(ISessionCache)
        factory.configure(info={**(factory.kw.get("info") or {}), info.CACHE: cache})
        config.registry.registerUtility(factory, IDBSessionFactory)

    config.action(IDBSessionFactory, register, introspectables=())


def includeme(config: Any) -> None:
    """Set up caching from the settings of ``config``.

    Reads ``cache.*`` (regions) and ``sessioncache.*`` (add-on options),
    and adds ``request.cached_query()``, ``request.sessioncache`` and the
    directive ``config.set_sessioncache_session_factory()``.  Includes
    ``pyramid_tm``.  When the application defines no ``request.dbsession``
    of its own, adds one, made by the factory handed over, or else by one
    built from ``sqlalchemy.*``.  A bad setting raises
    :class:`pyramid.exceptions.ConfigurationError` naming it.
    """
    config.include("pyramid_tm")
    # zope.sqlalchemy's do_orm_execute listener only marks the Session
    # changed after ORM DML: cached_query() may serve hits before it.
    hook.trust_listener(ZopeTransactionEvents.do_orm_execute)
    hook.trust_listener(RequestTransactionEvents.do_orm_execute)
    # zope.sqlalchemy's after_begin joins the transaction and sets nothing on the connection.
    connection_state.quiet_at_begin(ZopeTransactionEvents.after_begin)
    # A hit in request.dbsession joins pyramid_tm's transaction without a connection.
    lookup.join_without_connection(RequestTransactionEvents.after_begin, join_request_transaction)
    # Any Session used as request.dbsession caches into the request's
    # application, whatever its info holds (the starter's test fixtures).
    add_cache_finder(request_session_cache)
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
    except InvalidOptionError as exc:  # an option only the built region could check
        raise invalid_option(exc, config.registry.settings) from None
    except Exception as exc:  # Beaker reports bad options in many ways
        # Not chained: the original message may hold a URL with its password.
        raise ConfigurationError(
            f"cannot build the cache regions from the cache.* settings: "
            f"{type(exc).__name__}: {hide_url_passwords(str(exc))}"
        ) from None
    _check_engine_url(config.registry.settings)

    def register() -> None:
        config.registry.registerUtility(cache, ISessionCache)

    config.action(ISessionCache, register)
    config.add_directive("set_sessioncache_session_factory", set_session_factory)
    config.add_request_method(cached_query, "cached_query")
    config.add_request_method(RequestCache, "sessioncache", reify=True)
    # A streamed response closes the add-on's request.dbsession once sent (see _add_dbsession()).
    config.add_tween("pyramid_sessioncache.addon.session.tween_factory", under=INGRESS)
    # An application that defines request.dbsession (as the cookiecutter
    # does) keeps its own: ours is added last, and only if none exists.
    config.action(
        ("pyramid_sessioncache", "dbsession"), _add_dbsession, args=(config.registry,), order=PHASE3_CONFIG + 1
    )
    if settings.postgresql_notify:
        config.action(
            ("pyramid_sessioncache", "listen"), _listen, args=(config.registry, cache), order=PHASE3_CONFIG + 2
        )


def _listen(registry: Any, cache: SessionCache) -> None:
    # Once request.dbsession's factory is known, the application's or ours.
    engine = get_engine(registry)
    if engine is None or engine.dialect.name != "postgresql":
        raise ConfigurationError(
            "invalid setting sessioncache.postgresql_notify = true: it needs the application's engine "
            "(sqlalchemy.url, or config.set_sessioncache_session_factory()) on PostgreSQL"
        )
    cache.listen(engine)


def request_session_cache(session: Any) -> SessionCache | None:
    """Return the cache of the current request's application if ``session`` is its ``request.dbsession``.

    The add-on's cache finder (see
    :func:`pyramid_sessioncache.engine.cache.add_cache_finder`): a Session
    that carries no cache in its ``info``, such as the one
    pyramid-cookiecutter-starter's test fixtures make with
    ``info={"request": None}`` and put in ``request.dbsession``, caches
    into the application of the request it serves.
    """
    request = get_current_request()
    if request is None or getattr(request, "__dict__", {}).get("dbsession") is not session:
        return None
    return request.registry.queryUtility(ISessionCache)


def _check_engine_url(settings: Any) -> None:
    # Checked now, so that a bad URL stops start-up at config.include();
    # the engine itself is built only if the add-on makes request.dbsession.
    url = settings.get("sqlalchemy.url")
    if not url:
        return
    try:
        make_url(url).get_dialect()
    except Exception as exc:
        # Not chained: a driver's message may hold the URL with its password.
        raise ConfigurationError(
            f"invalid setting sqlalchemy.url = {shown('sqlalchemy.url', url)}: "
            f"{type(exc).__name__}: {hide_url_passwords(str(exc))}"
        ) from None


def _engine(settings: Any) -> Any:
    if not settings.get("sqlalchemy.url"):
        return None
    try:
        engine = engine_from_config(settings, "sqlalchemy.")
    except Exception as exc:
        # Not chained: a driver's message may hold the URL with its password.
        raise ConfigurationError(
            f"invalid setting sqlalchemy.url = {shown('sqlalchemy.url', settings['sqlalchemy.url'])}: "
            f"{type(exc).__name__}: {hide_url_passwords(str(exc))}"
        ) from None
    _engines.add(engine)
    return engine


#: The engines the add-on made for ``request.dbsession``.
_engines: weakref.WeakSet[Any] = weakref.WeakSet()


def _after_fork() -> None:
    # A preloading server's master may have pooled connections (a warm-up
    # ran queries): a worker that used one would share the master's server
    # session, transaction included.  SQLAlchemy's advice for a forked
    # child: a new pool, the old one left untouched for the parent.
    for engine in members(_engines):
        engine.dispose(close=False)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _add_dbsession(registry: Any) -> None:
    if keeps_apps_dbsession(registry):
        # The application's own (a request method, or its request class's); it caches
        # through request_session_cache or its factory.
        registry[TWEEN] = True
        return
    if registry.queryUtility(IDBSessionFactory) is None:
        cache = registry.getUtility(ISessionCache)
        factory = sessionmaker(bind=_engine(registry.settings), info=cache.session_info())
        registry.registerUtility(factory, IDBSessionFactory)
    # Once per factory, instead of seven listeners on every request's Session.
    register_transaction_events(registry.getUtility(IDBSessionFactory))
    # Tells a Session first made after pyramid_tm ended that it did; closes those used after their request.
    registry.registerHandler(request_begins, (INewRequest,))
    registry[TWEEN] = True
    name, prop = InstancePropertyHelper.make_property(dbsession, name="dbsession", reify=True)
    registry.queryUtility(IRequestExtensions).descriptors[name] = registry[OWN_DBSESSION] = prop
