"""Attack s31: when SQLite's schema may be checked, and what the check must not lock.

Each test compares what a cached read returns with an uncached read on a
fresh Session (the truth), after another process (a raw ``sqlite3``
connection) changed the schema (a trigger, a cascading foreign key, a
view) between the statements of an open transaction; or checks that a
write meets no "database is locked" of the add-on's making.

The schema is checked (``PRAGMA database_list``, ``schema_version``) as
each transaction begins.  An attempt to check it only before a
transaction's first write (c4f3493, reverted) broke what the tests under
"Checked as a transaction begins" show:

- inside SQLite's transaction, opened by a savepoint (pysqlite's default
  mode) or a ``BEGIN`` the driver sends, ``PRAGMA schema_version`` takes
  a read lock before the first write, and SQLite then refuses to wait
  for another writer (it never calls the busy handler of a connection
  that holds a read lock): the write failed at once;
- the same read kept ``main`` locked for the whole transaction when it
  wrote only a database attached, or a temporary table made, through
  the DBAPI connection after its layout was learnt;
- and when that database is main's own file attached under another name,
  the transaction's own commit failed: its write was lost;
- a write declared with :meth:`SessionCache.invalidate_tables` (a cron
  job's) is closed over the triggers of the catalogs the process holds:
  with no check in read-only transactions, a trigger another process
  added was missed and its table's entries stayed stale.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, delete, event, insert, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import QueuePool

from pyramid_sessioncache import SessionCache, invalidate_tables

from .conftest import SECRET
from .conftest import rows as _rows
from .conftest import truth as _truth

_meta = MetaData()
_ITEM = Table("s31_item", _meta, Column("id", Integer, primary_key=True), Column("v", Integer))
_COUNTS = Table("s31_counts", _meta, Column("id", Integer, primary_key=True), Column("n", Integer))
# No foreign key here: the cascade another process adds is the database's alone.
_CHILD = Table("s31_child", _meta, Column("id", Integer, primary_key=True), Column("item_id", Integer))
_VIEW = Table("s31_view", _meta, Column("n", Integer))
_NOTE = Table("s31_note", _meta, Column("id", Integer, primary_key=True), schema="aux")
_TEMP_NOTE = Table("s31_tnote", _meta, Column("id", Integer, primary_key=True), schema="temp")
_ALIAS_ITEM = Table("s31_item", MetaData(), Column("id", Integer, primary_key=True), schema="alias")


class _Base(DeclarativeBase):
    pass


class _Item(_Base):
    __tablename__ = "s31_item"
    id: Mapped[int] = mapped_column(primary_key=True)
    v: Mapped[int | None]


#: A migration: every write to the items is counted.
_TRIGGERS = "".join(
    f"CREATE TRIGGER s31_{event_} AFTER {event_} ON s31_item BEGIN UPDATE s31_counts SET n = n + 1 WHERE id = 1; END;"
    for event_ in ("insert", "update", "delete")
)
#: A migration: the children of an item go with it.
_CASCADE = (
    "CREATE TABLE s31_new (id INTEGER PRIMARY KEY, item_id INTEGER REFERENCES s31_item (id) ON DELETE CASCADE);"
    "INSERT INTO s31_new SELECT id, item_id FROM s31_child; DROP TABLE s31_child;"
    "ALTER TABLE s31_new RENAME TO s31_child;"
)


def _database(tmp_path, journal: str = "delete") -> str:
    path = str(tmp_path / "main.sqlite")
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA journal_mode={journal}")
    db.executescript(
        "CREATE TABLE s31_item (id INTEGER PRIMARY KEY, v INTEGER);"
        "CREATE TABLE s31_counts (id INTEGER PRIMARY KEY, n INTEGER);"
        "CREATE TABLE s31_child (id INTEGER PRIMARY KEY, item_id INTEGER);"
        "INSERT INTO s31_item VALUES (1, 0), (2, 0), (3, 0);"
        "INSERT INTO s31_counts VALUES (1, 0);"
        "INSERT INTO s31_child VALUES (1, 1), (2, 1), (3, 2);"
    )
    db.commit()
    db.close()
    return path


def _other(path: str, sql: str, timeout: float = 5.0) -> None:
    """Run ``sql`` on ``path`` and commit, as another process would (a migration, a cron job)."""
    db = sqlite3.connect(path, timeout=timeout)
    db.executescript(sql)
    db.commit()
    db.close()


def _cache(tmp_path) -> SessionCache:
    return SessionCache(
        {
            "memory": {"type": "memory"},
            "file": {"type": "file", "data_dir": str(tmp_path / "c"), "lock_dir": str(tmp_path / "l")},
            "local": {"type": "ext:local_session"},
        },
        secret=SECRET,
    )


def _raw_begin(engine, sent: str) -> None:
    """SQLAlchemy's recipe for pysqlite: the driver begins nothing; BEGIN goes as SQLAlchemy's transaction begins."""

    @event.listens_for(engine, "connect")
    def connect(dbapi_connection, record):
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def begin(conn):
        if sent.startswith("raw "):
            conn.connection.dbapi_connection.execute(sent[4:])
        else:
            conn.exec_driver_sql(sent)


class _Writer:
    """Another process in the middle of a write (it holds SQLite's write lock), which commits ``delay`` seconds later."""

    def __init__(self, path: str, delay: float = 0.4) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("INSERT INTO s31_counts VALUES (100, 0)")
        self.timer = threading.Timer(delay, self.db.execute, ("COMMIT",))

    def __enter__(self) -> _Writer:
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.join()
        self.db.close()


_COUNTS_ROWS = select(_COUNTS.c.id, _COUNTS.c.n).order_by(_COUNTS.c.id)


def _write(session, kind: str) -> None:
    if kind == "orm flush":
        session.add(_Item(id=10, v=0))
        session.flush()
    elif kind == "core executemany":
        session.execute(insert(_ITEM), [{"id": 10, "v": 0}, {"id": 11, "v": 0}])
    elif kind == "bulk update":
        session.execute(
            update(_Item).where(_Item.id == 1).values(v=5), execution_options={"synchronize_session": "fetch"}
        )
    elif kind == "bulk delete":
        session.execute(delete(_Item).where(_Item.id == 3), execution_options={"synchronize_session": "evaluate"})
    else:
        session.connection().exec_driver_sql("INSERT INTO s31_item (id, v) VALUES (10, 0)")


@contextlib.contextmanager
def _world(tmp_path, journal: str = "delete", begin: str | None = None, **options):
    """``(path, engine, Sess, cache)`` over the test's database: ``Sess`` caches in every region; disposed at the end.

    ``begin``: how SQLAlchemy's transaction begins SQLite's (see :func:`_raw_begin`), by default as pysqlite does.
    """
    path = _database(tmp_path, journal)
    engine = create_engine(f"sqlite:///{path}", **options)
    if begin is not None:
        _raw_begin(engine, begin)
    cache = _cache(tmp_path)
    try:
        yield path, engine, sessionmaker(engine, info=cache.session_info()), cache
    finally:
        engine.dispose()


def _learn_layout(Sess) -> None:
    """A first transaction on the connection: the add-on learns its databases."""
    with Sess() as session:
        session.execute(select(_ITEM)).all()


def _served_fresh(engine, Sess, stmt, before=None, region: str = "memory") -> list[tuple]:
    """Return the truth of ``stmt`` (changed from ``before``, if given), having checked that ``region`` serves it."""
    truth = _truth(engine, stmt)
    assert before is None or truth != before
    with Sess() as session:
        assert _rows(session, stmt, region) == truth
    return truth


# Checked as a transaction begins ------------------------------------------------------------


@pytest.mark.parametrize(
    ("journal", "begin"),
    [
        ("delete", None),
        ("wal", None),
        ("delete", "BEGIN"),
        ("delete", "BEGIN IMMEDIATE"),
        ("delete", "raw BEGIN IMMEDIATE"),
    ],
)
def test_a_savepoints_first_write_waits_for_another_writer(tmp_path, journal, begin):
    # pysqlite's default mode (no BEGIN of its own): SAVEPOINT opens SQLite's
    # transaction, before the first write.  With BEGIN sent, that opened it.
    with _world(tmp_path, journal, begin, connect_args={"timeout": 5}) as (path, engine, Sess, _):
        _learn_layout(Sess)
        with _Writer(path), Sess() as session:
            with session.begin_nested():
                _write(session, "orm flush")
            session.commit()
        assert _truth(engine, select(_ITEM.c.id).where(_ITEM.c.id == 10)) == [(10,)]


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_a_first_write_after_a_driver_begin_waits_for_another_writer(tmp_path, journal):
    with _world(tmp_path, journal, "raw BEGIN", connect_args={"timeout": 5}) as (path, engine, Sess, _):
        _learn_layout(Sess)
        with _Writer(path), Sess() as session:
            _write(session, "core executemany")
            session.commit()
        assert _truth(engine, select(_ITEM.c.id).where(_ITEM.c.id >= 10)) == [(10,), (11,)]


def _one_connection(tmp_path, opened_by: str):
    """A world of one pooled connection, failing at once on a lock; BEGIN as ``opened_by`` says."""
    begin = "raw BEGIN" if opened_by == "raw BEGIN" else None
    return _world(tmp_path, begin=begin, connect_args={"timeout": 0.2}, poolclass=QueuePool, pool_size=1)


@contextlib.contextmanager
def _opened_by(session, opened_by: str):
    """A block of writes in the SQLite transaction a savepoint (released after it) or the driver's BEGIN opened."""
    nested = session.begin_nested() if opened_by == "savepoint" else None
    yield
    if nested is not None:
        nested.commit()  # pysqlite's default mode: SAVEPOINT opened SQLite's transaction, RELEASE commits it


@pytest.mark.parametrize("where", ["attached", "temp"])
@pytest.mark.parametrize("opened_by", ["savepoint", "raw BEGIN"])
def test_a_write_beside_main_leaves_main_unlocked_when_the_database_came_later(tmp_path, where, opened_by):
    aux = str(tmp_path / "aux.sqlite")
    _other(aux, "CREATE TABLE s31_note (id INTEGER PRIMARY KEY)")
    with _one_connection(tmp_path, opened_by) as (path, engine, Sess, _):
        _learn_layout(Sess)  # main alone
        with engine.connect() as conn:  # later in the connection's life, behind SQLAlchemy's back
            if where == "attached":
                conn.connection.dbapi_connection.execute(f"ATTACH DATABASE '{aux}' AS aux")
            else:
                conn.connection.dbapi_connection.execute("CREATE TEMP TABLE s31_tnote (id INTEGER PRIMARY KEY)")
        note = _NOTE if where == "attached" else _TEMP_NOTE
        with Sess() as session:
            with _opened_by(session, opened_by):
                session.execute(insert(note).values(id=1))
                _other(path, "INSERT INTO s31_item (id, v) VALUES (7, 0)", timeout=0.2)  # raises if main is locked
            session.commit()
        assert _truth(engine, select(_ITEM.c.id).where(_ITEM.c.id == 7)) == [(7,)]


@pytest.mark.parametrize("opened_by", ["savepoint", "raw BEGIN"])
def test_a_write_through_mains_file_attached_later_commits(tmp_path, opened_by):
    with _one_connection(tmp_path, opened_by) as (path, engine, Sess, _):
        _learn_layout(Sess)  # main alone
        with engine.connect() as conn:
            conn.connection.dbapi_connection.execute(f"ATTACH DATABASE '{path}' AS alias")
        with Sess() as session:
            with _opened_by(session, opened_by):
                session.execute(insert(_ALIAS_ITEM).values(id=8))
            session.commit()
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT id FROM s31_item WHERE id = 8").fetchall() == [(8,)]
    finally:
        db.close()


@pytest.mark.parametrize("declared_by", ["SessionCache.invalidate_tables", "invalidate_tables(session)"])
def test_a_declared_write_reaches_the_table_of_a_trigger_another_process_added(tmp_path, declared_by):
    with _world(tmp_path) as (path, engine, Sess, cache):
        with Sess() as session:
            assert _rows(session, _COUNTS_ROWS, "memory") == [(1, 0)]
        _other(path, _TRIGGERS)  # a migration
        with Sess() as session:  # a request that only reads, uncached
            session.execute(select(_ITEM)).all()
        _other(path, "INSERT INTO s31_item (id, v) VALUES (9, 0)")  # a cron job, which the application declares
        if declared_by == "SessionCache.invalidate_tables":
            cache.invalidate_tables("s31_item")
        else:
            with Sess() as session:
                invalidate_tables(session, _ITEM)
                session.commit()
        assert _served_fresh(engine, Sess, _COUNTS_ROWS) == [(1, 1)]


# Invalidation after a migration of another process -------------------------------------------


@pytest.mark.parametrize("kind", ["orm flush", "core executemany", "bulk update", "bulk delete", "driver sql"])
@pytest.mark.parametrize("region", ["memory", "file"])
def test_a_trigger_added_between_a_read_and_the_first_write_invalidates(tmp_path, kind, region):
    with _world(tmp_path) as (path, engine, Sess, _):
        with Sess() as session:
            before = _rows(session, _COUNTS_ROWS, region)
        with Sess() as session:
            _rows(session, select(_ITEM), region)  # a miss: the schema is checked
            local = _rows(session, _COUNTS_ROWS, "local")
            _other(path, _TRIGGERS)  # a migration, while the Session's transaction is open
            _write(session, kind)
            # The Session's own view of the counts, cached locally or not.
            assert _rows(session, _COUNTS_ROWS, "local") == _rows(session, _COUNTS_ROWS) != local
            session.commit()
        _served_fresh(engine, Sess, _COUNTS_ROWS, before, region)


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_a_trigger_added_after_begin_sent_as_sql_invalidates_once_committed(tmp_path, journal):
    # Checked before BEGIN; the trigger comes before the first write, which
    # is not checked again: the check after the commit finds it.
    with _world(tmp_path, journal, "BEGIN") as (path, engine, Sess, _):
        with Sess() as session:
            before = _rows(session, _COUNTS_ROWS, "memory")
        with Sess() as session:
            session.connection()  # BEGIN is sent
            _other(path, _TRIGGERS)
            _write(session, "orm flush")
            session.commit()
        _served_fresh(engine, Sess, _COUNTS_ROWS, before)


def test_a_first_write_in_the_drivers_own_transaction_waits_for_another_writer(tmp_path):
    with _world(tmp_path, connect_args={"timeout": 5}) as (path, engine, Sess, _):
        with Sess() as session:
            _rows(session, select(_ITEM), "memory")
        with _Writer(path), Sess() as session:
            _rows(session, _COUNTS_ROWS, "memory")
            _write(session, "orm flush")
            session.commit()
        assert _truth(engine, select(_ITEM.c.id).where(_ITEM.c.id == 10)) == [(10,)]


def test_a_cascade_another_process_adds_invalidates_the_children(tmp_path):
    children = select(_CHILD.c.id).order_by(_CHILD.c.id)
    with _world(tmp_path) as (path, engine, Sess, _):
        event.listen(engine, "connect", lambda dbapi, record: dbapi.execute("PRAGMA foreign_keys = ON"))
        with Sess() as session:
            before = _rows(session, children, "memory")
        with Sess() as session:
            _rows(session, select(_ITEM), "memory")
            _other(path, _CASCADE)
            session.execute(delete(_ITEM).where(_ITEM.c.id == 1))
            session.commit()
        assert _served_fresh(engine, Sess, children, before) == [(3,)]


def test_a_view_and_trigger_another_process_adds_mid_transaction_invalidate_the_view(tmp_path):
    view = select(_VIEW.c.n)
    with _world(tmp_path) as (path, engine, Sess, _):
        with Sess() as session:
            session.execute(select(_ITEM)).all()
            _other(path, _TRIGGERS + "CREATE VIEW s31_view AS SELECT n FROM s31_counts;")
            before = _rows(session, view, "memory")
        with Sess() as session:
            _rows(session, view, "memory")
            _write(session, "bulk update")
            session.commit()
        _served_fresh(engine, Sess, view, before)


def test_a_trigger_added_before_a_savepoint_is_known_after_its_rollback(tmp_path):
    with _world(tmp_path) as (path, engine, Sess, _):
        with Sess() as session:
            before = _rows(session, _COUNTS_ROWS, "memory")
        with Sess() as session:
            _rows(session, select(_ITEM), "memory")  # checked, before SQLite's transaction opens
            _other(path, _TRIGGERS)
            nested = session.begin_nested()  # SAVEPOINT opens it
            session.execute(insert(_ITEM).values(id=20, v=0))
            nested.rollback()
            session.execute(insert(_ITEM).values(id=21, v=0))
            session.commit()
        assert _served_fresh(engine, Sess, _COUNTS_ROWS, before) == [(1, 1)]


def test_a_trigger_added_after_a_commit_sent_as_sql_is_known_at_the_next_write(tmp_path):
    with _world(tmp_path) as (path, engine, Sess, _):
        with Sess() as session:
            before = _rows(session, _COUNTS_ROWS, "memory")
        with Sess() as session:
            session.execute(insert(_ITEM).values(id=30, v=0))
            session.connection().exec_driver_sql("COMMIT")
            _other(path, _TRIGGERS)
            session.execute(insert(_ITEM).values(id=31, v=0))
            session.commit()
        assert _served_fresh(engine, Sess, _COUNTS_ROWS, before) == [(1, 1)]


def test_a_temporary_trigger_made_on_the_dbapi_connection_later_invalidates(tmp_path):
    with _world(tmp_path, poolclass=QueuePool, pool_size=1) as (path, engine, Sess, _):
        with Sess() as session:
            before = _rows(session, _COUNTS_ROWS, "memory")
        with engine.connect() as conn:  # behind SQLAlchemy's back, after the layout was learnt
            conn.connection.dbapi_connection.execute(
                "CREATE TEMP TRIGGER s31_temp AFTER INSERT ON s31_item BEGIN UPDATE s31_counts SET n = n + 1; END"
            )
        with Sess() as session:
            session.execute(insert(_ITEM).values(id=40, v=0))
            session.commit()
        with Session(engine) as session:  # the same connection: its trigger fired
            truth = _rows(session, _COUNTS_ROWS)
        assert truth == [(1, 1)] != before
        with Sess() as session:
            assert _rows(session, _COUNTS_ROWS, "memory") == truth


def test_a_declared_write_in_a_transaction_that_read_reaches_a_trigger_another_process_added(tmp_path):
    # Declared on a connection in transaction: closed over the schema as it
    # is after the commit.
    with _world(tmp_path) as (path, engine, Sess, _):
        with Sess() as session:
            assert _rows(session, _COUNTS_ROWS, "memory") == [(1, 0)]
        _other(path, _TRIGGERS)
        with Sess() as session:
            session.execute(select(_ITEM)).all()
            _other(path, "INSERT INTO s31_item (id, v) VALUES (9, 0)")
            invalidate_tables(session, _ITEM)
            session.commit()
        assert _served_fresh(engine, Sess, _COUNTS_ROWS) == [(1, 1)]
