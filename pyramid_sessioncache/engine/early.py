"""The early entrance: :func:`~pyramid_sessioncache.cached_query`, which serves a hit before ``Session.execute()``.

``Session.execute()`` returning a stored result, with nothing else,
already costs more than a local look-up; :func:`~pyramid_sessioncache.cached_query` reads a
plain hit first, with the decision the ORM hook makes (``lookup.py``),
and leaves everything else (misses, entries to regenerate, shapes whose
tables are not known yet) to the ORM hook.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Query, Session
from sqlalchemy.sql import Executable

from .. import _sqlalchemy
from ..errors import NotCacheableError
from ..storage.region import Region
from . import found_by, lookup
from .cache import SessionCache
from .hook import leaves_selects_alone
from .options import FromCache, statement_option


def cached_query(
    session: Session,
    query: Any,
    region: str | None = None,
    cache_key: str | None = None,
    expire: int | None = None,
    *,
    cache: SessionCache | None = None,
) -> Any:
    """Run ``query`` through the cache region ``region`` of ``session``.

    :param query: a 2.0 ``select()`` or SQL text that reads
        (``select(...).from_statement(text(...))``, ``text(...).columns(...)``,
        ``text(...)``), executed on ``session`` and returned as its
        ``Result`` (``.scalars()``, ``.one()``, ``.all()``); or a legacy
        ``Query`` (of ``session``), returned with the caching option
        applied (``.one()``, ``.all()``, iteration).
    :param region: a configured region name; default: the cache's default region.
    :param cache_key: a readable prefix for the entry's key.
    :param expire: seconds to keep a new entry, instead of the region's.
    :param cache: the :class:`~pyramid_sessioncache.SessionCache` to use;
        default: the one ``session`` carries
        (:func:`~pyramid_sessioncache.cache_of`).

    The same as ``session.execute(query.options(FromCache(region, ...)))``,
    except that a hit is served before the Session's execution machinery
    runs, which costs as much as a local look-up itself.  Raises
    :class:`~pyramid_sessioncache.UnknownRegionError` for an unknown region,
    :class:`~pyramid_sessioncache.NoRegionsError` for a Session that caches
    nowhere and :class:`~pyramid_sessioncache.NotCacheableError` for
    anything but a read (a SELECT, SQL text that writes no rows), before
    anything is executed.
    """
    if cache is None:
        cache = lookup.cache_for(session)
    name = region or cache.default_region
    found = cache.region(name)
    given = statement_option(query)
    if given is not None:
        raise NotCacheableError(
            f"cached_query() got a statement that has a caching option already, {given!r}: "
            "name the region in one place, the statement's option or cached_query()"
        )
    option = FromCache(name, cache_key, expire, cache=cache)
    if isinstance(query, Query):
        return query.options(option)
    if isinstance(query, Executable) and lookup.is_read(query):
        result, decided = _early_hit(session, cache, found, query, option)
        if result is not None:
            return result
        statement = query.options(option)
        # A decision made is handed to the ORM hook, which need not decide (and key) again.
        handed = {} if decided is None else {lookup.DECIDED: (statement, decided)}
        return session.execute(statement, execution_options=handed)
    if isinstance(query, Executable):
        raise lookup.not_a_read(query)
    raise NotCacheableError(f"cached_query() expects a select() or a Query, got {query!r}")


def _early_hit(
    session: Session, cache: SessionCache, region: Region, statement: Any, option: FromCache
) -> tuple[Any, lookup.Lookup | None]:
    """Return a hit read before ``Session.execute()`` runs, or None to let the ORM hook decide; and the decision.

    What can be seen before an execution: the caller gives a statement
    alone, so only listeners that leave SELECTs alone may be installed, and
    no Session-wide execution option may apply.  The decision, when one
    was made for a look-up that missed, is handed to the ORM hook.
    """
    if not all(map(leaves_selects_alone, session.dispatch.do_orm_execute)):
        return None, None
    if getattr(session, "execution_options", None):
        return None, None
    bind_arguments = _sqlalchemy.bind_arguments(statement)
    options = statement.get_execution_options()
    found = lookup.decide(cache, region, session, statement, None, options, bind_arguments, option)
    if found is None or found.valid is None:  # uncached, or a shape whose tables are not known yet
        return None, found
    value = region.peek(found.key.text, session, found.valid, found.tables or ())
    if value is None:
        return None, found
    if region.is_local:
        result = value.result()
    else:
        lookup.begin(session, bind_arguments, found.bind)
        result = lookup.objects_of(session, region, found.key.text, value, statement)
        if result is None:  # only the query can say what it gives this Session
            return None, found
    lookup.record(cache, session, region, True, found.key)
    return found_by.keyed_like(result, value, statement), found
