"""The ORM hook: look-up, store and hand back cached results.

One ``do_orm_execute`` listener on :class:`sqlalchemy.orm.Session` serves
every Session of the process; it does nothing for statements without a
:class:`~pyramid_sessioncache.FromCache` or matching
:class:`~pyramid_sessioncache.RelationshipCache` option, and finds the
regions of the Session that runs the statement in ``session.info`` (see
``cache.py``).  Other Session events drop the Session's local cache when
what it holds may no longer be what a query would return.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Mapper, ORMExecuteState, Session

from . import _sqlalchemy, local, stats
from .cache import cache_of
from .errors import NoRegionsError, NotCacheableError
from .keys import BYPASS_OPTIONS
from .options import FromCache, caching_option
from .rows import LOADER_FLAG, CachedRows, LocalResult

log = logging.getLogger(__name__)

#: ``session.info`` flag: the current transaction has written to the database.
WROTE_KEY = "sessioncache.wrote"


def install() -> None:
    """Install the add-on's Session and mapper listeners (once per process)."""
    if event.contains(Session, "do_orm_execute", _do_orm_execute):
        return
    event.listen(Session, "do_orm_execute", _do_orm_execute)
    event.listen(Session, "after_flush", _wrote)
    event.listen(Session, "after_transaction_end", _transaction_ended)
    event.listen(Session, "after_soft_rollback", _drop_local)
    event.listen(Session, "persistent_to_detached", _drop_local)
    event.listen(Mapper, "expire", _drop_local_of_state, raw=True)


def _drop_local(session: Session, *args: Any) -> None:
    session.info.pop(local.INFO_KEY, None)


def _wrote(session: Session, *args: Any) -> None:
    # What this transaction wrote is in no shared entry: until it ends, the
    # Session reads around shared regions (and stores nothing in them).
    session.info[WROTE_KEY] = True
    session.info.pop(local.INFO_KEY, None)


def _transaction_ended(session: Session, transaction: Any) -> None:
    session.info.pop(local.INFO_KEY, None)
    if transaction.parent is None:
        session.info.pop(WROTE_KEY, None)


def _drop_local_of_state(state: Any, attrs: Any) -> None:
    session = state.session
    if session is not None:
        session.info.pop(local.INFO_KEY, None)


def _has_cache_option(statement: Any) -> bool:
    return any(isinstance(option, FromCache) for option in getattr(statement, "_with_options", ()))


def _bypassed(options: Any) -> bool:
    # Streamed results cannot be kept, and populate_existing asks for fresh rows.
    return any(options.get(name) for name in BYPASS_OPTIONS) or _sqlalchemy.legacy_bypass(options)


def _do_orm_execute(state: ORMExecuteState) -> Any:
    session = state.session
    if not state.is_select:
        # A write through the Session may change what any cached query of
        # this Session returns.
        _wrote(session)
        if _has_cache_option(state.statement):
            raise NotCacheableError(f"only SELECT statements can be cached, not {type(state.statement).__name__}")
        return None
    option = caching_option(state)
    if option is None or LOADER_FLAG in session.info:
        return None
    cache = cache_of(session)
    if cache is None:
        raise NoRegionsError(
            "this Session has no cache regions: make it with "
            "sessionmaker(info=session_cache.session_info()), or through pyramid_sessioncache"
        )
    region = cache.region(option.region)
    options = state.execution_options
    if not region.enabled or state.is_column_load or _bypassed(options):
        return None
    _sqlalchemy.autoflush(session, options)
    bind = session.get_bind(**state.bind_arguments)
    key = cache.key(state.statement, state.parameters, options, bind, option.cache_key)
    if key is None:
        log.debug("uncached: statement cannot be keyed (region %s)", region.name)
        return None
    if not region.is_local and WROTE_KEY in session.info:
        return None
    if region.is_local:
        value, hit = region.get_or_create(
            key, lambda: LocalResult(state.invoke_statement().freeze()), session, option.expire
        )
        result = value.result()
    else:
        # Begin the Session's transaction on this bind as the query would
        # have: whatever joins on after_begin (zope.sqlalchemy, so pyramid_tm
        # commits the changes made to these objects) must see it.
        connection = session.connection(bind_arguments=state.bind_arguments)
        value, hit = region.get_or_create(key, lambda: _snapshot(state, connection), session, option.expire)
        result = value.result(session, _propagating(state.statement))
    stats.record(cache.stats, session, region.name, hit, key)
    log.debug("cache %s: region %s key %s", "hit" if hit else "miss", region.name, key)
    return result


def _propagating(statement: Any) -> tuple:
    return tuple(opt for opt in statement._with_options if opt.propagate_to_loaders)


def _snapshot(state: ORMExecuteState, connection: Any) -> CachedRows:
    """Run the statement in a fresh Session on the caller's connection.

    The fresh Session's objects hold exactly what the database returned in
    the caller's transaction, whatever the caller's Session has in memory.
    """
    loader = Session(bind=connection, info={LOADER_FLAG: True}, autoflush=False, expire_on_commit=False)
    try:
        result = loader.execute(state.statement, state.parameters, execution_options=state.local_execution_options)
        return CachedRows.from_result(result)
    finally:
        loader.close()
