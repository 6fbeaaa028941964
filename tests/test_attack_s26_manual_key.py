"""Attack s26: manual invalidation of one query, and a query in another Session that read the rows before.

Under manual invalidation, ``invalidate(query)`` forgot one entry now and
again after the commit; a query that read the rows before the commit and
stored them after both stored an entry that nothing made void: served
until it expired.  Each test plays that interleaving deterministically
(the reader's query runs, then a whole writer transaction commits, then
the reader stores), compares what the cache serves with an uncached read
of the same query, and proves hits by counting statements.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, event, select, update
from sqlalchemy.orm import sessionmaker

from pyramid_sessioncache import SessionCache, cached_query, invalidate
from pyramid_sessioncache._beaker import redis_key
from pyramid_sessioncache.addon.interfaces import IDBSessionFactory
from pyramid_sessioncache.storage import versions as storage_versions

from .conftest import SECRET, SQLCounter
from .models import Person
from .test_attack_s19_app import VIEW, make, person_1  # noqa: F401 (make: the application fixture)
from .test_attack_s25_review import _no_schema_known, _rows, _run, _truth  # noqa: F401 (the autouse fixture)
from .test_attack_s25_second import _COUNT, _COUNTS, _TABLES

#: A second query on the same table, with an entry of its own.
_OTHERS = select(_COUNT.c.id).where(_COUNT.c.n >= 0).order_by(_COUNT.c.id)


def _database(tmp_path):
    """A WAL SQLite file with ``s25s_count``: a reader's snapshot stays while a writer commits."""
    path = tmp_path / "t.sqlite"
    _run(path, "PRAGMA journal_mode=WAL;" + _TABLES.format(schema=""))
    return f"sqlite:///{path}"


def _race(url, reader_cache, writer_cache, region, n=7):
    """Read ``_COUNTS`` through ``region`` of ``reader_cache`` while a Session of ``writer_cache`` writes and invalidates it.

    The reader's query runs; then the writer updates the count, calls
    ``invalidate(_COUNTS)``, commits, and calls what it returned (as
    ``request.sessioncache`` does after the commit); then the reader
    stores the rows it read before the commit.  Returns the reader's
    engine.
    """
    reader, writer = create_engine(url), create_engine(url)
    pending = [True]

    @event.listens_for(reader, "after_cursor_execute")
    def meanwhile(conn, cursor, statement, parameters, context, executemany):
        if pending and "s25s_count.n" in statement:
            pending.clear()
            with sessionmaker(writer, info=writer_cache.session_info())() as session:
                session.execute(update(_COUNT).values(n=n))
                again = invalidate(_COUNTS, session, region, cache=writer_cache)
                session.commit()
            again()
            writer.dispose()

    with sessionmaker(reader, info=reader_cache.session_info())() as session:
        assert _rows(session, _COUNTS, region) == [(0,)]  # read before the commit
    assert not pending
    return reader


def _served_then_hit(engine, cache, region, stmt=_COUNTS):
    """Assert that ``stmt`` through ``region`` is what the database holds, then a hit (no statement)."""
    truth = _truth(engine, stmt)
    Sess = sessionmaker(engine, info=cache.session_info())
    with Sess() as session:
        assert _rows(session, stmt, region) == truth
    counter = SQLCounter(engine)
    with Sess() as session:
        assert _rows(session, stmt, region) == truth
    assert counter.count == 0
    return truth


def _manual(region_options):
    return SessionCache(region_options, invalidation="manual", secret=SECRET)


# The window, in every shared region -------------------------------------------------------------------------


def test_a_query_invalidated_voids_what_a_reader_begun_before_the_commit_stores_after_it(
    tmp_path, region_options, region
):
    cache = _manual(region_options)
    reader = _race(_database(tmp_path), cache, cache, region)
    assert _served_then_hit(reader, cache, region) == [(7,)]
    reader.dispose()


def test_another_process_invalidating_a_query_voids_what_this_one_stores_after_it_through_a_near_cache(
    tmp_path, redis_url
):
    # Two processes, each with its near cache: the writer's bump reaches the
    # reader's near cache by Redis's invalidation messages only.
    options = {"near": {"type": "ext:redis", "url": redis_url, "near": True}}
    cache, other = _manual(options), _manual(options)
    try:
        reader = _race(_database(tmp_path), cache, other, "near")
        assert _served_then_hit(reader, cache, "near") == [(7,)]
        assert _served_then_hit(reader, other, "near") == [(7,)]
        reader.dispose()
    finally:
        cache.close()
        other.close()


@pytest.mark.parametrize("name", ["file", "redis"])
def test_a_new_cache_over_the_same_backend_still_voids_what_the_reader_stored(tmp_path, request, region_options, name):
    # A restart: the bump is in the backend, not in the process.
    if name == "redis":
        region_options["redis"] = {"type": "ext:redis", "url": request.getfixturevalue("redis_url")}
    first = _manual(region_options)
    reader = _race(_database(tmp_path), first, first, name)
    restarted = _manual(region_options)
    assert _served_then_hit(reader, restarted, name) == [(7,)]
    reader.dispose()


def test_invalidate_from_a_script_voids_what_a_server_process_stores_after_it(tmp_path, region_options):
    # The writer is another process (another SessionCache over the same
    # files); the reader's process never saw its bump in memory.
    cache, script = _manual(region_options), _manual(region_options)
    reader = _race(_database(tmp_path), cache, script, "file")
    assert _served_then_hit(reader, cache, "file") == [(7,)]
    reader.dispose()


# Versions that are gone, and what is not touched ---------------------------------------------------------


def _versions_but_the_regions(cache, name, redis_url=None) -> list:
    """Every version ``name`` holds but the one every manual entry records (``*``): their backend keys."""
    region = cache.region(name)
    namespace = region.tokens.namespace
    if region.type == "memory":
        return [key for key in namespace.dictionary.keys() if key != b"*"]  # noqa: SIM118 - not a dict
    if region.type == "file":  # one file per version, named by a hash of its name
        kept = Path(namespace.path(b"*"))
        return [path for path in Path(namespace.directory).glob("*/*") if path != kept]
    client = redis.Redis.from_url(redis_url)
    prefix = redis_key(namespace, b"")
    return [key for key in client.scan_iter(match=prefix + "*") if key.decode() != prefix + "*"]


def _evict(cache, name, keys, redis_url=None) -> None:
    region = cache.region(name)
    namespace = region.tokens.namespace
    if region.type == "memory":
        for key in keys:
            del namespace.dictionary[key]
    elif region.type == "file":
        for path in keys:
            path.unlink()
    else:
        redis.Redis.from_url(redis_url).delete(*keys)


def test_an_entry_whose_query_version_was_evicted_is_a_miss(tmp_path, request, region_options, region):
    # Eviction costs misses, never stale data: a key version that is gone
    # must not read as "never invalidated".
    redis_url = request.getfixturevalue("redis_url") if region == "redis" else None
    cache = _manual(region_options)
    engine = create_engine(_database(tmp_path))
    Sess = sessionmaker(engine, info=cache.session_info())
    with Sess() as session:
        assert _rows(session, _COUNTS, region) == [(0,)]
    _run(engine.url.database, "UPDATE s25s_count SET n = 3")  # nobody invalidates
    keys = _versions_but_the_regions(cache, region, redis_url)
    assert keys, "the entry recorded no version of its own"
    _evict(cache, region, keys, redis_url)
    counter = SQLCounter(engine)
    with Sess() as session:
        assert _rows(session, _COUNTS, region) == _truth(engine, _COUNTS) == [(3,)]
    assert counter.count == 2  # the miss, and the truth
    assert _served_then_hit(engine, cache, region) == [(3,)]
    engine.dispose()


def test_invalidating_one_query_leaves_another_querys_entry_a_hit(tmp_path, region_options, region, request):
    if region == "redis":
        request.getfixturevalue("redis_url")
    cache = _manual(region_options)
    engine = create_engine(_database(tmp_path))
    Sess = sessionmaker(engine, info=cache.session_info())
    with Sess() as session:
        _rows(session, _COUNTS, region)
        _rows(session, _OTHERS, region)
    _run(engine.url.database, "UPDATE s25s_count SET n = 5")
    with Sess() as session:
        again = invalidate(_COUNTS, session, region)
    again()
    counter = SQLCounter(engine)
    with Sess() as session:
        assert _rows(session, _OTHERS, region) == [(1,)]
    assert counter.count == 0  # still a hit
    with Sess() as session:
        assert _rows(session, _COUNTS, region) == [(5,)]
    assert counter.count == 1  # the invalidated one ran
    engine.dispose()


def test_a_manual_hit_reads_its_entry_and_versions_in_one_redis_round_trip(
    tmp_path, region_options, redis_url, entrance
):
    region_options["redis"] = {"type": "ext:redis", "url": redis_url}
    cache = _manual(region_options)
    engine = create_engine(_database(tmp_path))
    Sess = sessionmaker(engine, info=cache.session_info())

    def read(session):
        if entrance == "cached_query()":
            return [tuple(row) for row in cached_query(session, _COUNTS, "redis").all()]
        return _rows(session, _COUNTS, "redis")

    with Sess() as session:
        read(session)
    client = redis.Redis.from_url(redis_url)

    def calls() -> dict:
        stats = client.info("commandstats")
        return {name: value["calls"] for name, value in stats.items() if name not in ("cmdstat_info", "cmdstat_ping")}

    counter = SQLCounter(engine)
    before = calls()
    with Sess() as session:
        assert read(session) == [(0,)]
    after = calls()
    assert counter.count == 0
    sent = {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}
    assert sent == {"cmdstat_mget": 1}
    engine.dispose()


def test_automatic_invalidation_of_a_query_writes_no_version_of_its_own(tmp_path, region_options, region, request):
    # Auto entries record their tables' versions, which commits bump: a
    # query's own version would cost a write and a key for nothing.
    redis_url = request.getfixturevalue("redis_url") if region == "redis" else None
    cache = SessionCache(region_options, secret=SECRET)
    engine = create_engine(_database(tmp_path))
    Sess = sessionmaker(engine, info=cache.session_info())
    with Sess() as session:
        _rows(session, _COUNTS, region)
    held = sorted(_versions_but_the_regions(cache, region, redis_url))
    with Sess() as session:
        again = invalidate(_COUNTS, session, region)
    again()
    assert sorted(_versions_but_the_regions(cache, region, redis_url)) == held
    engine.dispose()


# Bounds ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["memory", "file"])
def test_a_flood_of_distinct_queries_keeps_the_versions_of_entries_bounded(tmp_path, region_options, monkeypatch, name):
    # One version per key stored or invalidated: a memory region keeps as
    # many as twice its entries, and a process remembers the highest
    # counter of a bounded number; table versions are kept.
    monkeypatch.setattr(storage_versions, "REMEMBERED_ENTRIES", 50)
    region_options["memory"]["max_items"] = 20
    cache = _manual(region_options)
    engine = create_engine(_database(tmp_path))
    Sess = sessionmaker(engine, info=cache.session_info())

    def distinct(n):
        return select(_COUNT.c.n).where(_COUNT.c.id != -n)

    with Sess() as session:
        for n in range(300):
            _rows(session, distinct(n), name)
            invalidate(distinct(n + 1000), session, name)
    tokens = cache.region(name).tokens
    assert "*" in tokens.highest or tokens.trusted
    assert len(tokens.highest) <= 51
    if name == "memory":
        assert len(tokens.namespace.dictionary) <= 2 * 20 + 1
        assert b"*" in tokens.namespace.dictionary
    # What is still there is served right, and invalidated right.
    _run(engine.url.database, "UPDATE s25s_count SET n = 2")
    with Sess() as session:
        assert _rows(session, distinct(299), name) == [(0,)]  # nobody invalidated it: still a hit
        invalidate(distinct(299), session, name)
        assert _rows(session, distinct(299), name) == _truth(engine, distinct(299)) == [(2,)]
    engine.dispose()


def _stored_and_invalidated(tmp_path, cache, name):
    """An engine whose ``_COUNTS`` entry is stored in ``name``, and whose ``_OTHERS`` was invalidated (never stored)."""
    engine = create_engine(_database(tmp_path))
    with sessionmaker(engine, info=cache.session_info())() as session:
        _rows(session, _COUNTS, name)
        again = invalidate(_OTHERS, session, name)
    again()
    return engine


def test_entries_versions_expire_in_redis_and_tables_do_not(tmp_path, region_options, redis_url):
    region_options["redis"] = {"type": "ext:redis", "url": redis_url, "expire": 60}
    cache = _manual(region_options)
    engine = _stored_and_invalidated(tmp_path, cache, "redis")
    client = redis.Redis.from_url(redis_url)
    prefix = redis_key(cache.region("redis").tokens.namespace, b"")
    keys = [key.decode() for key in client.scan_iter(match=prefix + "*")]
    own = [key for key in keys if key.startswith(prefix + "entry.")]
    assert len(own) >= 2  # the stored entry's (added), the invalidated one's (bumped)
    lifetime = cache.region("redis").entry_lifetime
    assert all(0 < client.ttl(key) <= lifetime for key in own)
    assert client.ttl(prefix + "*") == -1  # kept
    engine.dispose()


def test_a_sweep_removes_entries_versions_after_their_lifetime_and_the_entry_is_a_miss(tmp_path, region_options):
    cache = _manual(region_options)
    engine = _stored_and_invalidated(tmp_path, cache, "file")
    namespace = cache.region("file").tokens.namespace
    own = [path for path in Path(namespace.directory).glob("*/*") if path.name.endswith(".expiring")]
    assert len(own) == 2
    for path in own:
        os.utime(path, (0, 0))  # written long ago
    for _ in range(256):  # every subdirectory, once
        namespace.sweep()
    assert not [path for path in Path(namespace.directory).glob("*/*") if path.name.endswith(".expiring")]
    assert Path(namespace.path(b"*")).exists()  # the version of every table is kept
    counter = SQLCounter(engine)
    assert _served_then_hit(engine, cache, "file") == [(0,)]
    assert counter.count == 2  # the miss its version's removal cost, and the truth
    engine.dispose()


# In a Pyramid request ---------------------------------------------------------------------------------------


def test_request_sessioncache_invalidate_voids_what_a_request_begun_before_the_commit_stores_after_it(
    make,  # noqa: F811 - the fixture
    db_url,
):
    # The reader request's query runs; a whole writer request (rename,
    # request.sessioncache.invalidate, pyramid_tm's commit) runs in another
    # thread meanwhile; then the reader stores person 1 as it read it.
    db = sqlite3.connect(db_url.removeprefix("sqlite:///"))
    db.execute("PRAGMA journal_mode=WAL")
    db.close()
    web = make(**{"sessioncache.invalidation": "manual"})
    engine = web.app.registry.queryUtility(IDBSessionFactory).kw["bind"]
    pending = [False]

    def view(request):
        if request.params.get("write"):
            request.dbsession.get(Person, 1).name = "renamed"
            request.dbsession.flush()
            request.sessioncache.invalidate(person_1(), region="shared")
            return None
        return {"name": request.cached_query(person_1(), region="shared").scalars().one().name}

    @event.listens_for(engine, "after_cursor_execute")
    def meanwhile(conn, cursor, statement, parameters, context, executemany):
        if pending[0] and "FROM person" in statement and "WHERE person.id = ?" in statement:
            pending[0] = False
            writer = threading.Thread(target=web.get, args=("/run?write=1",))
            writer.start()
            writer.join(60)

    VIEW["view"] = view
    pending[0] = True
    assert web.get("/run").json == {"name": "person 1"}  # read before the commit
    assert not pending[0]
    counter = SQLCounter(engine)
    assert web.get("/run").json == {"name": "renamed"}
    with engine.connect() as conn:
        assert conn.scalar(select(Person.name).where(Person.id == 1)) == "renamed"
    counter.reset()
    assert web.get("/run").json == {"name": "renamed"}
    assert counter.count == 0  # stored again, and a hit
