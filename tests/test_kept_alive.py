"""What only the cache held is gone: a Session's objects once the application lets them go.

The cache keeps objects of a Session in two places: an ``ext:local_session``
entry holds the objects it hands back, and a Session remembers the objects
its hits of a shared entry made, for its next hit of that entry.  Neither
may keep alive an object the application let go once another transaction
changed its row: the Session's later reads, cached or not, would find it
in the identity map, where the ORM does not overwrite what it holds, and
return the old values.  Each case is compared with the same steps run
without the cache; ``gc.collect()`` stands where the application lets go
(objects in reference cycles wait for the collector in a plain Session too).
"""

from __future__ import annotations

import gc
import json
import sqlite3
import subprocess
import sys
import threading
import weakref
from contextlib import closing

import pytest
from sqlalchemy import event, select, update
from sqlalchemy.orm import Session as PlainSession

from pyramid_sessioncache import cached_query

from .conftest import SECRET, use_region
from .models import Person
from .processes import ROOT

POINT = select(Person).where(Person.id == 1)

#: A write by another process, through a cache of its own on the same shared region.
_OTHER_PROCESS = """
import json, sys
from sqlalchemy import create_engine, update
from sqlalchemy.orm import sessionmaker
from pyramid_sessioncache import SessionCache
from tests.models import Person
url, name, options, secret = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
cache = SessionCache({name: options}, secret=secret)
with sessionmaker(create_engine(url), info=cache.session_info())() as session:
    session.execute(update(Person).where(Person.id == 1).values(name="renamed elsewhere"))
    session.commit()
"""


def _write_in_another_process(engine, region_options, region) -> None:
    subprocess.run(
        [sys.executable, "-c", _OTHER_PROCESS, str(engine.url), region, json.dumps(region_options[region]), SECRET],
        cwd=ROOT,
        check=True,
        timeout=120,
    )


def _rename(engine, name: str = "renamed") -> None:
    """Another transaction of this process changes person 1's name, and commits."""
    with PlainSession(engine) as other:
        other.execute(update(Person).where(Person.id == 1).values(name=name))
        other.commit()


READS = {
    "cached": lambda session, region: cached_query(session, POINT, region=region).scalar_one().name,
    "uncached": lambda session, region: session.scalars(POINT).one().name,
    "get": lambda session, region: session.get(Person, 1).name,
}


@pytest.fixture(params=["memory", "file", "redis"])
def out_of_process(request, region_options):
    """Each shared region (asked for before ``Session``: the cache is made with it)."""
    return use_region(request, region_options, request.param)


@pytest.fixture(params=["file", "redis"])
def across_processes(request, region_options):
    """Each region processes share (asked for before ``Session``: the cache is made with it)."""
    return use_region(request, region_options, request.param)


@pytest.mark.parametrize("read", ["cached", "uncached", "get"])
def test_after_another_process_commits_a_read_of_the_dropped_objects_is_fresh(
    across_processes, engine, Session, region_options, read
):
    region = across_processes
    with Session() as other:
        cached_query(other, POINT, region=region).all()  # stored
    with Session() as session:
        for _ in range(3):  # hits: the Session remembers the objects they made
            cached_query(session, POINT, region=region).all()
        gc.collect()
        _write_in_another_process(engine, region_options, region)
        assert READS[read](session, region) == "renamed elsewhere"


@pytest.mark.parametrize("read", ["uncached", "get"])
def test_after_another_program_writes_an_uncached_read_of_the_dropped_objects_is_fresh(
    out_of_process, engine, Session, read
):
    """A write no cache hears of (the Session's cached reads would still hit, by design): plain reads see it."""
    with Session() as other:
        cached_query(other, POINT, region=out_of_process).all()
    with Session() as session:
        for _ in range(3):
            cached_query(session, POINT, region=out_of_process).all()
        gc.collect()
        with closing(sqlite3.connect(engine.url.database)) as conn:  # not through SQLAlchemy: no cache hears it
            conn.execute("UPDATE person SET name = 'renamed' WHERE id = 1")
            conn.commit()
        assert READS[read](session, out_of_process) == "renamed"


def test_without_the_cache_the_same_steps_read_fresh(engine, Session):
    """The reference of the tests above, uncached."""
    with Session() as session:
        for _ in range(3):
            session.scalars(POINT).all()
        gc.collect()
        _rename(engine)
        assert session.get(Person, 1).name == "renamed"


def test_a_hit_serves_the_objects_the_application_still_holds(out_of_process, Session, sql):
    with Session() as other:
        cached_query(other, POINT, region=out_of_process).all()
    with Session() as session:
        held = cached_query(session, POINT, region=out_of_process).scalar_one()
        sql.reset()
        assert all(cached_query(session, POINT, region=out_of_process).scalar_one() is held for _ in range(3))
        assert sql.count == 0


def test_the_next_hit_after_the_objects_went_makes_them_again(out_of_process, Session, sql):
    with Session() as other:
        cached_query(other, POINT, region=out_of_process).all()
    with Session() as session:
        first = cached_query(session, POINT, region=out_of_process).scalar_one()
        second = cached_query(session, POINT, region=out_of_process).scalar_one()
        assert first is second
        gone = weakref.ref(first)
        del first, second
        gc.collect()
        assert gone() is None  # nothing of the cache kept it
        sql.reset()
        third = cached_query(session, POINT, region=out_of_process).scalar_one()
        assert (third.id, third.name, sql.count) == (1, "person 1", 0)


@pytest.mark.parametrize("read", ["cached", "uncached", "get"])
def test_a_local_entry_keeps_no_object_once_another_session_commits(engine, Session, read):
    with Session() as session:
        for _ in range(2):  # stored, then a hit
            cached_query(session, POINT, region="local").all()
        gc.collect()
        _rename(engine)
        assert READS[read](session, "local") == "renamed"


def test_a_local_entry_still_serves_its_objects_until_a_commit(engine, Session, sql):
    """The other side: what a current entry holds it keeps, and serves without SQL."""
    with Session() as session:
        kept = weakref.ref(cached_query(session, POINT, region="local").scalar_one())
        gc.collect()
        assert kept() is not None
        sql.reset()
        assert cached_query(session, POINT, region="local").scalar_one() is kept()
        assert sql.count == 0


def test_a_commit_in_another_thread_drops_what_each_sessions_local_entries_keep(engine, Session):
    """Sessions of other threads: each one's void entries let go of their objects, and the threads do not fail."""
    sessions = [Session() for _ in range(4)]
    kept = []
    errors: list[BaseException] = []

    def read(session) -> None:
        try:
            for _ in range(50):
                kept.append(weakref.ref(cached_query(session, POINT, region="local").scalar_one()))
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    threads = [threading.Thread(target=read, args=(session,)) for session in sessions]
    for thread in threads:
        thread.start()
    for name in range(20):
        _rename(engine, f"renamed {name}")
    for thread in threads:
        thread.join()
    assert errors == []
    _rename(engine, "renamed at last")
    gc.collect()
    assert [ref for ref in kept if ref() is not None] == []
    for session in sessions:
        assert session.get(Person, 1).name == "renamed at last"
        session.close()


def test_a_local_entry_a_commit_voided_while_it_loaded_keeps_nothing(engine, Session):
    """A commit published while the entry's query ran: the entry, stored after the commit dropped entries, is dropped too."""
    committed = []

    def commit_meanwhile(conn, cursor, statement, parameters, context, executemany) -> None:
        if statement.lstrip().upper().startswith("SELECT") and not committed:
            committed.append(True)
            _rename(engine)

    with Session() as session:
        event.listen(engine, "before_cursor_execute", commit_meanwhile)
        try:
            person = cached_query(session, POINT, region="local").scalar_one()
        finally:
            event.remove(engine, "before_cursor_execute", commit_meanwhile)
        assert committed
        gone = weakref.ref(person)
        del person
        gc.collect()
        assert gone() is None
        assert session.get(Person, 1).name == "renamed"
