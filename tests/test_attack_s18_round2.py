"""Attack s18, round 2: SQL text the tokenizer reads differently from the database, fragments, storage.

Every case warms a shared region, proves a hit sends no SQL, writes, and
compares what the cache serves with the same query run uncached in a fresh
Session (or runs a write twice through the cache and counts what reached
the database).  Real SQLite files, real PostgreSQL, real Redis; no mocks.
Cases that fail on the reviewed code are left failing.
"""

from __future__ import annotations

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, insert, literal_column, select, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from pyramid_sessioncache import FromCache, SessionCache

from . import test_attack_s18_invalidation as invalidation
from . import test_attack_s18_storage as storage
from .conftest import SECRET
from .test_attack_s18_invalidation import PEOPLE, SPerson, counting, rows, stale_after, uncached

# The fixtures of the first round, used here too.
PgSession, SSession, pg, region, scache, sengine = (
    invalidation.PgSession,
    invalidation.SSession,
    invalidation.pg,
    invalidation.region,
    invalidation.scache,
    invalidation.sengine,
)
own_redis = storage.own_redis


def _write_text(Sess, sql):
    def write():
        with Sess() as session:
            result = session.execute(text(sql))
            if result.returns_rows:
                result.all()
            session.commit()

    return write


def _name_of_1(engine):
    return uncached(engine, select(SPerson.name).where(SPerson.id == 1))


def _twice_through_the_cache(Sess, engine, region, sql):
    """Run DML-in-CTE text twice with FromCache; return (names after, statements sent, refused)."""

    def run():
        with Sess() as session:
            try:
                session.execute(text(sql).columns(id=Integer).options(FromCache(region))).all()
            except Exception as refused:  # a clear refusal is fine
                return refused
            session.commit()
        return None

    with counting(engine) as seen:
        refused = run()
        if refused is None:
            refused = run()
    return _name_of_1(engine), seen, refused


# 1. SQL text the tokenizer reads otherwise than PostgreSQL / SQLite -----------------------

PG_HIDDEN_DML = [
    pytest.param(
        "WITH x AS (SELECT 1 /* outer /* inner */ ' */ AS k), "
        "u AS (UPDATE s18_person SET name = name || '!' WHERE id = 1 RETURNING id) SELECT id, 'x' AS label FROM u",
        id="nested comment holding a quote",
    ),
    pytest.param(
        "WITH x AS (SELECT name'C:\\' AS p), "
        "u AS (UPDATE s18_person SET name = name || '!' WHERE id = 1 RETURNING id) SELECT id, 'done' AS label FROM u",
        id="e' ending a type name (name'C:\\')",
    ),
    pytest.param(
        "WITH x AS (SELECT 1 WHERE 'a_' LIKE 'a\\_' ESCAPE'\\'), "
        "u AS (UPDATE s18_person SET name = name || '!' WHERE id = 1 RETURNING id) SELECT id, 'done' AS label FROM u",
        id="ESCAPE'\\' without a space",
    ),
    pytest.param(
        "WITH s AS (SELECT 1 AS a$b$), "
        "u AS (UPDATE s18_person SET name = name || '!' WHERE id = 1 RETURNING id) SELECT id AS c$b$ FROM u",
        id="$ inside identifiers",
    ),
]


@pytest.mark.parametrize("sql", PG_HIDDEN_DML)
def test_pg_hidden_dml_cte_is_published(PgSession, pg, region, sql):
    served, truth = stale_after(PgSession, pg, region, PEOPLE, _write_text(PgSession, sql))
    assert served == truth


@pytest.mark.parametrize("sql", PG_HIDDEN_DML)
def test_pg_hidden_dml_cte_is_not_cached(PgSession, pg, region, sql):
    name, seen, refused = _twice_through_the_cache(PgSession, pg, region, sql)
    if refused is not None:
        return
    assert name == [("person 1!!",)], f"the second run's UPDATE was not sent ({len(seen)} statements)"


BACKSLASH_QUOTE = (
    "WITH s AS (SELECT 'a\\'b' AS k), "
    "u AS (UPDATE s18_person SET name = name || '!' WHERE id = 1 RETURNING id) SELECT id, 'c' AS label FROM u"
)


@pytest.fixture
def pg_escapes(pg_database, pg):
    """The same database, on connections with standard_conforming_strings off (backslash escapes quotes)."""
    engine = create_engine(pg_database, connect_args={"options": "-c standard_conforming_strings=off"})
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW standard_conforming_strings").scalar() == "off"
    yield engine
    engine.dispose()


def test_pg_standard_conforming_strings_off_publishes(pg_escapes, scache, region):
    Sess = sessionmaker(bind=pg_escapes, info=scache.session_info())
    served, truth = stale_after(Sess, pg_escapes, region, PEOPLE, _write_text(Sess, BACKSLASH_QUOTE))
    assert served == truth


def test_pg_standard_conforming_strings_off_not_cached(pg_escapes, scache, region):
    Sess = sessionmaker(bind=pg_escapes, info=scache.session_info())
    name, seen, refused = _twice_through_the_cache(Sess, pg_escapes, region, BACKSLASH_QUOTE)
    if refused is not None:
        return
    assert name == [("person 1!!",)], f"the second run's UPDATE was not sent ({len(seen)} statements)"


SQLITE_HIDDEN_UPDATE = [
    pytest.param(
        "WITH c AS (SELECT 1 WHERE 'a_' LIKE 'a\\_' ESCAPE'\\') UPDATE s18_person SET name = name || 'x' WHERE id = 1",
        id="ESCAPE'\\'",
    ),
    pytest.param(
        "WITH c AS (SELECT 1 WHERE 'a' NOT LIKE'\\') UPDATE s18_person SET name = name || 'x' WHERE id = 1",
        id="LIKE'\\'",
    ),
]


@pytest.mark.parametrize("sql", SQLITE_HIDDEN_UPDATE)
@pytest.mark.parametrize("via", ["text", "driver"])
def test_sqlite_backslash_after_a_word_ending_in_e(SSession, sengine, region, sql, via):
    write = invalidation.text_writer(SSession, sengine, sql, via)
    served, truth = stale_after(SSession, sengine, region, PEOPLE, write)
    assert served == truth


def test_pg_select_into_temp_is_not_served_from_the_cache(pg_database, pg, scache, region):
    # SELECT ... INTO creates a table and fills it: a write, whatever its first word.
    engine = create_engine(pg_database, poolclass=NullPool)  # each Session: a new connection, no temp table
    Sess = sessionmaker(bind=engine, info=scache.session_info())
    sql = "SELECT id INTO TEMP s18_snapshot FROM s18_person"
    try:
        outcomes = []
        with counting(engine) as seen:
            for _ in range(2):
                with Sess() as session:
                    try:
                        session.execute(text(sql).columns(id=Integer).options(FromCache(region))).all()
                    except Exception as refused:
                        outcomes.append(("refused", f"{type(refused).__name__}: {refused}"[:200]))
                        continue
                    made = session.execute(text("SELECT count(*) FROM s18_snapshot")).scalar()
                    outcomes.append(("ran", made))
        assert all(kind == "refused" for kind, _ in outcomes) or outcomes == [("ran", 3), ("ran", 3)], (
            outcomes,
            seen,
        )
    finally:
        engine.dispose()


# 2. Fragments whose reads hide inside square brackets, or after IN without a space ---------------

PG_BRACKET_FRAGMENTS = [
    pytest.param("s18_person.id = ANY(ARRAY[(SELECT max(person_id) FROM s18_address)])", id="ARRAY[(SELECT ...)]"),
    pytest.param(
        "(ARRAY[1, 2, 3, 4])[(SELECT count(*) FROM s18_address) - 5] = s18_person.id", id="subscript by a subquery"
    ),
]


@pytest.mark.parametrize("fragment", PG_BRACKET_FRAGMENTS)
@pytest.mark.parametrize("how", ["text", "literal_column"])
def test_pg_bracketed_subquery_in_a_fragment(PgSession, pg, region, fragment, how):
    if how == "text":
        stmt = select(SPerson.id, SPerson.name).where(text(fragment)).order_by(SPerson.id)
    else:
        stmt = select(SPerson.id, SPerson.name).where(literal_column(fragment)).order_by(SPerson.id)

    # Warm after person 4 exists, so that only the s18_address write changes the result.
    with PgSession() as session:
        session.add(SPerson(id=4, name="person 4"))
        session.commit()

    def address_only():
        with PgSession() as session:
            session.execute(text("INSERT INTO s18_address (id, person_id, street) VALUES (7, 4, '7 Main St')"))
            session.commit()

    served, truth = stale_after(PgSession, pg, region, stmt, address_only)
    assert served == truth


ids_table = Table("s18_ids", MetaData(), Column("id", Integer))


@pytest.mark.parametrize(
    "fragment", ['s18_person.id IN"s18_ids"', "s18_person.id IN[s18_ids]", "s18_person.id IN`s18_ids`"]
)
def test_sqlite_in_table_without_a_space(SSession, sengine, region, fragment):
    with sengine.begin() as conn:
        ids_table.create(conn)
        conn.execute(insert(ids_table), [{"id": 1}])
    stmt = select(SPerson.id, SPerson.name).where(text(fragment)).order_by(SPerson.id)

    def write():
        with SSession() as session:
            session.execute(insert(ids_table).values(id=2))
            session.commit()

    served, truth = stale_after(SSession, sengine, region, stmt, write)
    assert served == truth


# 4. A near cache while Redis refuses the bump for memory ------------------------------------------


def test_near_cache_hears_the_versions_deleted_when_redis_is_full(db_url, engine, own_redis):
    """Redis at maxmemory (noeviction): another process's bump is refused, its versions deleted; the near cache must drop them."""
    import redis as redis_py

    from .models import Person
    from .near_server import run_script
    from .test_attack_s18_storage import WRITER

    url = f"unix://{own_redis.socket_file}"
    cache = SessionCache({"shared": {"type": "ext:redis", "url": url, "near": True}}, secret=SECRET)
    Sess = sessionmaker(engine, info=cache.session_info())
    stmt = select(Person.name).where(Person.id == 1).options(FromCache("shared"))
    try:
        with Sess() as session:
            assert session.execute(stmt).scalar_one() == "person 1"
        with counting(engine) as seen, Sess() as session:
            assert session.execute(stmt).scalar_one() == "person 1"
        assert seen == [], "a hit"
        own_redis.config_set("maxmemory-policy", "noeviction")
        own_redis.config_set("maxmemory", 1)
        with pytest.raises(redis_py.exceptions.ResponseError, match="maxmemory"):
            own_redis.set("probe", b"x")
        assert run_script(WRITER, db_url, url, "renamed while full").strip() == "committed"
        truth = uncached(engine, select(Person.name).where(Person.id == 1))
        assert truth == [("renamed while full",)]
        import time

        deadline = (
            time.monotonic() + 20
        )  # invalidation messages are asynchronous: give them time (a loaded machine, seconds)
        while True:
            with Sess() as session:
                served = session.execute(stmt).scalar_one()
            if served == "renamed while full" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert [(served,)] == truth
    finally:
        own_redis.config_set("maxmemory", 0)
        cache.close()


# 5. A routed Session given an explicit bind --------------------------------------------------------


def test_routed_session_with_an_explicit_bind_argument(tmp_path, region_options, region):
    from .test_attack_s18_invalidation import Base, seed, sqlite_engine

    engines = []
    for name in ("a", "b"):
        engine = sqlite_engine(tmp_path / f"{name}.sqlite")
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            seed(conn)
            conn.execute(text("UPDATE s18_person SET name = :n WHERE id = 1"), {"n": f"in {name}"})
        engines.append(engine)
    a, b = engines
    cache = SessionCache(region_options, default_region="memory", secret=SECRET)
    Sess = sessionmaker(binds={SPerson: a}, info=cache.session_info())
    stmt = select(SPerson.id, SPerson.name).order_by(SPerson.id)
    try:
        with Session(binds={SPerson: a}) as session:
            truth = rows(session.execute(stmt, bind_arguments={"bind": b}))
        assert truth[0] == (1, "in b")
        with Sess() as session:
            first = rows(session.execute(stmt.options(FromCache(region)), bind_arguments={"bind": b}))
        with counting(a) as seen_a, counting(b) as seen_b, Sess() as session:
            again = rows(session.execute(stmt.options(FromCache(region)), bind_arguments={"bind": b}))
        assert first == truth
        assert again == truth
        assert seen_a == seen_b == [], "a hit"
    finally:
        for engine in engines:
            engine.dispose()
