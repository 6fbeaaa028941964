"""A worker forked while another thread held one of the add-on's locks does not hang on it.

Pre-fork servers (``gunicorn --preload``, uWSGI, mod_wsgi daemons) fork
their workers from a master that runs the application, and its threads
(a warm-up, a scheduler, the add-on's own) may hold a lock at that moment.
Each test holds one lock in another thread, forks, and has the child do
what a worker does that takes the lock: it must be done within a bound
(the child is killed if it hangs).  Last, what a worker shares with the
master through the fork: an open lock file, a pooled database connection.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

import pytest
from pyramid.config import Configurator
from sqlalchemy import create_engine, event
from sqlalchemy import select as sa_select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool

from pyramid_sessioncache import FromCache, SessionCache, _sqlalchemy
from pyramid_sessioncache.addon.interfaces import IDBSessionFactory
from pyramid_sessioncache.engine import as_loaded
from pyramid_sessioncache.engine.invalidation import writes
from pyramid_sessioncache.storage.backends.filelock import FileLock
from pyramid_sessioncache.storage.region import CacheRegions

from . import models
from .conftest import SECRET
from .models import Person

#: Seconds a child may take; one that hangs is killed after it.
BOUND = 30


@contextmanager
def _held_by_a_thread(acquire: Callable[[], object], release: Callable[[], object]):
    """Have another thread take a lock with ``acquire()`` and keep it until the block ends."""
    taken, done = threading.Event(), threading.Event()

    def hold() -> None:
        acquire()
        taken.set()
        done.wait(BOUND * 3)
        release()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert taken.wait(BOUND)
    try:
        yield
    finally:
        done.set()
        thread.join(BOUND)


def _forked_while_held(lock: object, use: Callable[[], bool], acquire=None) -> None:
    """Fork while another thread holds ``lock``: the child's ``use()`` must return True within :data:`BOUND` seconds."""
    acquire = acquire or lock.acquire  # type: ignore[attr-defined]
    with _held_by_a_thread(acquire, lock.release):  # type: ignore[attr-defined]
        pid = os.fork()
        if pid == 0:
            try:
                os._exit(0 if use() else 1)
            finally:
                os._exit(2)
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError("the child hung on the lock held at the fork")


def _reap(pid: int) -> None:
    """Wait for the child ``pid`` to exit, at most :data:`BOUND` seconds, then kill it."""
    deadline = time.monotonic() + BOUND
    while not os.waitpid(pid, os.WNOHANG)[0]:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return
        time.sleep(0.01)


def _commit_a_write(engine, Session) -> bool:
    engine.dispose(close=False)  # what a worker does with the connections it inherited
    with Session() as session:
        session.get(Person, 1).name = "forked"
        session.commit()
    return True


def test_a_forked_child_bumps_although_a_thread_held_the_kept_names_lock_at_the_fork():
    region = CacheRegions({"r": {"type": "memory"}}, 0.2)["r"]

    def bump() -> bool:  # a commit
        region.bump(["person"])
        return region.versions(("person",)) != (None,)

    _forked_while_held(region._pending_lock, bump)


def test_a_forked_child_commits_although_a_thread_was_wrapping_a_dialects_commit_at_the_fork(engine, Session):
    _forked_while_held(_sqlalchemy._wrapping, lambda: _commit_a_write(engine, Session))


def test_a_forked_child_commits_although_a_thread_was_counting_a_commit_at_the_fork(engine, cache, Session):
    _forked_while_held(cache._commits_lock, lambda: _commit_a_write(engine, Session))


def test_a_forked_child_reads_although_a_thread_held_the_shared_connections_marks_at_the_fork():
    """An engine whose Sessions share one connection (SQLite in memory): a cached read asks what it wrote."""
    engine = create_engine("sqlite://", poolclass=StaticPool)
    models.Base.metadata.create_all(engine)
    cache = SessionCache({"m": {"type": "memory"}}, secret=SECRET)
    Session = sessionmaker(engine, info=cache.session_info())
    with Session() as session:
        session.add(Person(id=1, name="one"))
        session.commit()

    def read() -> bool:
        with Session() as session:
            return session.execute(sa_select(Person.name).options(FromCache("m"))).scalars().all() == ["one"]

    _forked_while_held(writes._sharing_lock, read)


def test_a_forked_child_keeps_loaded_values_although_a_thread_was_watching_a_class_at_the_fork():
    class Base(DeclarativeBase):
        pass

    class Listened(Base):
        __tablename__ = "listened"
        id: Mapped[int] = mapped_column(primary_key=True)

    event.listen(Listened, "load", lambda target, context: None)
    manager = Listened.__mapper__.class_manager
    _forked_while_held(as_loaded._lock, lambda: as_loaded.watch(manager) is False and as_loaded.watch(manager))


def _memory_region(**options):
    return CacheRegions({"r": {"type": "memory", **options}}, 0.2)["r"]


def test_a_forked_child_regenerates_although_a_thread_was_making_a_creation_lock_at_the_fork():
    region = _memory_region()
    _forked_while_held(region._locks._guard, lambda: region.get_or_create("k", lambda: 1) == (1, False))


def test_a_forked_child_regenerates_at_once_an_entry_a_thread_was_regenerating_at_the_fork():
    """Without the parent's regenerator, nobody would ever release the entry's creation lock in the child.

    Each of the child's misses of that entry would wait ``lock_timeout``
    seconds, then run uncached, for ever.
    """
    region = _memory_region(lock_timeout=3 * BOUND)
    namespace = region._namespace(None)
    lock = region._locks(namespace, b"k")

    def regenerate() -> bool:
        return region.get_or_create("k", lambda: 1) == (1, False) and region.get("k") == 1

    _forked_while_held(lock, regenerate, acquire=lambda: lock.acquire(0))


def test_a_forked_child_bumps_although_a_thread_was_raising_a_version_at_the_fork():
    region = _memory_region()
    region.bump(["person"])
    (before,) = region.versions(("person",))
    assert region.tokens is not None
    _forked_while_held(
        region.tokens._lock, lambda: region.bump(["person"]) or region.versions(("person",)) != (before,)
    )


def test_a_forked_child_reads_although_a_thread_was_reading_a_memory_region_at_the_fork():
    region = _memory_region()
    region.put("k", 1)
    dictionary = region._shared.namespace.dictionary
    _forked_while_held(dictionary._lock, lambda: region.get("k") == 1)


def _blocked_on(path: str) -> bool:
    """Whether a process waits for an ``flock`` on the file ``path`` (Linux's ``/proc/locks``)."""
    inode = f":{os.stat(path).st_ino} "
    with open("/proc/locks") as locks:
        return any("->" in line and inode in line for line in locks)


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="needs Linux's /proc/locks")
def test_a_file_lock_released_in_the_parent_lets_its_waiters_in_although_a_forked_child_inherited_it(tmp_path):
    """A worker forked while a thread held a file lock must not keep it for ever from the threads waiting for it.

    An ``flock`` belongs to the open file, which the child shares: a
    release that only closed the holder's descriptor left it held until
    the worker exited (a commit's bump waits on such a lock, ``versions.lock``).
    """
    path = str(tmp_path / "versions.lock")
    held = FileLock(path)
    got = threading.Event()

    def wait_for_the_lock() -> None:
        waiter = FileLock(path)
        waiter.acquire()
        got.set()
        waiter.release()

    reading, writing = os.pipe()
    waiter = threading.Thread(target=wait_for_the_lock, daemon=True)
    with _held_by_a_thread(held.acquire, held.release):
        pid = os.fork()
        if pid == 0:  # a worker that lives on, and does nothing with the lock
            try:
                os.close(writing)
                os.read(reading, 1)
            finally:
                os._exit(0)
        os.close(reading)
        try:
            waiter.start()
            deadline = time.monotonic() + BOUND
            while not _blocked_on(path):
                assert time.monotonic() < deadline, "the waiter never waited for the lock"
                time.sleep(0.01)
        except BaseException:
            os.close(writing)
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise
    try:
        assert got.wait(BOUND), "the lock stayed held by the forked child"
    finally:
        os.close(writing)  # the child exits
        _reap(pid)
        waiter.join(BOUND)


def test_a_forked_child_closes_a_region_although_its_retrying_thread_was_waking_at_the_fork():
    """The thread retrying kept table invalidations waits on the region's event, which takes a lock of its own."""
    region = _memory_region()
    _forked_while_held(region._closed._cond, lambda: region.close() is None and region._closed.is_set())


def test_a_forked_worker_never_uses_a_database_connection_the_master_pooled(pg_url):
    """The engine the add-on makes for ``request.dbsession`` leaves the master's pooled connections to the master.

    A master that ran queries (a warm-up) keeps a connection in the pool:
    a worker that took it would share its server session, and the master
    would then read the worker's uncommitted rows (and could cache them).
    """
    config = Configurator(
        settings={
            "sqlalchemy.url": pg_url,
            "cache.regions": "local_session",
            "cache.local_session.type": "ext:local_session",
            "sessioncache.default_region": "local_session",
        }
    )
    config.include("pyramid_sessioncache")
    factory = config.make_wsgi_app().registry.getUtility(IDBSessionFactory)
    with factory() as session:  # the warm-up: its connection goes back to the pool
        original = session.get(Person, 1).name
    to_child, written = os.pipe()
    reading, from_child = os.pipe()
    pid = os.fork()
    if pid == 0:  # a worker, in the middle of a request that wrote
        try:
            os.close(written)
            os.close(reading)
            session = factory()
            session.get(Person, 1).name = "uncommitted"
            session.flush()
            os.write(from_child, b"w")
            os.read(to_child, 1)
        finally:
            os._exit(0)
    os.close(to_child)
    os.close(from_child)
    try:
        assert select.select([reading], [], [], BOUND)[0], "the worker did not write"
        with factory() as session:
            assert session.execute(sa_select(Person.name).where(Person.id == 1)).scalar_one() == original
    finally:
        os.close(written)  # the worker ends
        _reap(pid)
        os.close(reading)
