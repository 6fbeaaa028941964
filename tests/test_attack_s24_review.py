"""Attack s24 (review): SQLite's triggers, foreign keys and schema_version, read from its schema.

Each test compares what a cached read returns with what the database
says, after a write whose effects only the database's schema tells: a
temporary trigger, a trigger or a foreign key of an attached database.
Hits are proven by counting the statements SQLite itself runs.
"""

from __future__ import annotations

import sqlite3

from sqlalchemy import Column, Integer, MetaData, Table, create_engine, event, insert, select
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from pyramid_sessioncache import SessionCache

from .conftest import SECRET
from .conftest import rows as _rows

_meta = MetaData()
_ITEM = Table("r24_item", _meta, Column("id", Integer, primary_key=True))
_COUNT = Table("r24_count", _meta, Column("id", Integer, primary_key=True), Column("n", Integer))
_COUNTS = select(_COUNT.c.n).order_by(_COUNT.c.id)


def _cache():
    return SessionCache({"memory": {"type": "memory"}}, secret=SECRET)


def _make(path, schema=""):
    _run(
        path,
        f"CREATE TABLE {schema}r24_item (id INTEGER PRIMARY KEY);"
        f"CREATE TABLE {schema}r24_count (id INTEGER PRIMARY KEY, n INTEGER);"
        f"INSERT INTO {schema}r24_count VALUES (1, 0);",
    )


TRIGGER = (
    "CREATE {temp} TRIGGER r24_counted AFTER INSERT ON r24_item BEGIN UPDATE r24_count SET n = n + 1 WHERE id = 1; END"
)


def _stale_after_insert(engine, region="memory"):
    """What a cached read of the counts returns after an insert a trigger counts, and the truth."""
    cache = _cache()
    Sess = sessionmaker(engine, info=cache.session_info())
    with Sess() as session:
        before = _rows(session, _COUNTS, region)
    with Sess() as session:
        session.execute(insert(_ITEM).values(id=1))
        session.commit()
    with Session(engine) as session:
        truth = _rows(session, _COUNTS)
    assert truth != before
    with Sess() as session:
        return _rows(session, _COUNTS, region), truth


def _run(path, sql: str) -> None:
    """Run ``sql`` (one or more statements) on the SQLite file ``path`` and commit, as another program would."""
    db = sqlite3.connect(path)
    db.executescript(sql)
    db.commit()
    db.close()


def _attaching(main, aux):
    """An engine on ``main`` whose every connection attaches ``aux`` as ``aux``."""
    engine = create_engine(f"sqlite:///{main}")
    event.listen(engine, "connect", lambda dbapi, record: dbapi.execute(f"ATTACH DATABASE '{aux}' AS aux"))
    return engine


def test_a_temporary_trigger_invalidates_what_it_writes(tmp_path):
    # A temporary trigger lives in sqlite_temp_master, not sqlite_master:
    # the catalog read only the latter, and the count stayed stale.
    path = tmp_path / "t.sqlite"
    _make(path)
    engine = create_engine(f"sqlite:///{path}", poolclass=StaticPool)
    with engine.begin() as conn:
        conn.exec_driver_sql(TRIGGER.format(temp="TEMP"))
    cached, truth = _stale_after_insert(engine)
    assert cached == truth
    engine.dispose()


def test_a_trigger_of_an_attached_database_invalidates_what_it_writes(tmp_path):
    main, aux = tmp_path / "main.sqlite", tmp_path / "aux.sqlite"
    sqlite3.connect(main).close()
    _make(aux)
    _run(aux, TRIGGER.format(temp=""))
    engine = _attaching(main, aux)
    cached, truth = _stale_after_insert(engine)
    assert cached == truth
    engine.dispose()


def _traced(engine):
    sent: list[str] = []
    event.listen(engine, "connect", lambda dbapi, record: dbapi.set_trace_callback(sent.append))
    return sent


def test_a_hit_sends_nothing_to_sqlite(tmp_path):
    # Counted by SQLite itself: PRAGMA schema_version goes by the DBAPI cursor, unseen by SQLAlchemy's events.
    path = tmp_path / "t.sqlite"
    _make(path)
    engine = create_engine(f"sqlite:///{path}")
    sent = _traced(engine)
    cache = _cache()
    Sess = sessionmaker(engine, info=cache.session_info())
    with Sess() as session:
        first = _rows(session, _COUNTS, "memory")
    sent.clear()
    with Sess() as session:
        assert _rows(session, _COUNTS, "memory") == first
    assert sent == []
    engine.dispose()


def test_a_trigger_another_process_adds_to_an_attached_database_invalidates(tmp_path):
    # schema_version was checked for main only: a trigger another process
    # (a migration) created in an attached database was never read.
    main, aux = tmp_path / "main.sqlite", tmp_path / "aux.sqlite"
    sqlite3.connect(main).close()
    _make(aux)
    engine = create_engine(f"sqlite:///{aux.parent / 'main.sqlite'}")
    event.listen(engine, "connect", lambda dbapi, record: dbapi.execute(f"ATTACH DATABASE '{aux}' AS aux"))
    cache = _cache()
    Sess = sessionmaker(engine, info=cache.session_info())
    with Sess() as session:  # a write: the schema is read, without the trigger
        session.execute(insert(_ITEM).values(id=100))
        session.commit()
    _run(aux, TRIGGER.format(temp=""))  # another process
    cached, truth = _stale_after_insert(engine)
    assert cached == truth
    engine.dispose()


def test_a_trigger_chain_and_an_attached_cascade_invalidate_transitively(tmp_path):
    main, aux = tmp_path / "main.sqlite", tmp_path / "aux.sqlite"
    sqlite3.connect(main).close()
    _run(
        aux,
        "CREATE TABLE r24_item (id INTEGER PRIMARY KEY);"
        "CREATE TABLE r24_mid (id INTEGER PRIMARY KEY, n INTEGER);"
        "CREATE TABLE r24_count (id INTEGER PRIMARY KEY, n INTEGER);"
        "INSERT INTO r24_mid VALUES (1, 0); INSERT INTO r24_count VALUES (1, 0);"
        "CREATE TRIGGER r24_a AFTER INSERT ON r24_item BEGIN UPDATE r24_mid SET n = n + 1; END;"
        'CREATE TRIGGER "R24 b" AFTER UPDATE ON "R24_MID" BEGIN UPDATE r24_count SET n = n + 1; END;',
    )
    engine = _attaching(main, aux)
    cached, truth = _stale_after_insert(engine)
    assert cached == truth
    engine.dispose()


def test_a_trigger_another_process_adds_while_a_transaction_is_open_invalidates(tmp_path):
    # A trigger made after the writing transaction began, which its write
    # fires: the next transaction to begin finds the schema changed.
    path = tmp_path / "t.sqlite"
    _make(path)
    engine = create_engine(f"sqlite:///{path}")
    cache = _cache()
    Sess = sessionmaker(engine, info=cache.session_info())
    with Sess() as session:
        before = _rows(session, _COUNTS, "memory")
    with Sess() as session:
        session.execute(select(_ITEM)).all()  # its transaction began: the schema is read
        _run(path, TRIGGER.format(temp=""))  # another process: a migration
        session.execute(insert(_ITEM).values(id=1))
        session.commit()
    with Session(engine) as session:
        truth = _rows(session, _COUNTS)
    assert truth != before
    with Sess() as session:
        assert _rows(session, _COUNTS, "memory") == truth
    engine.dispose()


_VIEW = Table("r24_view", MetaData(), Column("n", Integer))


def test_a_view_another_process_creates_while_a_transaction_is_open_makes_its_reader_depend_on_every_table(tmp_path):
    # A view read in a transaction that began before another process made
    # it was not known to be a view: its entry depended on the view's name
    # alone, which no write bumps.
    path = tmp_path / "t.sqlite"
    _make(path)
    engine = create_engine(f"sqlite:///{path}")
    cache = _cache()
    Sess = sessionmaker(engine, info=cache.session_info())
    stmt = select(_VIEW.c.n)
    with Sess() as session:
        session.execute(select(_ITEM)).all()  # its transaction began: the schema is read
        _run(path, "CREATE VIEW r24_view AS SELECT n FROM r24_count")  # another process: a migration
        before = _rows(session, stmt, "memory")
    with Sess() as session:
        session.execute(_COUNT.update().values(n=5))
        session.commit()
    with Session(engine) as session:
        truth = _rows(session, stmt)
    assert truth != before
    with Sess() as session:
        assert _rows(session, stmt, "memory") == truth
    engine.dispose()
