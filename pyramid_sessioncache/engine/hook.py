"""The ORM entrance: a ``do_orm_execute`` listener, and the Session events that keep caches right.

One ``do_orm_execute`` listener on :class:`sqlalchemy.orm.Session` serves
every Session of the process; it does nothing for statements without a
:class:`~pyramid_sessioncache.FromCache` or matching
:class:`~pyramid_sessioncache.RelationshipCache` option, and finds the
regions of the Session that runs the statement in ``session.info`` (see
``cache.py``).  Other Session events drop the Session's local cache when
what it holds may no longer be what a query would return, and record the
tables a transaction writes (see ``invalidation/writes.py``).

Nothing is installed at import: :func:`install` runs when the first
:class:`~pyramid_sessioncache.SessionCache` or caching option is made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Mapper, ORMExecuteState, Session, attributes

from .. import _sqlalchemy
from ..storage.backends import local_session
from ..storage.region import always_valid
from . import as_loaded, connection_state, eager_rows, found_by, info, loader, lookup, values
from .cache import SessionCache
from .invalidation import reads, schema, versions, writes
from .lookup import Lookup
from .options import FromCache, caching_option, statement_option
from .values import CachedRows, LocalResult

#: Whether :func:`install` has run in this process.
installed = False
#: ``do_orm_execute`` listeners known to leave SELECT statements alone (see
#: :func:`leaves_selects_alone`).
_SELECT_SAFE: set[Any] = set()


def install() -> None:
    """Install the add-on's Session listeners, once per process."""
    global installed
    if installed or event.contains(Session, "do_orm_execute", _do_orm_execute):
        installed = True
        return
    installed = True
    event.listen(Session, "do_orm_execute", _do_orm_execute)
    event.listen(Session, "after_begin", writes.session_began)
    connection_state.quiet_at_begin(writes.session_began)
    event.listen(Session, "after_flush", _drop_local)
    event.listen(Session, "after_commit", writes.committed)
    event.listen(Session, "after_transaction_end", _transaction_ended)
    event.listen(Session, "after_soft_rollback", _drop_local)
    event.listen(Session, "before_attach", _attaching)
    writes.install()
    loader.install()
    connection_state.install()
    _sqlalchemy.watch_always_refresh()
    as_loaded.install()
    eager_rows.install()
    event.listen(Mapper, "expire", _expired_partly, raw=True)


def trust_listener(listener: Callable[..., Any]) -> None:
    """Declare that ``listener``, a ``do_orm_execute`` listener, never changes a SELECT.

    :func:`~pyramid_sessioncache.cached_query` serves hits before
    ``Session.execute()`` only on Sessions whose listeners all leave SELECTs
    alone; the Pyramid add-on declares zope.sqlalchemy's, which only marks
    the Session changed after ORM DML.
    """
    _SELECT_SAFE.add(getattr(listener, "__func__", listener))


def leaves_selects_alone(listener: Any) -> bool:
    """Whether ``listener`` (from ``session.dispatch.do_orm_execute``) never changes a SELECT."""
    return listener is _do_orm_execute or getattr(listener, "__func__", listener) in _SELECT_SAFE


def _drop_local(session: Session, *args: Any) -> None:
    local_session.drop(session)


def _attaching(session: Session, instance: Any) -> None:
    """Drop the Session's local entries when an object of an identity they may keep alive is attached.

    ``session.add()`` of an object detached from another Session (or made
    with ``make_transient_to_detached()``) works in the ORM once the
    application has let go of the Session's own object of that identity:
    the identity map holds it weakly.  A local entry holding it would turn
    that into "another instance with key ... is already present".  Without
    the entries it goes, as the ORM would have let it go.
    """
    key = attributes.instance_state(instance).key
    if key is not None and local_session.INFO_KEY in session.info:
        present = session.identity_map.get(key)
        if present is not None and present is not instance:
            local_session.drop(session)


def _expired_partly(state: Any, keys: Any) -> None:
    """Drop the local entries of the Session of ``state``, some of whose ``keys`` were expired.

    ``session.expire(obj, [key])`` unloads a relationship or a
    ``query_expression()`` without marking it expired, where a query's
    eager rows would load it again: in an object a hit's checks may not
    reach.  Rare, so every entry goes.  A whole object expired (``keys``
    None, as each one at a commit) is marked so, and checked.
    """
    if keys is not None:
        session = state.session
        if session is not None:
            local_session.drop(session)


def _transaction_ended(session: Session, transaction: Any) -> None:
    _drop_local(session)
    if transaction.parent is None:
        # A commit published its writes (after_commit); these were rolled back.
        writes.forget(session)
        session.info.pop(info.SNAPSHOTS, None)


def _do_orm_execute(state: ORMExecuteState) -> Any:
    statement = state.statement
    if not lookup.is_read(statement):
        # What it writes, the connection sees (invalidation/writes.py).
        if statement_option(statement, relationships=True) is not None:
            raise lookup.not_a_read(statement)
        return None
    session = state.session
    if info.LOADER in session.info:
        return None
    if _sqlalchemy.populates_existing(state.execution_options):
        # It unloads what the Session's entries hold loaded and it does not
        # (a column another query undeferred), without marking it expired.
        local_session.drop(session)
    option = caching_option(statement)
    if option is None:
        return None
    if not _sqlalchemy.later_listeners(state):
        return _cached(state, option)
    # The application's listeners that come after this one may still change
    # the statement (with_loader_criteria per tenant, say): run them now, so
    # that what is keyed and stored is what would run.  They have run, so
    # the ORM must not run them again after this listener: return a result.
    result = _sqlalchemy.run_later_listeners(state)
    if result is None:
        option = caching_option(state.statement)  # they may have changed it
        result = None if option is None else _cached(state, option)
    return state.invoke_statement() if result is None else result


def _cached(state: ORMExecuteState, option: FromCache) -> Any:
    """Return the result of ``state``'s statement from ``option``'s region, or None to run it uncached."""
    statement = state.statement
    session = state.session
    if option.relationships_only and state.lazy_loaded_from is None:
        return None  # an eager load (selectin, subquery): the parent's entry holds it
    cache = option.cache if option.cache is not None else lookup.cache_for(session)
    region = cache.region(option.region)
    if _sqlalchemy.is_column_load(statement):
        return None
    decided = state.local_execution_options.get(lookup.DECIDED)
    if decided is not None and decided[0] is statement:  # cached_query() missed, deciding as here
        found = decided[1]
    else:
        options = _sqlalchemy.execution_options(state)
        found = lookup.decide(
            cache, region, session, statement, state.parameters, options, state.bind_arguments, option
        )
    if found is None:
        return None
    if region.is_local:
        loaded: dict[str, Any] = {}
        value, hit = region.get_or_create(
            found.key.text,
            lambda: _local_load(state, cache, loaded),
            session,
            option.expire,
            valid=found.valid or always_valid,
            store=lambda value: loaded["keep"] and value.checked and not _holds_always_refreshed(session),
            on_store=cache.stats.region(region.name).count_store,
        )
        if not hit and local_session.dropped_since(session, loaded["mark"]):
            # The Session's entries were dropped while it loaded (a commit
            # counts, then drops): its query may have found the objects the
            # void entries still held, as they were.  Dropped too, so that it
            # keeps no object alive; a drop after this empties what it stored.
            local_session.drop(session)
        result = value.result()
    else:
        value, hit, instances = _shared(state, cache, found, region, option.expire)
        if not value.servable:  # its objects are as load listeners made them: run uncached (as_loaded.py)
            return None
        if not hit and _sqlalchemy.ALWAYS_REFRESHED and value.refreshes_always():
            # It reached objects of an always_refresh class, which the query
            # overwrites in the Session, pending changes and all: run it so,
            # and this shape from now on, instead of a load thrown away each time.
            _refreshes(cache, found.key.shape)
            return None
        result = lookup.objects_of(session, region, found.key.text, value, statement, instances)
        if result is None:  # only the query can say what it gives this Session: run uncached
            return None
    lookup.record(cache, session, region, hit, found.key)
    return found_by.keyed_like(result, value, statement)


def _local_load(state: ORMExecuteState, cache: SessionCache, loaded: dict[str, Any]) -> LocalResult:
    """Run ``state``'s statement for an ``ext:local_session`` entry, tagged with the commits of the process so far.

    Read before the query runs: a commit that publishes while it runs (or
    just before the database commits) voids the entry, whatever rows the
    query saw.  ``loaded["keep"]``: false when the statement wrote (a
    function of the database's own that writes, or that reads what its
    connection drew from a sequence), so that the next execution must do
    it again, or when its eager rows may have held objects its result
    does not reach in a Session too large to watch (``eager_rows.py``):
    such an entry is not kept.
    """
    commits = cache.commits
    session = state.session
    loaded["mark"] = local_session.mark(session)  # see _cached()
    connection = session.connection(bind_arguments=dict(state.bind_arguments))
    before = writes.writes_run(connection)
    statement = state.statement
    with eager_rows.watching(session, statement) as watch:
        value = LocalResult.from_result(state.invoke_statement(), _sqlalchemy.eager_relationship_keys(statement))
    if watch.found:
        value.session_expired = values.session_snapshot(session)
    loaded["keep"] = writes.writes_run(connection) == before and not (watch.found and value.session_expired is None)
    value.commits = commits
    return value


def _refreshes(cache: SessionCache, shape: str) -> None:
    """Remember that ``shape`` reaches objects of an ``always_refresh`` class (a bounded number of shapes)."""
    if len(cache.refreshed_shapes) >= _REFRESHED_SHAPES:
        cache.refreshed_shapes.clear()  # relearnt, one miss each
    cache.refreshed_shapes.add(shape)


#: How many shapes :func:`_refreshes` remembers.
_REFRESHED_SHAPES = 2000


def _holds_always_refreshed(session: Session) -> bool:
    """Whether ``session`` holds an object of a class mapped with ``always_refresh`` (none do, in most applications).

    Every query that reaches such an object overwrites it in the Session
    (an eager load too): a local entry kept after one would serve it as
    it is now, pending changes and all.
    """
    if not _sqlalchemy.ALWAYS_REFRESHED:
        return False
    return any(state.mapper.always_refresh for state in session.identity_map.all_states())


def _shared(state: ORMExecuteState, cache: SessionCache, found: Lookup, region: Any, expire: int | None):
    """Return ``(value, hit, instances)``: ``instances``, the objects a miss loaded ``value`` from, else None."""
    session = state.session
    # The transaction begins when the query runs (``connection()``), or
    # after a hit: never while waiting for another request's query, which
    # would hold a pooled connection for nothing.
    made: dict[str, Any] = {}
    value, hit = _look_up(state, cache, found, region, expire, made)
    if hit:
        lookup.begin(session, state.bind_arguments, found.bind)
    instances = made["instances"] if not hit and made.get("value") is value else None
    return value, hit, instances


def _look_up(state: ORMExecuteState, cache: SessionCache, found: Lookup, region: Any, expire: int | None, made: dict):
    """``region.get_or_create()`` of the statement's entry; ``made`` gets the value this call loaded, and its objects."""
    session = state.session

    def connection() -> Any:
        # A copy: Session.connection() pops an explicit "bind" from what it is given.
        return session.connection(bind_arguments=dict(state.bind_arguments))

    def load(named: frozenset[str] | None = None, conn: Any = None) -> CachedRows:
        instances: list[Any] = []
        value = made["value"] = loader.load(state, connection() if conn is None else conn, named, instances)
        made["instances"] = instances
        return value

    key = found.key
    verdict = {"store": True}
    stored = cache.stats.region(region.name).count_store
    if cache.invalidation != "auto":

        def load_once() -> CachedRows:
            # What an explicit invalidation removed, an older snapshot must not store again.
            conn = connection()
            verdict["store"] = not loader.must_not_store(session, conn)
            now = region.versions(found.tables, create=True)  # before the query, as for create() below
            before = writes.writes_run(conn)
            value = load(conn=conn)
            wrote = writes.writes_run(conn) != before  # a SELECT that writes: see create() below
            verdict["store"] = (
                verdict["store"]
                and now is not None
                and value.storable
                and not wrote
                and not loader.reads_a_standby(conn)
            )
            value.tables, value.versions = found.tables, now
            return value

        return region.get_or_create(
            key.text,
            load_once,
            session,
            expire,
            store=lambda value: verdict["store"],
            valid=found.valid,
            tables=found.tables,
            label=key.shape,
            on_store=stored,
        )

    tables = found.tables
    if tables is None:
        tables = cache.tables_read.learn(key.shape, _tables_read(state.statement))

    def create() -> CachedRows:
        conn = connection()
        old_snapshot = loader.must_not_store(session, conn)  # before anything runs for this query
        known = tables
        for attempt in range(2):
            if attempt:
                # The first load began the transaction: at REPEATABLE READ the
                # second reads its snapshot, older than the versions read now.
                old_snapshot = old_snapshot or loader.must_not_store(session, conn)
            now = region.versions(known, create=True)  # before the query: see invalidation/__init__.py
            before = writes.writes_run(conn)
            value = load(frozenset(known), conn)
            # A view calling a function of the database's own reads any table.
            value.tables = schema.depends_on(conn, value.tables)
            if writes.writes_run(conn) != before:
                # It wrote (a function of the database's own that writes, DML
                # in a CTE): rows no committed state holds, which a rollback
                # would leave stored under current versions.  Not loaded
                # again either: that would write twice.
                old_snapshot = True
                break
            if value.tables <= frozenset(known):
                break
            # It read tables its statement does not name (eager loads, column
            # properties, criteria, a view's function): their versions were
            # not read before the query, so this result cannot be stored.
            # Now they are known: read their versions and load once more, to
            # store that.
            known = cache.tables_read.learn(key.shape, value.tables.union(known))
        else:
            verdict["store"] = False
        if now is None or old_snapshot or not value.storable or loader.reads_a_standby(conn):
            # A failed backend, rows no committed state holds (or not yet, on
            # a standby), or loaders a copy would lose.
            verdict["store"] = False
        value.tables, value.versions = known, now
        return value

    return region.get_or_create(
        key.text,
        create,
        session,
        expire,
        store=lambda value: verdict["store"],
        valid=versions.valid(region, tables),
        tables=tables,
        label=key.shape,
        on_store=stored,
    )


def _tables_read(statement: Any) -> frozenset[str]:
    """The tables ``statement`` reads, as far as the statement tells: every table, for SQL text.

    What SQL text reads is not known, only the tables of the columns it
    is given to: its entries depend on :data:`~.invalidation.reads.ANY_TABLE`,
    which every committed write bumps.  The tables whose writes cascade
    into them count too (see :func:`~.invalidation.schema.depends_on`):
    known before the first load, they spare it a second one.
    """
    read = schema.cascading_into(reads.statement_tables(statement))
    if _sqlalchemy.textual_sql(statement) is not None:
        return read | {reads.ANY_TABLE}
    return read
