"""sessioncache.postgresql_notify: every committed write of any client reaches every listening process.

Two application processes, each with a ``memory`` region of its own (no
shared backend at all: only the notifications tell them), and a writer
that is plain psycopg, no SQLAlchemy.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

from pyramid_sessioncache.engine.invalidation.notify import dsn_of

from . import models
from .processes import ServerProcess
from .test_concurrency import get

WINDOW = 30.0  # seconds: a generous bound on notification plus reconnection, on a loaded machine


@pytest.fixture
def notified_db(pg_database):
    """A seeded database whose tables notify every committed write."""
    engine = create_engine(pg_database)
    models.Base.metadata.create_all(engine)
    with sessionmaker(engine)() as session:
        models.seed(session)
    engine.dispose()
    return pg_database


def psql(url: str, sql: str) -> None:
    import psycopg

    with psycopg.connect(dsn_of(url)) as conn:  # commits at the end of the block
        conn.execute(sql)


def wait_for(read, expected, bound: float = WINDOW) -> float:
    started = time.monotonic()
    while time.monotonic() - started < bound:
        if read() == expected:
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"still {read()!r} after {bound} s, expected {expected!r}")


def test_a_write_by_another_client_reaches_every_listening_process(notified_db, tmp_path):
    url = notified_db
    ini = tmp_path / "app.ini"
    escaped = url.replace("%", "%%")  # ini interpolation
    ini.write_text(f"[app:main]\nuse = egg:sessioncache_demo\nsqlalchemy.url = {escaped}\n")
    command = Path(sys.executable).with_name("sessioncache-notify")
    done = subprocess.run([str(command), "install", str(ini)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "person" in done.stdout
    processes = [ServerProcess(url, {"type": "memory"}, {"sessioncache.postgresql_notify": "true"}) for _ in range(2)]
    try:
        for process in processes:
            assert get(process.base, "/people/1")["name"] == "person 1"
        psql(url, "UPDATE person SET name = 'by psql' WHERE id = 1")
        for process in processes:
            wait_for(lambda p=process: get(p.base, "/people/1")["name"], "by psql")
        psql(url, "BEGIN; UPDATE person SET name = 'rolled back' WHERE id = 1; ROLLBACK")
        psql(url, "UPDATE person SET name = 'after' WHERE id = 2")  # proof that notifications still flow
        for process in processes:
            wait_for(lambda p=process: get(p.base, "/people/2")["name"], "after")
            assert get(process.base, "/people/1")["name"] == "by psql"
    finally:
        for process in processes:
            process.stop()


def test_a_killed_listening_connection_recovers_and_misses_nothing(notified_db):
    from pyramid_sessioncache import FromCache, SessionCache
    from pyramid_sessioncache.engine.invalidation.notify import install_triggers

    url = notified_db
    engine = create_engine(url)
    with engine.begin() as conn:
        install_triggers(conn)
    cache = SessionCache({"memory": {"type": "memory"}})
    Session = sessionmaker(bind=engine, info=cache.session_info())
    listener = cache.listen(engine)
    try:
        assert listener.wait_connected(10)
        stmt = select(models.Person.name).where(models.Person.id == 3).options(FromCache("memory"))

        def name() -> str:
            with Session() as session:
                return session.execute(stmt).scalar_one()

        assert name() == "person 3"
        psql(url, f"SELECT pg_terminate_backend({listener.backend_pid})")
        # Written while the listener may be down: whatever it missed is invalidated when it is back.
        psql(url, "UPDATE person SET name = 'while down' WHERE id = 3")
        wait_for(name, "while down")
        assert listener.wait_connected(WINDOW)
        psql(url, "UPDATE person SET name = 'after the reconnection' WHERE id = 3")
        wait_for(name, "after the reconnection")
    finally:
        cache.close()
        engine.dispose()
