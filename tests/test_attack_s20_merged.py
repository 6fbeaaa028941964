"""Session 20, review of the day's merged fixes (adversarial): the request's Session after pyramid_tm, the fuzzer's, PostgreSQL's.

Each test is a defect found by attacking the changes merged that day,
fixed with it.
"""

from __future__ import annotations

import pytest
from sqlalchemy import String, create_engine, func, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from pyramid_sessioncache import FromCache, SessionCache
from pyramid_sessioncache.addon.interfaces import IDBSessionFactory
from pyramid_sessioncache.engine.invalidation import writes

from . import test_attack_s18_round6 as round6
from . import test_writes_postgresql
from .conftest import SECRET, SQLCounter
from .models import Person
from .test_attack_s19_final import _late_app

#: Schemas public, tenant_a and tenant_b, each with its ``item`` (PostgreSQL).
tenants = round6.tenants


@pytest.mark.parametrize("explicit", [False, True])
def test_a_session_first_made_in_a_finished_callback_joins_no_ended_transaction(db_url, explicit):
    """The view never used ``request.dbsession``: made after pyramid_tm ended, it joined the thread's next transaction.

    With the explicit manager the read raised ``NoTransaction``; with the
    thread's it began a transaction nobody ended, holding the Session.
    """
    import gc
    import weakref

    import transaction
    from webtest import TestApp

    read = []
    sessions = []

    def view(request):
        def late(request):
            sessions.append(weakref.ref(request.dbsession))
            read.append(request.dbsession.execute(select(Person.name).where(Person.id == 2)).scalar_one())

        request.add_finished_callback(late)
        return {}

    settings = {"tm.manager_hook": "pyramid_tm.explicit_manager"} if explicit else {}
    app = _late_app(db_url, view, **settings)
    engine = app.registry.queryUtility(IDBSessionFactory).kw["bind"]
    try:
        TestApp(app).get("/run")
        gc.collect()
        assert read == ["person 2"]
        assert engine.pool.checkedout() == 0
        assert [ref() for ref in sessions] == [None]
    finally:
        transaction.manager.abort()
        engine.dispose()


def test_a_subrequest_session_that_could_not_join_is_closed(db_url):
    """With the explicit manager a subrequest's ``request.tm`` is a manager of its own, with no transaction.

    Its Session's read raises ``NoTransaction`` after checking a
    connection out, and it joins nothing: left to its parent's
    transaction, which never closes it, it kept the connection out.
    """
    from pyramid.request import Request
    from webtest import TestApp

    raised = []

    def view(request):
        if "sub" in request.params:
            request.dbsession.execute(select(Person.name)).all()
            return {}
        request.dbsession.scalars(select(Person.id)).all()
        try:
            request.invoke_subrequest(Request.blank("/run?sub=1"), use_tweens=False)
        except Exception as exc:
            raised.append(type(exc).__name__)
        return {}

    app = _late_app(db_url, view, **{"tm.manager_hook": "pyramid_tm.explicit_manager"})
    engine = app.registry.queryUtility(IDBSessionFactory).kw["bind"]
    try:
        TestApp(app).get("/run")
        assert raised == ["NoTransaction"]
        assert engine.pool.checkedout() == 0
    finally:
        engine.dispose()


class _NamedBase(DeclarativeBase):
    pass


class _Setval(_NamedBase):
    """A table and columns named like functions called for their effect, or like locking hints."""

    __tablename__ = "setval"
    id: Mapped[int] = mapped_column(primary_key=True)
    nextval: Mapped[int] = mapped_column(default=0)
    updlock: Mapped[str] = mapped_column(String(10), default="x")


@pytest.mark.parametrize(
    "statement",
    [
        pytest.param(select(_Setval), id="the class"),
        pytest.param(select(_Setval.id, _Setval.nextval), id="columns"),
        pytest.param(select(_Setval.id.label("pg_advisory_lock")), id="a label"),
    ],
)
def test_names_like_effect_functions_or_locks_are_cached(tmp_path, statement):
    """Only a call runs every time: every query of a table, column or label so named ran uncached."""
    engine = create_engine(f"sqlite:///{tmp_path / 'named.sqlite'}")
    _NamedBase.metadata.create_all(engine)
    with sessionmaker(engine)() as session:
        session.add(_Setval(id=1))
        session.commit()
    assert _statements_per_run(engine, statement) == [1, 0]


def _statements_per_run(engine, statement):
    """SQL statements each of two runs of ``statement`` from a ``memory`` region sends, each in a new Session."""
    cache = SessionCache({"memory": {"type": "memory"}}, secret=SECRET)
    Session = sessionmaker(engine, info=cache.session_info())
    sql = SQLCounter(engine)
    counts = []
    try:
        for _ in range(2):
            with Session() as session:
                sql.reset()
                session.execute(statement.options(FromCache("memory"))).all()
                counts.append(sql.count)
    finally:
        engine.dispose()
    return counts


def test_a_call_of_an_effect_function_still_runs_every_time(tmp_path):
    """What the names above no longer do, a call still does: ``func.setval()`` of the same table's column."""
    engine = create_engine(f"sqlite:///{tmp_path / 'named.sqlite'}")
    _NamedBase.metadata.create_all(engine)
    engine.raw_connection().driver_connection.create_function("setval", 1, lambda value: value)
    assert _statements_per_run(engine, select(func.setval(_Setval.nextval))) == [1, 1]


@pytest.mark.parametrize(
    "ended_by, expected, hit",
    [
        ("a rollback", ["of public"], True),
        ("a commit", ["of a"], True),
        # Committed by SQL text, which SQLAlchemy does not see: its rollback
        # then undoes nothing, and the setting, committed, is known to stay.
        ("COMMIT, then a rollback", ["of a"], True),
    ],
)
def test_a_setting_made_in_a_transaction_rolled_back_leaves_its_connection_cached(tenants, ended_by, expected, hit):
    """PostgreSQL undoes a session setting its transaction made when it rolls back, as if never made.

    The connection's settings were marked unknown instead, for the rest of
    its life in the pool: every look-up it served ran uncached (a tenant
    switch, ``SET search_path``, in a request that failed, and its pooled
    connection never cached again).  After a commit the setting stays.
    """
    engine = create_engine(tenants, pool_size=1, max_overflow=0)  # one connection: its settings stay
    Session = sessionmaker(engine, info=round6._cache().session_info())
    sql = SQLCounter(engine)
    try:
        with Session() as session:
            session.connection().exec_driver_sql("SET search_path TO tenant_a")
            assert list(session.scalars(round6.ITEMS)) == ["of a"]
            if ended_by.startswith("COMMIT"):
                session.connection().exec_driver_sql("COMMIT")
            session.commit() if ended_by == "a commit" else session.rollback()
        with Session() as session:
            assert round6._prime(session) == list(session.scalars(round6.ITEMS)) == expected
            sql.reset()
            assert list(session.scalars(round6.CACHED)) == expected
            assert sql.count == (0 if hit else 1)
    finally:
        engine.dispose()


#: The PostgreSQL fixtures of the temporary-table attacks.
pg = test_writes_postgresql.pg


@pytest.mark.parametrize(
    "make, end, apart",
    [
        (" ON COMMIT DROP", "commit", False),
        ("", "rollback", False),
        (" ON COMMIT DROP", "rollback", False),
        ("", "commit", True),  # the table stays: its connection's look-ups stay apart
    ],
)
def test_a_temporary_table_its_transaction_ended_unpins_its_connection(pg, region_options, make, end, apart):
    """A temporary table gone with its transaction (dropped at commit, or rolled back) no longer keys its connection apart.

    The token stayed for the connection's life in the pool: none of its
    look-ups was ever served what another connection stored.
    """
    from .test_attack_s20_postgresql import PARENTS
    from .test_writes_postgresql import cached, uncached

    own = create_engine(pg.url, pool_size=1, max_overflow=0)  # its one connection, every time
    try:
        cache = SessionCache(region_options, default_region="memory", secret=SECRET)
        Own = sessionmaker(bind=own, info=cache.session_info())
        Other = sessionmaker(bind=pg, info=cache.session_info())
        with Own() as session:
            session.connection().exec_driver_sql(
                f"CREATE TEMPORARY TABLE pg_parent (id integer PRIMARY KEY, name varchar(50)){make};"
                "INSERT INTO pg_parent VALUES (1, 'temporary')"
            )
            assert [tuple(row) for row in session.execute(PARENTS)] == [(1, "temporary")]
            session.commit() if end == "commit" else session.rollback()
        for _ in range(3):  # learnt, stored
            assert cached(Other, "memory", PARENTS) == uncached(pg, PARENTS)
        sql = SQLCounter(own)
        assert cached(Own, "memory", PARENTS) == uncached(own, PARENTS)
        assert sql.count == (2 if apart else 1)  # its own look-up ran, or was a hit; then the uncached read
        assert (uncached(own, PARENTS) == [(1, "temporary")]) is apart
    finally:
        own.dispose()


def test_look_ups_while_new_threads_write_on_a_singleton_thread_pool(db_url):
    """Each thread's connection of a ``SingletonThreadPool`` adds its marks as it first writes.

    Another thread's look-up in a shared region, reading them all
    (``writes.pending_in_pool()``), raised ``RuntimeError: Set changed size
    during iteration``: the query failed.  Threads switched as often as can
    be, for a few seconds at most.
    """
    import sys
    import threading
    import time

    from sqlalchemy.pool import SingletonThreadPool

    engine = create_engine(db_url, poolclass=SingletonThreadPool, pool_size=500, connect_args={"timeout": 30})
    cache = SessionCache({"memory": {"type": "memory"}}, secret=SECRET)
    Session = sessionmaker(engine, info=cache.session_info())
    errors: list[str] = []
    stop = time.monotonic() + 4
    statement = select(Person.name).where(Person.id == 1).options(FromCache("memory"))

    def write() -> None:
        try:
            with Session() as session:
                session.execute(update(Person).where(Person.id == 2).values(name="person 2"))
                session.commit()
        except Exception as exc:
            errors.append(repr(exc))

    def read() -> None:
        # What every shared look-up on the engine asks first (lookup.decide()), asked as often as can be.
        with Session() as session:
            session.execute(statement).all()
        while time.monotonic() < stop and not errors:
            try:
                writes.pending_in_pool(engine)
            except Exception as exc:
                errors.append(repr(exc))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    readers = [threading.Thread(target=read) for _ in range(2)]
    try:
        for thread in readers:
            thread.start()
        while time.monotonic() < stop and not errors:
            writers = [threading.Thread(target=write) for _ in range(10)]
            for thread in writers:
                thread.start()
            for thread in writers:
                thread.join()
    finally:
        stop = 0
        for thread in readers:
            thread.join()
        sys.setswitchinterval(interval)
        engine.dispose()
    assert errors == []
