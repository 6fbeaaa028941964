"""Figures at scale: big pages, a big memory region, and a read/write mix.

Run by ``run.py`` on the benchmark's SQLite database (``model.create``):

- :func:`pages`: a ``memory`` hit on a new Session for pages of 10, 100
  and 1000 people (no relationships loaded), beside the floor (building
  the statement and its cache key): what a hit costs per object it
  builds.  Limited by building ORM objects: each hit makes every object
  afresh in the new Session, as a request would.
- :func:`big_region`: the same point lookup hit in a ``memory`` region
  holding 100 entries, then 100,000 (each a point lookup of one person,
  under its own ``cache_key``); and the memory each entry takes (key,
  value and the region's bookkeeping, measured with ``tracemalloc``).
  Limited by how the region is filled: the value of one stored point
  lookup, put under the keys the add-on computes (100,000 misses would
  take minutes), and shared beyond the first entries whose memory is
  measured; so every entry is the same size.
- :func:`mix`: a seeded sequence of requests through a Pyramid application
  (``sessioncache.invalidation = auto``): 95% reads, half of them a point
  lookup of one of the people, half one of 20 pages of 50 with their
  addresses; 5% writes, renaming one person.  Run once through the
  ``memory`` region and once uncached; the hit ratio and the mean request
  time.  Limited by invalidation: a write makes every cached read of the
  ``person`` table stale (versions are per table), so the hit ratio is
  bounded by how many reads fall between two writes.
"""

from __future__ import annotations

import gc
import itertools
import pickle
import random
import time
import tracemalloc
from dataclasses import dataclass

from pyramid.config import Configurator
from pyramid.response import Response
from sqlalchemy import create_engine, select
from sqlalchemy.orm import selectinload, sessionmaker
from webob import Request

from pyramid_sessioncache import SessionCache, cached_query
from pyramid_sessioncache.addon.interfaces import ISessionCache

from . import model
from .timing import Budget, Timing, measure_many
from .wsgi_overhead import render_people

PAGE_SIZES = (10, 100, 1000)
REGION_SIZES = (100, 100_000)
QUICK_REGION_SIZES = (10, 200)
#: Entries of their own (an unpickled copy each) whose memory is measured; the rest share one value.
MEASURED_ENTRIES = 2000
MIX_REQUESTS = 4000
QUICK_MIX_REQUESTS = 60
MIX_PAGES = 20
SECRET = "benchmark secret, not for production"


def _people(limit: int):
    return select(model.Person).order_by(model.Person.id).limit(limit)


def pages(url: str, sizes: model.Sizes, budget: Budget) -> dict[int, tuple[Timing, Timing]]:
    """Return page size -> (memory hit on a new Session, floor), for :data:`PAGE_SIZES` (at most ``sizes.people``)."""
    engine = create_engine(url)
    try:
        cache = SessionCache({"memory": {"type": "memory"}}, secret=SECRET)
        factory = sessionmaker(bind=engine, info=cache.session_info())
        calls = {}
        counts = sorted({min(n, sizes.people) for n in PAGE_SIZES})
        for n in counts:

            def hit(n: int = n) -> None:
                with factory() as session:
                    cached_query(session, _people(n), region="memory").scalars().all()

            def floor(n: int = n) -> None:
                _people(n)._generate_cache_key()

            hit()  # the miss that stores the entry
            calls[f"hit {n}"] = hit
            calls[f"floor {n}"] = floor
        timings = measure_many(calls, budget)
        return {n: (timings[f"hit {n}"], timings[f"floor {n}"]) for n in counts}
    finally:
        engine.dispose()


@dataclass
class RegionFigures:
    """The point lookup hit with ``entries`` entries in the region, and the memory per entry."""

    entries: int
    hit: Timing
    bytes_per_entry: float


def big_region(url: str, sizes: model.Sizes, budget: Budget, quick: bool = False) -> list[RegionFigures]:
    """Time one hit in a ``memory`` region filled to each of :data:`REGION_SIZES` entries.

    The region is filled under the keys the add-on computes for one
    ``cache_key`` per entry, with the value one point lookup stored: the
    first :data:`MEASURED_ENTRIES` each get a copy of their own (unpickled),
    and the memory per entry is what ``tracemalloc`` sees allocated and
    still held after storing them, divided by their number; the rest share
    one copy (unpickling 100,000 copies would take a minute), which makes
    the region's dictionary as big without the memory.
    """
    engine = create_engine(url)
    try:
        out = []
        statement = select(model.Person).where(model.Person.id == sizes.people // 2 + 1)
        options = statement.get_execution_options()
        for entries in QUICK_REGION_SIZES if quick else REGION_SIZES:
            cache = SessionCache({"memory": {"type": "memory", "max_items": entries + 10}}, secret=SECRET)
            factory = sessionmaker(bind=engine, info=cache.session_info())
            region = cache.region("memory")
            with factory() as session:
                cached_query(session, statement, region="memory", cache_key="entry 0").scalar_one()
            stored = pickle.dumps(region.get(cache.key(statement, None, options, engine, "entry 0").text))
            measured = min(entries - 1, MEASURED_ENTRIES)
            gc.collect()
            tracemalloc.start()
            try:
                for i in range(1, measured + 1):
                    region.put(cache.key(statement, None, options, engine, f"entry {i}").text, pickle.loads(stored))
                gc.collect()
                held, _peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            shared = pickle.loads(stored)
            for i in range(measured + 1, entries):
                region.put(cache.key(statement, None, options, engine, f"entry {i}").text, shared)

            def hit(entries: int = entries, factory=factory) -> None:
                with factory() as session:
                    cached_query(session, statement, region="memory", cache_key=f"entry {entries // 2}").scalar_one()

            timing = measure_many({"hit": hit}, budget)["hit"]
            out.append(RegionFigures(entries, timing, held / measured))
        return out
    finally:
        engine.dispose()


@dataclass
class MixFigures:
    """One run of the read/write mix."""

    requests: int
    mean_us: float
    hits: int
    misses: int

    @property
    def hit_ratio(self) -> float | None:
        looked_up = self.hits + self.misses
        return self.hits / looked_up if looked_up else None


def _mix_app(url: str, sizes: model.Sizes):
    settings = {
        "sqlalchemy.url": url,
        "cache.regions": "memory",
        "cache.memory.type": "memory",
        "cache.memory.max_items": "100000",
        "sessioncache.default_region": "memory",
        "sessioncache.invalidation": "auto",
    }
    with Configurator(settings=settings) as config:
        config.include("pyramid_sessioncache")

        def run(request, statement):
            if request.matchdict["how"] == "cached":
                return request.cached_query(statement)
            return request.dbsession.execute(statement)

        def point(request):
            number = int(request.matchdict["n"])
            statement = select(model.Person).where(model.Person.name == model.person_name(number))
            person = run(request, statement).scalar_one()
            return Response(f"{person.name} <{person.email}>", content_type="text/plain")

        def page(request):
            offset = int(request.matchdict["n"]) * model.PAGE_SIZE % max(1, sizes.people)
            statement = (
                select(model.Person)
                .order_by(model.Person.id)
                .limit(model.PAGE_SIZE)
                .offset(offset)
                .options(selectinload(model.Person.addresses))
            )
            return render_people(run(request, statement).scalars().all())

        def rename(request):
            number = int(request.matchdict["n"])
            person = request.dbsession.execute(
                select(model.Person).where(model.Person.name == model.person_name(number))
            ).scalar_one()
            person.email = f"{request.params['v']}@example.org"  # the name stays: the reads keep finding them
            return Response("ok", content_type="text/plain")

        for name, view in (("point", point), ("page", page), ("rename", rename)):
            config.add_route(name, f"/{{how}}/{name}/{{n}}")
            config.add_view(view, route_name=name)
        return config.make_wsgi_app()


def mix_paths(sizes: model.Sizes, count: int, access: str = "uniform") -> list[str]:
    """The seeded sequence of request paths (``{how}`` left to fill in).

    ``access`` says how reads pick their person and page: ``uniform``, or
    ``skewed`` (Zipf, s = 1: the n-th most read is read 1/n as often as the
    first, as the pages of a site tend to be).  Writes pick uniformly.
    """
    rng = random.Random(95)
    people = range(1, sizes.people + 1)
    pages = range(MIX_PAGES)
    if access == "skewed":
        person_weights = list(itertools.accumulate(1 / rank for rank in people))
        page_weights = list(itertools.accumulate(1 / (rank + 1) for rank in pages))
    else:
        person_weights = page_weights = None
    paths = []
    for i in range(count):
        draw = rng.random()
        if draw < 0.05:
            paths.append(f"/{{how}}/rename/{rng.randint(1, sizes.people)}?v={i}")
        elif draw < 0.525:
            person = rng.choices(people, cum_weights=person_weights)[0]
            paths.append(f"/{{how}}/point/{person}")
        else:
            paths.append(f"/{{how}}/page/{rng.choices(pages, cum_weights=page_weights)[0]}")
    return paths


#: How the reads of the mix pick what they read (see :func:`mix_paths`).
ACCESS = ("uniform", "skewed")


def mix(url: str, sizes: model.Sizes, quick: bool = False) -> dict[tuple[str, str], MixFigures]:
    """Run the read/write mix through the cache, then uncached, for each of :data:`ACCESS`.

    Returns (access, how) -> figures.  One run after the other
    (interleaving them would double the writes each sees); each starts
    with an untimed tenth of its sequence.
    """
    app = _mix_app(url, sizes)
    stats = app.registry.getUtility(ISessionCache).stats.region("memory")
    out = {}
    for access in ACCESS:
        paths = mix_paths(sizes, QUICK_MIX_REQUESTS if quick else MIX_REQUESTS, access)
        for how in ("cached", "uncached"):
            for path in paths[: len(paths) // 10]:
                _get(app, path.format(how=how))
            hits, misses = stats.hits, stats.misses
            gc.collect()
            start = time.perf_counter_ns()
            for path in paths:
                _get(app, path.format(how=how))
            mean_us = (time.perf_counter_ns() - start) / len(paths) / 1000
            out[(access, how)] = MixFigures(len(paths), mean_us, stats.hits - hits, stats.misses - misses)
    return out


def _get(app, path: str) -> None:
    response = Request.blank(path).get_response(app)
    if response.status_code != 200:
        raise RuntimeError(f"GET {path}: {response.status}\n{response.text[:2000]}")
