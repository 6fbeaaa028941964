"""Attack s27: SQLite databases in memory that connections share by name.

``file:NAME?mode=memory&cache=shared`` (``file::memory:?cache=shared``,
``file:/NAME?vfs=memdb``) is one database for every connection of the
process that opens it, while one is open: its connections share their
entries.  It vanishes with its last connection, and a new one under the
same name may hold other rows, written where no listener sees them
(``sqlite3`` itself here).  Each test compares what a cached read
returns with an uncached read of the same query; hits are proven by
counting statements.
"""

from __future__ import annotations

import os
import sqlite3
import time
import uuid

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, event, select, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool, QueuePool, StaticPool

from pyramid_sessioncache import FromCache, SessionCache
from pyramid_sessioncache.engine import identity

from .conftest import SECRET, SQLCounter
from .conftest import rows as _rows
from .conftest import truth as _truth
from .test_attack_s25_review import _cache, _no_schema_known  # noqa: F401  (an autouse fixture)

_COUNT = Table("s27m_count", MetaData(), Column("id", Integer, primary_key=True), Column("n", Integer))
_COUNTS = select(_COUNT.c.n)
_MAKE = "CREATE TABLE IF NOT EXISTS s27m_count (id INTEGER PRIMARY KEY, n INTEGER)"


def _name() -> str:
    return f"s27m_{uuid.uuid4().hex}"


def _engine(uri: str, **options):
    return create_engine(f"sqlite:///{uri}&uri=true", **options)


def _raw(uri: str, n: int) -> sqlite3.Connection:
    """A connection of sqlite3's own (no listener sees it) holding the database ``uri``, its one row ``n``."""
    db = sqlite3.connect(uri, uri=True)
    db.execute("DROP TABLE IF EXISTS s27m_count")
    db.execute(_MAKE)
    db.execute("INSERT INTO s27m_count VALUES (1, ?)", (n,))
    db.commit()
    return db


def _fill(conn, n: int, schema: str = "main") -> None:
    """Give the database ``schema`` of SQLAlchemy's connection ``conn`` the one row ``n`` (a write the listeners see)."""
    conn.exec_driver_sql(_MAKE.replace("s27m_count", f"{schema}.s27m_count"))
    conn.exec_driver_sql(f"DELETE FROM {schema}.s27m_count")
    conn.exec_driver_sql(f"INSERT INTO {schema}.s27m_count VALUES (1, {n})")
    conn.commit()


def _uncached(conn, stmt=_COUNTS):
    with Session(bind=conn) as session:
        return _rows(session, stmt)


# Shared while it lives: the entries too ---------------------------------------------------------


_SHARED = {
    "file:NAME?mode=memory&cache=shared": "file:{name}?mode=memory&cache=shared",
    "parameters in another order": "file:{name}?cache=shared&mode=memory",
    "file::memory:?cache=shared": "file::memory:?cache=shared",
    "file:/NAME?vfs=memdb": "file:/{name}?vfs=memdb",
}


@pytest.mark.parametrize("uri", list(_SHARED.values()), ids=list(_SHARED))
@pytest.mark.parametrize("pool", [QueuePool, NullPool])
def test_connections_of_a_shared_database_in_memory_share_entries_while_it_lives(uri, pool):
    uri = uri.format(name=_name())
    engine = _engine(uri, poolclass=pool)
    Sess = sessionmaker(engine, info=_cache().session_info())
    counter = SQLCounter(engine)
    with engine.connect() as keep:  # the database lives while it is open: one token for all
        _fill(keep, 1)
        with engine.connect() as first, engine.connect() as second:
            with Sess(bind=first) as session:
                assert _rows(session, _COUNTS, "memory") == [(1,)]
            counter.reset()
            with Sess(bind=second) as session:
                assert _rows(session, _COUNTS, "memory") == _uncached(second) == [(1,)]
            assert counter.count == 1  # the uncached read alone
            with Sess(bind=second) as session:
                session.execute(_COUNT.update().values(n=2))
                session.commit()
            with Sess(bind=first) as session:
                assert _rows(session, _COUNTS, "memory") == _uncached(first) == [(2,)]
    engine.dispose()


def test_two_engines_named_alike_over_one_shared_database_in_memory_share_entries():
    # Two engines have two identities, unless named: then one database, one token.
    name = _name()
    options = {"execution_options": {identity.NAME_OPTION: name}, "poolclass": QueuePool}
    one = _engine(f"file:{name}?mode=memory&cache=shared", **options)
    other = _engine(f"file:{name}?cache=shared&mode=memory", **options)
    cache = _cache()
    counter = SQLCounter(other)
    with one.connect() as keep:
        _fill(keep, 1)
        with Session(one, info=cache.session_info()) as session:
            assert _rows(session, _COUNTS, "memory") == [(1,)]
        with Session(other, info=cache.session_info()) as session:
            assert _rows(session, _COUNTS, "memory") == _truth(other, _COUNTS) == [(1,)]
        assert counter.count == 1
    one.dispose()
    other.dispose()


# A database that vanished, and another of its name ------------------------------------------------


_GONE = ["file:NAME?mode=memory&cache=shared", "file::memory:?cache=shared", "file:/NAME?vfs=memdb"]


def _invalidated(engine) -> None:
    with engine.connect() as conn:
        conn.invalidate()  # its driver's connection closed: the pool opens another


def _returned(engine) -> None:
    pass  # NullPool closes each connection as it is returned


def _closed_on_the_driver(engine) -> None:
    conn = engine.raw_connection()
    conn.driver_connection.close()  # the application's doing: no pool event says so
    conn.invalidate()


def _served_the_new_one(uri: str, engine, Sess, vanish) -> None:
    """``engine`` reads ``uri`` (row 1); it vanishes, and another is made under its name (row 2), which must be read."""
    old = _raw(uri, 1)  # no listener sees this connection: nothing of ours holds the database but the engine's
    with Sess() as session:
        assert _rows(session, _COUNTS, "memory") == [(1,)]
    vanish(engine)
    old.close()  # the database is gone
    new = _raw(uri, 2)  # another, under the same name and table, its row written unseen
    with Sess() as session:
        assert _rows(session, _COUNTS, "memory") == _truth(engine, _COUNTS) == [(2,)]
    new.close()


@pytest.mark.parametrize(
    "pool, vanish",
    [(NullPool, _returned), (QueuePool, _invalidated), (StaticPool, _invalidated), (QueuePool, _closed_on_the_driver)],
    ids=["NullPool", "QueuePool, invalidated", "StaticPool, invalidated", "closed on the driver"],
)
@pytest.mark.parametrize("uri", [_SHARED[name] for name in _GONE], ids=_GONE)
def test_a_database_in_memory_made_again_under_its_name_is_not_served_what_the_one_gone_stored(pool, vanish, uri):
    uri = uri.format(name=_name())
    engine = _engine(uri, poolclass=pool)
    _served_the_new_one(uri, engine, sessionmaker(engine, info=_cache().session_info()), vanish)
    engine.dispose()


_OTHERS = {
    "a name in another case": ("file:{name}?mode=memory&cache=shared", "file:{upper}?mode=memory&cache=shared"),
    "memdb, of the same name": ("file:/{name}?mode=memory&cache=shared", "file:/{name}?vfs=memdb"),
    "not shared (no cache=shared)": ("file:{name}?mode=memory&cache=shared", "file:{name}?mode=memory"),
    "shared cache of a memdb name": ("file:/{name}?vfs=memdb", "file:/{name}?mode=memory&cache=shared"),
}


@pytest.mark.parametrize("uri, other", list(_OTHERS.values()), ids=list(_OTHERS))
def test_a_connection_to_another_database_does_not_keep_a_vanished_ones_entries_alive(uri, other):
    # Another engine's connection, open throughout, to a database whose
    # name is nearly this one's: it keeps that database alive, not this one.
    name = _name()
    uri, other = uri.format(name=name), other.format(name=name, upper=name.upper())
    cache = _cache()
    elsewhere = _engine(other, poolclass=QueuePool, execution_options={identity.NAME_OPTION: name})
    engine = _engine(uri, poolclass=NullPool, execution_options={identity.NAME_OPTION: name})
    with elsewhere.connect() as held:
        _fill(held, 3)
        _served_the_new_one(uri, engine, sessionmaker(engine, info=cache.session_info()), _returned)
        with Session(bind=held, info=cache.session_info()) as session:
            assert _rows(session, _COUNTS, "memory") == _uncached(held) == [(3,)]
    engine.dispose()
    elsewhere.dispose()


# Databases in memory each connection has to itself -------------------------------------------------


_PRIVATE = {
    "mode=memory without cache=shared": "file:{name}?mode=memory",
    "cache=private": "file:{name}?mode=memory&cache=private",
    "memdb without a slash": "file:{name}?vfs=memdb",
    "file::memory: without cache=shared": "file::memory:?mode=memory",
}


def _each_served_its_own(engine) -> None:
    """Two connections of ``engine``, each with a database of its own holding another row, are each served theirs."""
    Sess = sessionmaker(engine, info=_cache().session_info())
    with engine.connect() as first, engine.connect() as second:
        _fill(first, 1)
        _fill(second, 2)
        with Sess(bind=first) as session:
            assert _rows(session, _COUNTS, "memory") == [(1,)]
        with Sess(bind=second) as session:
            assert _rows(session, _COUNTS, "memory") == _uncached(second) == [(2,)]
    engine.dispose()


@pytest.mark.parametrize("uri", list(_PRIVATE.values()), ids=list(_PRIVATE))
def test_connections_each_with_a_database_in_memory_of_their_own_are_keyed_apart(uri):
    engine = _engine(uri.format(name=_name()), poolclass=QueuePool)
    _each_served_its_own(engine)


def test_connections_a_creator_opens_are_keyed_apart_whatever_the_url_says():
    # The URL names a shared database; the creator opens one per connection.
    engine = create_engine(
        f"sqlite:///file:{_name()}?mode=memory&cache=shared&uri=true",
        creator=lambda: sqlite3.connect(":memory:", check_same_thread=False),
        poolclass=QueuePool,
    )
    _each_served_its_own(engine)


# What a connection shows alone, over a shared database ---------------------------------------------


def test_a_connection_given_temporary_tables_as_it_opens_is_keyed_apart():
    uri = f"file:{_name()}?mode=memory&cache=shared"
    engine = _engine(uri, poolclass=QueuePool)
    opened = []

    @event.listens_for(engine, "connect")
    def shadow(dbapi_connection, record):  # no statement event sees it
        opened.append(dbapi_connection)
        if len(opened) == 1:
            dbapi_connection.execute("CREATE TEMP TABLE s27m_count (id INTEGER PRIMARY KEY, n INTEGER)")
            dbapi_connection.execute("INSERT INTO temp.s27m_count VALUES (1, 9)")

    Sess = sessionmaker(engine, info=_cache().session_info())
    with engine.connect() as first, engine.connect() as second:
        _fill(second, 1)  # the shared table
        with Sess(bind=first) as session:
            assert _rows(session, _COUNTS, "memory") == [(9,)]
        with Sess(bind=second) as session:
            assert _rows(session, _COUNTS, "memory") == _uncached(second) == [(1,)]
    engine.dispose()


@pytest.mark.parametrize(
    "attached",
    ["file:{name}?mode=memory&cache=shared", "file:/{name}?vfs=memdb"],
    ids=["shared cache", "memdb"],
)
def test_a_database_in_memory_attached_by_name_again_after_it_vanished_is_keyed_apart(attached):
    attached = attached.format(name=_name())
    engine = _engine(f"file:{_name()}?mode=memory&cache=shared", poolclass=QueuePool)
    Sess = sessionmaker(engine, info=_cache().session_info())
    query = select(text("n")).select_from(text("other.s27m_count"))
    with engine.connect() as keep:
        _fill(keep, 0)
        old = _raw(attached, 1)
        with engine.connect() as first:
            first.exec_driver_sql(f"ATTACH '{attached}' AS other")
            with Sess(bind=first) as session:
                assert _rows(session, query, "memory") == [(1,)]
            first.invalidate()  # its driver's connection closed, with what it attached
        old.close()  # gone
        new = _raw(attached, 2)
        with engine.connect() as second:
            second.exec_driver_sql(f"ATTACH '{attached}' AS other")
            with Sess(bind=second) as session:
                cached = _rows(session, query, "memory")
            assert cached == [tuple(row) for row in second.execute(query)] == [(2,)]
            second.exec_driver_sql("DETACH other")
        new.close()
    engine.dispose()


# A forked child: a copy of the database, which diverges ---------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() only")
def test_a_forked_child_is_not_served_what_its_parent_stored_for_its_own_copy_of_the_database(tmp_path):
    # Named alike in both processes (the identity the fork keeps), and one
    # region in files both read: the child's copy of the database does not
    # have the parent's later write, whose version it sees.
    name = _name()
    engine = _engine(
        f"file:{name}?mode=memory&cache=shared", poolclass=QueuePool, execution_options={identity.NAME_OPTION: name}
    )
    cache = SessionCache({"f": {"type": "file", "data_dir": str(tmp_path / "data")}}, secret=SECRET)
    Sess = sessionmaker(engine, info=cache.session_info())
    cached = _COUNTS.options(FromCache("f"))
    with engine.connect() as keep:
        _fill(keep, 1)
        with Sess() as session:
            assert _rows(session, cached) == [(1,)]
        ready, go = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.read(ready, 1)  # the parent wrote, and stored what it reads since
                engine.dispose(close=False)  # what a worker does with the connections it inherited
                with Sess() as session:
                    served = _rows(session, cached)
                os._exit(0 if served == _truth(engine, _COUNTS) == [(1,)] else 1)
            finally:
                os._exit(2)
        try:
            with Sess() as session:
                session.execute(_COUNT.update().values(n=2))
                session.commit()
            with Sess() as session:
                assert _rows(session, cached) == [(2,)]
        finally:
            os.write(go, b"x")
            status = _reaped(pid)
    engine.dispose()
    assert status == 0


def _reaped(pid: int) -> int | None:
    """The exit code of the child ``pid``, within ten seconds (then killed: None)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return None
