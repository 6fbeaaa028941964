"""Database identity: which data a bind reads, named so that another process names it alike."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url
from sqlalchemy.pool import QueuePool, StaticPool

from pyramid_sessioncache import DatabaseNameError
from pyramid_sessioncache import _sqlalchemy as private
from pyramid_sessioncache.engine.identity import NAME_OPTION, database_identity, portable_text

ROOT = Path(__file__).resolve().parent.parent


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
