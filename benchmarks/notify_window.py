"""How long another client's commit stays unseen in PostgreSQL notification mode, and what the triggers cost.

Usage::

    .venv/bin/python benchmarks/notify_window.py [--commits N] [--load-rate R] [--quick]

What it does:

1. Starts a PostgreSQL server (``pgserver``) in a temporary folder, creates
   the tables ``measured`` and ``load`` and installs the notification
   triggers (``pyramid_sessioncache/engine/invalidation/notify.py``).
2. The window, for 1 and 2 listening processes, idle and under load: each
   listener is an OS process of its own (``multiprocessing``, spawned)
   running a :class:`~pyramid_sessioncache.engine.invalidation.notify.Listener`;
   its callback reads the clock and sends the reading to this process
   through a pipe.  A writer here, a plain psycopg connection (no
   SQLAlchemy), updates ``measured`` and commits ``N`` times (default
   300, after 10 not counted), one at a time: each commit waits until
   every listener has heard the one before.  The window of a commit runs
   from the writer's call to ``commit()`` to the callback of the last
   listener to hear it.  Under load, a thread commits single-row updates
   of ``load`` at a steady rate (default 200 a second), each notified to
   the listeners as well.  The clock is ``CLOCK_MONOTONIC``, one clock
   for every process of the host.
3. The cost: the commit of a single-row update, one writer, and the
   commits per second of 4 writers at once (each updating a table of its
   own, so that no row lock is shared), without the triggers and with
   them, in turn, three times (once with ``--quick``), on the same server.

Times are in milliseconds.  ``--quick`` makes a few commits per row: it
checks that everything runs, its figures mean nothing.  Progress goes to
stderr, the tables to stdout.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/notify_window.py` from anywhere

from benchmarks import servers, windows  # noqa: E402

WRITERS = 4
COST_ROUNDS = 3
WARMUP = 10
CHANNEL = "sessioncache"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commits", type=int, default=300, help="commits measured per row (default 300)")
    parser.add_argument("--load-rate", type=float, default=200.0, help="commits per second of the load (default 200)")
    parser.add_argument("--cost-seconds", type=float, default=3.0, help="seconds per throughput figure (default 3)")
    parser.add_argument("--quick", action="store_true", help="a few commits per row: checks that it runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.commits, args.load_rate, args.cost_seconds = 20, 50.0, 0.3
    started = time.monotonic()

    windows.progress("starting PostgreSQL")
    with servers.postgresql_url() as (url, version):
        from sqlalchemy import create_engine

        from pyramid_sessioncache.engine.invalidation.notify import dsn_of, install_triggers, remove_triggers

        dsn = dsn_of(url)
        engine = create_engine(url)
        try:
            with engine.begin() as conn:
                conn.exec_driver_sql(
                    "CREATE TABLE measured (id int PRIMARY KEY, n int); INSERT INTO measured VALUES (1, 0);"
                    "CREATE TABLE load (id int PRIMARY KEY, n int); INSERT INTO load VALUES (1, 0);"
                )
                for writer in range(WRITERS):
                    conn.exec_driver_sql(f"CREATE TABLE w{writer} (id int PRIMARY KEY, n int)")
                    conn.exec_driver_sql(f"INSERT INTO w{writer} VALUES (1, 0)")
                settings = {
                    name: conn.exec_driver_sql(f"SHOW {name}").scalar_one()
                    for name in ("fsync", "synchronous_commit", "wal_sync_method")
                }
            print(_header(args, version, settings), flush=True)

            windows.progress("the cost of the triggers")
            rounds = 1 if args.quick else COST_ROUNDS
            cost: dict[str, tuple[list[float], list[float]]] = {"without triggers": ([], []), "with triggers": ([], [])}
            for _ in range(rounds):  # interleaved, so that a machine's drift weighs on both
                for label, (latencies, throughputs) in cost.items():
                    with engine.begin() as conn:
                        if label == "with triggers":
                            install_triggers(conn, channel=CHANNEL)
                        else:
                            remove_triggers(conn, channel=CHANNEL)
                    some, throughput = _cost(dsn, args.commits // rounds, args.cost_seconds / rounds)
                    latencies += some
                    throughputs.append(throughput)

            rows = []
            for listeners in (1, 2):
                for rate in (0.0, args.load_rate):
                    load = f"{rate:.0f} commits/s" if rate else "idle"
                    windows.progress(f"the window: {listeners} listener process(es), {load}")
                    rows.append((listeners, load, _window(dsn, listeners, rate, args.commits)))
            print(_window_table(rows, args.commits), flush=True)
            print(_cost_table(cost, args.cost_seconds, rounds), flush=True)
            with engine.begin() as conn:
                remove_triggers(conn, channel=CHANNEL)
        finally:
            engine.dispose()
        windows.progress("stopping PostgreSQL")
    print(f"\ntotal time: {time.monotonic() - started:.0f} s; load average {windows.load_average()} at the end")
    return 0


# The window ------------------------------------------------------------------------


def _listen(dsn: str, pipe: Pipe, stop: Any) -> None:
    """A listening process: send the clock reading of each notification naming ``measured``."""
    from pyramid_sessioncache.engine.invalidation.notify import Listener

    def on_tables(tables: frozenset[str]) -> None:
        if "measured" in tables:
            pipe.send(time.monotonic_ns())

    with Listener(dsn, on_tables, lambda: pipe.send("lost"), channel=CHANNEL) as listener:
        pipe.send("ready" if listener.wait_connected(windows.TIMEOUT) else "not connected")
        stop.wait()


def _window(dsn: str, listeners: int, rate: float, commits: int) -> list[tuple[float, float]]:
    """The window of each commit, in milliseconds: from the call to ``commit()``, and from its return."""
    import psycopg

    failure = "a listener process did not start listening"
    with windows.processes(listeners, _listen, lambda pipe, stop: (dsn, pipe, stop), failure) as pipes:
        measured = []
        with windows.steady_load(rate, lambda: _committing(dsn)), psycopg.connect(dsn) as writer:
            for commit in range(WARMUP + commits):
                writer.execute("UPDATE measured SET n = %s WHERE id = 1", [commit])
                before = time.monotonic_ns()
                writer.commit()
                after = time.monotonic_ns()
                heard = []
                for pipe in pipes:
                    if not pipe.poll(windows.TIMEOUT):
                        raise SystemExit(f"a commit was not heard within {windows.TIMEOUT} s")
                    heard.append(pipe.recv())
                if any(not isinstance(at, int) for at in heard):
                    raise SystemExit(f"a listener lost its connection: {heard}")
                if commit >= WARMUP:
                    measured.append(((max(heard) - before) / 1e6, (max(heard) - after) / 1e6))
        return measured


@contextmanager
def _committing(dsn: str) -> Iterator[Callable[[], None]]:
    """The write of the load: commit a single-row update of ``load``."""
    import psycopg

    with psycopg.connect(dsn) as conn:

        def commit() -> None:
            conn.execute("UPDATE load SET n = n + 1 WHERE id = 1")
            conn.commit()

        yield commit


# The cost ------------------------------------------------------------------------


def _cost(dsn: str, commits: int, seconds: float) -> tuple[list[float], float]:
    """The commit times of one writer (ms), and the commits per second of :data:`WRITERS` writers at once."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        latencies = []
        for commit in range(WARMUP + commits):
            conn.execute("UPDATE w0 SET n = %s WHERE id = 1", [commit])
            before = time.perf_counter_ns()
            conn.commit()
            if commit >= WARMUP:
                latencies.append((time.perf_counter_ns() - before) / 1e6)

    start, counts = threading.Barrier(WRITERS + 1), [0] * WRITERS
    done = threading.Event()

    def write(writer: int) -> None:
        with psycopg.connect(dsn) as conn:
            start.wait()
            while not done.is_set():
                conn.execute(f"UPDATE w{writer} SET n = n + 1 WHERE id = 1")
                conn.commit()
                counts[writer] += 1

    threads = [threading.Thread(target=write, args=(writer,), daemon=True) for writer in range(WRITERS)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.monotonic()
    time.sleep(seconds)
    done.set()
    for thread in threads:
        thread.join(windows.TIMEOUT)
    return latencies, sum(counts) / (time.monotonic() - began)


# The report ------------------------------------------------------------------------


def _window_table(rows: list[tuple[int, str, list[tuple[float, float]]]], commits: int) -> str:
    intro = [
        f"The window: from another client's commit() to the listener's callback, ms ({commits} commits per row;",
        "with 2 listener processes, the later of the two).  The commit becomes visible between the call and",
        "the return: the window is at most the first figures; the callback may even come before the return.",
    ]
    return windows.window_table(intro, "commit()", "listener processes", rows)


def _cost_table(rows: dict[str, tuple[list[float], list[float]]], seconds: float, rounds: int) -> str:
    commits = len(next(iter(rows.values()))[0])
    lines = [
        "",
        f"What the triggers cost writers (no listener): commit() of a one-row update, one writer, ms ({commits} commits),",
        f"and commits per second of {WRITERS} writers at once, each on a table of its own ({seconds:g} s);",
        f"without and with the triggers in turn, {rounds} time(s)",
        f"{'':<20}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}{'commits/s':>12}",
    ]
    for label, (latencies, throughputs) in rows.items():
        lines.append(f"{label:<20}{windows.figures(latencies)}{sum(throughputs) / len(throughputs):>12.0f}")
    return "\n".join(lines)


def _header(args: argparse.Namespace, version: str, settings: dict[str, str]) -> str:
    return "\n".join(
        [
            windows.title("PostgreSQL notification mode", args.quick),
            windows.machine(),
            f"versions: Python {platform.python_version()}, psycopg {windows.installed('psycopg')}, "
            f"PostgreSQL server {version} (pgserver, Unix socket, same host), "
            + ", ".join(f"{name}={value}" for name, value in settings.items()),
            f"load: a thread committing one-row updates of another table at {args.load_rate:g} a second, "
            "each notified too",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
