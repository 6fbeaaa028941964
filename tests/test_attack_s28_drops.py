"""Hostile review of fc08b5b / 3430b79: how every Session's local entries are dropped.

A fork while another thread drops every Session's entries; a Session's
entries dropped from a thread that is not the Session's; copies of a
Session's ``info``; manual invalidation; what the registry keeps alive.
"""

from __future__ import annotations

import copy
import gc
import pickle
import subprocess
import sys
import threading
import weakref

import pytest
from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import Session as PlainSession
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import StaticPool

from pyramid_sessioncache import SessionCache, cached_query
from pyramid_sessioncache.storage.backends import local_session

from .conftest import SECRET
from .models import Person, Tag
from .processes import ROOT
from .test_attack_s23_k import _commit_a_write, _forked_while_held
from .test_attack_s28_review import ActsWhenAsked

POINT = select(Person).where(Person.id == 1)


# A fork while another thread holds the lock of the drops ---------------------


def test_a_forked_child_commits_although_a_thread_was_dropping_every_sessions_entries_at_the_fork(engine, Session):
    """``local_session._dropping`` is taken at every commit of the process (drop_everywhere()).

    A worker forked while another thread of the master held it (a warm-up
    committing) hangs for ever at its first commit, unless the lock is one
    of ``forks.lock()``'s.
    """
    _forked_while_held(local_session._dropping, lambda: _commit_a_write(engine, Session))


def test_a_forked_child_loads_a_local_entry_although_a_thread_was_dropping_at_the_fork(engine, Session):
    """A local miss takes the same lock (mark()): the child's first local miss hangs too."""

    def read() -> bool:
        engine.dispose(close=False)
        with Session() as session:
            return cached_query(session, POINT, region="local").scalar_one().id == 1

    _forked_while_held(local_session._dropping, read)


# Another thread's write on a connection every Session shares (StaticPool) ----


@pytest.fixture
def shared_connection(db_url):
    """An engine whose Sessions share one DBAPI connection, across threads (SQLite, StaticPool)."""
    engine = create_engine(db_url, poolclass=StaticPool, connect_args={"check_same_thread": False})
    yield engine
    engine.dispose()


def test_a_write_on_the_shared_connection_while_a_miss_copies_the_sessions_info_does_not_break_the_miss(
    shared_connection, cache
):
    """fc08b5b says another thread never changes a Session's ``info``, and dropped the copy in loader.load().

    On a connection every Session shares, a write of another Session (another
    thread) still pops the entries of every Session working on it
    (writes._read_again(): ``local_session.drop(session)``), from the writing
    thread: a miss iterating its Session's ``info`` at that moment failed
    with RuntimeError.  The loader copies it in one step again; application
    code iterating its own ``info`` on such a connection still can (known).
    """
    Session = sessionmaker(shared_connection, info=cache.session_info())

    def write() -> None:
        with Session() as other:
            other.execute(update(Tag).where(Tag.id == 1).values(name="written meanwhile"))
            other.commit()

    key = ActsWhenAsked("application key", write)
    with Session() as session:
        session.info[key] = "value"
        cached_query(session, POINT, region="memory").all()
        cached_query(session, POINT, region="memory").all()  # a hit: the Session keeps local namespaces
        assert local_session.INFO_KEY in session.info
        key.armed = True
        tags = cached_query(session, select(Tag).order_by(Tag.id), region="memory").scalars().all()
        assert not key.armed
        assert [tag.id for tag in tags] == [1, 2, 3]


def test_threads_reading_while_others_write_on_a_shared_connection(shared_connection, cache):
    """The same with real threads: readers miss and hit (local and shared) while a writer writes on the one connection."""
    import time

    Session = sessionmaker(shared_connection, info=cache.session_info())
    errors: list[BaseException] = []
    stop = threading.Event()
    lock = threading.Lock()  # SQLite's one connection: one statement at a time

    def reader():
        with Session() as session:
            for i in range(500):
                session.info[f"app {i}"] = i
            while not stop.is_set():
                try:
                    with lock:
                        cached_query(session, POINT, region="local").all()
                        cached_query(session, select(Tag), region="memory").all()
                        cached_query(session, POINT, region="memory").all()
                except BaseException as error:  # noqa: BLE001 - reported by the test
                    errors.append(error)
                    stop.set()

    def writer():
        n = 0
        while not stop.is_set():
            with lock, Session() as other:
                other.execute(update(Tag).where(Tag.id == 1).values(name=f"tag {n}"))
                other.commit()
            n += 1
            time.sleep(0)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and not stop.is_set():
            time.sleep(0.02)
        stop.set()
        for thread in threads:
            thread.join(30)
    finally:
        sys.setswitchinterval(interval)
    assert errors == []


# Copies of a Session's info -------------------------------------------------


def test_a_session_made_with_a_copy_of_anothers_info_keeps_its_own_local_entries(engine, cache, sql):
    """An application that makes a Session with ``info=dict(session.info)`` (a helper's Session, a retry).

    The Kept dictionary travels with the copy: two Sessions then share one
    container, the second one never registered for the drops, and a hit of
    one serves the other's objects.
    """
    Session = sessionmaker(engine, info=cache.session_info())
    with Session() as first:
        mine = cached_query(first, POINT, region="local").scalar_one()
        with Session(info=dict(first.info)) as second:
            theirs = cached_query(second, POINT, region="local").scalar_one()
            assert theirs is not mine
            assert theirs in second
            assert mine not in second


def test_deepcopy_and_pickle_of_a_sessions_info_keep_working(engine, Session):
    """``copy.deepcopy(session.info)`` / pickling an info: Kept has ``__slots__`` and a required attribute."""
    with Session() as session:
        cached_query(session, POINT, region="local").all()
        kept = session.info[local_session.INFO_KEY]
        kept.drops = 3
        copied = copy.copy(kept)
        assert copied.drops == 3
        copied = copy.deepcopy({k: v for k, v in session.info.items() if k == local_session.INFO_KEY})
        assert copied[local_session.INFO_KEY].drops == 3
        empty = local_session.Kept()
        empty.drops = 2
        assert pickle.loads(pickle.dumps(empty)).drops == 2


# What the registry and the lock keep alive ----------------------------------


def test_the_registry_keeps_no_session_alive(engine, Session):
    for _ in range(3):
        session = Session()
        cached_query(session, POINT, region="local").all()
        cached_query(session, POINT, region="memory").all()
        cached_query(session, POINT, region="memory").all()
        ref = weakref.ref(session)
        session.close()
        del session
        gc.collect()
        assert ref() is None
    assert all(member is not None for member in local_session.members(local_session._keeping))


# Manual invalidation ---------------------------------------------------------


def test_manual_invalidation_a_read_only_commit_elsewhere_leaves_local_entries_alone(engine, region_options, sql):
    """A commit that wrote nothing publishes nothing: a local hit still hands back the object the app holds."""
    cache = SessionCache(region_options, secret=SECRET, invalidation="manual")
    Session = sessionmaker(engine, info=cache.session_info())
    with Session() as session:
        held = cached_query(session, POINT, region="local").scalar_one()
        with Session() as other:
            other.scalars(POINT).one()
            other.commit()
        sql.reset()
        assert cached_query(session, POINT, region="local").scalar_one() is held
        assert sql.count == 0


def test_manual_invalidation_an_undeclared_write_elsewhere_leaves_shared_entries_valid(engine, region_options, sql):
    """Local entries follow every commit now; shared entries under manual invalidation still do not."""
    cache = SessionCache(region_options, secret=SECRET, invalidation="manual")
    Session = sessionmaker(engine, info=cache.session_info())
    with Session() as session:
        cached_query(session, POINT, region="memory").all()
    with PlainSession(engine) as other:
        other.execute(update(Person).where(Person.id == 1).values(name="undeclared"))
        other.commit()
    with Session() as session:
        sql.reset()
        assert cached_query(session, POINT, region="memory").scalar_one().name != "undeclared"
        assert sql.count == 0
        stats = cache.stats.region("memory")
        assert stats.invalidations == 0


# A garbage collection while the lock of the drops is held ---------------------

#: Loses a Session that wrote (in a reference cycle, never closed), then has a
#: garbage collection run at each point in turn of drop_everywhere().
_LOST_WHILE_DROPPING = """
import gc, sys
from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import sessionmaker
from pyramid_sessioncache import SessionCache, cached_query
from pyramid_sessioncache.storage.backends import local_session
from tests.models import Person

engine = create_engine(sys.argv[1])
cache = SessionCache({"local": {"type": "ext:local_session"}}, secret=sys.argv[2])
Session = sessionmaker(engine, info=cache.session_info())
kept = Session()
cached_query(kept, select(Person).where(Person.id == 1), region="local").all()
under_the_lock = []
lock = local_session._dropping
held = getattr(lock, "_is_owned", None) or lock.locked  # an RLock, or a Lock
gc.callbacks.append(lambda phase, info: phase == "start" and under_the_lock.append(held()))
for allocations in range(16):
    gc.collect()
    gc.disable()
    lost = Session()
    lost.execute(update(Person).where(Person.id == 2).values(name="lost"))  # written, neither committed nor rolled back
    lost.itself = lost  # a reference cycle: only the collector frees it
    del lost
    gc.set_threshold(gc.get_count()[0] + allocations)
    gc.enable()
    local_session.drop_everywhere()  # what every commit of the process does
    gc.set_threshold(700)
    gc.collect()
print(any(under_the_lock))
"""


def test_a_garbage_collection_while_every_sessions_entries_are_dropped_does_not_deadlock_the_commit(db_url):
    """A collection that runs while ``_dropping`` is held (any allocation in drop_everywhere() or mark() may start one).

    If it finalizes the connection of a Session the application lost with
    writes pending (an exception path that never closed it), the pool's
    check-in publishes them (writes._checked_in()), which drops every
    Session's entries again, in the same thread: with a plain Lock the thread
    waits for itself for ever, and so does every other thread's commit and
    local miss after it.
    """
    done = _child(_LOST_WHILE_DROPPING, db_url)
    assert done.stdout.strip() == "True"  # a collection did run under the lock


#: The same with a real commit, reading a shared region first: a collection at
#: each point in turn of the commit's path.
_LOST_WHILE_COMMITTING = """
import gc, sys
from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import sessionmaker
from pyramid_sessioncache import SessionCache, cached_query
from tests.models import Person, Tag

engine = create_engine(sys.argv[1])
cache = SessionCache({"memory": {"type": "memory"}}, secret=sys.argv[2])
Session = sessionmaker(engine, info=cache.session_info())
for allocations in range(120):
    gc.collect()
    gc.disable()
    lost = Session()
    lost.execute(update(Tag).where(Tag.id == 2).values(name="lost"))  # written, neither committed nor rolled back
    lost.itself = lost  # a reference cycle: only the collector frees it
    del lost
    gc.set_threshold(gc.get_count()[0] + allocations)
    gc.enable()
    with Session() as session:
        cached_query(session, select(Person).where(Person.id == 3), region="memory").all()
        session.get(Person, 1).name = f"name {allocations}"
        session.commit()
    gc.set_threshold(700)
    gc.collect()
"""


def test_a_garbage_collection_in_a_memory_regions_lock_does_not_deadlock(db_url):
    """A collection while a memory region's lock is held finalizes a lost Session's connection.

    Its pool check-in publishes the writes the connection left; from the
    finalizer, region.bump() waited for the lock its own thread held, for
    ever.  Now a check-in inside a collection publishes from a thread of
    its own.
    """
    _child(_LOST_WHILE_COMMITTING, db_url)


def _child(script: str, db_url: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a process of its own; one that hangs is killed, and the test fails."""
    done = subprocess.run(
        [sys.executable, "-c", script, db_url, SECRET],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,  # ~13 s alone; the suite runs it beside three other workers on two cores
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done
