"""Where a cache hit spends its time: the add-on's hit path under a profiler.

Usage::

    .venv/bin/python benchmarks/profile_hits.py [--quick] [--calls N] [--pyinstrument]

Profiles two cases of ``run.py``'s query table, on a temporary SQLite file
with the same data:

- ``new``: new session, page of 50 with addresses, ``memory`` region (a new
  Session per call, as a new request has; the objects are built from the
  cached rows);
- ``same``: same session, page of 50 with addresses, ``ext:local_session``
  (the objects are those of the Session).

For each it prints, from ``cProfile`` (standard library), the self time per
call by package (``pyramid_sessioncache``, ``sqlalchemy``, ``beaker``, the
rest), the functions with the most self time, and the add-on's functions by
cumulative time.  The profiler slows every Python call down, so figures are
larger than in ``run.py``; compare them with each other.  With
``--pyinstrument`` (``pip install pyinstrument``, not a dependency of this
project) it prints pyinstrument's call tree instead.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/profile_hits.py` from anywhere

from sqlalchemy import create_engine  # noqa: E402
from sqlalchemy.orm import sessionmaker  # noqa: E402

from benchmarks import model, servers  # noqa: E402
from pyramid_sessioncache import FromCache, SessionCache  # noqa: E402

PACKAGES = ("pyramid_sessioncache", "sqlalchemy", "beaker")


def cases(factory, sizes: model.Sizes):
    """(name, title, call, close) for each profiled case; the cache is filled and warm."""

    def new_session():
        with factory() as session:
            model.fetch_page(session, model.page(sizes, (FromCache("memory"),)))

    session = factory()
    held = model.fetch_page(session, model.page(sizes, (FromCache("local"),)))

    def same_session():
        model.fetch_page(session, model.page(sizes, (FromCache("local"),)))

    new_session()
    for _ in range(50):  # warm SQLAlchemy's and the add-on's memos
        new_session()
        same_session()
    return [
        ("new", "new session, page of 50, memory region", new_session, lambda: None),
        ("same", "same session, page of 50, local_session", same_session, lambda: (held, session.close())),
    ]


def package_of(filename: str) -> str:
    for package in PACKAGES:
        if f"/{package}/" in filename:
            return package
    return "other"


def where(func: tuple) -> str:
    filename, line, name = func
    if filename == "~":
        return name
    for package in PACKAGES:
        marker = f"/{package}/"
        if marker in filename:
            filename = package + "/" + filename.split(marker, 1)[1]
            break
    else:
        filename = Path(filename).name
    return f"{filename}:{line} {name}"


def report_cprofile(title: str, call, calls: int, top: int) -> None:
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    for _ in range(calls):
        call()
    profile.disable()
    elapsed = time.perf_counter() - start
    stats = pstats.Stats(profile).stats  # func -> (primitive calls, calls, self, cumulative, callers)
    per_call = 1e6 / calls
    print(f"\n== {title}: {calls} calls, {elapsed * per_call:.0f} us per call under cProfile")
    by_package: dict[str, float] = defaultdict(float)
    for func, (_cc, _nc, self_time, _cum, _callers) in stats.items():
        by_package[package_of(func[0])] += self_time
    print(
        "self time per call by package: "
        + ", ".join(f"{name} {by_package[name] * per_call:.0f} us" for name in (*PACKAGES, "other"))
    )
    print(f"\n{'self us':>8} {'cum us':>8} {'calls':>7}  function (top {top} by self time)")
    ranked = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)
    for func, (_cc, nc, self_time, cum, _callers) in ranked[:top]:
        print(f"{self_time * per_call:8.1f} {cum * per_call:8.1f} {nc / calls:7.1f}  {where(func)}")
    print(f"\n{'self us':>8} {'cum us':>8} {'calls':>7}  pyramid_sessioncache functions by cumulative time")
    ours = [item for item in stats.items() if package_of(item[0][0]) == "pyramid_sessioncache"]
    for func, (_cc, nc, self_time, cum, _callers) in sorted(ours, key=lambda item: item[1][3], reverse=True)[:top]:
        print(f"{self_time * per_call:8.1f} {cum * per_call:8.1f} {nc / calls:7.1f}  {where(func)}")


def report_pyinstrument(title: str, call, calls: int) -> None:
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0001)
    profiler.start()
    for _ in range(calls):
        call()
    profiler.stop()
    print(f"\n== {title}: {calls} calls (pyinstrument; times are totals over all calls)")
    print(profiler.output_text(unicode=False, color=False, show_all=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny data, few calls: checks that it runs")
    parser.add_argument("--calls", type=int, default=2000, help="calls per case (default 2000)")
    parser.add_argument("--top", type=int, default=25, help="functions listed per table (default 25)")
    parser.add_argument("--pyinstrument", action="store_true", help="print pyinstrument's call tree instead")
    parser.add_argument("--case", choices=("new", "same"), action="append", help="profile only this case")
    args = parser.parse_args(argv)
    sizes = model.Sizes(people=60, purchases=1) if args.quick else model.Sizes()
    calls = 5 if args.quick else args.calls
    with servers.sqlite_url() as url:
        engine = create_engine(url)
        model.create(engine, sizes)
        cache = SessionCache({"local": {"type": "ext:local_session"}, "memory": {"type": "memory"}})
        factory = sessionmaker(bind=engine, info=cache.session_info())
        for name, title, call, close in cases(factory, sizes):
            if args.case and name not in args.case:
                continue
            if args.pyinstrument:
                report_pyinstrument(title, call, calls)
            else:
                report_cprofile(title, call, calls, args.top)
            close()
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
