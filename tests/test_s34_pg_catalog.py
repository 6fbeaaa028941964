"""PostgreSQL's catalog: the relations no cache answers for, and the reads beside them that stay cached.

A read of a sequence, of a view whose query locks rows or calls a
function run for its effect (``nextval()``) or reading the server's live
state, or of a function of the database's own that does one of those,
runs every time; a view over a query given as a string
(``ts_rewrite(q, 'SELECT ...')``) reads any table.  A plain view, a
function that only reads, a table whose name merely starts like a
sequence's, are still answered from the cache: hits are proven by
counting SQL.
"""

from __future__ import annotations

import pytest
from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, create_engine, func, select, text
from sqlalchemy.orm import sessionmaker

from pyramid_sessioncache import SessionCache

from .conftest import SECRET, SQLCounter
from .test_attack_s34_paths import cached, uncached

_META = MetaData()
NEXT_TICKET_AGAIN = Table("next_ticket_again", _META, Column("n", BigInteger))
DRAWN = Table("drawn", _META, Column("n", BigInteger))
SHARE_LOCKED = Table("share_locked", _META, Column("id", Integer))
PERSON_NAMES = Table("person_names", _META, Column("id", Integer), Column("name", String))
TICKET_LOG = Table("ticket_log", _META, Column("id", Integer))
REWRITTEN = Table("rewritten", _META, Column("q", String))

SCHEMA = [
    "CREATE SEQUENCE ticket",
    "CREATE VIEW next_ticket AS SELECT nextval('ticket') AS n",
    # A view over a view over nextval(): what shows its rows draws too.
    "CREATE VIEW next_ticket_again AS SELECT n FROM next_ticket",
    # A view over a function of the database's own that draws.
    "CREATE FUNCTION draw() RETURNS bigint LANGUAGE sql AS $$ SELECT nextval('ticket') $$",
    "CREATE VIEW drawn AS SELECT draw() AS n",
    # A function that reads the sequence as a relation.
    "CREATE FUNCTION ticket_last() RETURNS bigint LANGUAGE sql AS $$ SELECT last_value FROM ticket $$",
    # Row locks taken in a subquery of the view.
    "CREATE VIEW share_locked AS SELECT id FROM (SELECT id, name FROM person FOR SHARE) s",
    # What stays cached.
    "CREATE VIEW person_names AS SELECT id, name FROM person",
    "CREATE FUNCTION person_name(int) RETURNS text LANGUAGE sql STABLE AS $$ SELECT name FROM person WHERE id = $1 $$",
    "CREATE TABLE ticket_log (id int)",
    "INSERT INTO ticket_log VALUES (1)",
    # ts_rewrite() runs the query its second argument gives: the view reads "alias", which no catalog row links.
    "CREATE TABLE alias (t tsquery, s tsquery)",
    "CREATE VIEW rewritten AS SELECT ts_rewrite('supernovae'::tsquery, 'SELECT t, s FROM alias')::text AS q",
]


@pytest.fixture
def pg(pg_url, region_options):
    """An engine on the seeded database with :data:`SCHEMA`, and a sessionmaker caching into ``local`` and ``memory``."""
    engine = create_engine(pg_url)
    with engine.begin() as conn:
        for sql in SCHEMA:
            conn.exec_driver_sql(sql)
    cache = SessionCache(region_options, default_region="memory", secret=SECRET)
    yield engine, sessionmaker(engine, info=cache.session_info())
    engine.dispose()


@pytest.mark.parametrize("region", ["local", "memory"])
@pytest.mark.parametrize(
    "statement",
    [
        select(PERSON_NAMES.c.id, PERSON_NAMES.c.name).order_by(PERSON_NAMES.c.id),
        select(func.person_name(1)),
        select(TICKET_LOG.c.id),
        text("SELECT id FROM ticket_log"),
        text("SELECT table_name FROM information_schema.tables WHERE table_name = 'person'"),
    ],
    ids=[
        "a plain view",
        "a function of its own that reads",
        "a table named like a sequence",
        "the same as text",
        "information_schema.tables (calls pg_my_temp_schema())",
    ],
)
def test_reads_beside_the_never_cached_ones_are_hits(pg, statement, region):
    """What reads no sequence, takes no lock and calls nothing run for its effect is served from the cache."""
    engine, Sessions = pg
    with Sessions() as session:
        first = cached(session, statement, region)
        sql = SQLCounter(engine)
        assert cached(session, statement, region) == first
        assert sql.count == 0, "a read that may be cached ran again"
    assert first == uncached(engine.url.render_as_string(hide_password=False), statement)


@pytest.mark.parametrize("region", ["local", "memory"])
@pytest.mark.parametrize(
    "statement",
    [
        select(NEXT_TICKET_AGAIN.c.n),
        select(DRAWN.c.n),
        select(func.ticket_last()),
        text("SELECT last_value FROM ticket"),
        select(SHARE_LOCKED.c.id).order_by(SHARE_LOCKED.c.id),
        text("SELECT count(*) FROM pg_stat_activity"),
        text("SELECT n_live_tup FROM pg_stat_user_tables WHERE relname = 'person'"),
        text("SELECT count(*) FROM pg_lock_status()"),
    ],
    ids=[
        "a view over a view over nextval()",
        "a view over a function of its own that draws",
        "a function of its own that reads a sequence",
        "a sequence read as text",
        "a view locking rows in a subquery",
        "pg_stat_activity",
        "pg_stat_user_tables (a view over pg_stat_all_tables)",
        "pg_lock_status()",
    ],
)
def test_reads_of_what_no_write_publishes_run_every_time(pg, statement, region):
    """Each of these runs on every read: never stored, in a local region or a shared one."""
    engine, Sessions = pg
    with Sessions() as session:
        cached(session, statement, region)
        sql = SQLCounter(engine)
        cached(session, statement, region)
        assert sql.count > 0, "served from the cache"


def test_a_sequence_read_as_text_sees_nextval_elsewhere(pg, pg_url):
    """``SELECT last_value FROM ticket`` after another engine's ``nextval()``: the sequence advanced, no write published."""
    engine, Sessions = pg
    statement = text("SELECT last_value, is_called FROM ticket")
    with Sessions() as first:
        assert cached(first, statement) == [(1, False)]
    other = create_engine(pg_url)
    try:
        with other.connect() as conn:  # rolled back: the sequence advanced all the same
            conn.exec_driver_sql("SELECT nextval('ticket'), nextval('ticket')")
    finally:
        other.dispose()
    with Sessions() as again:
        assert cached(again, statement) == uncached(pg_url, statement) == [(2, True)]


@pytest.mark.parametrize("region", ["memory", "file"])
def test_a_view_over_ts_rewrite_is_cached_and_sees_a_write_to_what_its_string_reads(pg, pg_url, region):
    """``ts_rewrite(q, 'SELECT t, s FROM alias')`` reads ``alias``, which the catalog does not link: any write voids it."""
    engine, Sessions = pg
    statement = select(REWRITTEN.c.q)
    with Sessions() as first:
        before = cached(first, statement, region)
        sql = SQLCounter(engine)
        assert cached(first, statement, region) == before
        assert sql.count == 0  # opaque, not never cached
    other = create_engine(pg_url)
    try:
        with other.begin() as conn:
            conn.exec_driver_sql("INSERT INTO alias VALUES ('supernovae', 'sn')")
    finally:
        other.dispose()
    with Sessions() as again:
        served = cached(again, statement, region)
    assert before == [("'supernovae'",)]
    assert served == [("'sn'",)]
    assert served == uncached(pg_url, statement)
