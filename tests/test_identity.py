"""Database identity: engines whose connections see different data never share an entry.

Each end-to-end test reads the same query through one shared region from
two engines that a URL cannot tell apart, and compares what each gets from
the cache with what the same query returns uncached on that engine.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, event, make_url, select, text
from sqlalchemy.orm import Session as PlainSession
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import QueuePool, StaticPool

from pyramid_sessioncache import DatabaseNameError, FromCache, SessionCache, cache_parameters
from pyramid_sessioncache import _sqlalchemy as private
from pyramid_sessioncache.engine.identity import NAME_OPTION, database_identity, portable_text
from pyramid_sessioncache.engine.keys import KeyMaker

from . import models
from .conftest import SECRET, SQLCounter
from .models import Person

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cache(region_options, region):
    # Manual invalidation: the writes that fill one database would otherwise
    # invalidate, by table name, what another stored, and hide a shared key.
    return SessionCache(region_options, default_region="local", invalidation="manual", secret=SECRET)


def seeded(engine, people: int):
    """``engine``, its tables created and ``people`` people in them."""
    models.Base.metadata.create_all(engine)
    with PlainSession(engine) as session:
        models.seed(session, people=people)
    return engine


def names(session, region: str | None = None) -> list[str]:
    stmt = select(Person).order_by(Person.id)
    if region is not None:
        stmt = stmt.options(FromCache(region))
    return [person.name for person in session.scalars(stmt)]


def assert_served_its_own_rows(engine, cache, region: str) -> list[str]:
    """Check that ``engine`` gets from ``region`` what it reads uncached, and a hit the second time."""
    Session = sessionmaker(engine, info=cache.session_info())
    sql = SQLCounter(engine)
    with Session() as session:
        uncached = names(session)
    with Session() as session:
        assert names(session, region) == uncached
    sql.reset()
    with Session() as session:
        assert names(session, region) == uncached
    assert sql.count == 0, "the second cached read should have been a hit"
    return uncached


def other_process(code: str, env: dict | None = None) -> str:
    """Run ``code`` in a new Python process (in the repository) and return what it prints."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def identity_elsewhere(url: str, connect_args: dict | None = None, env: dict | None = None) -> str:
    return other_process(
        f"""
        from sqlalchemy import create_engine
        from pyramid_sessioncache.engine.identity import database_identity
        print(database_identity(create_engine({url!r}, connect_args={connect_args or {}!r})))
        """,
        env,
    )


# SQLite in memory, creator= engines ---------------------------------------------


def test_two_sqlite_databases_in_memory_never_share_an_entry(cache, region):
    engines = [seeded(create_engine("sqlite://"), people) for people in (3, 5)]
    served = [assert_served_its_own_rows(engine, cache, region) for engine in engines]
    assert served[0] != served[1]


def test_a_disposed_database_in_memory_is_another_database(cache, region):
    engine = seeded(create_engine("sqlite://"), 3)
    assert_served_its_own_rows(engine, cache, region)
    engine.dispose()  # the database in memory is gone with its connection
    seeded(engine, 5)
    assert len(assert_served_its_own_rows(engine, cache, region)) == 5


def test_two_creator_engines_never_share_an_entry(cache, region, tmp_path):
    paths = [tmp_path / f"{people}.sqlite" for people in (3, 5)]
    engines = [create_engine("sqlite://", creator=lambda path=path: sqlite3.connect(path)) for path in paths]
    for engine, people in zip(engines, (3, 5), strict=True):
        seeded(engine, people)
    served = [assert_served_its_own_rows(engine, cache, region) for engine in engines]
    assert served[0] != served[1]


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite:///file:memdb1?mode=memory&cache=shared&uri=true",
        "sqlite:///file::memory:?cache=shared&uri=true",
        "sqlite:///file:/memdb2?vfs=memdb&uri=true",
        "sqlite:///file:?uri=true",  # a temporary database of one connection
    ],
)
def test_every_sqlite_database_in_memory_is_process_local(url):
    engines = [create_engine(url, poolclass=StaticPool) for _ in range(2)]
    identities = [database_identity(engine) for engine in engines]
    assert identities[0].startswith("local:")
    assert identities[0] != identities[1]
    # One pool, one database: a copy with options and a connection share it.
    assert database_identity(engines[0].execution_options(logging_token="x")) == identities[0]
    with engines[0].connect() as connection:
        assert database_identity(connection) == identities[0]


def test_engines_that_connect_by_themselves_are_process_local(tmp_path, caplog):
    path = tmp_path / "db.sqlite"
    connect = lambda: sqlite3.connect(path)  # noqa: E731
    with caplog.at_level("INFO", logger="pyramid_sessioncache.engine.identity"):
        by_creator = create_engine("sqlite://", creator=connect)
        by_pool = create_engine(f"sqlite:///{path}", pool=QueuePool(connect))
        assert database_identity(by_creator).startswith("local:")
        assert database_identity(by_pool).startswith("local:")
    assert database_identity(by_creator) != database_identity(create_engine("sqlite://", creator=connect))
    assert "creator= function" in caplog.text and NAME_OPTION in caplog.text


def test_an_engine_with_a_do_connect_listener_is_process_local(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'a.sqlite'}")

    @event.listens_for(engine, "do_connect")
    def elsewhere(dialect, record, args, kwargs):
        args[0] = str(tmp_path / "b.sqlite")  # the URL no longer says where it connects

    seeded(engine, 1)
    assert (tmp_path / "b.sqlite").exists() and not (tmp_path / "a.sqlite").exists()
    assert database_identity(engine).startswith("local:")


@pytest.mark.parametrize("empty_cell", [False, True])
def test_an_unexpected_creator_shape_is_process_local(empty_cell):
    other = None

    def connect():
        return other

    if empty_cell:
        del other
    # A function that looks like create_engine's own but closes over other names.
    connect.__module__ = "sqlalchemy.engine.create"
    connect.__qualname__ = "create_engine.<locals>.connect"
    engine = create_engine("postgresql+psycopg://app@db.example/app", creator=connect)
    assert private.connect_arguments(engine.pool) is None
    assert database_identity(engine).startswith("local:")
    assert private.connect_arguments(create_engine("postgresql+psycopg://app@db.example/app").pool) is not None


def test_connect_arguments_that_cannot_be_read_are_process_local(caplog):
    engine = create_engine("postgresql+psycopg://app@db.example/app")

    def broken(url):
        raise RuntimeError("a dialect that changed")

    engine.dialect.create_connect_args = broken
    with caplog.at_level("WARNING", logger="pyramid_sessioncache.engine.identity"):
        assert database_identity(engine).startswith("local:")
    assert "could not be read" in caplog.text


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
def test_a_forked_child_has_databases_in_memory_of_its_own(tmp_path):
    in_memory = create_engine("sqlite://")
    on_disk = seeded(create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}"), 1)
    maker = KeyMaker()
    parent = [database_identity(in_memory), maker.bind(in_memory), database_identity(on_disk)]
    reading, writing = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            found = [database_identity(in_memory), maker.bind(in_memory), database_identity(on_disk)]
            os.write(writing, json.dumps(found).encode())
        finally:
            os._exit(0)
    os.close(writing)
    with os.fdopen(reading) as pipe:
        child = json.loads(pipe.read())
    os.waitpid(pid, 0)
    assert child[0].startswith("local:") and child[0] != parent[0]
    assert child[1] != parent[1] and child[1].startswith(child[0])
    assert child[2] == parent[2]  # a file is the same file


# SQLite files ------------------------------------------------------------------


def test_a_sqlite_file_has_one_identity_however_it_is_spelled(db_url, tmp_path, monkeypatch):
    path = Path(make_url(db_url).database)
    identity = database_identity(create_engine(db_url))
    assert identity.startswith("db:")
    monkeypatch.chdir(path.parent)
    assert database_identity(create_engine(f"sqlite:///{path.name}")) == identity
    assert database_identity(create_engine(f"sqlite:///file:{path.name}?uri=true")) != identity  # other URL query
    (tmp_path / "link.sqlite").symlink_to(path)
    assert database_identity(create_engine(f"sqlite:///{tmp_path / 'link.sqlite'}")) == identity
    assert identity_elsewhere(db_url) == identity
    as_uris = {
        database_identity(create_engine(f"sqlite:///{spelling}?uri=true"))
        for spelling in (path.name, f"file:{path}", f"file://{path}", f"file://localhost{path}")
    }
    assert len(as_uris) == 1 and as_uris.pop().startswith("db:")


def test_a_missing_or_recreated_sqlite_file_is_another_database(tmp_path):
    path = tmp_path / "late.sqlite"
    url = f"sqlite:///{path}"
    assert database_identity(create_engine(url)).startswith("local:")  # it does not exist yet
    sqlite3.connect(path).close()
    before = identity_elsewhere(url)
    assert before.startswith("db:")
    keep = path.open()  # holds the old inode, so that the new file gets another
    path.unlink()
    sqlite3.connect(path).close()
    keep.close()
    assert identity_elsewhere(url) != before


def test_an_sqlite_uri_that_names_a_host_is_process_local():
    assert database_identity(create_engine("sqlite:///file://elsewhere/db.sqlite?uri=true")).startswith("local:")


# What the driver connects with ----------------------------------------------------


def test_the_portable_identity_is_what_the_driver_connects_with():
    def identity(url, **connect_args):
        return database_identity(create_engine(url, connect_args=connect_args))

    base = "postgresql+psycopg://app:secret-one@db.example:5432/app?sslmode=require&application_name=web"
    assert identity(base).startswith("db:")
    assert identity(base) == identity(base.replace("secret-one", "secret-two"))
    assert identity(base) == identity(base, password="secret-three", sslpassword="secret-four")
    assert identity(base) == identity(
        "postgresql+psycopg://app:secret-one@db.example:5432/app?application_name=web&sslmode=require"
    )
    others = {
        identity(base),
        identity(base.replace("app:", "other:")),
        identity(base.replace("db.example", "replica.example")),
        identity(base.replace("5432", "5433")),
        identity(base.replace("/app?", "/other?")),
        identity(base.replace("application_name=web", "application_name=cron")),
        identity(base, options="-c search_path=tenant_a"),
        identity(base, options="-c search_path=tenant_b"),
        identity(base, dbname="other"),
        identity(base, options=["-c", "search_path=tenant_a"]),
        identity(base.replace("db.example:5432", "") + "&host=db.example:5432&host=replica.example:5432"),
    }
    assert len(others) == 11
    shown = portable_text(create_engine(base, connect_args={"sslpassword": "secret-four"}))
    assert "secret" not in shown and "db.example" in shown
    with pytest.raises(ValueError, match="process-local"):
        portable_text(create_engine("sqlite://"))


def test_connect_arguments_without_a_stable_text_are_process_local(caplog):
    class Factory:
        pass

    with caplog.at_level("INFO", logger="pyramid_sessioncache.engine.identity"):
        engine = create_engine("postgresql+psycopg://app@db.example/app", connect_args={"cursor_factory": Factory})
        assert database_identity(engine).startswith("local:")
    assert "no text another process" in caplog.text


def test_libpq_environment_variables_are_part_of_the_identity():
    url = "postgresql+psycopg:///"
    one = identity_elsewhere(url, env={"PGDATABASE": "one", "PGOPTIONS": "-c search_path=a"})
    assert one == identity_elsewhere(url, env={"PGDATABASE": "one", "PGOPTIONS": "-c search_path=a"})
    assert one != identity_elsewhere(url, env={"PGDATABASE": "two", "PGOPTIONS": "-c search_path=a"})
    assert one != identity_elsewhere(url, env={"PGDATABASE": "one", "PGOPTIONS": "-c search_path=b"})


# An explicit name --------------------------------------------------------------


def test_an_explicit_name_makes_two_engines_share(cache, region, db_url):
    path = make_url(db_url).database
    named = {"sessioncache_database": "main"}
    by_url = create_engine(db_url, execution_options=named)
    by_creator = create_engine("sqlite://", creator=lambda: sqlite3.connect(path), execution_options=named)
    assert database_identity(by_url) == database_identity(by_creator) == "name:main"
    stored = assert_served_its_own_rows(by_url, cache, region)
    sql = SQLCounter(by_creator)
    with sessionmaker(by_creator, info=cache.session_info())() as session:
        assert names(session, region) == stored
    assert sql.count == 0, "the second engine has the same name: a hit"
    unnamed = create_engine("sqlite://", creator=lambda: sqlite3.connect(path))
    sql = SQLCounter(unnamed)
    with sessionmaker(unnamed, info=cache.session_info())() as session:
        assert names(session, region) == stored
    assert sql.count == 1, "without the name, nothing says it is the same database"


def test_an_explicit_name_on_a_copy_or_a_connection():
    engine = create_engine("sqlite://")
    assert database_identity(engine.execution_options(sessioncache_database="x")) == "name:x"
    with engine.connect() as connection:
        connection.execution_options(sessioncache_database="y")
        assert database_identity(connection) == "name:y"


@pytest.mark.parametrize("name", ["", "  ", 5, b"main"])
def test_an_explicit_name_must_be_a_string(name):
    engine = create_engine("sqlite://", execution_options={"sessioncache_database": name})
    with pytest.raises(DatabaseNameError, match="sessioncache_database"):
        database_identity(engine)


# Options of the connection a statement runs on --------------------------------------


@pytest.fixture
def attached(tmp_path):
    """A SQLite engine whose connections attach a second database as schema ``other``."""
    other = tmp_path / "other.sqlite"
    engine = create_engine(f"sqlite:///{tmp_path / 'main.sqlite'}")

    @event.listens_for(engine, "connect")
    def attach(dbapi_connection, record):
        dbapi_connection.execute(f"ATTACH DATABASE '{other}' AS other")

    seeded(engine, 3)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE other.person (id INTEGER PRIMARY KEY, name VARCHAR(100))")
        connection.exec_driver_sql("INSERT INTO other.person VALUES (1, 'someone else')")
    yield engine
    engine.dispose()


def test_options_given_to_the_session_connection_are_keyed(attached, cache, region):
    Session = sessionmaker(attached, info=cache.session_info())
    other = {"schema_translate_map": {None: "other"}}
    stmt = select(Person).order_by(Person.id).options(FromCache(region))
    with Session() as session:
        assert names(session, region) == ["person 1", "person 2", "person 3"]
        plain_key = cache_parameters(stmt, session=session)[1]
    with Session() as session:
        session.connection(execution_options=other)
        assert names(session) == ["someone else"]
        assert names(session, region) == ["someone else"]
        beaker_cache, key = cache_parameters(stmt, session=session)
        assert key != plain_key and beaker_cache.get(key) is not None  # where the look-up stored it
        with session.begin_nested():  # a savepoint runs on the same connection
            assert names(session, region) == ["someone else"]
    with Session() as session:
        assert names(session, region) == ["person 1", "person 2", "person 3"]


def test_options_changed_on_a_bound_connection_are_keyed(attached, cache, region):
    with attached.connect() as connection:
        Session = sessionmaker(connection, info=cache.session_info())
        with Session() as session:
            assert names(session, region) == ["person 1", "person 2", "person 3"]
        connection.execution_options(schema_translate_map={None: "other"})
        with Session() as session:
            assert names(session, region) == ["someone else"]


# PostgreSQL: one URL, two search paths ----------------------------------------------

TENANTS = {"tenant_a": "Ann", "tenant_b": "Bob"}


def tenant_engine(url, tenant: str, **kw):
    return create_engine(url, connect_args={"options": f"-c search_path={tenant}"}, **kw)


@pytest.fixture
def tenants(postgres_url):
    """A database of its own with one schema per tenant, each holding one person; yields its URL."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    url = make_url(postgres_url).set(database=name)
    for tenant, person in TENANTS.items():
        engine = create_engine(url)
        with engine.begin() as connection:
            connection.execute(text(f"CREATE SCHEMA {tenant}"))
        engine.dispose()
        engine = tenant_engine(url, tenant)
        models.Base.metadata.create_all(engine)
        with PlainSession(engine) as session:
            session.add(Person(id=1, name=f"{person} of {tenant}"))
            session.commit()
        engine.dispose()
    yield url
    with admin.connect() as connection:
        connection.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
    admin.dispose()


def test_one_url_with_two_search_paths_never_shares_an_entry(tenants, cache, region):
    engines = {tenant: tenant_engine(tenants, tenant) for tenant in TENANTS}
    assert engines["tenant_a"].url == engines["tenant_b"].url
    try:
        for tenant, person in TENANTS.items():
            assert assert_served_its_own_rows(engines[tenant], cache, region) == [f"{person} of {tenant}"]
    finally:
        for engine in engines.values():
            engine.dispose()


def test_processes_with_the_same_url_and_connect_args_share(tenants, redis_url):
    rendered = tenants.render_as_string(hide_password=False)
    printed = other_process(
        f"""
        from sqlalchemy import create_engine, select
        from sqlalchemy.orm import sessionmaker
        from pyramid_sessioncache import FromCache, SessionCache
        from pyramid_sessioncache.engine.identity import database_identity
        from tests.models import Person

        engine = create_engine({rendered!r}, connect_args={{"options": "-c search_path=tenant_a"}})
        cache = SessionCache({{"redis": {{"type": "ext:redis", "url": {redis_url!r}}}}}, secret={SECRET!r})
        with sessionmaker(engine, info=cache.session_info())() as session:
            print(session.scalars(select(Person).order_by(Person.id).options(FromCache("redis"))).one().name)
        print(database_identity(engine))
        """
    ).splitlines()
    assert printed[0] == "Ann of tenant_a"
    cache = SessionCache({"redis": {"type": "ext:redis", "url": redis_url}}, secret=SECRET)
    engines = {tenant: tenant_engine(tenants, tenant) for tenant in TENANTS}
    try:
        assert printed[1] == database_identity(engines["tenant_a"]) != database_identity(engines["tenant_b"])
        for tenant, expected_sql in (("tenant_a", 0), ("tenant_b", 1)):
            sql = SQLCounter(engines[tenant])
            with sessionmaker(engines[tenant], info=cache.session_info())() as session:
                assert names(session, "redis") == [f"{TENANTS[tenant]} of {tenant}"]
            assert sql.count == expected_sql, tenant
    finally:
        for engine in engines.values():
            engine.dispose()


def test_a_password_change_is_the_same_database(tenants):
    cache = SessionCache({"memory": {"type": "memory"}})
    engines = [
        tenant_engine(tenants.set(password="first password"), "tenant_a"),
        tenant_engine(tenants.set(password="second password"), "tenant_a"),  # trust authentication: both connect
    ]
    try:
        assert database_identity(engines[0]) == database_identity(engines[1])
        assert_served_its_own_rows(engines[0], cache, "memory")
        sql = SQLCounter(engines[1])
        with sessionmaker(engines[1], info=cache.session_info())() as session:
            assert names(session, "memory") == ["Ann of tenant_a"]
        assert sql.count == 0
    finally:
        for engine in engines:
            engine.dispose()
