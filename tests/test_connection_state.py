"""Settings of a connection are part of a key: SET search_path, set_config(), a session setting rolled back.

Every case reads the same statement under several settings through one
shared region, compares each read with the same statement run uncached
under the same setting, and counts SQL statements to prove the hits.
"""

from __future__ import annotations

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, event, select
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool

from pyramid_sessioncache import FromCache, SessionCache

from .conftest import SECRET, SQLCounter

item = Table("item", MetaData(), Column("id", Integer, primary_key=True), Column("name", String(50)))
ITEMS = select(item.c.name).order_by(item.c.id)


@pytest.fixture
def tenants(pg_database):
    """A database with a schema per tenant, each with its own ``item`` rows; its engine."""
    engine = create_engine(pg_database, poolclass=NullPool)
    with engine.begin() as conn:
        for tenant in ("a", "b"):
            conn.exec_driver_sql(f"CREATE SCHEMA tenant_{tenant}")
            conn.exec_driver_sql(f"CREATE TABLE tenant_{tenant}.item (id integer PRIMARY KEY, name varchar(50))")
            conn.exec_driver_sql(f"INSERT INTO tenant_{tenant}.item VALUES (1, 'of {tenant}')")
    yield engine
    engine.dispose()


def _cache() -> SessionCache:
    return SessionCache({"memory": {"type": "memory"}}, default_region="memory", secret=SECRET)


def _read(Session, tenant: str, how: str, cached: bool = True) -> list[str]:
    with Session() as session:
        if how == "SET LOCAL":
            session.connection().exec_driver_sql(f"SET LOCAL search_path TO tenant_{tenant}")
        elif how == "set_config":
            session.connection().exec_driver_sql(
                "SELECT set_config('search_path', %(path)s, true)", {"path": f"tenant_{tenant}"}
            )
        statement = ITEMS.options(FromCache("memory")) if cached else ITEMS
        return list(session.scalars(statement))


@pytest.mark.parametrize("how", ["SET LOCAL", "set_config"])
def test_a_setting_made_in_the_transaction_keys_its_reads(tenants, how):
    Session = sessionmaker(tenants, info=_cache().session_info())
    sql = SQLCounter(tenants)
    for tenant in ("a", "b", "a", "b"):
        assert _read(Session, tenant, how) == _read(Session, tenant, how, cached=False) == [f"of {tenant}"]
    sql.reset()
    for tenant in ("a", "b"):
        assert _read(Session, tenant, how) == [f"of {tenant}"]
    assert sql.count == 2  # the settings only: both reads were hits


def test_an_after_begin_listener_that_sets_the_tenant_is_run_before_the_look_up(tenants):
    """The listener sets the tenant when the transaction begins: a hit must not be served before it."""
    cache = _cache()
    Session = sessionmaker(tenants, info=cache.session_info())
    tenant = {"name": "a"}

    @event.listens_for(Session, "after_begin")
    def _tenant(session, transaction, connection):
        connection.exec_driver_sql(f"SET LOCAL search_path TO tenant_{tenant['name']}")

    for name in ("a", "b", "a", "b"):
        tenant["name"] = name
        with Session() as session:
            assert list(session.scalars(ITEMS.options(FromCache("memory")))) == [f"of {name}"]


def test_a_session_setting_undone_by_a_rollback_is_undone_here_too(tenants):
    """PostgreSQL undoes a session SET at a rollback: the connection runs with what it had before, and is cached.

    It was left uncached for the rest of its life in the pool.
    """
    engine = create_engine(tenants.url, pool_size=1, max_overflow=0)  # one connection, kept
    Session = sessionmaker(engine, info=_cache().session_info())
    try:
        with Session() as session:
            session.connection().exec_driver_sql("SET search_path TO tenant_a")
            session.commit()
        with Session() as session:
            session.connection().exec_driver_sql("SET search_path TO tenant_b")
            session.rollback()  # back to tenant_a, as PostgreSQL undoes it
        sql = SQLCounter(engine)
        for _ in range(3):  # learn the shape's tables, store, hit: were it cached
            with Session() as session:
                assert list(session.scalars(ITEMS.options(FromCache("memory")))) == ["of a"]
        assert sql.count == 1  # stored, then two hits
    finally:
        engine.dispose()
