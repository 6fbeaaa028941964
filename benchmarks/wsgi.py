"""Whole requests through a Pyramid application that includes the add-on.

The application (:func:`make_app`) includes ``pyramid_sessioncache`` with a
``local`` (``ext:local_session``) and a ``memory`` region, on the
benchmark's SQLite database; each request is a ``webob.Request.blank`` sent
straight to the WSGI application (no network, no server), through the
router, pyramid_tm and the add-on's ``request.dbsession``.

Rows (:data:`ROWS`): a view that touches no database; the page of 50 people
with their addresses, rendered as text, uncached, from ``local_session`` and
from ``memory``; and the same with the page loaded twice in the request (as
a layout and its body might), where ``local_session`` serves the second
load.  ``local_session`` lives as long as the request's Session, so loaded
once per request it is always a miss: that row shows what a miss costs.
Beside each figure: the SQL statements a request sends (the page of 50 is
two: people, then their addresses).

The add-on's overhead on views that cache nothing is measured by
``wsgi_overhead.py``, in processes of its own (see there); :func:`overhead`
runs it.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyramid.config import Configurator
from pyramid.response import Response
from sqlalchemy import event
from sqlalchemy.engine import Engine

from . import model
from .timing import SLICE_S, Budget, Timing, measure_many
from .wsgi_overhead import VIEWS, render_people, request

#: (path, label)
ROWS = (
    ("/nodb", "no database"),
    ("/page/uncached/1", "page of 50, uncached"),
    ("/page/local/1", "page of 50, local_session (a miss)"),
    ("/page/memory/1", "page of 50, memory region (a hit)"),
    ("/page/uncached/2", "page of 50 twice, uncached"),
    ("/page/local/2", "page of 50 twice, local_session"),
    ("/page/memory/2", "page of 50 twice, memory region"),
)


def make_app(url: str, sizes: model.Sizes):
    """A Pyramid application with the add-on and the views of :data:`ROWS`."""
    settings = {
        "sqlalchemy.url": url,
        "cache.regions": "local, memory",
        "cache.local.type": "ext:local_session",
        "cache.memory.type": "memory",
        "sessioncache.default_region": "local",
    }
    with Configurator(settings=settings) as config:
        config.include("pyramid_sessioncache")

        def nodb(request):
            return Response("no database here", content_type="text/plain")

        def page(request):
            how = request.matchdict["how"]
            for _ in range(int(request.matchdict["times"])):
                stmt = model.page(sizes)
                if how == "uncached":
                    result = request.dbsession.execute(stmt)
                else:
                    result = request.cached_query(stmt, region=how)
                people = result.scalars().all()
            return render_people(people)

        config.add_route("nodb", "/nodb")
        config.add_view(nodb, route_name="nodb")
        config.add_route("page", "/page/{how}/{times}")
        config.add_view(page, route_name="page")
        return config.make_wsgi_app()


def run(url: str, sizes: model.Sizes, budget: Budget) -> dict[str, tuple[Timing, float]]:
    """Time every row, interleaved; return path -> (timing, SQL statements per request)."""
    app = make_app(url, sizes)
    statements = [0]

    def count(*args) -> None:
        statements[0] += 1

    # The add-on builds its engine from sqlalchemy.url: count on every engine.
    event.listen(Engine, "before_cursor_execute", count)
    try:
        timings = measure_many({path: lambda path=path: request(app, path) for path, _label in ROWS}, budget)
        results = {}
        for path, _label in ROWS:
            statements[0] = 0
            checks = 3
            for _ in range(checks):
                request(app, path)
            results[path] = (timings[path], statements[0] / checks)
        return results
    finally:
        event.remove(Engine, "before_cursor_execute", count)


def overhead(url: str, sizes: model.Sizes, budget: Budget) -> dict[str, dict[bool, Timing]]:
    """Time the views of ``wsgi_overhead.py`` without and with the add-on, interleaved.

    Two child processes (without, with) serve side by side; as in
    :func:`~benchmarks.timing.measure_many`, each (view, side) in turn gets
    a slice of :data:`~benchmarks.timing.SLICE_S`, the order rotating, until
    each has had ``budget.measure_s``.  Returns view -> {include: timing}.
    """
    script = Path(__file__).with_name("wsgi_overhead.py")
    with contextlib.ExitStack() as stack:
        children = {}
        for include in (False, True):
            command = [sys.executable, str(script), url, "--people", str(sizes.people), "--serve"]
            command += ["--include"] * include
            errors = stack.enter_context(tempfile.TemporaryFile("w+"))
            child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True)
            stack.callback(_stop, child)
            children[include] = (child, errors)
            _answer(child, errors, command)  # "ready"

        def ask(view: str, include: bool, seconds: float) -> list[int]:
            child, errors = children[include]
            child.stdin.write(f"{view} {seconds}\n")
            child.stdin.flush()
            return json.loads(_answer(child, errors, view))

        pairs = [(view, include) for view in VIEWS for include in (False, True)]
        for view, include in pairs:
            ask(view, include, budget.warmup_s)
        samples: dict[tuple[str, bool], list[int]] = {pair: [] for pair in pairs}
        spent = dict.fromkeys(pairs, 0)
        wanted = int(budget.measure_s * 1e9)
        rounds = 0
        while any(spent[pair] < wanted or len(samples[pair]) < budget.min_calls for pair in pairs):
            shift = rounds % len(pairs)
            rounds += 1
            for pair in pairs[shift:] + pairs[:shift]:
                start = time.perf_counter_ns()
                samples[pair] += ask(*pair, SLICE_S)
                spent[pair] += time.perf_counter_ns() - start
    return {view: {include: Timing(tuple(samples[(view, include)])) for include in (False, True)} for view in VIEWS}


def _answer(child, errors, what) -> str:
    line = child.stdout.readline()
    if not line:
        child.wait(timeout=30)
        errors.seek(0)
        raise RuntimeError(f"wsgi_overhead.py stopped ({what}), exit code {child.returncode}:\n{errors.read()}")
    return line


def _stop(child) -> None:
    child.stdin.close()
    try:
        child.wait(timeout=30)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
