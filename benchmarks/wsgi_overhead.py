"""What ``config.include('pyramid_sessioncache')`` costs a view that caches nothing.

Run by ``run.py``: one process without the add-on, a twin of it (a
control, to show how precise the comparison is) and one with the add-on,
kept running side by side while ``run.py`` asks each in turn to time a view
for a slice of 10 ms (``--serve``), hundreds of times over, so that
whatever else the machine does weighs on all alike; and that with several
groups of processes (see ``wsgi.overhead``).  By hand::

    .venv/bin/python benchmarks/wsgi_overhead.py sqlite:////tmp/bench.sqlite [--include] [--quick]

The application is built the way pyramid-cookiecutter-starter builds one:
``pyramid_tm``, a ``request.dbsession`` of its own joined to the request's
transaction with zope.sqlalchemy (``info={"request": request}``).  With
``--include`` it also includes ``pyramid_sessioncache``, which keeps that
``dbsession``.  Its views cache nothing: ``/nodb`` touches no database,
``/point`` and ``/page`` run the benchmark's point lookup and page of 50,
uncached.  The database must hold the benchmark's data (``model.create``).

Without ``--include`` the process never imports ``pyramid_sessioncache``,
whose Session listeners would otherwise be installed (they are process-wide)
and timed on both sides.  Each request is a ``webob.Request.blank`` sent
straight to the WSGI application, no network.  By hand, it prints one JSON
object: view -> {"median_us", "p90_us", "calls"}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zope.sqlalchemy  # noqa: E402
from pyramid.config import Configurator  # noqa: E402
from pyramid.response import Response  # noqa: E402
from sqlalchemy import engine_from_config  # noqa: E402
from sqlalchemy.orm import sessionmaker  # noqa: E402
from webob import Request  # noqa: E402

from benchmarks import model  # noqa: E402
from benchmarks.timing import QUICK, Budget, measure, time_slice  # noqa: E402

VIEWS = ("nodb", "point", "page")


def render_people(people) -> Response:
    """The body every page view returns: each person and their addresses, as text."""
    lines = [
        f"{person.name} <{person.email}>: "
        + "; ".join(f"{a.street}, {a.postal_code} {a.city}" for a in person.addresses)
        for person in people
    ]
    return Response("\n".join(lines), content_type="text/plain")


def make_app(url: str, sizes: model.Sizes, include: bool):
    """The cookiecutter-style application, with or without the add-on."""
    settings = {"sqlalchemy.url": url, "tm.manager_hook": "pyramid_tm.explicit_manager"}
    with Configurator(settings=settings) as config:
        config.include("pyramid_tm")
        factory = sessionmaker(bind=engine_from_config(settings, "sqlalchemy."))

        def dbsession(request):
            session = factory(info={"request": request})
            zope.sqlalchemy.register(session, transaction_manager=request.tm)
            return session

        config.add_request_method(dbsession, "dbsession", reify=True)
        if include:
            config.include("pyramid_sessioncache")

        def nodb(request):
            return Response("no database here", content_type="text/plain")

        def point(request):
            person = request.dbsession.execute(model.point(sizes)).scalar_one()
            return render_people([person])

        def page(request):
            return render_people(request.dbsession.execute(model.page(sizes)).scalars().all())

        for name, view in (("nodb", nodb), ("point", point), ("page", page)):
            config.add_route(name, f"/{name}")
            config.add_view(view, route_name=name)
        return config.make_wsgi_app()


def request(app, path: str) -> None:
    """Send one GET to ``app``; raise unless it answers 200."""
    response = Request.blank(path).get_response(app)
    if response.status_code != 200:
        raise RuntimeError(f"GET {path}: {response.status}\n{response.text[:2000]}")


def serve(app, stdin, stdout) -> None:
    """Answer ``VIEW SECONDS`` lines: time ``GET /VIEW`` for that long, print the times (ns) as JSON."""
    print("ready", file=stdout, flush=True)
    for line in stdin:
        view, seconds = line.split()
        samples = time_slice(lambda view=view: request(app, f"/{view}"), float(seconds))
        print(json.dumps(samples), file=stdout, flush=True)


def _figures(app, view: str, budget: Budget) -> dict:
    timing = measure(lambda: request(app, f"/{view}"), budget)
    return {"median_us": timing.median_us, "p90_us": timing.p90_us, "calls": timing.calls}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="a database holding the benchmark's data")
    parser.add_argument("--include", action="store_true", help="config.include('pyramid_sessioncache')")
    parser.add_argument("--quick", action="store_true", help="few repetitions")
    parser.add_argument("--people", type=int, default=model.Sizes.people)
    parser.add_argument("--serve", action="store_true", help="take orders on stdin (see serve()); used by run.py")
    args = parser.parse_args(argv)
    sizes = model.Sizes(people=args.people)
    app = make_app(args.url, sizes, args.include)
    imported = "pyramid_sessioncache" in sys.modules
    if imported != args.include:
        raise RuntimeError(f"pyramid_sessioncache imported: {imported}, but --include is {args.include}")
    if args.serve:
        serve(app, sys.stdin, sys.stdout)
        return 0
    budget = QUICK if args.quick else Budget()
    print(json.dumps({view: _figures(app, view, budget) for view in VIEWS}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
