"""pyramid-cookiecutter-starter's ``tests/conftest.py``, with the fixtures pyramid_sessioncache's README adds.

The starter's own fixtures are kept as it generates them, except that
the database is a file of the test run's (not ``testing.sqlite`` beside
the ini) and its tables come from ``Base.metadata`` (the starter's own
alternative to its alembic migrations).  Each test runs with the two
rolled-back-transaction recipes (``dbsession``'s parameter): the
starter's (a doomed ``transaction`` manager) and SQLAlchemy's (an outer
``connection.begin()``, the Session in savepoints), and on the project
as the starter generates it plus ``config.include("pyramid_sessioncache")``
(``unchanged``) and with its session factory handed over (``hand-over``).
"""

import os

import pytest
import transaction
import webtest
from pyramid.paster import get_appsettings
from pyramid.scripting import prepare
from pyramid.testing import DummyRequest, testConfig
from sqlalchemy import event

from pyramid_sessioncache import get_session_cache
from pyramid_sessioncache.testing import LookupCounter, SQLCounter, clear

from .myproject import main, models
from .myproject.models.meta import Base

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="session")
def ini_file():
    return os.path.join(HERE, "testing.ini")


@pytest.fixture(scope="session")
def app_settings(ini_file, tmp_path_factory):
    settings = get_appsettings(ini_file)
    settings["sqlalchemy.url"] = f"sqlite:///{tmp_path_factory.mktemp('starter') / 'testing.sqlite'}"
    return settings


@pytest.fixture(scope="session")
def dbengine(app_settings, ini_file):
    engine = models.get_engine(app_settings)
    use_savepoints_on_sqlite(engine)

    Base.metadata.drop_all(bind=engine)
    Base.metadata.create_all(bind=engine)

    yield engine

    Base.metadata.drop_all(bind=engine)
    engine.dispose()


def use_savepoints_on_sqlite(engine):
    """Let pysqlite run SAVEPOINTs inside a real transaction (SQLAlchemy's recipe).

    Without it, pysqlite begins no transaction before the first write, so
    the release of the first SAVEPOINT commits, and SQLAlchemy's
    rolled-back-transaction recipe (``dbsession``'s ``savepoint``) would
    commit what a test writes.
    """

    @event.listens_for(engine, "connect")
    def do_connect(dbapi_connection, connection_record):
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def do_begin(conn):
        conn.exec_driver_sql("BEGIN")


@pytest.fixture(scope="session", params=["hand-over", "unchanged"])
def app(request, app_settings, dbengine):
    hand_over = "true" if request.param == "hand-over" else "false"
    return main({}, dbengine=dbengine, **app_settings, **{"myproject.hand_over_session_factory": hand_over})


@pytest.fixture
def tm():
    tm = transaction.TransactionManager(explicit=True)
    tm.begin()
    tm.doom()

    yield tm

    tm.abort()


@pytest.fixture(params=["starter", "savepoint"])
def dbsession(request, app, tm, dbengine):
    session_factory = app.registry["dbsession_factory"]
    if request.param == "starter":
        # The starter's: joined to the doomed transaction manager.
        yield models.get_tm_session(session_factory, tm)
        return
    # SQLAlchemy's "joining a Session into an external transaction": the
    # test may call dbsession.commit(), which releases a savepoint.
    connection = dbengine.connect()
    outer = connection.begin()
    session = session_factory(bind=connection, join_transaction_mode="create_savepoint", info={"request": None})
    yield session
    session.close()
    outer.rollback()
    connection.close()


@pytest.fixture
def testapp(app, tm, dbsession):
    # override request.dbsession and request.tm with our own
    # externally-controlled values that are shared across requests but aborted
    # at the end
    testapp = webtest.TestApp(
        app,
        extra_environ={
            "HTTP_HOST": "example.com",
            "tm.active": True,
            "tm.manager": tm,
            "app.dbsession": dbsession,
        },
    )

    return testapp


@pytest.fixture
def app_request(app, tm, dbsession):
    """
    A real request.

    This request is almost identical to a real request but it has some
    drawbacks in tests as it's harder to mock data and is heavier.

    """
    with prepare(registry=app.registry) as env:
        request = env["request"]
        request.host = "example.com"

        # without this, request.dbsession will be joined to the same transaction
        # manager but it will be using a different sqlalchemy.orm.Session using
        # a separate database transaction
        request.dbsession = dbsession
        request.tm = tm

        yield request


@pytest.fixture
def dummy_request(tm, dbsession):
    """
    A lightweight dummy request.

    This request is ultra-lightweight and should be used only when the request
    itself is not a large focus in the call-stack.  It is much easier to mock
    and control side-effects using this object, however:

    - It does not have request extensions applied.
    - Threadlocals are not properly pushed.

    """
    request = DummyRequest()
    request.host = "example.com"
    request.dbsession = dbsession
    request.tm = tm

    return request


@pytest.fixture
def dummy_config(dummy_request):
    """
    A dummy :class:`pyramid.config.Configurator` object.  This allows for
    mock configuration, including configuration for ``dummy_request``, as well
    as pushing the appropriate threadlocals.

    """
    with testConfig(request=dummy_request) as config:
        yield config


# What pyramid_sessioncache's README ("Testing your app") adds ----------------


@pytest.fixture(autouse=True)
def sessioncache(app):
    """The application's cache, its shared regions emptied before each test."""
    cache = get_session_cache(app.registry)
    clear(cache)
    return cache


@pytest.fixture
def sql(dbengine):
    """The SQL statements sent during the test."""
    with SQLCounter(dbengine) as counter:
        yield counter


@pytest.fixture
def seen(sessioncache):
    """The cache's hits and misses during the test, in any request."""
    with LookupCounter(sessioncache) as counter:
        yield counter
