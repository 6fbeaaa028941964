"""Building the demo: settings, first start on an empty database, the ini files."""

from __future__ import annotations

import configparser
import shutil
from pathlib import Path

import pytest
import sessioncache_demo as demo
import webtest
from pyramid.exceptions import ConfigurationError
from pyramid.paster import get_app, get_appsettings
from sessioncache_demo.models import Person
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .conftest import demo_settings

ROOT = Path(__file__).resolve().parents[2]


def people_in(app) -> int:
    with Session(demo.engine_of(app.registry)) as session:
        return session.scalar(select(func.count()).select_from(Person))


def dispose(app) -> None:
    demo.engine_of(app.registry).dispose()


def test_first_start_seeds_and_second_start_does_not(tmp_path):
    first = demo.main({}, **demo_settings(tmp_path / "demo.sqlite"))
    assert people_in(first) == 300
    form = webtest.TestApp(first).get("/people/1/edit").forms["edit-form"]
    form["name"] = "Changed"
    form.submit(status=303)
    dispose(first)
    second = demo.main({}, **demo_settings(tmp_path / "demo.sqlite"))
    assert people_in(second) == 300
    assert "Changed" in webtest.TestApp(second).get("/people").text
    dispose(second)


def test_cache_settings_default_to_the_three_regions(tmp_path):
    app = demo.main({}, **{"sqlalchemy.url": f"sqlite:///{tmp_path / 'demo.sqlite'}", "demo.people": "0"})
    page = webtest.TestApp(app).get("/")
    assert [row.td.text for row in page.html.select("main table tbody tr")] == list(demo.REGIONS)
    dispose(app)


def test_empty_database_has_one_empty_page(tmp_path):
    app = demo.main({}, **demo_settings(tmp_path / "demo.sqlite", **{"demo.people": "0"}))
    testapp = webtest.TestApp(app)
    page = testapp.get("/people")
    assert "Nobody here yet." in page.text
    assert "page 1 of 1" in page.text
    testapp.get("/people", {"page": "2"}, status=404)
    testapp.get("/people/1", status=404)
    dispose(app)


def test_missing_database_url_stops_start_up():
    with pytest.raises(ConfigurationError, match="sqlalchemy.url"):
        demo.main({})


def test_missing_region_stops_start_up(tmp_path):
    settings = demo_settings(tmp_path / "demo.sqlite", **{"cache.regions": "local_session, short_term"})
    del settings["cache.long_term.expire"]
    with pytest.raises(ConfigurationError, match="add long_term to cache.regions"):
        demo.main({}, **settings)


@pytest.mark.parametrize("value", ["-1", "many"])
def test_bad_people_setting_stops_start_up(tmp_path, value):
    with pytest.raises(ConfigurationError, match="demo.people"):
        demo.main({}, **demo_settings(tmp_path / "demo.sqlite", **{"demo.people": value}))


def test_bad_cache_setting_stops_start_up(tmp_path):
    settings = demo_settings(tmp_path / "demo.sqlite", **{"cache.short_term.expire": "soon"})
    with pytest.raises(ConfigurationError, match="cache.short_term.expire"):
        demo.main({}, **settings)


@pytest.mark.parametrize("ini", ["development.ini", "production.ini"])
def test_ini_files_serve_the_demo(tmp_path, ini):
    # A copy, so that %(here)s puts demo.sqlite in the temporary directory.
    shutil.copy(ROOT / ini, tmp_path / ini)
    settings = get_appsettings(str(tmp_path / ini))
    assert settings["sqlalchemy.url"] == f"sqlite:///{tmp_path}/demo.sqlite"
    assert settings["cache.local_session.type"] == "ext:local_session"
    app = get_app(str(tmp_path / ini))
    page = webtest.TestApp(app, extra_environ={"REMOTE_ADDR": "127.0.0.1"}).get("/people")
    assert len(page.html.select("table.people tbody tr")) == 20
    assert ("pDebugToolbarHandle" in page.text) == (ini == "development.ini")
    assert (tmp_path / "demo.sqlite").exists()
    dispose(app)


def test_ini_files_show_the_redis_variant():
    for ini in ("development.ini", "production.ini"):
        text = (ROOT / ini).read_text()
        assert "#cache.long_term.type = ext:redis" in text
        assert "#cache.long_term.url = redis://127.0.0.1:6379/0" in text


def test_production_ini_differs_from_development_ini_as_the_docs_say():
    """docs/demo.md lists the differences: the toolbar, template reloading, the interface, log levels."""

    def read(name):
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(ROOT / name)
        return {
            (section, key): value.strip() for section in parser.sections() for key, value in parser[section].items()
        }

    development, production = read("development.ini"), read("production.ini")
    differing = {key for key in development.keys() | production.keys() if development.get(key) != production.get(key)}
    assert differing == {
        ("app:main", "pyramid.includes"),
        ("app:main", "debugtoolbar.hosts"),
        ("app:main", "debugtoolbar.includes"),
        ("app:main", "pyramid.reload_templates"),
        ("server:main", "listen"),
        ("logger_root", "level"),
        ("logger_sessioncache_demo", "level"),
        ("logger_pyramid_sessioncache", "level"),
    }
    assert production[("app:main", "use")] == development[("app:main", "use")] == "egg:sessioncache_demo"
    assert production[("server:main", "listen")] == "*:6543"
    assert {production[(section, "level")] for section in ("logger_root", "logger_sessioncache_demo")} == {"WARN"}
    documented = (ROOT / "docs" / "demo.md").read_text()
    for said in ("pyramid_debugtoolbar", "pyramid.reload_templates = false", "listen = *:6543", "WARN"):
        assert said in documented
