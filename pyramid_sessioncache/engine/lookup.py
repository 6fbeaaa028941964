"""The one decision both entrances share: whether, under which key and how to check a look-up.

A cached statement reaches the cache by two entrances: the ORM hook
(``hook.py``, a ``do_orm_execute`` listener) and
:func:`~pyramid_sessioncache.cached_query`, which reads a hit before
``Session.execute()`` (``early.py``).  Both ask :func:`decide` what to
do, so they cannot disagree on the key, the bypass rules, the autoflush
or which entries are valid; and both hand hits back with
:func:`objects_of` and count them with :func:`record`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple

from sqlalchemy import Engine, Select
from sqlalchemy.orm import Session

from .. import _sqlalchemy
from ..errors import NoRegionsError, NotCacheableError
from ..storage.backends import local_session
from ..storage.region import Region, Validator
from . import connection_state, hydrate, stats
from .cache import SessionCache, cache_of
from .invalidation import versions, writes
from .invalidation.statements import sql_tables
from .keys import BYPASS_OPTIONS, EntryKey
from .options import FromCache
from .values import CachedRows

log = logging.getLogger(__name__)


class Lookup(NamedTuple):
    """How to look a statement up: its key, and what makes an entry valid.

    ``tables`` are the tables the statement's shape reads (sorted, with the
    pseudo-table ``*``) for a shared region under automatic invalidation,
    None when they are not known yet (the shape has never been loaded),
    :func:`~.invalidation.versions.manual` ones under manual invalidation, and
    ``()`` when entries carry no versions (a local region).  ``valid`` is the
    :data:`~pyramid_sessioncache.storage.region.Validator` of entries, None
    while ``tables`` is.  ``bind``: the Engine or Connection the statement
    runs on.
    """

    key: EntryKey
    tables: tuple[str, ...] | None
    valid: Validator | None
    bind: Any


#: The execution option by which :func:`~pyramid_sessioncache.cached_query`
#: hands the ORM hook the decision it made for a statement that missed:
#: ``(statement, Lookup)``, used only for that very statement object.
DECIDED = "_sessioncache_decided"


def cache_for(session: Session) -> SessionCache:
    """Return the cache ``session`` caches into; :class:`~pyramid_sessioncache.NoRegionsError` if none."""
    cache = cache_of(session)
    if cache is None:
        raise NoRegionsError(
            "this Session has no cache regions: make it with "
            "sessionmaker(info=session_cache.session_info()), or use it as request.dbsession "
            "of an application that includes pyramid_sessioncache"
        )
    return cache


def is_read(statement: Any) -> bool:
    """Whether ``statement`` only reads rows, so that a cache may answer it.

    A SELECT, or SQL text whose SQL writes no rows (``text()``,
    ``text().columns()``, ``select().from_statement()`` of either): for
    those, ``is_select`` tells nothing (False for ``from_statement(text())``,
    True for an ``UPDATE ... RETURNING`` given ``.columns()``), so the SQL
    is read (``invalidation/statements.py``).
    """
    if statement.__class__ is Select:  # the commonest, answered first: every ORM execution asks
        return True
    sql = _sqlalchemy.textual_sql(statement)
    if sql is None:
        return bool(statement.is_select)
    return not sql_tables(sql)


def not_a_read(statement: Any) -> NotCacheableError:
    """The error for a caching request on ``statement``, which :func:`is_read` refused."""
    sql = _sqlalchemy.textual_sql(statement)
    if sql is not None:
        return NotCacheableError(f"only reads can be cached, and this SQL text may write rows: {sql}")
    return NotCacheableError(f"only SELECT statements can be cached, not {type(statement).__name__}")


def bypassed(options: Any) -> bool:
    """Whether execution ``options`` ask for rows that must not come from a cache.

    Streamed results cannot be kept, and ``populate_existing`` asks for
    fresh rows.
    """
    if not BYPASS_OPTIONS.isdisjoint(options) and any(options.get(name) for name in BYPASS_OPTIONS):
        return True
    return "_sa_orm_load_options" in options and _sqlalchemy.legacy_bypass(options)


def decide(
    cache: SessionCache,
    region: Region,
    session: Session,
    statement: Any,
    parameters: Any,
    options: Any,
    bind_arguments: dict,
    option: FromCache,
) -> Lookup | None:
    """Return how to look ``statement`` up in ``region``, or None when it must run uncached.

    Runs uncached: a disabled region, streamed or ``populate_existing``
    loads (or loads reaching a class mapped with ``always_refresh``),
    reads around shared regions after this transaction wrote, a statement
    that cannot be keyed, and a locking read (``with_for_update()`` in any
    form: its locks must be taken, every time).

    Autoflushes first, as the query would: a look-up must not ignore the
    Session's pending inserts, updates and deletes.
    """
    if not region.enabled or bypassed(options):
        return None
    if _sqlalchemy.ALWAYS_REFRESHED and _sqlalchemy.loads_always_refreshed(statement):
        return None  # it overwrites what the Session holds, as populate_existing does
    _sqlalchemy.autoflush(session, options, statement)
    bind = _sqlalchemy.execution_bind(session, bind_arguments)
    if not region.is_local and (writes.has_written(session, bind) or writes.pending_in_pool(bind)):
        # What this transaction wrote is in no shared entry: until it ends,
        # the Session reads around shared regions and stores nothing there.
        # (A Session bound to a Connection joins what it wrote before; one
        # whose pool hands every Session one connection sees what others wrote.)
        return None
    state = connection_state.state_text(session, bind_arguments, bind)
    if state is None:  # settings of the connection that cannot be told (see connection_state.py)
        log.debug("uncached: the connection's settings cannot be told (region %s)", region.name)
        return None
    key = cache.key(statement, parameters, options, bind, option.cache_key, session, state)
    if key is None:  # unkeyable, or a locking read (see keys.py)
        log.debug("uncached: statement cannot be keyed or takes row locks (region %s)", region.name)
        return None
    if cache.refreshed_shapes and key.shape in cache.refreshed_shapes:  # it reached always_refresh objects (hook.py)
        return None
    if region.is_local:
        return Lookup(key, (), _current_in(session, cache), bind)
    if cache.invalidation != "auto":
        manual = versions.manual(key.text)
        return Lookup(key, manual, versions.valid(region, manual), bind)
    tables = cache.tables_read.get(key.shape)
    return Lookup(key, tables, None if tables is None else versions.valid(region, tables), bind)


def _current_in(session: Session, cache: SessionCache) -> Validator:
    # A local entry is void once a commit of the process published writes
    # since its query: another Session's commit changes what the same query
    # reads now (READ COMMITTED, pysqlite), whether or not this one's
    # transaction has ended.  Commits of other processes are not seen here.
    return lambda value, versions: value.current(session) and value.commits in (None, cache.commits)


def record(cache: SessionCache, session: Session, region: Region, hit: bool, key: EntryKey) -> None:
    """Count a look-up, remember it on ``session`` and log it at DEBUG.

    The key starts with the caller's ``cache_key`` label: shown with
    ``%r``, a newline in it (set on an option after its checks) stays on
    one line.  Region names are checked when the region is made.
    """
    stats.record(cache.stats, session, region.name, hit, key.text)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("cache %s: region %s key %r", "hit" if hit else "miss", region.name, key.text)


#: ``after_begin`` listener functions -> what a hit calls instead: see :func:`join_without_connection`.
_JOINS: dict[Any, Callable[[Session], None]] = {}


def join_without_connection(listener: Any, join: Callable[[Session], None]) -> None:
    """Declare that a hit may call ``join(session)`` instead of beginning a transaction for ``listener``.

    A shared hit begins the Session's transaction on the statement's bind,
    checking a connection out of the pool, so that ``after_begin``
    listeners (a transaction join: zope.sqlalchemy) see it.  When every
    such listener of the Session is declared here, the hit calls their
    ``join`` instead, and leaves the database alone.  The Pyramid add-on
    declares its own zope.sqlalchemy listener (``addon/transaction.py``),
    whose ``join`` joins the request's transaction without a connection.
    """
    _JOINS[getattr(listener, "__func__", listener)] = join
    connection_state.quiet_at_begin(listener)


def begin(session: Session, bind_arguments: dict, bind: Any) -> None:
    """Begin the Session's transaction on the statement's ``bind``, as the query would have.

    Whatever joins on ``after_begin`` (zope.sqlalchemy, so that pyramid_tm
    commits changes made to the objects of a hit) must see it; unless
    every such listener has a ``join`` that needs no connection (see
    :func:`join_without_connection`): then those are called instead.  On
    an engine whose pool hands every Session one connection (``StaticPool``,
    ``SingletonThreadPool``), the Session takes it, as the query would.
    """
    # The Session's transaction, at least: ``rollback()`` expires what it
    # loaded, and a commit elsewhere is then read again, as after the query.
    _sqlalchemy.autobegin(session)
    if isinstance(bind, Engine) and isinstance(bind.pool, writes.SHARING_POOLS):
        # Its one DBAPI connection is every Session's (of the thread): this
        # Session's commit or rollback ends that connection's transaction,
        # other Sessions' writes in it included, as it would after the query.
        session.connection(bind_arguments=dict(bind_arguments))
        return
    joins = []
    for listener in session.dispatch.after_begin:
        if listener is writes.session_began:  # the add-on's own needs no transaction
            continue
        join = _JOINS.get(getattr(listener, "__func__", listener))
        if join is None:
            session.connection(bind_arguments=dict(bind_arguments))  # it pops "bind" from what it is given
            return
        joins.append(join)
    for join in joins:
        join(session)


def objects_of(
    session: Session, region: Region, key: str, value: CachedRows, statement: Any, instances: list | None = None
) -> Any:
    """Return ``value`` as a Result of ``session``'s objects.

    A region hands back the same stored value until it changes (Redis
    too: see ``storage/backends/redis.py``); the objects built from it are
    remembered, weakly, with the Session's local cache (and dropped with
    it, and bounded like it), so hitting the same entry again in one
    Session, while the application holds its objects, costs about what a
    local hit costs (see ``hydrate.HeldObjects``).  ``instances``: the
    objects a miss just made ``value`` from (see ``hydrate.adopted()``).

    Returns None, having changed nothing, when the Session holds an object
    that disagrees with the entry on which objects one of its relationships
    holds (see ``hydrate.HeldObjectDiffers``): the statement must run
    uncached.
    """
    if not any(value.entity_columns):  # plain rows: nothing to build twice
        return hydrate.result(value, session, propagating(statement))
    try:
        return _objects_of(session, region, key, value, statement, instances)
    except hydrate.HeldObjectDiffers:
        log.debug("uncached: an object of the Session disagrees with the entry (region %s)", region.name)
        return None


def _objects_of(
    session: Session, region: Region, key: str, value: CachedRows, statement: Any, instances: list | None
) -> Any:
    built = local_session.entries(session).setdefault(region.namespace_name + ".objects", {})
    seen = built.get(key)
    if seen is None or seen[0] is not value:
        # First use in this Session (most requests have no second): just build.
        if len(built) >= local_session.DEFAULT_MAX_ITEMS:
            del built[next(iter(built))]  # the oldest: a Session keeps a bounded number
        built[key] = (value, None)
        return hydrate.result(value, session, propagating(statement), instances)
    result = None if seen[1] is None else seen[1].result(value, session)
    if result is not None:
        return result
    result, objects = hydrate.hydrated(value, session, propagating(statement))
    built[key] = (value, hydrate.HeldObjects(value, objects, _sqlalchemy.eager_relationship_keys(statement)))
    return result


def propagating(statement: Any) -> tuple:
    """The loader options of ``statement`` that its objects carry to their own loads."""
    return tuple(opt for opt in _sqlalchemy.statement_options(statement) if opt.propagate_to_loaders)
