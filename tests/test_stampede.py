"""Stampede: when an entry is missing or expires under load, one caller regenerates it."""

from __future__ import annotations

import os
import threading
import time

import pytest
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from pyramid_sessioncache import FromCache, SessionCache

from .conftest import SECRET
from .models import Person

THREADS = 8
#: Seconds an entry lives where it expires: every thread reads it within that of its store, on a loaded machine too.
EXPIRE = 3


def run_together(Session, stmt) -> list:
    barrier = threading.Barrier(THREADS, timeout=60)
    results: list = []
    errors: list = []

    def worker() -> None:
        try:
            with Session() as session:
                barrier.wait()
                results.append(session.execute(stmt).all())
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    return results


@pytest.fixture
def slow_sql(engine):
    """SQL statements, each made slow enough that the threads overlap."""
    from sqlalchemy import event

    statements: list[str] = []

    def slow(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)
        time.sleep(0.2)

    event.listen(engine, "before_cursor_execute", slow)
    return statements


def test_memory_region_regenerates_once(engine, slow_sql):
    cache = SessionCache({"r": {"type": "memory", "expire": EXPIRE}}, invalidation="manual")
    Session = sessionmaker(bind=engine, info=cache.session_info())
    stmt = select(Person.name).where(Person.id == 1).options(FromCache("r"))

    results = run_together(Session, stmt)  # nothing stored yet: the others wait for the first
    assert len(slow_sql) == 1 and all(rows == [("person 1",)] for rows in results)

    time.sleep(EXPIRE + 0.1)  # expired: one caller regenerates, the others get the previous value
    slow_sql.clear()
    results = run_together(Session, stmt)
    assert len(slow_sql) == 1 and len(results) == THREADS


def test_redis_region_regenerates_once(engine, slow_sql, redis_url):
    # Redis drops an entry when it expires (Beaker stores it with a TTL), so
    # there is no previous value to serve: every caller waits for the one
    # that regenerates, on Beaker's lock in Redis.
    cache = SessionCache({"r": {"type": "ext:redis", "url": redis_url, "expire": 60}}, secret=SECRET)
    Session = sessionmaker(bind=engine, info=cache.session_info())
    stmt = select(Person.name).where(Person.id == 2).options(FromCache("r"))
    results = run_together(Session, stmt)
    assert len(slow_sql) == 1 and all(rows == [("person 2",)] for rows in results)


def test_file_region_regenerates_once_and_leaves_no_lock_file(engine, slow_sql, tmp_path):
    # An expired file entry is gone when read, as from Redis: every caller
    # waits for the one that regenerates, on a lock file that is removed after.
    locks = tmp_path / "locks"
    region = {"type": "file", "data_dir": str(tmp_path / "data"), "lock_dir": str(locks), "expire": EXPIRE}
    cache = SessionCache({"r": region}, secret=SECRET)
    Session = sessionmaker(bind=engine, info=cache.session_info())
    stmt = select(Person.name).where(Person.id == 3).options(FromCache("r"))
    results = run_together(Session, stmt)
    assert len(slow_sql) == 1 and all(rows == [("person 3",)] for rows in results)

    time.sleep(EXPIRE + 0.1)
    slow_sql.clear()
    results = run_together(Session, stmt)
    assert len(slow_sql) == 1 and all(rows == [("person 3",)] for rows in results)
    assert [files for _, _, files in os.walk(locks) if files] == []
