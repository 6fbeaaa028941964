"""Attack s26 (third): today's changes attacked again.

Each test compares what a cached read returns with what an uncached read
of the same query returns, after a committed write.  Hits are proven by
counting statements.
"""

from __future__ import annotations

import contextlib
import sqlite3
import uuid

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, select, text, update
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool

from pyramid_sessioncache import FromCache, invalidate
from pyramid_sessioncache.storage import versions as storage_versions

from .conftest import SQLCounter
from .test_attack_s25_review import (  # the helpers of s25's review, and its autouse fixture
    _cache,
    _logged_fresh_after,
    _no_schema_known,  # noqa: F401
    _rows,
    _truth,
)
from .test_attack_s25_second import _COUNT as _MANUAL_COUNT
from .test_attack_s25_second import _COUNTS as _MANUAL_COUNTS
from .test_attack_s25_second import _each_served_its_own
from .test_attack_s26_manual_key import _database, _manual, _race, _served_then_hit
from .test_attack_s26_review import _CHECKED, _LOGGED, _WRITER, _add_item

_COUNT = Table("s26t_count", MetaData(), Column("id", Integer, primary_key=True), Column("n", Integer))
_COUNTS = select(_COUNT.c.n)


# SQLite: one database in memory shared by every connection ------------------------------------------


def _shared_in_memory():
    """An engine of connections that share one database in memory (no file), and one connection holding it, with a row."""
    name = f"s26t_{uuid.uuid4().hex}"
    engine = create_engine(f"sqlite:///file:{name}?mode=memory&cache=shared&uri=true", poolclass=QueuePool)
    keep = engine.connect()  # the database lives while a connection holds it
    keep.exec_driver_sql("CREATE TABLE s26t_count (id INTEGER PRIMARY KEY, n INTEGER)")
    keep.exec_driver_sql("INSERT INTO s26t_count VALUES (1, 1)")
    keep.commit()
    return engine, keep


@contextlib.contextmanager
def _two_connections_sharing_one():
    """A sessionmaker caching in ``memory``, a SQLCounter, and two connections of one shared database in memory."""
    engine, keep = _shared_in_memory()
    try:
        with engine.connect() as first, engine.connect() as second:
            yield engine, sessionmaker(engine, info=_cache().session_info()), SQLCounter(engine), first, second
    finally:
        keep.close()
        engine.dispose()


def test_connections_sharing_a_database_in_memory_are_invalidated_together():
    # file:NAME?mode=memory&cache=shared: every connection of the process
    # sees one database, which has no file.  A write committed on one
    # connection must void what another stored.
    with _two_connections_sharing_one() as (engine, Sess, counter, first, second):
        with Sess(bind=first) as session:
            assert _rows(session, _COUNTS, "memory") == [(1,)]
        counter.reset()
        with Sess(bind=first) as session:
            assert _rows(session, _COUNTS, "memory") == [(1,)]
        assert counter.count == 0  # a hit
        with Sess(bind=second) as session:
            session.execute(_COUNT.update().values(n=2))
            session.commit()
        assert _truth(engine, _COUNTS) == [(2,)]
        with Sess(bind=first) as session:
            assert _rows(session, _COUNTS, "memory") == [(2,)]  # not the stale 1


def test_connections_sharing_a_database_in_memory_are_keyed_alike():
    with _two_connections_sharing_one() as (engine, Sess, counter, first, second):
        with Sess(bind=first) as session:
            assert _rows(session, _COUNTS, "memory") == [(1,)]
        counter.reset()
        with Sess(bind=second) as session:
            assert _rows(session, _COUNTS, "memory") == _truth(engine, _COUNTS)
        assert counter.count == 1  # the truth alone: one database, one key


# PostgreSQL: what a write to a table calls, through wrappers and nesting ----------------------------

_FIXED = (
    "CREATE FUNCTION s26_fixed(x integer) RETURNS integer LANGUAGE plpgsql IMMUTABLE AS $$"
    " BEGIN RETURN s26_logged(); END $$;"
)


@pytest.mark.parametrize(
    "item",
    [
        _FIXED
        + "CREATE TABLE s26_item (id integer PRIMARY KEY, stamp integer GENERATED ALWAYS AS (s26_fixed(id)) STORED)",
        _FIXED + "CREATE TABLE s26_item (id integer PRIMARY KEY, EXCLUDE USING btree ((s26_fixed(id)) WITH =))",
        _FIXED
        + "CREATE TABLE s26_item (id integer PRIMARY KEY); CREATE INDEX ON s26_item (id) WHERE s26_fixed(id) > 0",
        _CHECKED + "CREATE DOMAIN s26_again AS s26_checked;"
        "CREATE TABLE s26_item (id integer PRIMARY KEY, again s26_again DEFAULT ceil(random())::integer)",
        _CHECKED + "CREATE TYPE s26_inner AS (a s26_checked); CREATE TYPE s26_outer AS (i s26_inner);"
        "CREATE TABLE s26_item (id integer PRIMARY KEY, o s26_outer DEFAULT ROW(ROW(ceil(random())::integer)))",
        _CHECKED + "CREATE TYPE s26_pair AS (a s26_checked);"
        "CREATE TABLE s26_item (id integer PRIMARY KEY,"
        " pairs s26_pair[] DEFAULT ARRAY[ROW(ceil(random())::integer)::s26_pair])",
        "CREATE SCHEMA s26_other; CREATE FUNCTION s26_other.s26_hidden() RETURNS integer LANGUAGE plpgsql AS $$"
        " BEGIN INSERT INTO public.s26_log VALUES (1); RETURN 1; END $$;"
        "CREATE TABLE s26_item (id integer PRIMARY KEY, stamp integer DEFAULT s26_other.s26_hidden())",
    ],
    ids=[
        "a generated column through an immutable wrapper",
        "an exclusion constraint's expression",
        "a partial index's predicate",
        "a domain over a domain",
        "a composite of a composite of a domain",
        "an array of a composite of a domain",
        "a default calling a function of another schema",
    ],
)
def test_what_a_postgresql_insert_calls_through_wrappers_and_nesting_is_invalidated(pg_database, item):
    _logged_fresh_after(pg_database, _WRITER + item, _LOGGED, _add_item)


# PostgreSQL: a remembered answer, and a function replaced to write ----------------------------------

_QUIET = """
CREATE TABLE s26_log (id integer);
CREATE FUNCTION s26_quiet() RETURNS integer LANGUAGE sql AS 'SELECT 1';
"""
_LOUD = """
CREATE OR REPLACE FUNCTION s26_quiet() RETURNS integer LANGUAGE plpgsql AS $$
BEGIN INSERT INTO s26_log VALUES (1); RETURN 1; END $$
"""
_CALL_QUIET = text("SELECT s26_quiet()")


def _replaced_rolled_back_then_redone(savepoint: bool):
    def between(engine):
        with Session(engine) as session:  # the text's answer remembered: it writes nothing
            session.execute(_CALL_QUIET)
            session.commit()
        with engine.connect() as conn:
            if savepoint:
                outer = conn.begin()
                inner = conn.begin_nested()
                conn.exec_driver_sql(_LOUD)
                conn.execute(_CALL_QUIET)  # its own catalog: it writes
                inner.rollback()
                conn.execute(_CALL_QUIET)  # rolled back: it writes nothing again
                outer.rollback()
            else:
                conn.exec_driver_sql(_LOUD)
                conn.rollback()
        with Session(engine) as session:  # read again, as committed: it writes nothing
            session.execute(_CALL_QUIET)
            session.rollback()
        with engine.begin() as conn:  # redone, committed
            conn.exec_driver_sql(_LOUD)

    return between


@pytest.mark.parametrize("savepoint", [False, True], ids=["a transaction", "a savepoint"])
def test_a_postgresql_function_replaced_to_write_after_a_rolled_back_replacement_writes(pg_database, savepoint):
    # What a catalog's patterns found in the text is remembered with the
    # catalog: the answer read while the replacement was rolled back (it
    # writes nothing) must not outlive the replacement committed.
    _logged_fresh_after(pg_database, _QUIET, _LOGGED, _CALL_QUIET, between=_replaced_rolled_back_then_redone(savepoint))


# Manual invalidation: a label of odd characters -------------------------------------------------------

_ODD_LABELS = ["é/../ü \\x *:%s{}", "é", "entry.é:", ("entry." + "ü" * 200)[:200]]


@pytest.mark.parametrize("name", ["memory", "file", "redis"])
def test_a_query_labelled_with_odd_characters_is_invalidated_by_its_label_alone(
    tmp_path, request, region_options, name
):
    # The version of an entry is named after its key, which the label
    # starts: labels of characters outside ASCII, or that look like a
    # version's name, are invalidated each by its own.
    if name == "redis":
        region_options["redis"] = {"type": "ext:redis", "url": request.getfixturevalue("redis_url")}
    cache = _manual(region_options)
    engine = create_engine(_database(tmp_path))
    Sess = sessionmaker(engine, info=cache.session_info())

    def read(session, label):
        stmt = _MANUAL_COUNTS.options(FromCache(name, cache_key=label))
        return [tuple(row) for row in session.execute(stmt).all()]

    with Sess() as session:
        for label in _ODD_LABELS:
            assert read(session, label) == [(0,)]
    counter = SQLCounter(engine)
    with Sess() as session:
        for label in _ODD_LABELS:
            assert read(session, label) == [(0,)]
    assert counter.count == 0  # each a hit
    for n, label in enumerate(_ODD_LABELS, 1):
        with Sess() as session:
            session.execute(update(_MANUAL_COUNT).values(n=n))
            again = invalidate(_MANUAL_COUNTS, session, name, cache_key=label, cache=cache)
            session.commit()
        again()
        truth = _truth(engine, _MANUAL_COUNTS)
        assert truth == [(n,)]
        with Sess() as session:
            assert read(session, label) == truth
            counter.reset()
            assert read(session, label) == truth
            assert counter.count == 0
    engine.dispose()
    cache.close()


def test_labels_that_encode_alike_are_each_a_hit(tmp_path, region_options):
    cache = _manual(region_options)
    engine = create_engine(_database(tmp_path))
    Sess = sessionmaker(engine, info=cache.session_info())
    labels = ["é", "\\xe9"]

    def read_all():
        with Sess() as session:
            return [
                [tuple(row) for row in session.execute(_MANUAL_COUNTS.options(FromCache("memory", cache_key=label)))]
                for label in labels
            ]

    assert read_all() == [_truth(engine, _MANUAL_COUNTS)] * 2
    counter = SQLCounter(engine)
    assert read_all() == [[(0,)]] * 2
    engine.dispose()
    assert counter.count == 0  # each a hit


# Manual invalidation: versions of entries evicted and forgotten ---------------------------------------


@pytest.mark.parametrize("name", ["memory", "file"])
def test_an_entry_stored_after_a_racing_invalidation_stays_void_once_its_version_is_evicted_and_forgotten(
    tmp_path, region_options, monkeypatch, name
):
    # The reader stores what it read before the writer's commit; then a
    # flood of other queries evicts its version (memory) and makes the
    # process forget every entry's counter: the entry must not come back.
    monkeypatch.setattr(storage_versions, "REMEMBERED_ENTRIES", 3)
    region_options["memory"]["max_items"] = 4
    cache = _manual(region_options)
    reader = _race(_database(tmp_path), cache, cache, name)
    Sess = sessionmaker(reader, info=cache.session_info())
    with Sess() as session:
        for n in range(40):
            stmt = select(_MANUAL_COUNT.c.n).where(_MANUAL_COUNT.c.id != -n - 1)
            _rows(session, stmt, name)
            invalidate(stmt, session, name, cache=cache)
    assert _served_then_hit(reader, cache, name) == _truth(reader, _MANUAL_COUNTS) == [(7,)]
    reader.dispose()


# SQLite: a connection in memory replaced by the pool ------------------------------------------------------


def test_a_connection_in_memory_replaced_by_the_pool_is_not_served_the_rows_of_the_one_it_replaced():
    # sqlite:// (one connection per thread, each its own database): a
    # connection invalidated is replaced by a new one, with a new, empty
    # database; what the old one stored must not be served on the new one.
    engine = create_engine("sqlite://")
    Sess = sessionmaker(engine, info=_cache().session_info())
    for n in (1, 2):
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE s26t_count (id INTEGER PRIMARY KEY, n INTEGER)")
            conn.exec_driver_sql(f"INSERT INTO s26t_count VALUES (1, {n})")
        with Sess() as session:
            assert _rows(session, _COUNTS, "memory") == _truth(engine, _COUNTS) == [(n,)]
        counter = SQLCounter(engine)
        with Sess() as session:
            assert _rows(session, _COUNTS, "memory") == [(n,)]
        assert counter.count == 0  # a hit
        with engine.connect() as conn:
            conn.invalidate()  # the pool opens a new connection, a new database
    engine.dispose()


# PostgreSQL: a writer named without its schema, and in a long text ------------------------------------

_HIDDEN = """
CREATE TABLE s26_log (id integer);
CREATE SCHEMA s26_other;
CREATE FUNCTION s26_other.s26_hidden() RETURNS integer LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.s26_log VALUES (1); RETURN 1; END $$;
"""


def _through_search_path(session):
    session.execute(text("SET LOCAL search_path TO s26_other, public"))
    session.execute(text("SELECT s26_hidden()"))


def _in_a_long_text(session):
    session.execute(text("SELECT s26_other.s26_hidden() WHERE 1 IN (" + ", ".join(["1"] * 1500) + ")"))


@pytest.mark.parametrize("write", [_through_search_path, _in_a_long_text], ids=["search_path", "a long text"])
def test_a_postgresql_writer_of_another_schema_writes_every_table(pg_database, write):
    _logged_fresh_after(pg_database, _HIDDEN, _LOGGED, write)


# Manual invalidation: two SessionCaches over one region ---------------------------------------------------


@pytest.mark.parametrize("name", ["file", "redis"])
def test_a_query_invalidated_through_another_sessioncache_voids_what_a_racing_reader_stores(
    tmp_path, request, region_options, name
):
    # Two SessionCaches of one process over the same backend: the writer's
    # bumps are in its own counters, and the reader's are another's.
    if name == "redis":
        region_options["redis"] = {"type": "ext:redis", "url": request.getfixturevalue("redis_url")}
    cache, other = _manual(region_options), _manual(region_options)
    try:
        reader = _race(_database(tmp_path), cache, other, name)
        assert _served_then_hit(reader, cache, name) == [(7,)]
        assert _served_then_hit(reader, other, name) == [(7,)]
        reader.dispose()
    finally:
        cache.close()
        other.close()


# SQLite: a main database in a temporary file, each connection's own ----------------------------------


def test_connections_whose_main_database_is_a_temporary_file_are_not_served_each_others_rows():
    # sqlite3.connect(""): each connection opens a private database in a
    # temporary file (no file name in PRAGMA database_list), as a
    # database in memory: each must be keyed apart.
    engine = create_engine("sqlite://", creator=lambda: sqlite3.connect(""), poolclass=QueuePool)

    def made(conn):
        conn.exec_driver_sql("CREATE TABLE s26t_count (id INTEGER PRIMARY KEY, n INTEGER)")

    _each_served_its_own(engine, _COUNTS, "INSERT INTO s26t_count VALUES (1, {n})", made)
