"""The starter project's tests with caching on: hits, invalidation, and nothing carried from test to test."""

import pytest
import transaction
import webtest
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

import pyramid_sessioncache
from pyramid_sessioncache import FromCache, NoRegionsError, get_engine
from pyramid_sessioncache.addon.interfaces import IDBSessionFactory
from pyramid_sessioncache.testing import SQLCounter, assert_lookups, lookups

from .myproject import main, models

#: Rows committed before the tests, as a migration or a seed script would.
COMMITTED = ["alpha", "beta"]


@pytest.fixture(scope="session", autouse=True)
def committed_rows(dbengine):
    with Session(dbengine) as session:
        session.add_all(models.MyModel(name=name, value=i) for i, name in enumerate(COMMITTED))
        session.commit()


def hand_over(app) -> bool:
    return app.registry.settings["myproject.hand_over_session_factory"] == "true"


def test_a_list_seen_before_costs_no_sql(testapp, sql, seen):
    assert testapp.get("/models").json == COMMITTED
    assert sql.count == 1
    sql.reset()
    assert testapp.get("/models").json == COMMITTED
    assert sql.count == 0
    assert (seen.hits, seen.misses) == (1, 1)
    assert seen.region("short_term").hits == 1


def test_lookups_of_a_request(app_request, sql):
    query = select(models.MyModel).where(models.MyModel.name == "alpha")
    first = app_request.cached_query(query, region="local_session").scalar_one()
    assert app_request.cached_query(query, region="local_session").scalar_one() is first
    assert sql.count == 1
    assert_lookups(app_request, hits=1, misses=1, region="local_session")
    assert [(lookup.region, lookup.hit) for lookup in app_request.sessioncache.lookups] == [
        ("local_session", False),
        ("local_session", True),
    ]


def test_assert_lookups_lists_what_it_saw(app_request):
    app_request.cached_query(select(models.MyModel).where(models.MyModel.name == "beta"))
    with pytest.raises(AssertionError, match=r"expected 1 hit\(s\) and 1 miss\(es\), got 0 and 1:\n  short_term: miss"):
        assert_lookups(app_request, hits=1, misses=1)
    assert lookups(app_request, region="local_session") == []


def test_the_home_page_is_cached_in_the_default_region(testapp, sql, seen):
    # No model named "one": the starter's view answers 500, and the empty
    # result is cached like any other.
    testapp.get("/", status=500)
    sql.reset()
    testapp.get("/", status=500)
    assert sql.count == 0
    assert seen.region("short_term").hits == 1


def test_a_test_that_wrote_reads_its_own_rows(testapp, dbsession, sql, seen):
    assert testapp.get("/models").json == COMMITTED
    dbsession.add(models.MyModel(name="gamma", value=3))
    dbsession.flush()
    # Uncommitted: read from the database, around the shared region, and never stored there.
    assert testapp.get("/models").json == [*COMMITTED, "gamma"]
    assert testapp.get("/models").json == [*COMMITTED, "gamma"]
    assert seen.misses == 1 and seen.hits == 0


def test_a_request_that_writes_is_seen_by_the_next(testapp, dbsession):
    assert testapp.get("/models").json == COMMITTED
    testapp.post("/models", {"name": "delta"}, status=303)  # the test's transaction: not committed
    assert testapp.get("/models").json == [*COMMITTED, "delta"]


class TestOneTestToTheNext:
    """Two tests in a row, the shared region not emptied between them."""

    @pytest.fixture(autouse=True)
    def sessioncache(self, app):  # the conftest's, without clear()
        return pyramid_sessioncache.get_session_cache(app.registry)

    added: dict = {}

    def test_a_row_added_in_a_rolled_back_transaction(self, testapp, dbsession, request):
        testapp.get("/models")  # stored before the write: committed rows only
        dbsession.add(models.MyModel(name="ghost", value=0))
        if request.node.callspec.params["dbsession"] == "savepoint":
            dbsession.commit()  # releases a savepoint: the outer transaction is rolled back at the end
        else:
            dbsession.flush()
        assert testapp.get("/models").json == [*COMMITTED, "ghost"]
        assert testapp.get("/models").json == [*COMMITTED, "ghost"]
        self.added[request.node.callspec.id] = True

    def test_is_never_served_in_the_next(self, testapp, dbengine, request):
        if not self.added.get(request.node.callspec.id):
            pytest.skip("runs after test_a_row_added_in_a_rolled_back_transaction")
        assert testapp.get("/models").json == COMMITTED
        with Session(dbengine) as session:
            assert session.scalars(select(models.MyModel.name).order_by(models.MyModel.name)).all() == COMMITTED


def test_nothing_uncommitted_is_stored_in_a_shared_region(app, dbsession, dbengine, request):
    # Without clear() between them: the ghost of one test must not be stored at all.
    dbsession.add(models.MyModel(name="ghost", value=0))
    if request.node.callspec.params["dbsession"] == "savepoint":
        dbsession.commit()
    else:
        dbsession.flush()
    environ = {"tm.active": True, "tm.manager": transaction.TransactionManager(), "app.dbsession": dbsession}
    assert webtest.TestApp(app, extra_environ=environ).get("/models").json == [*COMMITTED, "ghost"]
    cache = pyramid_sessioncache.get_session_cache(app.registry)
    with Session(dbengine) as other:  # another connection, that must not be served the ghost
        query = select(models.MyModel).order_by(models.MyModel.name).options(FromCache("short_term", cache=cache))
        assert [model.name for model in other.scalars(query)] == COMMITTED


def test_invalidation_on_a_committing_request(app, dbengine, sql, seen):
    # The application's own request.dbsession and transaction: pyramid_tm commits.
    web = webtest.TestApp(app)
    try:
        assert web.get("/models").json == COMMITTED
        assert web.get("/models").json == COMMITTED
        assert seen.hits == 1
        web.post("/models", {"name": "delta"}, status=303)
        sql.reset()
        assert web.get("/models").json == [*COMMITTED, "delta"]
        assert sql.count == 1
        assert web.get("/models").json == [*COMMITTED, "delta"]
        assert sql.count == 1
    finally:
        with Session(dbengine) as session:
            session.execute(delete(models.MyModel).where(models.MyModel.name == "delta"))
            session.commit()
    assert web.get("/models").json == COMMITTED


def test_the_add_on_uses_the_applications_engine(app, dbengine):
    if hand_over(app):
        # The factory handed over: its engine (the dbengine test hook's), one pool.
        assert get_engine(app.registry) is dbengine
        assert app.registry.getUtility(IDBSessionFactory) is app.registry["dbsession_factory"]
    else:
        # The project defines request.dbsession: the add-on builds no engine of its own.
        assert get_engine(app.registry) is None
        assert app.registry.queryUtility(IDBSessionFactory) is None


def test_sessions_of_the_factory_cache_outside_requests(app, tm, sql):
    session = models.get_tm_session(app.registry["dbsession_factory"], tm)
    query = select(models.MyModel).order_by(models.MyModel.name).options(FromCache("local_session"))
    if hand_over(app):
        assert session.scalars(query).all() == session.scalars(query).all()
        assert sql.count == 1
    else:
        # No request, nothing handed over: nothing says which application's cache to use.
        with pytest.raises(
            NoRegionsError, match="request.dbsession of an application that includes pyramid_sessioncache"
        ):
            session.scalars(query).all()


def test_a_database_error_reaches_the_projects_own_handler(app_settings, tmp_path):
    # A database without the tables: the SQLAlchemyError of the cached query
    # is the view's to handle, as it would be uncached.
    empty = models.get_engine({"sqlalchemy.url": f"sqlite:///{tmp_path / 'empty.sqlite'}"})
    try:
        app = main({}, dbengine=empty, **app_settings)
        response = webtest.TestApp(app).get("/", status=500)
        assert "Pyramid is having a problem using your SQL database" in response.text
    finally:
        empty.dispose()


def test_the_sql_counter_of_a_dummy_request_test(dummy_config, dummy_request, dbsession, dbengine):
    with SQLCounter(dbengine) as sql:
        dbsession.scalars(select(models.MyModel)).all()
    assert sql.count == 1
    assert lookups(dummy_request) == []


def test_request_sessioncache_finds_and_forgets_entries(app_request):
    query = select(models.MyModel).where(models.MyModel.name == "alpha")
    app_request.cached_query(query, region="short_term").scalar_one()
    beaker_cache, key = app_request.sessioncache.cache_parameters(query, region="short_term")
    assert beaker_cache.has_key(key)
    app_request.sessioncache.invalidate(query, region="short_term")
    assert not beaker_cache.has_key(key)
