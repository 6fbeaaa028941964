"""Finding where a query's result is stored, and forgetting it: explicit invalidation.

A query is named the way it runs: a legacy ``Query`` (which knows its
Session), or a ``select()`` with the Session given.  A ``Query`` and the
equivalent ``select()`` share their key, so either reaches the entry the
other stored.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from beaker.cache import Cache
from sqlalchemy.orm import Query
from sqlalchemy.sql import Executable

from .. import _sqlalchemy
from ..errors import NoRegionsError, NotCacheableError
from ..storage.region import Region
from ..storage.versions import entry_version
from . import connection_state
from .cache import SessionCache, cache_of
from .cache_options import check_label
from .invalidation import versions
from .lookup import is_read, not_a_read
from .options import statement_option


def _statement(query: Any, session: Any) -> tuple[Any, Any, Any]:
    if isinstance(query, Query):
        statement, parameters = _sqlalchemy.query_statement(query)
        if session is None and query.session is None:
            # Keyed for the Session's bind and connection: none, none to key for.
            raise TypeError("a Query made without a Session needs the Session it runs in: pass session=")
        return statement, parameters, session or query.session
    if isinstance(query, Executable):
        if not is_read(query):
            raise not_a_read(query)
        if session is None:
            raise TypeError("a select() needs the Session it runs in: pass session=")
        return query, None, session
    raise NotCacheableError(f"expected a select(), SQL text that reads or a Query, got {query!r}")


def _cache(session: Any) -> SessionCache:
    cache = cache_of(session)
    if cache is None:
        raise NoRegionsError(
            "this Session has no cache regions: pass cache=, or make it with "
            "sessionmaker(info=session_cache.session_info())"
        )
    return cache


def _locate(query, session, region, cache_key, parameters, execution_options, cache=None):
    check_label(cache_key)
    statement, query_parameters, session = _statement(query, session)
    option = statement_option(statement)
    if cache is None:
        cache = option.cache if option is not None and option.cache is not None else _cache(session)
    chosen = cache.region(region or (option.region if option else None))
    if cache_key is None and option is not None:
        cache_key = option.cache_key
    options = {**statement.get_execution_options(), **(execution_options or {})}
    bind = _sqlalchemy.execution_bind(session, _sqlalchemy.bind_arguments(statement))
    state = connection_state.state_text(session, _sqlalchemy.bind_arguments(statement), bind)
    if state is None:
        raise NotCacheableError("the settings of this Session's connection cannot be told: it is never cached")
    key = cache.key(statement, parameters or query_parameters, options, bind, cache_key, session, state)
    if key is None:
        raise NotCacheableError(f"this statement has no cache key (it is never cached): {statement}")
    return cache, chosen, session, key.text


def cache_parameters(
    query: Any,
    session: Any = None,
    region: str | None = None,
    cache_key: str | None = None,
    parameters: Any = None,
    execution_options: Any = None,
    *,
    cache: SessionCache | None = None,
) -> tuple[Cache, str]:
    """Return ``(beaker_cache, key)``: where ``query``'s result is stored.

    ``beaker_cache.get(key)`` then reads the stored value.  The region and
    ``cache_key`` default to those of the query's ``FromCache`` option, then
    to the default region.  For a ``select()``, pass the ``session``.
    ``cache``: the :class:`~pyramid_sessioncache.SessionCache`, when the
    Session carries none (default: the option's, then the Session's).

    Raises :class:`~pyramid_sessioncache.NotCacheableError` for a statement
    that cannot be keyed.
    """
    _, chosen, session, key = _locate(query, session, region, cache_key, parameters, execution_options, cache)
    return chosen.cache_for(session), key


def invalidate(
    query: Any,
    session: Any = None,
    region: str | None = None,
    cache_key: str | None = None,
    parameters: Any = None,
    execution_options: Any = None,
    *,
    cache: SessionCache | None = None,
) -> Callable[[], None] | None:
    """Forget the cached result of ``query`` (arguments as for :func:`cache_parameters`).

    Under manual invalidation, the entry's own version in a shared region
    is bumped too: what a query that read the rows before the commit
    stores after it is void (the entry records that version, read with it
    on every hit).  Returns, for a shared region, a function that does it
    again (see ``again()``); None for a local region.
    """
    cache, chosen, session, key = _locate(query, session, region, cache_key, parameters, execution_options, cache)
    # Under automatic invalidation, the entry's tables' versions void what
    # a query that read before the commit stores after it; under manual
    # invalidation, the entry's own version (see invalidation/versions.py).
    own = (entry_version(key),) if cache.invalidation != "auto" and not chosen.is_local else ()
    _forget_entry(chosen, key, own, session)
    cache.stats.region(chosen.name).invalidations += 1
    return again(chosen, _forget_entry, chosen, key, own)


def _forget_entry(region: Region, key: str, names: tuple[str, ...], session: Any = None) -> None:
    # As for a region (see _forget_region): the version first, then the entry.
    if names:
        region.bump(names)
    region.remove(key, session)


def again(region: Region, forget: Callable[..., None], *args: Any) -> Callable[[], None] | None:
    """Return ``forget(*args)`` to call again once the invalidating transaction commits; None for a local ``region``.

    An entry forgotten before the transaction that changed its rows
    commits may be stored again in between, with the rows as they were,
    by another request that reads them (under manual invalidation nothing
    else would ever forget it): forgetting it again after the commit
    closes that window for the queries that read after the first forget.
    A query that read before it and stores after the second is voided by
    the versions bumped with both (a region's, an entry's own).  A local
    region's entries end with the Session's transaction anyway.
    """
    return None if region.is_local else functools.partial(forget, *args)


def invalidate_region(cache: SessionCache, name: str | None = None, session: Any = None) -> Callable[[], None] | None:
    """Forget every entry of region ``name`` (of ``session``, for a local region).

    Returns, for a shared region, a function that forgets them again (see
    ``again()``); None for a local region.
    """
    region = cache.region(name)
    _forget_region(region, session)
    cache.stats.region(region.name).invalidations += 1
    return again(region, _forget_region, region)


def _forget_region(region: Region, session: Any = None) -> None:
    # A shared region's version of every table, which every entry records,
    # is bumped too: a query that read the rows before, and stores them
    # after, stores a void entry (with manual invalidation, no commit would
    # void it).  First: a bump the backend refuses is retried until it is
    # written, where a failed clear raises.
    if not region.is_local:
        region.bump(versions.MANUAL)
    region.clear(session)


def invalidate_all(cache: SessionCache, session: Any = None) -> None:
    """Forget every entry of every region of ``cache``."""
    for name in cache.regions:
        invalidate_region(cache, name, session)
