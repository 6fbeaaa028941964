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


# Catalogs kept per database, what they cannot name -----------------------------------


def _hit(PgSession, engine, region, stmt):
    """Whether ``stmt`` is served from the cache, sending no SQL, with what the database holds."""
    truth = uncached(engine, stmt)
    sql = SQLCounter(engine)
    served = cached(PgSession, region, stmt)
    return served == truth and sql.count == 0


def _role(name, grants):
    return (
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{name}') THEN "
        f"CREATE ROLE {name} LOGIN; END IF; END $$; {grants}"
    )


through_view = Table("pg_through", MetaData(), Column("id", Integer), Column("name", String))


@pytest.mark.parametrize("through", ["another engine", "an execution_options() copy", "another user's engine"])
def test_a_view_created_through_another_engine_is_known(PgSession, pg, region, through):
    _delete_parent(PgSession, pg)  # the application's engine has written: its catalog is read
    ddl = "CREATE VIEW pg_through AS SELECT id, name FROM pg_parent"
    if through == "an execution_options() copy":
        migration = pg.execution_options(isolation_level="AUTOCOMMIT")  # another Engine, the same pool
    elif through == "another engine":
        migration = create_engine(pg.url)  # alembic's, in this process
    else:  # a migration role that owns the schema, the application's a role of its own
        with pg.begin() as conn:
            conn.exec_driver_sql(
                _role(
                    "pgw_migrator",
                    "GRANT CREATE ON SCHEMA public TO pgw_migrator; GRANT SELECT ON pg_parent TO pgw_migrator;",
                )
            )
        migration = create_engine(make_url(pg.url).set(username="pgw_migrator", password=None))
    with migration.begin() as conn:
        conn.exec_driver_sql(ddl)
    if through != "an execution_options() copy":
        migration.dispose()
    stmt = select(through_view.c.id, through_view.c.name).order_by(through_view.c.id)
    cached(PgSession, region, stmt)
    assert _hit(PgSession, pg, region, stmt)
    with PgSession() as session:
        session.execute(update(PgParent).where(PgParent.id == 2).values(name="renamed"))
        session.commit()
    assert cached(PgSession, region, stmt) == uncached(pg, stmt) == [(2, "renamed"), (3, "three")]


def test_a_view_over_a_declared_trigger_target(pg, region_options, region):
    # What the trigger writes is declared; the view over it, the catalog says.
    with pg.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE pg_audit (id serial PRIMARY KEY, what varchar(50));"
            "CREATE VIEW pg_audit_count AS SELECT count(*)::integer AS n FROM pg_audit;"
            "CREATE FUNCTION pg_audit_parent() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN INSERT INTO pg_audit (what) VALUES (NEW.name); RETURN NEW; END $$;"
            "CREATE TRIGGER pg_audit_parent AFTER UPDATE ON pg_parent FOR EACH ROW EXECUTE FUNCTION pg_audit_parent();"
        )
    cache = SessionCache(region_options, default_region=region, secret=SECRET, writes_also={"pg_parent": ["pg_audit"]})
    Sess = sessionmaker(bind=pg, info=cache.session_info())
    stmt = select(Table("pg_audit_count", MetaData(), Column("n", Integer)).c.n)
    cached(Sess, region, stmt)
    assert _hit(Sess, pg, region, stmt)
    with Sess() as session:
        session.execute(update(PgParent).where(PgParent.id == 1).values(name="audited"))
        session.commit()
    assert cached(Sess, region, stmt) == uncached(pg, stmt) == [(1,)]


FUNCTIONS = """
CREATE TABLE pg_tag (id integer PRIMARY KEY, parent_id integer);
INSERT INTO pg_tag VALUES (1, 1), (2, 1), (3, 2);
CREATE FUNCTION pg_tags_of(p integer) RETURNS bigint LANGUAGE sql STABLE
    AS 'SELECT count(*) FROM pg_tag WHERE parent_id = p';
CREATE VIEW pg_counted AS SELECT id, pg_tags_of(id)::integer AS tags FROM pg_parent;
CREATE VIEW pg_counted_again AS SELECT id, tags FROM pg_counted;
"""

counted = Table("pg_counted", MetaData(), Column("id", Integer), Column("tags", Integer))
counted_again = Table("pg_counted_again", MetaData(), Column("id", Integer), Column("tags", Integer))


@pytest.mark.parametrize("view", [counted, counted_again], ids=["calling it", "over one calling it"])
def test_a_view_calling_a_function_of_the_database_depends_on_every_table(PgSession, pg, region, view):
    # The function reads pg_tag; the catalog records that the view calls
    # it, not what it reads.
    with pg.begin() as conn:
        conn.exec_driver_sql(FUNCTIONS)
    stmt = select(view.c.id, view.c.tags).order_by(view.c.id)
    cached(PgSession, region, stmt)
    assert _hit(PgSession, pg, region, stmt)
    before = uncached(pg, stmt)
    with PgSession() as session:
        session.execute(text("INSERT INTO pg_tag VALUES (4, 3)"))
        session.commit()
    after = uncached(pg, stmt)
    assert after != before
    assert cached(PgSession, region, stmt) == after
    assert _hit(PgSession, pg, region, stmt)


def test_a_view_of_catalog_functions_only_keeps_its_entries(PgSession, pg, region):
    # pg_summary calls coalesce() and a cast, PostgreSQL's own: a write to a
    # table it does not read leaves its entries valid.
    with pg.begin() as conn:
        conn.exec_driver_sql(FUNCTIONS + "CREATE TABLE pg_other (id integer PRIMARY KEY)")
    stmt = QUERIES["summary"]
    cached(PgSession, region, stmt)
    with PgSession() as session:
        session.execute(text("INSERT INTO pg_other VALUES (1)"))
        session.commit()
    assert _hit(PgSession, pg, region, stmt)


@pytest.mark.parametrize("policy", ["a subquery", "a function of the database"])
def test_a_row_level_security_policy_reading_another_table(pg, region_options, region, policy):
    # A role the policy applies to (the owner, a superuser here, bypasses it).
    using = (
        "EXISTS (SELECT 1 FROM pg_grant g WHERE g.parent_id = pg_parent.id)"
        if policy == "a subquery"
        else "pg_granted(id)"
    )
    with pg.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE pg_grant (parent_id integer PRIMARY KEY); INSERT INTO pg_grant VALUES (1), (2);"
            "CREATE FUNCTION pg_granted(p integer) RETURNS boolean LANGUAGE sql STABLE "
            "    AS 'SELECT EXISTS (SELECT 1 FROM pg_grant WHERE parent_id = p)';"
            f"ALTER TABLE pg_parent ENABLE ROW LEVEL SECURITY; CREATE POLICY pg_visible ON pg_parent USING ({using});"
            + _role("pgw_reader", "GRANT SELECT, INSERT ON pg_parent, pg_grant TO pgw_reader;")
        )
    reader = create_engine(make_url(pg.url).set(username="pgw_reader", password=None))
    try:
        cache = SessionCache(region_options, default_region=region, secret=SECRET)
        Reader = sessionmaker(bind=reader, info=cache.session_info())
        stmt = select(PgParent.id, PgParent.name).order_by(PgParent.id)
        cached(Reader, region, stmt)
        assert _hit(Reader, reader, region, stmt)
        with Reader() as session:
            session.execute(text("INSERT INTO pg_grant VALUES (3)"))
            session.commit()
        after = uncached(reader, stmt)
        assert len(after) == 3
        assert cached(Reader, region, stmt) == after
        assert _hit(Reader, reader, region, stmt)
    finally:
        reader.dispose()


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


NOTE = """CREATE OR REPLACE FUNCTION pg_note() RETURNS integer LANGUAGE plpgsql AS $$
BEGIN {body} RETURN 1; END $$"""


def test_what_a_catalog_found_in_a_statement_ends_with_the_catalog(PgSession, pg, region):
    """The same SQL text, once its function writes, writes: what was found in it is remembered per catalog."""
    with pg.begin() as conn:
        conn.exec_driver_sql(NOTE.format(body=""))
    stmt = QUERIES["children"]

    def call_note():
        with PgSession() as session:
            assert session.execute(text("SELECT pg_note()")).scalar() == 1
            session.commit()

    cached(PgSession, region, stmt)
    call_note()  # writes nothing: the entry stays
    assert _hit(PgSession, pg, region, stmt)
    with pg.begin() as conn:  # a migration of this process: the function now writes
        conn.exec_driver_sql(NOTE.format(body="INSERT INTO pg_child VALUES (9, 'z', 1);"))
    cached(PgSession, region, stmt)
    assert _hit(PgSession, pg, region, stmt)
    call_note()  # the very same SQL text
    after = uncached(pg, stmt)
    assert (9, 1, "z") in after
    assert cached(PgSession, region, stmt) == after
