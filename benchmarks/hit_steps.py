"""Where a same-session hit's time goes beyond the floor: the hit path taken one step at a time.

Usage::

    .venv/bin/python benchmarks/hit_steps.py [--quick]

On a temporary SQLite file with ``run.py``'s data, a point lookup by name,
a new statement built on every call as an application builds it: each row
times one more step of what ``cached_query(session, statement, region)``
does on a hit in the same Session, so that the difference between two rows
is what that step costs *in the loop*, where a fresh statement makes every
step run colder than it does measured alone.

Rows: the floor of ``run.py`` (statement with a ``FromCache`` option and
its SQLAlchemy cache key); the statement and its cache key without the
option; then the entry's key (``KeyMaker.key``), the whole decision
(``lookup.decide``), reading the entry (``Region.peek``), the early hit
with its Result and statistics (``early._early_hit``), ``cached_query()``
itself, and ``.scalar_one()`` on its result (what ``run.py`` times).
Columns: an ``ext:local_session`` and a ``memory`` region.  Rows are
interleaved in slices (see ``timing.py``); medians in microseconds.
``--quick`` checks that everything runs; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/hit_steps.py` from anywhere

from sqlalchemy import create_engine  # noqa: E402
from sqlalchemy.orm import sessionmaker  # noqa: E402

from benchmarks import model  # noqa: E402
from benchmarks.timing import QUICK, Budget, measure_many  # noqa: E402
from pyramid_sessioncache import FromCache, SessionCache, _sqlalchemy, cached_query  # noqa: E402
from pyramid_sessioncache.engine import early, lookup  # noqa: E402

REGIONS = ("local", "memory")
#: (row, label)
STEPS = (
    ("floor", "floor: statement with FromCache + cache key"),
    ("statement", "statement + cache key, no option"),
    ("key", "+ the entry's key"),
    ("decide", "+ the rest of the decision"),
    ("peek", "+ reading the entry"),
    ("early", "+ its Result and statistics"),
    ("cached_query", "+ cached_query() itself"),
    ("scalar_one", "+ .scalar_one() (run.py's row)"),
)
BUDGET = Budget(warmup_s=0.5, measure_s=1.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few calls per row: checks that it runs")
    args = parser.parse_args(argv)
    sizes = model.Sizes(people=60, addresses=3, purchases=2) if args.quick else model.Sizes()
    budget = QUICK if args.quick else BUDGET
    with tempfile.TemporaryDirectory() as folder:
        engine = create_engine(f"sqlite:///{folder}/steps.db")
        try:
            model.create(engine, sizes)
            medians = {region: _steps(engine, sizes, region, budget) for region in REGIONS}
        finally:
            engine.dispose()
    print(_table(medians))
    return 0


def _steps(engine, sizes: model.Sizes, region_name: str, budget: Budget) -> dict[str, float]:
    cache = SessionCache(
        {"local": {"type": "ext:local_session"}, "memory": {"type": "memory"}},
        secret="benchmark secret, not for production",
    )
    session = sessionmaker(bind=engine, info=cache.session_info())()
    region = cache.region(region_name)
    option = FromCache(region_name, cache=cache)
    build = model.point
    # The miss, stored; its object stays in the identity map, as in run.py
    # (held: a shared region's hit in the same Session serves it again).
    held = cached_query(session, build(sizes), region_name).scalar_one()

    def decided():
        statement = build(sizes)
        options = statement.get_execution_options()
        arguments = _sqlalchemy.bind_arguments(statement)
        return lookup.decide(cache, region, session, statement, None, options, arguments, option)

    def peek():
        found = decided()
        region.peek(found.key.text, session, found.valid, found.tables or ())

    calls = {
        "floor": lambda: build(sizes, (FromCache("memory"),))._generate_cache_key(),
        "statement": lambda: build(sizes)._generate_cache_key(),
        "key": lambda: cache.key(build(sizes), None, {}, engine, None),
        "decide": decided,
        "peek": peek,
        "early": lambda: early._early_hit(session, cache, region, build(sizes), option),
        "cached_query": lambda: cached_query(session, build(sizes), region_name),
        "scalar_one": lambda: cached_query(session, build(sizes), region_name).scalar_one(),
    }
    try:
        timings = measure_many(calls, budget)
        assert held is calls["cached_query"]().scalar_one()
        return {step: timings[step].median_us for step, _label in STEPS}
    finally:
        session.close()


def _table(medians: dict[str, dict[str, float]]) -> str:
    label_width, column = 48, 22
    lines = [
        "Same-session point-lookup hit, one step more per row (SQLite, a new statement per call),",
        "median us (the step's own cost in parentheses)",
        " " * label_width + "".join(f"{region:>{column}}" for region in REGIONS),
    ]
    previous: dict[str, float | None] = dict.fromkeys(REGIONS)
    for step, label in STEPS:
        cells = []
        for region in REGIONS:
            value, before = medians[region][step], previous[region]
            delta = "" if before is None or step == "statement" else f" ({value - before:+.1f})"
            cells.append(f"{value:.1f}{delta}".rjust(column))
            previous[region] = value
        lines.append(label.ljust(label_width) + "".join(cells))
    for region in REGIONS:
        lines.append(f"{region}: hit / floor {medians[region]['scalar_one'] / medians[region]['floor']:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
