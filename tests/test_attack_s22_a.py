"""Attack s22 (A): transactions and the request's lifecycle, cached and uncached side by side.

Each test runs a query cached and as a plain Session would, around a
transaction that ends in a way the add-on might not see as it is: a commit
sent as compiled DDL, a savepoint rolled back by SQL text or by the code
owning a Session's Connection, a commit made on the driver's connection, a
Session joined to an outer transaction, a two-phase commit, a snapshot
begun after a COMMIT sent as SQL, a request pyramid_retry runs again; and
two threads committing at once (a new engine; a hung shared backend).
PostgreSQL cases use ``test_writes_postgresql``'s schema (``pg_parent``...).
"""

from __future__ import annotations

import contextlib
import socket
import threading

import pytest
import transaction
from sqlalchemy import DDL, create_engine, event, select, text, update
from sqlalchemy.orm import Session, sessionmaker
from webtest import TestApp

from pyramid_sessioncache import SessionCache, _sqlalchemy, cached_query, invalidate_tables
from pyramid_sessioncache.storage.region import CacheRegions

from . import test_attack_request as attack_request
from . import test_attack_s20_postgresql, test_writes_postgresql
from .conftest import SECRET
from .models import Person
from .test_writes_postgresql import PgChild, PgParent, cached, uncached

pg = test_writes_postgresql.pg
PgSession = test_writes_postgresql.PgSession
PARENTS = select(PgParent.id, PgParent.name).order_by(PgParent.id)


# 1. A commit sent as compiled DDL ---------------------------------------------------------------


@pytest.mark.parametrize("sql", ["COMMIT AND CHAIN", "COMMIT; BEGIN"])
def test_a_commit_sent_as_ddl_that_begins_again_is_published(pg, PgSession, region, sql):
    # DDL() is compiled, not SQL text, but its SQL is whatever the application wrote.
    cached(PgSession, region, PARENTS)
    with pg.connect() as conn:
        conn.execute(update(PgParent.__table__).where(PgParent.id == 1).values(name="chained"))
        conn.execute(DDL(sql))  # committed; a new transaction is open
        conn.rollback()  # which writes nothing
    assert uncached(pg, PARENTS)[0] == (1, "chained")
    assert cached(PgSession, region, PARENTS) == uncached(pg, PARENTS)


# 2. A savepoint rolled back by SQL text ----------------------------------------------------------


@pytest.mark.parametrize("engine_fixture, table", [("engine", Person.__table__), ("pg", PgParent.__table__)])
def test_a_savepoint_rolled_back_by_sql_text_voids_local_entries(request, region_options, engine_fixture, table):
    # "SAVEPOINT a; ...; ROLLBACK TO a" as SQL: the database undid the
    # write, SQLAlchemy saw no savepoint end.  What the Session read in
    # between is no longer what the same query reads.
    engine = request.getfixturevalue(engine_fixture)
    stmt = select(table.c.name).where(table.c.id == 1)
    cache = SessionCache(region_options, default_region="local", secret=SECRET)
    with sessionmaker(engine, info=cache.session_info())() as session:
        before = session.execute(stmt).scalar_one()
        session.execute(text("SAVEPOINT a"))
        session.execute(update(table).where(table.c.id == 1).values(name="undone"))
        assert cached_query(session, stmt, "local").scalar_one() == "undone"
        session.execute(text("ROLLBACK TO SAVEPOINT a"))
        assert session.execute(stmt).scalar_one() == before
        assert cached_query(session, stmt, "local").scalar_one() == before


# 3. A Session's two-phase commit -----------------------------------------------------------------

pg2pc = test_attack_s20_postgresql.pg2pc


@pytest.mark.parametrize("reader", ["before PREPARE", "between PREPARE and COMMIT PREPARED"])
def test_a_two_phase_session_commit_is_published(pg2pc, region_options, reader):
    # Published before PREPARE, and again once COMMIT PREPARED has made it visible.
    region = "memory"
    cache = SessionCache(region_options, default_region=region, secret=SECRET)
    Sess = sessionmaker(bind=pg2pc, info=cache.session_info())
    writer = create_engine(pg2pc.url)
    read = []

    def another_request_reads(conn, *args):
        read.append(cached(Sess, region, PARENTS))

    event.listen(writer, "prepare_twophase" if reader == "before PREPARE" else "commit_twophase", another_request_reads)
    try:
        cached(Sess, region, PARENTS)
        with sessionmaker(bind=writer, twophase=True, info=cache.session_info())() as session:
            session.execute(update(PgParent).where(PgParent.id == 1).values(name="two-phase"))
            session.commit()
        assert read == [[(1, "one"), (2, "two"), (3, "three")]]
        assert uncached(pg2pc, PARENTS)[0] == (1, "two-phase")
        assert cached(Sess, region, PARENTS) == uncached(pg2pc, PARENTS)
    finally:
        writer.dispose()


# 4. A savepoint of a Connection a Session is bound to ---------------------------------------------


@pytest.mark.parametrize("end", ["savepoint rolled back", "outer transaction rolled back"])
def test_a_rollback_on_a_sessions_connection_voids_its_local_entries(request, region_options, end):
    # The Session is bound to a Connection (a test's outer transaction);
    # the code that owns the Connection writes in a savepoint and rolls it
    # back: what the Session read over that write is gone from the database.
    engine = request.getfixturevalue("pg")
    stmt = select(PgParent.name).where(PgParent.id == 1)
    cache = SessionCache(region_options, default_region="local", secret=SECRET)
    with engine.connect() as conn:
        outer = conn.begin()
        session = Session(bind=conn, info=cache.session_info())
        before = cached_query(session, stmt, "local").scalar_one()
        savepoint = conn.begin_nested()
        conn.execute(update(PgParent.__table__).where(PgParent.id == 1).values(name="undone"))
        assert cached_query(session, stmt, "local").scalar_one() == "undone"
        (savepoint if end == "savepoint rolled back" else outer).rollback()
        assert session.execute(stmt).scalar_one() == before
        assert cached_query(session, stmt, "local").scalar_one() == before
        session.close()


# 5. What a Session declared, when its commit is not the database's ----------------------------------


@pytest.mark.parametrize("end", ["commit", "close"])
@pytest.mark.parametrize("reads", [False, True], ids=["declared alone", "after a query"])
def test_tables_declared_in_a_session_joined_to_an_outer_transaction_are_published_when_it_commits(
    pg, region_options, reads, end
):
    # A Session bound to a Connection in a transaction (a script's
    # ``engine.begin()``) commits nothing itself: what it declared written
    # (SQL on the driver's cursor, such as psycopg's COPY) is committed with
    # the outer transaction, and a reader in between stored the rows before it.
    region = "memory"
    cache = SessionCache(region_options, default_region=region, secret=SECRET)
    Readers = sessionmaker(bind=pg, info=cache.session_info())
    cached(Readers, region, PARENTS)
    with pg.connect() as conn:
        outer = conn.begin()
        session = Session(bind=conn, info=cache.session_info())
        if reads:
            session.execute(select(PgParent.id)).all()
        conn.connection.driver_connection.execute("UPDATE pg_parent SET name = 'declared' WHERE id = 1")
        invalidate_tables(session, "pg_parent")
        getattr(session, end)()  # joined to the outer transaction: nothing committed, nor rolled back, yet
        assert cached(Readers, region, PARENTS) == uncached(pg, PARENTS) == [(1, "one"), (2, "two"), (3, "three")]
        outer.commit()
    assert uncached(pg, PARENTS)[0] == (1, "declared")
    assert cached(Readers, region, PARENTS) == uncached(pg, PARENTS)


# 6. A commit on the driver's connection, then SQLAlchemy's rollback ---------------------------------


@pytest.mark.parametrize("engine_fixture, table", [("engine", Person.__table__), ("pg", PgParent.__table__)])
def test_writes_committed_on_the_driver_are_published_at_the_rollback_that_follows(
    request, region_options, engine_fixture, table
):
    # The write went through SQLAlchemy (seen, marked); the commit through
    # the DBAPI connection: SQLAlchemy's rollback then undoes nothing.
    engine = request.getfixturevalue(engine_fixture)
    stmt = select(table.c.id, table.c.name).where(table.c.id <= 3).order_by(table.c.id)
    cache = SessionCache(region_options, default_region="memory", secret=SECRET)
    Sess = sessionmaker(bind=engine, info=cache.session_info())
    cached(Sess, "memory", stmt)
    with Sess() as session:
        session.execute(update(table).where(table.c.id == 1).values(name="committed by the driver"))
        session.connection().connection.driver_connection.commit()
        session.rollback()
    assert uncached(engine, stmt)[0] == (1, "committed by the driver")
    assert cached(Sess, "memory", stmt) == uncached(engine, stmt)


# 7. A snapshot taken in a transaction begun after a COMMIT sent as SQL ---------------------------------


def test_a_snapshot_begun_after_a_commit_sent_as_sql_stores_nothing(pg, region_options):
    # The add-on asks the isolation level once per transaction; a COMMIT
    # sent as SQL begins another, which may read an older snapshot: what
    # it loads, stored under the versions of now, would be served to the
    # next transaction run at that level, which would see the newer rows.
    region = "memory"
    cache = SessionCache(region_options, default_region=region, secret=SECRET)
    Sess = sessionmaker(bind=create_engine(pg.url, pool_size=1, max_overflow=0), info=cache.session_info())
    children = select(PgChild.id, PgChild.name).order_by(PgChild.id)
    repeatable = text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    cached(Sess, region, children)  # its shape's tables known
    try:
        with Sess() as session:
            session.execute(select(PgParent.id)).all()
            cached_query(session, PARENTS, region).all()  # a miss in a begun READ COMMITTED transaction
            session.execute(text("COMMIT"))
            session.execute(repeatable)
            session.execute(select(PgParent.id)).all()  # the snapshot
            with pg.begin() as other:
                other.execute(update(PgChild.__table__).where(PgChild.id == 1).values(name="after the snapshot"))
            assert cached_query(session, children, region).all()[0] == (1, "a")  # as of its snapshot
        with Sess() as session:  # a transaction at the same level, its snapshot taken after the write
            session.execute(repeatable)
            assert cached_query(session, children, region).all() == session.execute(children).all()
    finally:
        Sess.kw["bind"].dispose()


# 8. Two threads' first commits on a new engine --------------------------------------------------------


class _BothLookUp:
    """A dialect's ``do_commit``, looked up by two threads at once: each waits (a little) for the other."""

    def __init__(self, original):
        self.original = original
        self.barrier = threading.Barrier(2)

    def __get__(self, dialect, owner=None):
        if dialect is not None:
            with contextlib.suppress(threading.BrokenBarrierError):
                self.barrier.wait(timeout=0.5)
        return self.original.__get__(dialect, owner)


def test_two_threads_first_commits_on_a_new_engine_both_publish_again_after_it(tmp_path):
    # The second publication of a commit runs from the dialect's do_commit,
    # wrapped once per engine by the first commit that writes: two threads
    # doing that at once each wrapped it, and one's wrapper was dropped,
    # with the publication of its commit (and, set in the other order, of
    # every later commit of the engine).
    engine = create_engine(f"sqlite:///{tmp_path / 'race.sqlite'}")
    dialect_class = type("RacingDialect", (type(engine.dialect),), {})
    dialect_class.do_commit = _BothLookUp(type(engine.dialect).do_commit)
    engine.dialect.__class__ = dialect_class
    ran = []
    connections = [engine.connect(), engine.connect()]
    for conn in connections:
        conn.begin()
    try:
        threads = [
            threading.Thread(target=_sqlalchemy.after_dbapi_commit, args=(conn, lambda n=n: ran.append(n)))
            for n, conn in enumerate(connections)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
        for conn in connections:
            conn.commit()
        assert sorted(ran) == [0, 1]
    finally:
        for conn in connections:
            conn.close()
        engine.dispose()


# 9. Two commits' bumps while the shared backend hangs ---------------------------------------------------


def test_two_threads_bumps_to_a_hung_backend_are_both_kept(region_options):
    # Redis hangs (it accepts connections, answers nothing): two requests
    # commit at once, and each commit's bump fails after the timeout.  Each
    # kept its own names, over the other's: one commit's tables were never
    # bumped once Redis answered, and other processes kept serving what it changed.
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        port = hung.getsockname()[1]
        url = f"redis://127.0.0.1:{port}/0?socket_timeout=0.3&socket_connect_timeout=0.3"
        region = CacheRegions({"r": {"type": "ext:redis", "url": url}}, 60, SECRET.encode())["r"]
        start = threading.Barrier(2)

        def commit(table):
            start.wait(timeout=5)
            region.bump([table])

        threads = [threading.Thread(target=commit, args=(table,)) for table in ("person", "address")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
        assert region.unpublished == {"person", "address"}


# 10. A request pyramid_retry runs again ------------------------------------------------------------------


@pytest.mark.parametrize("region", ["local_session", "short_term"])
def test_a_retried_request_sees_neither_the_first_attempts_entries_nor_its_writes(db_url, region):
    app = attack_request.make_app(db_url, "addon", **{"retry.attempts": "3"})
    stmt = select(Person.name).where(Person.id == 3)
    seen = []

    def view(request, name):
        seen.append(request.cached_query(stmt, region=region).scalar_one())
        if len(seen) == 1:
            request.dbsession.execute(update(Person).where(Person.id == 3).values(name="never committed"))
            seen.append(request.cached_query(stmt, region=region).scalar_one())
            raise transaction.interfaces.TransientError("try again")

    attack_request.scenario(view)
    try:
        TestApp(app).get("/run/x")
    finally:
        attack_request.SCENARIO.clear()
        app.engine.dispose()
    assert seen == ["person 3", "never committed", "person 3"]


# 11. A Session bound to a Connection whose own code commits -------------------------------------------------


@pytest.mark.parametrize("engine_fixture, table", [("engine", Person.__table__), ("pg", PgParent.__table__)])
def test_a_session_bound_to_a_connection_committed_by_its_code_drops_its_local_entries_when_it_writes(
    request, region_options, engine_fixture, table
):
    # The code owning the Connection commits (a data migration committing
    # as it goes); the Session bound to it carries on in the Connection's
    # next transaction, and its own Core UPDATE left its local entry as it was.
    engine = request.getfixturevalue(engine_fixture)
    stmt = select(table.c.name).where(table.c.id == 1)
    cache = SessionCache(region_options, default_region="local", secret=SECRET)
    with engine.connect() as conn:
        session = Session(bind=conn, info=cache.session_info())
        before = cached_query(session, stmt, "local").scalar_one()
        conn.commit()
        session.execute(update(table).where(table.c.id == 1).values(name="written"))
        assert session.execute(stmt).scalar_one() == "written"
        assert cached_query(session, stmt, "local").scalar_one() == "written" != before
        session.close()
