"""Writes by other processes: a script that bootstraps the application, and ``sessioncache-invalidate``.

The application and the script are separate OS processes sharing a SQLite
file and a ``file`` cache region, as a web server and a cron job would.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import webtest
from pyramid.paster import get_app

from .conftest import SECRET

INI = """
[app:main]
use = egg:sessioncache_demo
sqlalchemy.url = sqlite:///{here}/app.sqlite
cache.regions = local_session, short_term, long_term
cache.type = file
cache.data_dir = {here}/cache
cache.lock_dir = {here}/locks
cache.local_session.type = ext:local_session
sessioncache.default_region = local_session
sessioncache.secret = {secret}
demo.people = 30
"""

SCRIPT = """
import sys
from pyramid.paster import bootstrap
from sqlalchemy import text
from sqlalchemy.orm import sessionmaker

from pyramid_sessioncache import get_engine

env = bootstrap(sys.argv[1])
try:
    # As a cookiecutter script would: a Session of its own, no cache on it.
    with sessionmaker(bind=get_engine(env["registry"]))() as session:
        session.execute(text("UPDATE person SET name = :name WHERE id = 1"), {"name": sys.argv[2]})
        session.commit()
finally:
    env["closer"]()
"""


@pytest.fixture
def ini(tmp_path) -> Path:
    path = tmp_path / "app.ini"
    path.write_text(INI.format(here=tmp_path, secret=SECRET))
    return path


@pytest.fixture
def web(ini):
    app = get_app(str(ini))
    yield webtest.TestApp(app)
    from sessioncache_demo import engine_of

    engine_of(app.registry).dispose()


def first_name(web) -> str:
    return web.get("/people", params={"page": 1}).html.select_one("a.name").text.strip()


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def test_a_bootstrapped_script_that_writes_invalidates_the_server(web, ini):
    before = first_name(web)
    assert first_name(web) == before  # a hit now
    done = _run(sys.executable, "-c", textwrap.dedent(SCRIPT), str(ini), "Written By A Script")
    assert done.returncode == 0, done.stderr
    assert first_name(web) == "Written By A Script"


def test_sessioncache_invalidate_for_writes_nobody_saw(web, ini, tmp_path):
    before = first_name(web)
    with sqlite3.connect(tmp_path / "app.sqlite") as db:  # another program: no SQLAlchemy here
        db.execute("UPDATE person SET name = 'Written Behind Its Back' WHERE id = 1")
    assert first_name(web) == before  # nothing in this process saw it
    command = Path(sys.executable).with_name("sessioncache-invalidate")
    done = _run(str(command), str(ini), "person")
    assert done.returncode == 0, done.stderr
    assert "short_term: invalidated person" in done.stdout
    assert "long_term: invalidated person" in done.stdout
    assert "local_session: skipped" in done.stdout
    assert first_name(web) == "Written Behind Its Back"


def test_sessioncache_invalidate_reports_a_backend_that_fails(tmp_path):
    ini = tmp_path / "redis.ini"
    ini.write_text(
        "[app:main]\nuse = egg:sessioncache_demo\n"
        "cache.regions = shared\ncache.shared.type = ext:redis\n"
        "cache.shared.url = redis://127.0.0.1:1/0?socket_connect_timeout=0.2\n"
        f"sessioncache.secret = {SECRET}\n"
    )
    command = Path(sys.executable).with_name("sessioncache-invalidate")
    done = _run(str(command), str(ini))
    assert done.returncode == 1
    assert "shared: FAILED" in done.stderr
