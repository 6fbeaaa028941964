"""Attack s24 (A): DESIGN.md's promises, black-box, through the public interface.

Each test builds what a user builds (a Pyramid application with
``config.include("pyramid_sessioncache")`` and WebTest, or the engine API
the specification names) and checks one promise of it: the per-region
counters (section 5, Observability), errors that name the problem at the
call site (section 5, Bad input), explicit invalidation with
``sessioncache.invalidation = manual`` (section 4's settings, section 3's
invalidation of tables, the console script), every query form on SQLite
and PostgreSQL in every region, and views over a written table
(section 5, Automatic invalidation).
"""

from __future__ import annotations

import pytest
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, select, text, update
from sqlalchemy.orm import sessionmaker, with_parent
from sqlalchemy.pool import StaticPool
from webtest import TestApp

from pyramid_sessioncache import (
    FromCache,
    InvalidOptionError,
    RelationshipCache,
    cached_query,
    get_engine,
    get_session_cache,
)

from .conftest import SECRET, SQLCounter
from .models import Address, Person


def person(request):
    """Person ``id`` from region ``region`` (the default region if not given)."""
    stmt = select(Person).where(Person.id == int(request.matchdict["id"]))
    return {"name": request.cached_query(stmt, region=request.params.get("region")).scalar_one().name}


def rename_then_read(request):
    """Rename person ``id``, then read it cached: nothing read in a transaction that wrote is stored."""
    request.dbsession.execute(update(Person).where(Person.id == int(request.matchdict["id"])).values(name="renamed"))
    return person(request)


def make_app(db_url: str, **settings: str):
    """The application a user writes: the add-on included, its regions from the settings."""
    with Configurator(settings={"sqlalchemy.url": db_url, **settings}) as config:
        config.include("pyramid_sessioncache")
        for name, view in (("person", person), ("rename_then_read", rename_then_read)):
            config.add_route(name, f"/{name}/{{id}}")
            config.add_view(view, route_name=name, renderer="json")
        return config.make_wsgi_app()


@pytest.fixture
def regions(request, tmp_path) -> dict:
    """Settings with one region of each type: ``local`` (ext:local_session), ``memory``, ``file`` and ``redis``."""
    return {
        "cache.regions": "local, memory, file, redis",
        "cache.local.type": "ext:local_session",
        "cache.memory.type": "memory",
        "cache.file.type": "file",
        "cache.file.data_dir": str(tmp_path / "cache"),
        "cache.redis.type": "ext:redis",
        "cache.redis.url": request.getfixturevalue("redis_url"),
        "sessioncache.secret": SECRET,
        "sessioncache.default_region": "memory",
    }


# 1. Observability: "per-region hit/miss/store/invalidate counters" ----------------------------


@pytest.mark.parametrize("region", ["local", "memory", "file", "redis"])
def test_each_region_counts_its_stores(db_url, regions, region):
    # The counters had hits, misses and invalidations, and no stores: a
    # miss that stored and one that could not store looked alike.
    app = make_app(db_url, **regions)
    web, counters = TestApp(app), get_session_cache(app.registry).stats.region(region)
    sql = SQLCounter(get_engine(app.registry))
    get_session_cache(app.registry).region(region).clear()  # Redis lives for the whole run

    web.get(f"/person/3?region={region}")  # a miss, stored
    web.get(f"/person/3?region={region}")  # a hit for shared regions; ext:local_session lives one request
    stored_once = 2 if region == "local" else 1
    assert (counters.misses, counters.stores) == (stored_once, stored_once)
    assert counters.hits == 2 - stored_once
    assert sql.count == stored_once

    web.get(f"/rename_then_read/4?region={region}")  # read after a write in its transaction
    if region == "local":  # the Session's own cache: it sees its own writes
        assert counters.stores == stored_once + 1
    else:  # never stored where another request could read it
        assert counters.stores == stored_once
    assert web.get(f"/person/4?region={region}").json == {"name": "renamed"}


def test_a_value_too_large_to_store_is_not_counted_as_stored(db_url, regions):
    app = make_app(db_url, **{**regions, "cache.memory.max_entry_bytes": "100"})
    counters = get_session_cache(app.registry).stats.region("memory")
    TestApp(app).get("/person/3?region=memory")
    assert (counters.misses, counters.stores) == (1, 0)


# 2. Bad input: "a clear exception naming the problem, raised at the call site" -------------------


@pytest.mark.parametrize("attribute", [Person.name, Address.street, "addresses", None])
def test_relationship_cache_of_something_not_a_relationship_names_it(attribute):
    # Person.name (a column) was taken silently and cached nothing; the
    # name of a relationship raised AttributeError: 'str' object has no
    # attribute 'property'.
    with pytest.raises(InvalidOptionError, match="attribute.*a relationship"):
        RelationshipCache(attribute, "memory")


@pytest.mark.parametrize("other", [FromCache("memory"), Person.addresses, None])
def test_relationship_cache_chains_relationship_caches_only(other):
    # and_(FromCache(...)) raised AttributeError: 'FromCache' object has no attribute '_relationships'.
    with pytest.raises(InvalidOptionError, match="and_\\(\\) chains RelationshipCache options only"):
        RelationshipCache(Person.addresses, "memory").and_(other)


def test_relationship_cache_of_a_relationship_still_caches_its_lazy_loads(db_url, regions):
    # RelationshipCache accepts what it accepted: a relationship attribute.
    engine = create_engine(db_url)
    app = make_app(db_url, **regions)
    Session = sessionmaker(engine, info=get_session_cache(app.registry).session_info())
    option = RelationshipCache(Person.addresses, "memory").and_(RelationshipCache(Address.person, "memory"))
    sql = SQLCounter(engine)
    for _ in range(2):
        with Session() as session:
            found = session.scalars(select(Person).where(Person.id == 2).options(option)).one()
            assert [address.street for address in found.addresses] == ["2 Main St", "2 High St"]
    assert sql.count == 3  # the two people, one lazy load: the second one a hit
    engine.dispose()


# 3. sessioncache.invalidation = manual: "only explicit invalidation and expire" ------------------


def mark_changed(request):
    """Rename person ``id`` by SQL the add-on is told of (``request.sessioncache.mark_changed``)."""
    request.dbsession.connection().exec_driver_sql(
        f"UPDATE person SET name = 'marked' WHERE id = {int(request.matchdict['id'])}"
    )
    request.sessioncache.mark_changed(*request.params.getall("table"))
    return {}


@pytest.mark.parametrize("region", ["memory", "file", "redis"])
@pytest.mark.parametrize("how", ["mark_changed", "mark_changed()", "SessionCache.invalidate_tables"])
def test_explicit_table_invalidation_works_with_manual_invalidation(db_url, regions, region, how):
    # With invalidation = manual, the tables named to mark_changed(),
    # invalidate_tables(session, ...) or SessionCache.invalidate_tables()
    # invalidated nothing: the entry that read them kept serving the old row.
    app = make_app(db_url, **{**regions, "sessioncache.invalidation": "manual"})
    with Configurator(registry=app.registry) as config:
        config.add_route("mark_changed", "/mark_changed/{id}")
        config.add_view(mark_changed, route_name="mark_changed", renderer="json")
    web, cache = TestApp(config.make_wsgi_app()), get_session_cache(app.registry)
    cache.region(region).clear()
    assert web.get(f"/person/5?region={region}").json == {"name": "person 5"}  # stored
    if how == "SessionCache.invalidate_tables":  # a write outside the application, then the call
        engine = create_engine(db_url)
        with engine.begin() as conn:
            conn.execute(update(Person).where(Person.id == 5).values(name="marked"))
        engine.dispose()
        cache.invalidate_tables(Person)
    else:
        web.get("/mark_changed/5", params={"table": "person"} if how == "mark_changed" else {})
    assert web.get(f"/person/5?region={region}").json == {"name": "marked"}


def test_manual_invalidation_still_ignores_writes_nobody_names(db_url, regions):
    # What manual means: a committed write alone leaves the entries as they are.
    app = make_app(db_url, **{**regions, "sessioncache.invalidation": "manual"})
    web = TestApp(app)
    get_session_cache(app.registry).region("memory").clear()
    assert web.get("/person/6?region=memory").json == {"name": "person 6"}
    web.get("/rename_then_read/6?region=memory")
    assert web.get("/person/6?region=memory").json == {"name": "person 6"}


MANUAL_INI = """
[app:main]
use = egg:sessioncache_demo
sqlalchemy.url = sqlite:///{here}/app.sqlite
cache.regions = local_session, short_term, long_term
cache.type = file
cache.data_dir = {here}/cache
cache.local_session.type = ext:local_session
sessioncache.default_region = local_session
sessioncache.invalidation = manual
sessioncache.secret = {secret}
demo.people = 30
"""


def test_sessioncache_invalidate_works_with_manual_invalidation(tmp_path, capsys):
    # The command always built its cache with automatic invalidation: it
    # bumped table versions that a manual application's entries never
    # check, printed "invalidated", and the application served the old rows.
    import sqlite3

    from pyramid.paster import get_app
    from sessioncache_demo import engine_of

    from pyramid_sessioncache.addon.scripts import invalidate

    ini = tmp_path / "app.ini"
    ini.write_text(MANUAL_INI.format(here=tmp_path, secret=SECRET))
    app = get_app(str(ini))
    web = TestApp(app)

    def first_name() -> str:
        return web.get("/people", params={"page": 1}).html.select_one("a.name").text.strip()

    before = first_name()
    with sqlite3.connect(tmp_path / "app.sqlite") as db:  # another program
        db.execute("UPDATE person SET name = 'Written Behind Its Back' WHERE id = 1")
    assert first_name() == before  # served from short_term
    assert invalidate([str(ini), "person"]) == 0
    assert "short_term: invalidated every entry" in capsys.readouterr().out
    assert first_name() == "Written Behind Its Back"
    engine_of(app.registry).dispose()


def test_sessioncache_invalidate_reports_a_backend_that_fails_with_manual_invalidation(tmp_path, capsys):
    from pyramid_sessioncache.addon.scripts import invalidate

    ini = tmp_path / "redis.ini"
    ini.write_text(
        "[app:main]\nuse = egg:sessioncache_demo\n"
        "cache.regions = shared\ncache.shared.type = ext:redis\n"
        "cache.shared.url = redis://127.0.0.1:1/0?socket_connect_timeout=0.2\n"
        f"sessioncache.invalidation = manual\nsessioncache.secret = {SECRET}\n"
    )
    assert invalidate([str(ini)]) == 1
    assert "shared: FAILED" in capsys.readouterr().err


def test_postgresql_notify_with_manual_invalidation_stops_start_up(db_url):
    # Both were accepted: the listener then heard every other client's
    # commit and invalidated nothing, silently.
    with pytest.raises(ConfigurationError, match="invalid setting sessioncache.postgresql_notify = 'true'.*manual"):
        make_app(db_url, **{"sessioncache.postgresql_notify": "true", "sessioncache.invalidation": "manual"})


# 4. FromCache in every query form, on SQLite and PostgreSQL, in every region -----------------

#: Each query form the specification names, given the caching options (none: uncached).
FORMS = {
    "Query.all": lambda s, o: [p.name for p in s.query(Person).filter(Person.id < 4).order_by(Person.id).options(*o)],
    "Query.get": lambda s, o: s.query(Person).options(*o).get(2).name,
    "Query page": lambda s, o: [p.name for p in s.query(Person).order_by(Person.id).options(*o)[1:3]],
    "Session.get": lambda s, o: s.get(Person, 2, options=o).name,
    "scalars": lambda s, o: [
        p.name for p in s.scalars(select(Person).where(Person.id < 4).order_by(Person.id).options(*o))
    ],
    "one_or_none": lambda s, o: s.execute(select(Person).where(Person.id == 2).options(*o)).scalar_one_or_none().name,
    "page": lambda s, o: [p.name for p in s.scalars(select(Person).order_by(Person.id).limit(2).offset(1).options(*o))],
    "with_parent": lambda s, o: [
        a.street
        for a in s.scalars(
            select(Address).where(with_parent(s.get(Person, 2), Person.addresses)).order_by(Address.id).options(*o)
        )
    ],
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize(
    "url_fixture, region",
    [("db_url", "local"), ("db_url", "memory"), ("db_url", "file"), ("db_url", "redis")]
    + [("pg_url", "local"), ("pg_url", "redis")],
)
def test_every_query_form_hits_then_sees_another_sessions_commit(request, regions, url_fixture, region, form):
    url = request.getfixturevalue(url_fixture)
    engine = create_engine(url)
    cache = get_session_cache(make_app(url, **regions).registry)
    cache.region(region).clear()
    Cached, Plain = sessionmaker(engine, info=cache.session_info()), sessionmaker(engine)
    read, sql = FORMS[form], SQLCounter(engine)
    with Cached() as session:
        first = read(session, [FromCache(region)])
        sql.reset()
        assert read(session, [FromCache(region)]) == first
        if form != "with_parent":  # its parent is loaded uncached
            assert sql.count == 0  # the same Session: a hit in every region
    with Plain() as session:
        session.execute(update(Person).where(Person.id.in_([2, 3])).values(name=Person.name + " renamed"))
        session.execute(update(Address).where(Address.id == 3).values(street="moved"))
        session.commit()
    with Cached() as session, Plain() as plain:
        assert read(session, [FromCache(region)]) == read(plain, [])
    engine.dispose()


# 5. "A write also invalidates what the database ... shows under another name: ... views over the table"


@pytest.mark.parametrize("region", ["memory", "file", "redis"])
@pytest.mark.parametrize("temporary", [False, True], ids=["view", "temporary view"])
def test_a_write_invalidates_what_read_a_view_over_the_table_on_sqlite(db_url, regions, region, temporary):
    # Only PostgreSQL's catalog was read: on SQLite a result read through
    # a view depended on the view's name, which no write bumps, and was
    # served stale after every write to the table under it.
    engine = create_engine(db_url, poolclass=StaticPool if temporary else None)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE {'TEMP ' if temporary else ''}VIEW named AS SELECT id, name FROM person")
    named = Table("named", MetaData(), Column("id", Integer, primary_key=True), Column("name", String))
    cache = get_session_cache(make_app(db_url, **regions).registry)
    cache.region(region).clear()
    Cached, Plain = sessionmaker(engine, info=cache.session_info()), sessionmaker(engine)
    statements = {
        "a view as a Table": select(named.c.name).where(named.c.id == 7),
        "a view in SQL text": text("SELECT name FROM named WHERE id = 7"),
    }
    for stmt in statements.values():
        with Cached() as session:
            assert cached_query(session, stmt, region).scalar() == "person 7"
    with Plain() as session:
        session.execute(update(Person).where(Person.id == 7).values(name="renamed"))
        session.commit()
    for stmt in statements.values():
        with Cached() as session:
            assert cached_query(session, stmt, region).scalar() == "renamed"
    engine.dispose()
