"""What the window benchmarks share: reader processes, a steady load, figures and the table they print.

``near_window.py`` and ``notify_window.py`` measure the same thing on two
transports: how long after a write the last of a few other processes hears
of it.  The processes, the load thread, the percentiles and the layout of
the table are the same for both and live here, so that their figures stay
comparable.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from importlib import metadata
from multiprocessing.connection import Connection as Pipe
from typing import Any

#: The longest a write may stay unheard before the run is declared broken (generous: the smoke
#: tests run these scripts on a loaded CI; a write heard ends the wait at once).
TIMEOUT = 60.0


def progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


@contextmanager
def processes(
    count: int, target: Callable[..., None], args: Callable[[Pipe, Any], tuple[Any, ...]], failure: str
) -> Iterator[list[Pipe]]:
    """Start ``count`` spawned processes running ``target(*args(pipe, stop))``; yield the pipes they send on.

    Each process says ``"ready"`` first; anything else stops the run with
    ``failure`` and what the process said.  On leaving, ``stop`` is set and the
    processes are joined, or killed after :data:`TIMEOUT`.
    """
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    pipes, started = [], []
    for _ in range(count):
        ours, theirs = context.Pipe(duplex=False)
        process = context.Process(target=target, args=args(theirs, stop), daemon=True)
        process.start()
        pipes.append(ours)
        started.append(process)
    try:
        for pipe in pipes:
            said = pipe.recv() if pipe.poll(60) else "nothing within 60 s"
            if said != "ready":
                raise SystemExit(f"{failure}: {said}")
        yield pipes
    finally:
        stop.set()
        for process in started:
            process.join(TIMEOUT)
            if process.is_alive():
                process.kill()


@contextmanager
def steady_load(rate: float, writer: Callable[[], AbstractContextManager[Callable[[], None]]]) -> Iterator[None]:
    """A thread calling the write that ``writer()`` yields at ``rate`` a second (none at 0).

    A failure of the thread is raised here, on leaving.
    """
    if not rate:
        yield
        return
    done = threading.Event()
    failures: list[BaseException] = []

    def write() -> None:
        try:
            with writer() as one:
                began = time.monotonic()
                count = 0
                while not done.wait(max(0.0, began + count / rate - time.monotonic())):
                    one()
                    count += 1
        except BaseException as exc:  # reported by the measuring thread
            failures.append(exc)

    thread = threading.Thread(target=write, name="load", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(TIMEOUT)
    if failures:
        raise failures[0]


def percentile(values: list[float], percent: float) -> float:
    """The nearest-rank percentile of ``values``."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * percent // 100))
    return ordered[int(rank) - 1]


def figures(values: list[float]) -> str:
    return "".join(f"{percentile(values, p):>8.2f}" for p in (50, 90, 99, 100))


def window_table(
    intro: list[str], call: str, processes: str, rows: list[tuple[Any, str, list[tuple[float, float]]]]
) -> str:
    """The table of windows: one row a (processes, load), from the ``call`` and from its return.

    ``intro`` is the paragraph above the column heads; ``processes`` heads the first column.
    """
    width = len(processes) + 2
    lines = [
        "",
        *intro,
        f"{'':<{width + 18}}{f'from the call to {call}':>32}{'from its return':>20}",
        f"{processes:<{width}}{'load':<18}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}{'p50':>10}{'p99':>10}",
    ]
    for label, load, windows in rows:
        from_call = [window for window, _ in windows]
        from_return = [window for _, window in windows]
        lines.append(
            f"{label:<{width}}{load:<18}{figures(from_call)}"
            f"{percentile(from_return, 50):>10.2f}{percentile(from_return, 99):>10.2f}"
        )
    return "\n".join(lines)


def load_average() -> str:
    try:
        return " ".join(f"{figure:.2f}" for figure in os.getloadavg())
    except OSError:
        return "unknown"


def installed(name: str) -> str:
    """The installed version of the distribution ``name``, or ``not installed``."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> str:
    """The header line naming the machine, its cores, its system and its load average now."""
    return (
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"load average {load_average()} at the start"
    )


def title(what: str, quick: bool) -> str:
    """The first line of the header."""
    return f"pyramid_sessioncache: {what}" + ("  (--quick: a few commits; the figures mean nothing)" * quick)
