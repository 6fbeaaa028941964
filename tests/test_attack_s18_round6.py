"""Sixth adversarial round: connection settings as part of the key, StaticPool pending writes, read_uncommitted.

Each case compares what the cache serves with the same statement run
uncached (in the same Session, right after, and/or in a fresh Session
made to run with the same settings), and counts SQL to prove hits.
Real PostgreSQL (pgserver), real SQLite, real Redis where a region is shared.
"""

from __future__ import annotations

import uuid

import pytest
from pyramid.config import Configurator
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, event, func, select, text
from sqlalchemy.orm import scoped_session, sessionmaker
from sqlalchemy.pool import NullPool, StaticPool
from webtest import TestApp

from pyramid_sessioncache import FromCache, SessionCache, cached_query

from .conftest import SECRET, SQLCounter

item = Table("item", MetaData(), Column("id", Integer, primary_key=True), Column("name", String(50)))
ITEMS = select(item.c.name).order_by(item.c.id)
CACHED = ITEMS.options(FromCache("shared"))


def _cache(redis_url=None) -> SessionCache:
    region = {"type": "ext:redis", "url": redis_url} if redis_url else {"type": "memory"}
    return SessionCache({"shared": region}, default_region="shared", secret=SECRET)


@pytest.fixture
def tenants(pg_database):
    """Schemas public, tenant_a, tenant_b, each with one ``item`` row naming it."""
    engine = create_engine(pg_database, poolclass=NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE public.item (id integer PRIMARY KEY, name varchar(50))")
        conn.exec_driver_sql("INSERT INTO public.item VALUES (1, 'of public')")
        for tenant in ("a", "b"):
            conn.exec_driver_sql(f"CREATE SCHEMA tenant_{tenant}")
            conn.exec_driver_sql(f"CREATE TABLE tenant_{tenant}.item (id integer PRIMARY KEY, name varchar(50))")
            conn.exec_driver_sql(f"INSERT INTO tenant_{tenant}.item VALUES (1, 'of {tenant}')")
        conn.exec_driver_sql(
            "CREATE FUNCTION public.use_tenant(t text) RETURNS void LANGUAGE plpgsql AS "
            "$f$ BEGIN PERFORM pg_catalog.set_config('search_path', 'tenant_' || t, true); END $f$"
        )
    engine.dispose()
    return pg_database


def _prime(session, times=3):
    """Read CACHED enough times that the shape is learnt and the entry stored; return the last read."""
    out = None
    for _ in range(times):
        out = list(session.scalars(CACHED))
    return out


def _read_cached(session, entrance: str) -> list[str]:
    if entrance == "cached_query()":
        return list(cached_query(session, ITEMS, region="shared").scalars())
    return list(session.scalars(CACHED))


def _fresh_uncached(url, *setup) -> list[str]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with sessionmaker(engine)() as session:
            conn = session.connection()
            for statement, params in setup:
                conn.execute(text(statement), params or {})
            return list(session.scalars(ITEMS))
    finally:
        engine.dispose()


# --------------------------------------------------------------------- 1. settings in the key (PostgreSQL)


UNDO = {
    "RESET search_path": "RESET search_path",
    "RESET ALL": "RESET ALL",
    "SET TO DEFAULT": "SET search_path TO DEFAULT",
    "SET public": "SET search_path TO public",
    "SET SESSION public": "SET SESSION search_path TO public",
}


@pytest.mark.parametrize("undo", list(UNDO))
def test_pg_set_then_undo_vs_undo_then_set_in_one_session(tenants, undo, entrance):
    """SET a; <undo>; read (public rows) -- then SET a again: must read tenant a's rows, not the entry of public."""
    engine = create_engine(tenants, poolclass=NullPool)
    Session = sessionmaker(engine, info=_cache().session_info())
    sql = SQLCounter(engine)
    try:
        with Session() as session:
            conn = session.connection()
            conn.exec_driver_sql("SET search_path TO tenant_a")
            conn.exec_driver_sql(UNDO[undo])
            assert _prime(session) == list(session.scalars(ITEMS)) == ["of public"]
            conn.exec_driver_sql("SET search_path TO tenant_a")
            sql.reset()
            cached = _read_cached(session, entrance)
            hit = sql.count == 0
            uncached = list(session.scalars(ITEMS))
        fresh = _fresh_uncached(tenants, ("SET search_path TO tenant_a", None))
        assert uncached == fresh == ["of a"]
        assert cached == uncached, f"cached {cached} (hit={hit}) vs uncached {uncached}"
    finally:
        engine.dispose()


@pytest.mark.parametrize("scope", ["SET", "SET LOCAL", "set_config"])
def test_pg_setting_made_in_a_savepoint_rolled_back(tenants, scope, entrance):
    """A setting made inside a savepoint that rolls back is undone by PostgreSQL: the key must not keep it."""
    engine = create_engine(tenants, poolclass=NullPool)
    Session = sessionmaker(engine, info=_cache().session_info())
    sql = SQLCounter(engine)
    b = {
        "SET": "SET search_path TO tenant_b",
        "SET LOCAL": "SET LOCAL search_path TO tenant_b",
        "set_config": "SELECT set_config('search_path', 'tenant_b', true)",
    }[scope]
    try:
        with Session() as session:
            conn = session.connection()
            conn.exec_driver_sql("SET LOCAL search_path TO tenant_a")
            nested = session.begin_nested()
            session.connection().exec_driver_sql(b)  # after the SAVEPOINT
            nested.rollback()
            assert list(session.scalars(ITEMS)) == ["of a"]  # PostgreSQL undid it
            _prime(session)
        # another request, genuinely on tenant_b
        with Session() as session:
            session.connection().exec_driver_sql(b)  # the very statement the savepoint rolled back
            sql.reset()
            cached = _read_cached(session, entrance)
            hit = sql.count == 0
            uncached = list(session.scalars(ITEMS))
        fresh = _fresh_uncached(tenants, ("SET LOCAL search_path TO tenant_b", None))
        assert uncached == fresh == ["of b"]
        assert cached == uncached, f"cached {cached} (hit={hit}) vs uncached {uncached}"
    finally:
        engine.dispose()


LOCAL_FLAG = {
    "bound bool": ("SELECT set_config('search_path', :p, :l)", {"l": True}),
    "quoted 'true'": ("SELECT set_config('search_path', :p, 'true')", {}),
    "expression": ("SELECT set_config('search_path', :p, 1 = 1)", {}),
    "nested call": ("SELECT set_config('search_path', concat('tenant_', CAST(:t AS text)), true)", {}),
}


@pytest.mark.parametrize("how", list(LOCAL_FLAG))
def test_pg_transaction_local_set_config_not_kept_on_the_pooled_connection(tenants, how):
    """set_config(..., is_local) whose is_local is not a literal `true`: next request on the same pooled connection."""
    engine = create_engine(tenants, pool_size=1, max_overflow=0)
    Session = sessionmaker(engine, info=_cache().session_info())
    sql = SQLCounter(engine)
    statement, extra = LOCAL_FLAG[how]
    params = {"p": "tenant_a", "t": "a", **extra}
    params = {k: v for k, v in params.items() if f":{k}" in statement}
    try:
        with Session() as session:
            session.connection().execute(text(statement), params)
            assert _prime(session) == ["of a"]
            session.commit()
        with Session() as session:  # the same DBAPI connection: search_path is back to public
            sql.reset()
            cached = list(session.scalars(CACHED))
            hit = not any("item" in s for s in sql.statements)
            uncached = list(session.scalars(ITEMS))
        assert uncached == _fresh_uncached(tenants) == ["of public"]
        assert cached == uncached, f"cached {cached} (hit={hit}) vs uncached {uncached}"
    finally:
        engine.dispose()


def test_pg_set_config_with_a_bound_name_two_settings_share_one_slot(tenants):
    """`SELECT set_config(:n, :v, false)` run for two names: the second must not hide the first."""
    engine = create_engine(tenants, poolclass=NullPool)
    Session = sessionmaker(engine, info=_cache().session_info())
    sql = SQLCounter(engine)
    stmt = text("SELECT set_config(:n, :v, false)")
    try:
        with Session() as session:
            conn = session.connection()
            conn.execute(stmt, {"n": "search_path", "v": "tenant_a"})
            conn.execute(stmt, {"n": "application_name", "v": "web"})
            assert _prime(session) == ["of a"]
        with Session() as session:  # a new connection: search_path public, same application_name
            session.connection().execute(stmt, {"n": "application_name", "v": "web"})
            sql.reset()
            cached = list(session.scalars(CACHED))
            hit = sql.count == 0
            uncached = list(session.scalars(ITEMS))
        assert uncached == _fresh_uncached(tenants) == ["of public"]
        assert cached == uncached, f"cached {cached} (hit={hit}) vs uncached {uncached}"
    finally:
        engine.dispose()


def test_pg_two_set_config_calls_in_one_statement_then_one_of_them_again(tenants):
    """`SELECT set_config('application_name',..), set_config('search_path',..)` then the first alone: the second is forgotten."""
    engine = create_engine(tenants, poolclass=NullPool)
    Session = sessionmaker(engine, info=_cache().session_info())
    sql = SQLCounter(engine)
    app_name = "SELECT set_config('application_name', 'web', false)"
    try:
        with Session() as session:
            conn = session.connection()
            conn.exec_driver_sql(
                "SELECT set_config('application_name', 'web', false), set_config('search_path', 'tenant_a', false)"
            )
            conn.exec_driver_sql(app_name)
            assert _prime(session) == ["of a"]
        with Session() as session:
            session.connection().exec_driver_sql(app_name)
            sql.reset()
            cached = list(session.scalars(CACHED))
            hit = sql.count == 0
            uncached = list(session.scalars(ITEMS))
        assert uncached == _fresh_uncached(tenants) == ["of public"]
        assert cached == uncached, f"cached {cached} (hit={hit}) vs uncached {uncached}"
    finally:
        engine.dispose()


def test_pg_discard_all_on_the_pooled_connection(tenants):
    """SET (session) then DISCARD ALL on the same pooled connection: the connection is back to public."""
    engine = create_engine(tenants, pool_size=1, max_overflow=0)
    Session = sessionmaker(engine, info=_cache().session_info())
    sql = SQLCounter(engine)
    try:
        with Session() as session:
            session.connection().exec_driver_sql("SET search_path TO tenant_a")
            assert _prime(session) == ["of a"]
            session.commit()
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.exec_driver_sql("DISCARD ALL")
        with Session() as session:
            sql.reset()
            cached = list(session.scalars(CACHED))
            hit = not any("item" in s for s in sql.statements)
            uncached = list(session.scalars(ITEMS))
        assert uncached == _fresh_uncached(tenants) == ["of public"]
        assert cached == uncached, f"cached {cached} (hit={hit}) vs uncached {uncached}"
    finally:
        engine.dispose()


HIDDEN = {
    "block comment": "/* tenant */ SET search_path TO tenant_b",
    "line comment": "-- tenant\nSET search_path TO tenant_b",
    "function": "SELECT public.use_tenant('b')",
    "quoted name": "SELECT \"set_config\"('search_path', 'tenant_b', true)",
    "DO block": "DO $$ BEGIN EXECUTE 'SET LOCAL search_path TO tenant_b'; END $$",
}


@pytest.mark.parametrize("how", list(HIDDEN))
def test_pg_setting_changes_the_regex_does_not_see(tenants, how):
    """A request on public stores; another sets tenant_b in a way written differently: must read b's rows."""
    engine = create_engine(tenants, poolclass=NullPool)
    Session = sessionmaker(engine, info=_cache().session_info())
    sql = SQLCounter(engine)
    try:
        with Session() as session:
            assert _prime(session) == ["of public"]
        with Session() as session:
            session.connection().exec_driver_sql(HIDDEN[how])
            sql.reset()
            cached = list(session.scalars(CACHED))
            hit = sql.count == 0
            uncached = list(session.scalars(ITEMS))
        assert uncached == _fresh_uncached(tenants, ("SET LOCAL search_path TO tenant_b", None)) == ["of b"]
        assert cached == uncached, f"cached {cached} (hit={hit}) vs uncached {uncached}"
    finally:
        engine.dispose()


def test_pg_set_role_then_reset_role(tenants):
    """SET ROLE r; RESET ROLE; read -- vs RESET ROLE; SET ROLE r; read: two roles, one key."""
    admin = create_engine(tenants, poolclass=NullPool)
    role = f"r_{uuid.uuid4().hex[:8]}"
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {role}")
        conn.exec_driver_sql(f"GRANT USAGE ON SCHEMA tenant_a TO {role}")
        conn.exec_driver_sql(f"GRANT SELECT ON tenant_a.item TO {role}")
        conn.exec_driver_sql("ALTER TABLE tenant_a.item ENABLE ROW LEVEL SECURITY")
        conn.exec_driver_sql(f"CREATE POLICY none_for_r ON tenant_a.item TO {role} USING (false)")
    admin.dispose()
    engine = create_engine(tenants, poolclass=NullPool)
    Session = sessionmaker(engine, info=_cache().session_info())
    sql = SQLCounter(engine)
    try:
        with Session() as session:
            conn = session.connection()
            conn.exec_driver_sql("SET search_path TO tenant_a")
            conn.exec_driver_sql(f"SET ROLE {role}")
            conn.exec_driver_sql("RESET ROLE")  # the owner again: sees the row
            assert _prime(session) == list(session.scalars(ITEMS)) == ["of a"]
        with Session() as session:
            conn = session.connection()
            conn.exec_driver_sql("SET search_path TO tenant_a")
            conn.exec_driver_sql("RESET ROLE")
            conn.exec_driver_sql(f"SET ROLE {role}")  # the policy hides the row
            sql.reset()
            cached = list(session.scalars(CACHED))
            hit = sql.count == 0
            uncached = list(session.scalars(ITEMS))
        assert uncached == []
        assert cached == uncached, f"cached {cached} (hit={hit}) vs uncached {uncached}"
    finally:
        engine.dispose()


def test_pg_session_authorization(tenants):
    """SET SESSION AUTHORIZATION keys its reads apart from the owner's."""
    admin = create_engine(tenants, poolclass=NullPool)
    role = f"u_{uuid.uuid4().hex[:8]}"
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
        conn.exec_driver_sql(f"GRANT SELECT ON public.item TO {role}")
        conn.exec_driver_sql("ALTER TABLE public.item ENABLE ROW LEVEL SECURITY")
        conn.exec_driver_sql(f"CREATE POLICY none_for_u ON public.item TO {role} USING (false)")
    admin.dispose()
    engine = create_engine(tenants, poolclass=NullPool)
    Session = sessionmaker(engine, info=_cache().session_info())
    sql = SQLCounter(engine)
    try:
        with Session() as session:
            assert _prime(session) == ["of public"]
        with Session() as session:
            session.connection().exec_driver_sql(f"SET SESSION AUTHORIZATION {role}")
            sql.reset()
            cached = list(session.scalars(CACHED))
            hit = sql.count <= 1
            uncached = list(session.scalars(ITEMS))
        assert uncached == []
        assert cached == uncached, f"cached {cached} (hit={hit}) vs uncached {uncached}"
    finally:
        engine.dispose()


def test_pg_session_set_carried_by_the_pool_and_rollback_of_it(tenants, redis_url):
    """Session-level SET carried by a pooled connection into the next request; keys hit per tenant (Redis)."""
    engine = create_engine(tenants, pool_size=1, max_overflow=0)
    Session = sessionmaker(engine, info=_cache(redis_url).session_info())
    sql = SQLCounter(engine)
    try:
        for tenant in ("a", "b"):
            with Session() as session:
                session.connection().exec_driver_sql(f"SET search_path TO tenant_{tenant}")
                session.commit()
            with Session() as session:  # carried by the pooled connection
                assert _prime(session) == list(session.scalars(ITEMS)) == [f"of {tenant}"]
        for tenant in ("a", "b"):
            with Session() as session:
                session.connection().exec_driver_sql(f"SET search_path TO tenant_{tenant}")
                session.commit()
            with Session() as session:
                sql.reset()
                assert list(session.scalars(CACHED)) == [f"of {tenant}"]
                assert not any("item" in s for s in sql.statements)  # a hit
    finally:
        engine.dispose()


def test_pg_scoped_session_and_session_bound_to_a_connection(tenants):
    engine = create_engine(tenants, poolclass=NullPool)
    cache = _cache()
    sql = SQLCounter(engine)
    try:
        scoped = scoped_session(sessionmaker(engine, info=cache.session_info()))
        for tenant in ("a", "b", "a"):
            scoped.connection().exec_driver_sql(f"SET LOCAL search_path TO tenant_{tenant}")
            assert _prime(scoped, 2) == list(scoped.scalars(ITEMS)) == [f"of {tenant}"]
            scoped.remove()
        with engine.connect() as conn:
            conn.exec_driver_sql("SET search_path TO tenant_b")
            with sessionmaker(conn, info=cache.session_info())() as session:
                assert _prime(session, 2) == ["of b"]
                sql.reset()
                cached = list(session.scalars(CACHED))
                hit = sql.count == 0
                uncached = list(session.scalars(ITEMS))
        assert uncached == ["of b"]
        assert cached == uncached and hit
    finally:
        engine.dispose()


def test_docs_name_checkout_listeners_and_a_remedy():
    import pathlib

    text_ = (pathlib.Path(__file__).parent.parent / "docs" / "hits.md").read_text()
    for named in ("`connect`", "`checkout`", "`begin` listener", "`after_begin` listener", "sessioncache_database"):
        assert named in text_, f"docs/hits.md does not name {named}: what is not seen, and the remedies"


def test_pg_do_orm_execute_listener_of_the_factory_sets_the_tenant(tenants):
    """SET LOCAL made by the application's do_orm_execute listener, before each SELECT."""
    engine = create_engine(tenants, poolclass=NullPool)
    current = {"t": "a"}
    factory = sessionmaker(engine, info=_cache().session_info())

    @event.listens_for(factory, "do_orm_execute")
    def _tenant(state):
        if state.is_select:
            state.session.connection().exec_driver_sql(f"SET LOCAL search_path TO tenant_{current['t']}")

    sql = SQLCounter(engine)
    try:
        with factory() as session:
            assert _prime(session) == ["of a"]
        current["t"] = "b"
        with factory() as session:
            sql.reset()
            cached = list(session.scalars(CACHED))
            hit = not any("item" in s for s in sql.statements)
            uncached = list(session.scalars(ITEMS))
        assert uncached == ["of b"]
        assert cached == uncached, f"cached {cached} (hit={hit}) vs uncached {uncached}"
    finally:
        engine.dispose()


# --------------------------------------------------------------------- 1/2. Pyramid: cached_query, after_begin, cost


def _pyramid(engine, redis_url, after_begin=None):
    settings = {
        "cache.regions": "shared",
        "cache.shared.type": "ext:redis",
        "cache.shared.url": redis_url,
        "sessioncache.secret": SECRET,
    }
    config = Configurator(settings=settings)
    config.include("pyramid_sessioncache")
    factory = sessionmaker(bind=engine)
    if after_begin is not None:
        event.listen(factory, "after_begin", after_begin)
    config.set_sessioncache_session_factory(factory)

    def view(request):
        how = request.params.get("how", "cached_query")
        if how == "cached_query":
            rows = request.cached_query(ITEMS, region="shared")
            return {"v": list(rows.scalars()) if hasattr(rows, "scalars") else [r[0] for r in rows]}
        return {"v": list(request.dbsession.scalars(CACHED))}

    config.add_route("items", "/items")
    config.add_view(view, route_name="items", renderer="json")
    app = TestApp(config.make_wsgi_app())
    app.checkouts = []
    event.listen(engine, "checkout", lambda *a: app.checkouts.append(1))
    return app


@pytest.mark.parametrize("how", ["cached_query", "FromCache"])
def test_pyramid_after_begin_listener_tenant_and_hits(tenants, redis_url, how):
    engine = create_engine(tenants, pool_size=2)
    current = {"t": "a"}

    def _tenant(session, transaction, connection):
        connection.exec_driver_sql(f"SET LOCAL search_path TO tenant_{current['t']}")

    app = _pyramid(engine, redis_url, _tenant)
    sql = SQLCounter(engine)
    try:
        for tenant in ("a", "b", "a", "b", "a", "b"):
            current["t"] = tenant
            assert app.get("/items", {"how": how}).json["v"] == [f"of {tenant}"]
        sql.reset()
        for tenant in ("a", "b"):
            current["t"] = tenant
            assert app.get("/items", {"how": how}).json["v"] == [f"of {tenant}"]
        assert not any("item" in s for s in sql.statements), sql.statements  # hits
    finally:
        engine.dispose()


@pytest.mark.parametrize("settings", [False, True])
def test_pyramid_hit_checks_out_no_connection(tenants, redis_url, settings):
    """A hit in a request with only zope.sqlalchemy's/the add-on's listeners checks out nothing; with session settings: reported."""
    engine = create_engine(tenants, pool_size=2)
    if settings:
        with engine.connect() as conn:
            conn.exec_driver_sql("SET search_path TO public")
            conn.commit()
    app = _pyramid(engine, redis_url)
    try:
        for _ in range(3):
            assert app.get("/items").json["v"] == ["of public"]
        sql = SQLCounter(engine)
        before = len(app.checkouts)
        assert app.get("/items").json["v"] == ["of public"] == _fresh_uncached(tenants)
        assert sql.count == (1 if settings else 0) or not any("item" in s for s in sql.statements)
        checkouts = len(app.checkouts) - before
        print(f"settings={settings}: checkouts on a hit = {checkouts}, statements = {sql.statements}")
        assert checkouts == (1 if settings else 0)
    finally:
        engine.dispose()


# --------------------------------------------------------------------- 3. StaticPool / SQLite


@pytest.fixture
def static_engine():
    engine = create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE item (id integer PRIMARY KEY, name varchar(50))")
        conn.exec_driver_sql("INSERT INTO item VALUES (1, 'one')")
    yield engine
    engine.dispose()


@pytest.mark.parametrize("end", ["commit", "rollback"])
def test_staticpool_pending_then_resumes(static_engine, end):
    """Readers on the one shared DBAPI connection see a writer's uncommitted row: never stored; then hits resume."""
    cache = _cache()
    Session = sessionmaker(static_engine, info=cache.session_info())
    sql = SQLCounter(static_engine)
    writer = Session()
    writer.execute(item.insert().values(id=2, name="uncommitted"))
    readers = []
    for _ in range(3):  # not closed yet: closing one rolls back the shared DBAPI connection
        reader = Session()
        readers.append(reader)
        assert list(reader.scalars(CACHED)) == list(reader.scalars(ITEMS)) == ["one", "uncommitted"]
    getattr(writer, end)()
    writer.close()
    for reader in readers:
        reader.close()
    expected = ["one", "uncommitted"] if end == "commit" else ["one"]
    with Session() as fresh:
        assert list(fresh.scalars(ITEMS)) == expected
    with Session() as reader:
        assert list(reader.scalars(CACHED)) == expected  # nothing uncommitted was stored
    for _ in range(2):
        with Session() as reader:
            reader.scalars(CACHED).all()
    sql.reset()
    with Session() as reader:
        assert list(reader.scalars(CACHED)) == expected
    assert sql.count == 0, f"caching did not resume after {end}: {sql.statements}"


def test_staticpool_writer_begins_after_reader(static_engine):
    """The reader's transaction is open first; a writer's uncommitted row arrives; reader reads cached."""
    cache = _cache()
    Session = sessionmaker(static_engine, info=cache.session_info())
    reader = Session()
    reader.execute(select(1))  # begins
    writer = Session()
    writer.execute(item.insert().values(id=3, name="dirty"))
    for _ in range(3):
        reader.scalars(CACHED).all()
    writer.rollback()
    reader.close()
    writer.close()
    with Session() as session:
        assert list(session.scalars(CACHED)) == list(session.scalars(ITEMS)) == ["one"]


# --------------------------------------------------------------------- 4. SQLite shared cache, read_uncommitted


def _shared_cache_engines(tmp_path):
    url = f"sqlite:///file:{tmp_path}/sc.db?cache=shared&uri=true"
    keeper = create_engine(url, poolclass=NullPool)
    with keeper.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE item (id integer PRIMARY KEY, name varchar(50))")
        conn.exec_driver_sql("INSERT INTO item VALUES (1, 'one')")
    return url


def test_sqlite_read_uncommitted_resumes_for_connections_without_the_pragma(tmp_path):
    url = _shared_cache_engines(tmp_path)
    dirty = create_engine(url, poolclass=NullPool)

    @event.listens_for(dirty, "connect")
    def _pragma(dbapi, record):
        dbapi.execute("PRAGMA read_uncommitted = 1")

    clean = create_engine(url, poolclass=NullPool)
    cache = _cache()
    sql = SQLCounter(clean)
    try:
        for _ in range(2):
            with sessionmaker(dirty, info=cache.session_info())() as s:
                s.scalars(CACHED).all()
        for _ in range(3):
            with sessionmaker(clean, info=cache.session_info())() as s:
                assert list(s.scalars(CACHED)) == ["one"]
        sql.reset()
        with sessionmaker(clean, info=cache.session_info())() as s:
            assert list(s.scalars(CACHED)) == list(sessionmaker(clean)().scalars(ITEMS)) == ["one"]
        assert sql.count == 1, sql.statements  # the uncached comparison only
    finally:
        dirty.dispose()
        clean.dispose()


def test_sqlite_pragma_read_uncommitted_turned_on_mid_transaction(tmp_path):
    """The answer is remembered per transaction: turned on after a first look, a dirty row is stored."""
    url = _shared_cache_engines(tmp_path)
    reader = create_engine(url, poolclass=StaticPool)
    writer = create_engine(url, poolclass=NullPool)
    cache = _cache()
    try:
        wconn = writer.connect()
        wtx = wconn.begin()
        with sessionmaker(reader, info=cache.session_info())() as s:
            s.scalars(select(func.count()).select_from(item).options(FromCache("shared"))).all()
            wconn.execute(item.insert().values(id=2, name="dirty"))
            s.connection().exec_driver_sql("PRAGMA read_uncommitted = 1")
            for _ in range(3):
                s.scalars(CACHED).all()
        wtx.rollback()
        wconn.close()
        with sessionmaker(reader)() as s:
            s.connection().exec_driver_sql("PRAGMA read_uncommitted = 0")
        check = create_engine(url, poolclass=NullPool)
        sql = SQLCounter(check)
        with sessionmaker(check, info=cache.session_info())() as s:
            cached = list(s.scalars(CACHED))
        with sessionmaker(check)() as s:
            uncached = list(s.scalars(ITEMS))
        check.dispose()
        assert uncached == ["one"]
        assert cached == uncached, f"cached {cached} (statements {sql.statements}) vs uncached {uncached}"
    finally:
        reader.dispose()
        writer.dispose()
