"""Timing one callable: warm-up, many timed calls, median and p90.

Every figure of every table is measured by :func:`measure`, so every column
is treated alike:

- warm-up calls first (untimed), until :attr:`Budget.warmup_calls` calls or
  :attr:`Budget.warmup_s` seconds, whichever comes first;
- then each call is timed on its own with ``time.perf_counter_ns``, until
  :attr:`Budget.max_calls` calls or :attr:`Budget.measure_s` seconds, but
  never fewer than :attr:`Budget.min_calls`;
- the garbage collector is off inside timed calls; a young-generation
  collection runs, untimed, every :data:`GC_EVERY` calls, and a full one
  before each measurement, so no column pays for another's garbage.  (Timings
  therefore leave out cyclic garbage collection, which weighs more on paths
  that allocate more: the uncached query and the dogpile example.)

The figure reported is the median of the per-call times, with the 90th
percentile beside it.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

GC_EVERY = 16


@dataclass(frozen=True)
class Budget:
    """How long to warm up and measure one figure."""

    warmup_calls: int = 30
    warmup_s: float = 0.15
    min_calls: int = 15
    max_calls: int = 3000
    measure_s: float = 0.6


#: Tiny budgets for ``--quick``: the figures mean nothing, the code runs.
QUICK = Budget(warmup_calls=2, warmup_s=0.01, min_calls=3, max_calls=5, measure_s=0.01)


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
    """Time ``call()`` as the module docstring says; return its :class:`Timing`."""
    clock = time.perf_counter_ns
    deadline = clock() + int(budget.warmup_s * 1e9)
    for _ in range(budget.warmup_calls):
        call()
        if clock() > deadline:
            break
    gc.collect()
    samples: list[int] = []
    enabled = gc.isenabled()
    gc.disable()
    try:
        deadline = clock() + int(budget.measure_s * 1e9)
        while len(samples) < budget.max_calls and (len(samples) < budget.min_calls or clock() < deadline):
            start = clock()
            call()
            samples.append(clock() - start)
            if len(samples) % GC_EVERY == 0:
                gc.collect(0)
    finally:
        if enabled:
            gc.enable()
    return Timing(tuple(samples))


def cell(timing: Timing | None, width: int = 18) -> str:
    """Format a table cell: ``median [p90]`` in microseconds, or ``n/a``."""
    if timing is None:
        return "n/a".rjust(width)
    return f"{number(timing.median_us)} [{number(timing.p90_us)}]".rjust(width)


def number(us: float) -> str:
    """Microseconds, with one decimal below 100."""
    return f"{us:.1f}" if us < 100 else f"{us:.0f}"
