"""Timing callables side by side: warm-up, many timed calls, median and p90.

Every figure of every table is measured by :func:`measure_many`, which
times the rows of one table column (or one table) *together*, so that
whatever else the machine does at the time weighs on all of them alike:

- warm-up calls first (untimed), for each callable, until
  :attr:`Budget.warmup_calls` calls or :attr:`Budget.warmup_s` seconds;
- then rounds: in each round every callable in turn gets a slice of
  :data:`SLICE_S` seconds (at least one call), the order rotating from
  round to round, until each has had :attr:`Budget.measure_s` seconds and
  :attr:`Budget.min_calls` calls.  Each call is timed on its own with
  ``time.perf_counter_ns``.  On a machine whose speed drifts (a shared
  virtual machine), this keeps the ratios between rows honest where
  measuring one row after another would not;
- the garbage collector is off inside timed calls; a young-generation
  collection runs, untimed, every :data:`GC_EVERY` calls, and a full one
  before the rounds start, so no row pays for another's garbage.  (Timings
  therefore leave out cyclic garbage collection, which weighs more on paths
  that allocate more: the uncached query and the dogpile example.)

The figure reported is the median of the per-call times, with the 90th
percentile beside it.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

GC_EVERY = 16
SLICE_S = 0.01


@dataclass(frozen=True)
class Budget:
    """How long to warm up and measure one figure."""

    warmup_calls: int = 30
    warmup_s: float = 0.15
    min_calls: int = 15
    measure_s: float = 1.0


#: Tiny budgets for ``--quick``: the figures mean nothing, the code runs.
QUICK = Budget(warmup_calls=2, warmup_s=0.01, min_calls=3, measure_s=0.001)


@dataclass(frozen=True)
class Timing:
    """The per-call times of one measurement, in nanoseconds."""

    samples: tuple[int, ...]

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples) / 1000

    @property
    def p90_us(self) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))] / 1000

    @property
    def calls(self) -> int:
        return len(self.samples)


def measure(call: Callable[[], object], budget: Budget) -> Timing:
    """Time ``call()`` alone; see :func:`measure_many`."""
    return measure_many({"call": call}, budget)["call"]


def measure_many(calls: Mapping[str, Callable[[], object]], budget: Budget) -> dict[str, Timing]:
    """Time each of ``calls`` as the module docstring says; return name -> :class:`Timing`."""
    for call in calls.values():
        warm_up(call, budget)
    names = list(calls)
    samples: dict[str, list[int]] = {name: [] for name in names}
    spent = dict.fromkeys(names, 0)
    wanted = int(budget.measure_s * 1e9)
    gc.collect()
    rounds = 0
    while any(spent[name] < wanted or len(samples[name]) < budget.min_calls for name in names):
        shift = rounds % len(names)
        rounds += 1
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter_ns()
            samples[name] += time_slice(calls[name], SLICE_S)
            spent[name] += time.perf_counter_ns() - start
    return {name: Timing(tuple(samples[name])) for name in names}


def warm_up(call: Callable[[], object], budget: Budget) -> None:
    """Call ``call()`` untimed, :attr:`Budget.warmup_calls` times or for :attr:`Budget.warmup_s`."""
    deadline = time.perf_counter_ns() + int(budget.warmup_s * 1e9)
    for _ in range(budget.warmup_calls):
        call()
        if time.perf_counter_ns() > deadline:
            break


def time_slice(call: Callable[[], object], seconds: float) -> list[int]:
    """Time single calls of ``call()`` for ``seconds`` (at least one); return their times in ns.

    The garbage collector is off during the calls; a young-generation
    collection runs between them, untimed, every :data:`GC_EVERY` calls.
    """
    clock = time.perf_counter_ns
    out: list[int] = []
    enabled = gc.isenabled()
    gc.disable()
    try:
        end_of_slice = clock() + int(seconds * 1e9)
        while True:
            start = clock()
            call()
            out.append(clock() - start)
            if len(out) % GC_EVERY == 0:
                gc.collect(0)
            if clock() >= end_of_slice:
                return out
    finally:
        if enabled:
            gc.enable()


def cell(timing: Timing | None, width: int = 18) -> str:
    """Format a table cell: ``median [p90]`` in microseconds, or ``n/a``."""
    if timing is None:
        return "n/a".rjust(width)
    return f"{number(timing.median_us)} [{number(timing.p90_us)}]".rjust(width)


def number(us: float) -> str:
    """Microseconds, with one decimal below 100."""
    return f"{us:.1f}" if us < 100 else f"{us:.0f}"
