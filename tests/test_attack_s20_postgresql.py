"""Attack s20, PostgreSQL: a cached read that returns what the same query, uncached, would not.

Each test sets up a case where the database shows a query's rows otherwise
than the cache believed: a connection of its own, a commit that happens
apart from its transaction, a name the listener spells otherwise.  The
schema is ``test_writes_postgresql``'s (``pg_parent``, ``pg_child``...).
"""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

from pyramid_sessioncache import SessionCache

from . import test_writes_postgresql
from .conftest import SECRET
from .test_writes_postgresql import PgParent, cached, uncached

#: Its fixture: a database whose schema migrations made.
pg = test_writes_postgresql.pg
PARENTS = select(PgParent.id, PgParent.name).order_by(PgParent.id)


# 1. A temporary table that shadows a table: what one connection sees ------------------


TEMPORARY = {
    "CREATE TEMPORARY TABLE": "CREATE TEMPORARY TABLE pg_parent (id integer PRIMARY KEY, name varchar(50));"
    "INSERT INTO pg_parent VALUES (1, 'temporary')",
    'CREATE TABLE "pg_temp".name': "CREATE TABLE \"pg_temp\".pg_parent AS SELECT 1 AS id, 'temporary' AS name",
    "SELECT INTO TEMP": "SELECT 1 AS id, 'temporary'::varchar AS name INTO TEMP pg_parent",
}


@pytest.mark.parametrize("make", TEMPORARY)
@pytest.mark.parametrize("first", ["the shadowed connection", "another connection"])
def test_a_temporary_table_keeps_its_rows_to_its_connection(pg, region_options, region, first, make):
    # pg_temp comes first in every search_path: on the connection that made
    # it, "pg_parent" is the temporary table, elsewhere the permanent one.
    own = create_engine(pg.url, pool_size=1, max_overflow=0)  # its one connection, every time
    try:
        cache = SessionCache(region_options, default_region=region, secret=SECRET)
        Own = sessionmaker(bind=own, info=cache.session_info())
        Other = sessionmaker(bind=pg, info=cache.session_info())
        with Own() as session:
            session.connection().exec_driver_sql(TEMPORARY[make])
            session.commit()
        sessions = [(Own, own), (Other, pg)] if first == "the shadowed connection" else [(Other, pg), (Own, own)]
        for _ in range(2):
            for Sess, engine in sessions:
                assert cached(Sess, region, PARENTS) == uncached(engine, PARENTS)
        assert uncached(own, PARENTS) == [(1, "temporary")]
    finally:
        own.dispose()
