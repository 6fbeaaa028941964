"""Table versions: signed for their region and table, counted, never going back, never raising."""

from __future__ import annotations

import logging
import pickle
import threading

import pytest
import redis
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from pyramid_sessioncache import FromCache, SessionCache
from pyramid_sessioncache.storage import api

from .conftest import SECRET
from .models import Person
from .tampering import SIGNED_TYPES, Backend, options


@pytest.fixture(params=SIGNED_TYPES)
def kind(request) -> str:
    return request.param


@pytest.fixture
def region_of(kind, tmp_path, request):
    """Make a region of ``kind`` (the same backend every call): as another process would."""
    url = request.getfixturevalue("redis_url") if kind == "redis" else None

    def make(secret: str = SECRET) -> SessionCache:
        return SessionCache({"shared": options(kind, tmp_path, url)}, secret=secret)

    yield make
    if kind == "redis":
        redis.Redis.from_url(url).flushall()


def names_stmt():
    return select(Person.id, Person.name).where(Person.id <= 3).order_by(Person.id).options(FromCache("shared"))


def cached(Session):
    with Session() as session:
        return [tuple(row) for row in session.execute(names_stmt()).all()]


def uncached(Session):
    with Session() as session:
        stmt = select(Person.id, Person.name).where(Person.id <= 3).order_by(Person.id)
        return [tuple(row) for row in session.execute(stmt).all()]


def rename(Session, person_id: int, name: str) -> None:
    with Session() as session:
        session.get(Person, person_id).name = name
        session.commit()


def test_a_version_set_back_serves_nothing_stale(engine, sql, region_of, caplog):
    cache = region_of()
    Session = sessionmaker(bind=engine, info=cache.session_info())
    backend = Backend(cache.region("shared"))
    cached(Session)  # learns the tables of the shape
    cached(Session)  # stores the entry, under person's current version
    before = backend.version("person")
    rename(Session, 1, "renamed")  # committed: person's version is bumped
    assert backend.version("person") != before
    backend.set_version("person", before)  # ... and set back by somebody who kept it
    with caplog.at_level(logging.WARNING, logger="pyramid_sessioncache"):
        assert cached(Session) == uncached(Session) == [(1, "renamed"), (2, "person 2"), (3, "person 3")]
        assert cached(Session) == uncached(Session)
    assert any("went back" in r.getMessage() for r in caplog.records)
    sql.reset()
    assert cached(Session) == uncached(Session)
    assert sql.count == 1  # repaired: the cached read is a hit again


def garbage(backend: Backend) -> dict:
    """Values somebody could put where a version should be."""
    good = backend.version("person")
    return {
        "bad UTF-8": b"\xff\xfe\x00garbage",
        "truncated": good[:-7],
        "bare integer": b"12345",
        "another table's token": backend.version("*"),
        "unsigned huge counter": b"999999999999:AAAAAAAAAAAAAAAAAAAAAA:" + b"A" * 43,
        "a pickle": pickle.dumps({"version": 1}),
        "empty": b"",
        "much too long": b"1:" + b"x" * 100_000,
    }


def test_an_unreadable_version_is_a_miss_never_an_exception(engine, sql, region_of, kind, caplog):
    cache = region_of()
    Session = sessionmaker(bind=engine, info=cache.session_info())
    backend = Backend(cache.region("shared"))
    cached(Session)
    cached(Session)
    values = garbage(backend)
    if kind == "redis":
        values["wrong type"] = None  # a list where a string should be
    with caplog.at_level(logging.WARNING, logger="pyramid_sessioncache"):
        for what, value in values.items():
            rename(Session, 2, f"renamed before {what}")  # so that a stale entry would show
            cached(Session)  # stored again, after the write
            rename(Session, 2, f"renamed after {what}")
            if value is None:
                client, key = backend.versions.client, backend.versions._format_key(b"person")
                client.delete(key)
                client.rpush(key, "a", "list")
            else:
                backend.set_version("person", value)
            for _ in range(3):
                assert cached(Session) == uncached(Session), what
            assert (2, f"renamed after {what}") in uncached(Session)
            sql.reset()
            assert cached(Session) == uncached(Session)
            assert sql.count == 1, what  # the version was replaced: caching resumed
    # (Other tests' caches may still be alive, their backends gone: not counted.)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "failed while" not in r.getMessage()]
    assert 1 <= len(warnings) <= 2  # one per kind of problem, not one per read


def test_a_version_copied_from_another_region_does_not_check(engine, region_of, kind, tmp_path, request):
    url = request.getfixturevalue("redis_url") if kind == "redis" else None
    cache = SessionCache(
        {"shared": options(kind, tmp_path, url), "other": options(kind, tmp_path / "other", url)}, secret=SECRET
    )
    one, other = cache.region("shared"), cache.region("other")
    one.versions(("person",), create=True)
    other.versions(("person",), create=True)
    Backend(other).set_version("person", Backend(one).version("person"))
    assert other.versions(("person",)) == (None,)
    assert one.versions(("person",))[0] is not None


def test_versions_of_another_secret_do_not_check(region_of):
    theirs = region_of("another application's secret").region("shared")
    ours = region_of().region("shared")
    assert theirs.versions(("person",), create=True)[0] is not None
    assert ours.versions(("person",)) == (None,)
    assert ours.versions(("person",), create=True)[0] is not None  # replaced by a token of ours


def test_a_bump_from_a_process_that_saw_less_still_goes_up(region_of):
    busy, fresh = region_of().region("shared"), region_of().region("shared")
    for _ in range(5):
        busy.bump(["person"])
    (seen,) = busy.versions(("person",))
    fresh.bump(["person"])  # it has seen no counter at all
    (now,) = busy.versions(("person",))
    assert now is not None and now != seen
    assert api.counter_of(now) == api.counter_of(seen) + 1
    assert fresh.versions(("person",)) == (now,)


def test_a_forged_higher_counter_is_written_over(region_of):
    region = region_of().region("shared")
    backend = Backend(region)
    region.versions(("person",), create=True)
    backend.set_version("person", b"999999:AAAAAAAAAAAAAAAAAAAAAA:" + b"B" * 43)
    region.bump(["person"])
    (token,) = region.versions(("person",))
    assert token is not None and api.counter_of(token) < 999999


def test_two_processes_bumping_at_once_both_end_above_what_came_before(region_of):
    processes = [region_of().region("shared") for _ in range(6)]
    before = processes[0].versions(("person",), create=True)[0]
    for process in processes:
        assert process.versions(("person",)) == (before,)
    barrier = threading.Barrier(len(processes), timeout=60)
    errors = []

    def bump(process) -> None:
        try:
            barrier.wait()
            for _ in range(processes.index(process) + 1):  # some bump more often than others
                process.bump(["person"])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=bump, args=(process,)) for process in processes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    final = [process.versions(("person",))[0] for process in processes]
    assert final[0] is not None and final == [final[0]] * len(processes)  # nobody sees it as gone back
    assert final[0] != before and api.counter_of(final[0]) > api.counter_of(before)


def test_an_entry_records_only_versions_that_exist(engine, sql, region_of):
    # A version that disappears (evicted) never matches again, even when
    # another one is made under the same counter.
    cache = region_of()
    Session = sessionmaker(bind=engine, info=cache.session_info())
    backend = Backend(cache.region("shared"))
    cached(Session)
    cached(Session)
    token = backend.version("person")
    if cache.region("shared").type == "ext:redis":
        backend.versions.client.delete(backend.versions._format_key(b"person"))
    elif cache.region("shared").type == "file":
        import os

        os.unlink(backend.versions.path(b"person"))
    else:
        backend.versions.acquire_write_lock()
        del backend.versions.db[b"person"]
        backend.versions.release_write_lock()
    sql.reset()
    cached(Session)
    assert sql.count == 1
    assert backend.version("person") != token


def test_memory_regions_keep_their_versions_unchecked(engine, sql):
    cache = SessionCache({"shared": {"type": "memory"}})
    region = cache.region("shared")
    assert region.tokens.trusted
    Session = sessionmaker(bind=engine, info=cache.session_info())
    cached(Session)
    cached(Session)
    rename(Session, 3, "renamed")
    assert cached(Session) == uncached(Session)
    sql.reset()
    assert cached(Session) == uncached(Session) and sql.count == 1


def test_discarded_versions_are_missing_for_every_process_then_made_anew(region_of):
    # What a bump that cannot be written falls back to (see test_faults.py):
    # deleting, one key at a time or in one DEL; a name without a version is no error.
    writer, reader = region_of().region("shared"), region_of().region("shared")
    (before,) = reader.versions(("person",), create=True)
    writer.tokens.discard(["person", "never versioned"])
    assert reader.versions(("person", "never versioned")) == (None, None)
    (after,) = reader.versions(("person",), create=True)
    assert after is not None and after != before
