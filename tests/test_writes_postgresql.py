"""On PostgreSQL: what the catalog says a write changes, and DML inside a SELECT.

The schema here is made by SQL, as migrations would make it: the mapped
classes declare no foreign-key actions and no view, the catalog does.
"""

from __future__ import annotations

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, func, make_url, select, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from pyramid_sessioncache import FromCache, NotCacheableError, SessionCache

from .conftest import SECRET, SQLCounter


class Base(DeclarativeBase):
    pass


class PgParent(Base):
    __tablename__ = "pg_parent"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class PgChild(Base):
    """Its table's foreign key cascades in the database; the model says nothing of it."""

    __tablename__ = "pg_child"
    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(50))


class PgSummary(Base):
    __table__ = Table("pg_summary", MetaData(), Column("id", Integer, primary_key=True), Column("children", Integer))


SCHEMA = """
CREATE TABLE pg_parent (id integer PRIMARY KEY, name varchar(50));
CREATE TABLE pg_child (id integer PRIMARY KEY, name varchar(50),
                       parent_id integer REFERENCES pg_parent (id) ON DELETE CASCADE ON UPDATE CASCADE);
CREATE VIEW pg_inner AS SELECT parent_id, count(*) AS n FROM pg_child GROUP BY parent_id;
CREATE VIEW pg_summary AS SELECT p.id, coalesce(i.n, 0)::integer AS children
    FROM pg_parent p LEFT JOIN pg_inner i ON i.parent_id = p.id;
INSERT INTO pg_parent VALUES (1, 'one'), (2, 'two'), (3, 'three');
INSERT INTO pg_child VALUES (1, 'a', 1), (2, 'b', 1), (3, 'c', 2), (4, 'd', 3);
"""


@pytest.fixture
def pg(pg_database):
    engine = create_engine(pg_database)
    with engine.begin() as conn:
        conn.exec_driver_sql(SCHEMA)
    yield engine
    engine.dispose()


@pytest.fixture
def PgSession(pg, region_options, region):
    cache = SessionCache(region_options, default_region=region, secret=SECRET)
    return sessionmaker(bind=pg, info=cache.session_info())


QUERIES = {
    "children": select(PgChild.id, PgChild.parent_id, PgChild.name).order_by(PgChild.id),
    "summary": select(PgSummary.id, PgSummary.children).order_by(PgSummary.id),
}


def cached(PgSession, region, stmt):
    with PgSession() as session:
        return [tuple(row) for row in session.execute(stmt.options(FromCache(region))).all()]


def uncached(engine, stmt):
    with Session(engine) as session:
        return [tuple(row) for row in session.execute(stmt).all()]


def _delete_parent(PgSession, engine):
    with PgSession() as session:
        session.delete(session.get(PgParent, 1))
        session.commit()


def _key_change(PgSession, engine):
    with PgSession() as session:
        session.execute(update(PgParent).where(PgParent.id == 2).values(id=20))
        session.commit()


def _child_through_a_view(PgSession, engine):
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO pg_child VALUES (9, 'new', 3)"))


def _dml_in_a_cte(PgSession, engine):
    renamed = update(PgChild).where(PgChild.id == 4).values(name="cte").returning(PgChild.id).cte("renamed")
    with PgSession() as session:
        assert session.execute(select(renamed.c.id)).all() == [(4,)]
        session.commit()


def _text_cte(PgSession, engine):
    with PgSession() as session:
        session.execute(text("WITH gone AS (DELETE FROM pg_child WHERE id = 3 RETURNING id) SELECT count(*) FROM gone"))
        session.commit()


def _text_cte_after_a_quoted_name(PgSession, engine):
    # The apostrophe belongs to the CTE's name: the DELETE after it is SQL, not a string.
    with PgSession() as session:
        session.execute(
            text('WITH "gone\'s" AS (DELETE FROM pg_child WHERE id = 3 RETURNING id) SELECT count(*) FROM "gone\'s"')
        ).all()
        session.commit()


CASES = {
    "ON DELETE CASCADE from the catalog": ("children", _delete_parent),
    "ON UPDATE CASCADE from the catalog": ("children", _key_change),
    "a view over a view, from the catalog": ("summary", _child_through_a_view),
    "a view, through a cascade": ("summary", _delete_parent),
    "DML in a CTE of a select()": ("children", _dml_in_a_cte),
    "DML in a CTE of text()": ("children", _text_cte),
    "DML in a CTE of text(), after a quoted name": ("children", _text_cte_after_a_quoted_name),
}


@pytest.mark.parametrize("case", CASES)
def test_a_committed_write_is_never_served_stale(PgSession, pg, region, case):
    query, write = CASES[case]
    stmt = QUERIES[query]
    cached(PgSession, region, stmt)
    cached(PgSession, region, stmt)
    sql = SQLCounter(pg)
    assert cached(PgSession, region, stmt) == uncached(pg, stmt)
    assert sql.count == 1  # a hit, then the uncached run
    before = uncached(pg, stmt)
    write(PgSession, pg)
    after = uncached(pg, stmt)
    assert after != before
    assert cached(PgSession, region, stmt) == after


def test_a_rolled_back_cte_write_reaches_nobody(PgSession, pg, region):
    stmt = QUERIES["children"]
    cached(PgSession, region, stmt)
    committed = uncached(pg, stmt)
    renamed = update(PgChild).values(name="uncommitted").returning(PgChild.id).cte("renamed")
    with PgSession() as session:
        session.execute(select(renamed.c.id)).all()
        inside = [tuple(row) for row in session.execute(stmt.options(FromCache(region))).all()]
        session.rollback()
    assert inside != committed
    for _ in range(2):
        assert cached(PgSession, region, stmt) == committed


def test_dml_in_a_cte_after_a_quoted_name_is_never_cached(PgSession, pg, region):
    sql = "WITH \"renamed's\" AS (UPDATE pg_child SET name = name || '!' WHERE id = 1 RETURNING id) SELECT id FROM \"renamed's\""
    with PgSession() as session, pytest.raises(NotCacheableError, match="may write"):
        session.execute(text(sql).columns(id=Integer).options(FromCache(region)))
    assert uncached(pg, select(PgChild.name).where(PgChild.id == 1)) == [("a",)]


# Schema changes made in this process --------------------------------------------------

CHILD_COUNT = """CREATE OR REPLACE FUNCTION pg_child_count(p integer) RETURNS bigint LANGUAGE sql STABLE
AS 'SELECT count(*) {plus} FROM pg_child WHERE parent_id = p'"""

pg_counts = Table("pg_counts", MetaData(), Column("id", Integer), Column("n", Integer))


@pytest.mark.parametrize(
    "stmt",
    [
        select(PgParent.id, func.pg_child_count(PgParent.id)).order_by(PgParent.id),
        select(pg_counts.c.id, pg_counts.c.n).order_by(pg_counts.c.id),
    ],
    ids=["a query calling it", "a view calling it"],
)
def test_a_function_replaced_in_this_process_invalidates(PgSession, pg, region, stmt):
    with pg.begin() as conn:
        conn.exec_driver_sql(CHILD_COUNT.format(plus=""))
        conn.exec_driver_sql("CREATE VIEW pg_counts AS SELECT id, pg_child_count(id)::integer AS n FROM pg_parent")
    cached(PgSession, region, stmt)
    sql = SQLCounter(pg)
    assert cached(PgSession, region, stmt) == uncached(pg, stmt)
    assert sql.count == 1  # a hit, then the uncached run
    before = uncached(pg, stmt)
    with PgSession() as session:  # a migration run by the application
        session.execute(text(CHILD_COUNT.format(plus="+ 100")))
        session.commit()
    after = uncached(pg, stmt)
    assert after != before
    assert cached(PgSession, region, stmt) == after


def test_a_policy_created_in_this_process_invalidates(pg, region_options, region):
    # Policies bind no superuser: the application connects as the tables' owner, row-level security forced.
    with pg.begin() as conn:
        conn.exec_driver_sql(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'w_table_owner') THEN "
            "CREATE ROLE w_table_owner LOGIN; END IF; END $$;"
            "ALTER TABLE pg_parent OWNER TO w_table_owner; ALTER TABLE pg_parent ENABLE ROW LEVEL SECURITY;"
            "ALTER TABLE pg_parent FORCE ROW LEVEL SECURITY; CREATE POLICY pg_all ON pg_parent USING (true);"
        )
    owner = create_engine(make_url(pg.url).set(username="w_table_owner", password=None))
    try:
        cache = SessionCache(region_options, default_region=region, secret=SECRET)
        Sess = sessionmaker(bind=owner, info=cache.session_info())
        stmt = select(PgParent.id, PgParent.name).order_by(PgParent.id)
        cached(Sess, region, stmt)
        sql = SQLCounter(owner)
        assert cached(Sess, region, stmt) == uncached(owner, stmt)
        assert sql.count == 1
        with sessionmaker(bind=pg, info=cache.session_info())() as session:  # the superuser's migration
            session.execute(text("CREATE POLICY pg_hide ON pg_parent AS RESTRICTIVE USING (id <> 2)"))
            session.commit()
        after = uncached(owner, stmt)
        assert after == [(1, "one"), (3, "three")]
        assert cached(Sess, region, stmt) == after
    finally:
        owner.dispose()


pg_late = Table("pg_late", MetaData(), Column("id", Integer, primary_key=True), Column("parent_id", Integer))


def test_a_table_created_in_this_process_is_read_from_the_catalog(PgSession, pg, region):
    _delete_parent(PgSession, pg)  # the engine has written: its catalog is read
    with PgSession() as session:  # its foreign key cascades; its Table says nothing of it
        session.execute(
            text(
                "CREATE TABLE pg_late (id integer PRIMARY KEY, parent_id integer REFERENCES pg_parent ON DELETE CASCADE)"
            )
        )
        session.execute(text("INSERT INTO pg_late VALUES (1, 2), (2, 3)"))
        session.commit()
    stmt = select(pg_late.c.id, pg_late.c.parent_id).order_by(pg_late.c.id)
    cached(PgSession, region, stmt)
    sql = SQLCounter(pg)
    assert cached(PgSession, region, stmt) == uncached(pg, stmt) == [(1, 2), (2, 3)]
    assert sql.count == 1
    with PgSession() as session:
        session.delete(session.get(PgParent, 2))
        session.commit()
    assert cached(PgSession, region, stmt) == uncached(pg, stmt) == [(2, 3)]
