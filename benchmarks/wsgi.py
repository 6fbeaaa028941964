"""Whole requests through a Pyramid application that includes the add-on.

The application (:func:`make_app`) includes ``pyramid_sessioncache`` with a
``local`` (``ext:local_session``) and a ``memory`` region, on the
benchmark's SQLite database; each request is a ``webob.Request.blank`` sent
straight to the WSGI application (no network, no server), through the
router, pyramid_tm and the add-on's ``request.dbsession``.

Rows (:data:`ROWS`): a view that touches no database; the point lookup,
uncached and from ``memory``, beside the same ``memory`` hit on a new
plain Session of the application's factory (no request: what a request
adds to a hit); the page of 50 people
with their addresses, rendered as text, uncached, from ``local_session`` and
from ``memory`` (and that hit on a plain Session); and the same with the page loaded twice in the request (as
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
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pyramid.config import Configurator
from pyramid.response import Response
from sqlalchemy import event
from sqlalchemy.engine import Engine

from pyramid_sessioncache import cached_query
from pyramid_sessioncache.addon.interfaces import IDBSessionFactory

from . import model
from .timing import SLICE_S, Budget, Timing, measure_many
from .wsgi_overhead import VIEWS, render_people, request

#: Rows whose "path" starts with this are no request: the same hit on a new
#: plain Session of the application's factory (``cached_query(session, ...)``),
#: made and closed per call, to compare a request's hit with.
PLAIN = "plain Session: "

#: (path, label)
ROWS = (
    ("/nodb", "no database"),
    ("/point/uncached/1", "point lookup, uncached"),
    ("/point/memory/1", "point lookup, memory region (a hit)"),
    (PLAIN + "point", "  the same hit, plain Session"),
    ("/page/uncached/1", "page of 50, uncached"),
    ("/page/local/1", "page of 50, local_session (a miss)"),
    ("/page/memory/1", "page of 50, memory region (a hit)"),
    (PLAIN + "page", "  the same hit, plain Session"),
    ("/page/uncached/2", "page of 50 twice, uncached"),
    ("/page/local/2", "page of 50 twice, local_session"),
    ("/page/memory/2", "page of 50 twice, memory region"),
)


def render(people, query: str) -> Response:
    """The page of 50 with each person's addresses; the point lookup's person alone (no lazy load)."""
    if query == "page":
        return render_people(people)
    return Response("\n".join(f"{person.name} <{person.email}>" for person in people), content_type="text/plain")


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
            query = model.point if request.matchdict["query"] == "point" else model.page
            for _ in range(int(request.matchdict["times"])):
                stmt = query(sizes)
                if how == "uncached":
                    result = request.dbsession.execute(stmt)
                else:
                    result = request.cached_query(stmt, region=how)
                people = result.scalars().all()
            return render(people, request.matchdict["query"])

        config.add_route("nodb", "/nodb")
        config.add_view(nodb, route_name="nodb")
        config.add_route("page", "/{query:point|page}/{how}/{times}")
        config.add_view(page, route_name="page")
        return config.make_wsgi_app()


def run(url: str, sizes: model.Sizes, budget: Budget) -> dict[str, tuple[Timing, float]]:
    """Time every row, interleaved; return path -> (timing, SQL statements per request)."""
    app = make_app(url, sizes)
    factory = app.registry.getUtility(IDBSessionFactory)
    statements = [0]

    def plain(query):
        with factory() as session:
            people = cached_query(session, query(sizes), region="memory").scalars().all()
            render(people, "point" if query is model.point else "page")

    def call(path: str):
        if path.startswith(PLAIN):
            query = model.point if path == PLAIN + "point" else model.page
            return lambda: plain(query)
        return lambda: request(app, path)

    def count(*args) -> None:
        statements[0] += 1

    # The add-on builds its engine from sqlalchemy.url: count on every engine.
    event.listen(Engine, "before_cursor_execute", count)
    try:
        timings = measure_many({path: call(path) for path, _label in ROWS}, budget)
        results = {}
        for path, _label in ROWS:
            statements[0] = 0
            checks = 3
            for _ in range(checks):
                call(path)()
            results[path] = (timings[path], statements[0] / checks)
        return results
    finally:
        event.remove(Engine, "before_cursor_execute", count)


#: The processes of one group: the application without the add-on, a twin of
#: it (the control: its "overhead" shows how precise the figure is), and the
#: application with the add-on.
SIDES = ("without", "control", "with")


@dataclass
class Overhead:
    """One view, without and with the add-on: every call's time, and the paired estimates."""

    without: Timing
    with_: Timing
    #: The add-on's overhead, in percent: the median, over every round, of
    #: (median of the round's "with" slice) / (median of its "without" slice), minus 1.
    percent: float
    #: The same for the control process against "without": what two identical
    #: processes differ by on this machine now (ideally 0).
    control_percent: float


def overhead(url: str, sizes: model.Sizes, budget: Budget, groups: int = 1) -> dict[str, Overhead]:
    """Time the views of ``wsgi_overhead.py`` without and with the add-on, interleaved.

    ``groups`` times over, three new child processes (:data:`SIDES`) serve
    side by side, all with ``PYTHONHASHSEED=0``; as in
    :func:`~benchmarks.timing.measure_many`, each (view, side) in turn gets
    a slice of :data:`~benchmarks.timing.SLICE_S`, the order rotating, until
    each has had ``budget.measure_s / groups``.  Several groups of
    processes average out what makes one process faster than its twin
    (memory layout); the fixed hash seed removes another such cause.

    The overhead is estimated from slices run a few milliseconds apart, in
    the same round: their ratio is little affected by what else the
    machine does, which on a shared machine shifts whole seconds' worth of
    calls; the estimate is the median of those ratios.
    """
    runs = [_overhead_group(url, sizes, budget, groups) for _ in range(groups)]
    out = {}
    for view in VIEWS:
        timings = {side: Timing(tuple(t for samples, _rounds in runs for t in samples[(view, side)])) for side in SIDES}

        def paired(side: str, view: str = view) -> float:
            ratios = [
                statistics.median(slices[(view, side)]) / statistics.median(slices[(view, "without")])
                for _samples, rounds in runs
                for slices in rounds
            ]
            return (statistics.median(ratios) - 1) * 100

        out[view] = Overhead(timings["without"], timings["with"], paired("with"), paired("control"))
    return out


def _overhead_group(url: str, sizes: model.Sizes, budget: Budget, groups: int):
    """One group of processes: (samples by (view, side), [slices by (view, side), per round])."""
    script = Path(__file__).with_name("wsgi_overhead.py")
    environment = {**os.environ, "PYTHONHASHSEED": "0"}
    with contextlib.ExitStack() as stack:
        children = {}
        for side in SIDES:
            command = [sys.executable, str(script), url, "--people", str(sizes.people), "--serve"]
            command += ["--include"] * (side == "with")
            errors = stack.enter_context(tempfile.TemporaryFile("w+"))
            child = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True, env=environment
            )
            stack.callback(_stop, child)
            children[side] = (child, errors, command)
        for child, errors, command in children.values():
            _answer(child, errors, command)  # "ready"

        def ask(view: str, side: str, seconds: float) -> list[int]:
            child, errors, _command = children[side]
            child.stdin.write(f"{view} {seconds}\n")
            child.stdin.flush()
            return json.loads(_answer(child, errors, view))

        keys = [(view, side) for view in VIEWS for side in SIDES]
        for view, side in keys:
            ask(view, side, budget.warmup_s)
        samples: dict[tuple[str, str], list[int]] = {key: [] for key in keys}
        rounds: list[dict[tuple[str, str], list[int]]] = []
        spent = dict.fromkeys(keys, 0)
        wanted = int(budget.measure_s / groups * 1e9)
        while any(spent[key] < wanted or len(samples[key]) < budget.min_calls for key in keys):
            shift = len(rounds) % len(keys)
            slices = {}
            for key in keys[shift:] + keys[:shift]:
                start = time.perf_counter_ns()
                slices[key] = ask(*key, SLICE_S)
                spent[key] += time.perf_counter_ns() - start
                samples[key] += slices[key]
            rounds.append(slices)
        return samples, rounds


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
