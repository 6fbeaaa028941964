"""What runs every time is told apart from what only looks like it (keys.py, session 34).

``tests/test_attack_s34_paths.py`` shows locking reads and effects spelt
with comments, ``FETCH`` and ``SHOW`` served from a cache.  These show
the rules are no broader than they must be: names that are no calls,
comments that hide nothing, and SQL text that only mentions the words
are still cached (hits proven by counting statements).
"""

from __future__ import annotations

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, func, select, text
from sqlalchemy.orm import sessionmaker

from pyramid_sessioncache import SessionCache, cached_query
from pyramid_sessioncache.engine.keys import KeyMaker

from .conftest import SECRET, SQLCounter

CHANGES = Table("changes", MetaData(), Column("id", Integer, primary_key=True), Column("changes", Integer))


def keyable(statement) -> bool:
    return KeyMaker().structure(statement._generate_cache_key(), statement) is not None


@pytest.mark.parametrize(
    "statement",
    [
        select(CHANGES.c.changes),  # a table and a column named after an effect function
        select(CHANGES.c.changes.label("lo_get")).where(CHANGES.c.changes > 1),
        text("SELECT id /* the id, fetch it */ FROM person -- show all\nWHERE id = 1"),
        text("SELECT 1 AS show, 2 AS fetch"),
        text("SELECT name FROM person WHERE name = 'for /* x */ update'"),
    ],
    ids=["names", "label", "comments", "words as names", "a comment inside a string"],
)
def test_what_only_looks_like_an_effect_is_keyed(statement):
    assert keyable(statement)


@pytest.mark.parametrize(
    "statement",
    [
        text("SELECT id FROM person FOR /* this one */ UPDATE"),
        text("SELECT id FROM person FOR -- this one\nSHARE"),
        text("SELECT nextval /* one */ ('s')"),
        text("/* next */ FETCH NEXT FROM c"),
        text("MOVE 1 IN c"),
        text("  show search_path"),
        select(func.changes()),
        select(func.lo_get(1)),
        select(func.pg_export_snapshot()),
    ],
    ids=["for update", "for share", "nextval", "fetch", "move", "show", "changes()", "lo_get()", "snapshot"],
)
def test_what_locks_or_acts_or_reads_its_connection_is_never_keyed(statement):
    assert not keyable(statement)


def test_a_table_named_after_an_effect_function_is_cached_and_hit(tmp_path):
    """End to end on SQLite: ``changes`` is a table here, and its reads are hits."""
    engine = create_engine(f"sqlite:///{tmp_path / 'changes.sqlite'}")
    CHANGES.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(CHANGES.insert().values(id=1, changes=3))
    cache = SessionCache({"memory": {"type": "memory"}}, secret=SECRET)
    Sessions = sessionmaker(engine, info=cache.session_info())
    statement = select(CHANGES.c.changes).where(CHANGES.c.id == 1)
    try:
        with Sessions() as session:
            assert cached_query(session, statement, "memory").scalar_one() == 3
        with Sessions() as session:
            sql = SQLCounter(engine)
            assert cached_query(session, statement, "memory").scalar_one() == 3
            assert sql.count == 0
    finally:
        engine.dispose()
        cache.close()
