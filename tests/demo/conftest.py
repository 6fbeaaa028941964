"""Fixtures of the demo's tests: one demo app per test module, on its own SQLite file."""

from __future__ import annotations

import pytest
import sessioncache_demo as demo
import webtest
from sessioncache_demo.models import Person
from sqlalchemy import select
from sqlalchemy.orm import Session

from pyramid_sessioncache import get_session_cache, invalidate_all

from ..conftest import SQLCounter


def demo_settings(path, **extra) -> dict:
    """Settings for ``demo.main``: the ini's regions, a SQLite file at ``path``."""
    return {**demo.DEFAULT_CACHE_SETTINGS, "sqlalchemy.url": f"sqlite:///{path}", **extra}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The demo's WSGI app on a fresh, seeded SQLite file (one per test module)."""
    path = tmp_path_factory.mktemp("demo") / "demo.sqlite"
    app = demo.main({}, **demo_settings(path))
    yield app
    demo.engine_of(app.registry).dispose()


@pytest.fixture
def testapp(app):
    """A WebTest client with no cookies, and empty shared regions."""
    invalidate_all(get_session_cache(app.registry))
    return webtest.TestApp(app)


@pytest.fixture(scope="module")
def app_engine(app):
    """The engine behind the app's ``request.dbsession``."""
    return demo.engine_of(app.registry)


@pytest.fixture(scope="module")
def _module_sql(app_engine) -> SQLCounter:
    return SQLCounter(app_engine)


@pytest.fixture
def sql(_module_sql) -> SQLCounter:
    """The SQL statements the app sends during a test, counted by an engine listener."""
    _module_sql.reset()
    return _module_sql


@pytest.fixture
def name_in_db(app_engine):
    """Return the name stored for a person id, read in a Session of its own."""

    def read(person_id: int) -> str | None:
        with Session(app_engine) as session:
            return session.scalar(select(Person.name).where(Person.id == person_id))

    return read
