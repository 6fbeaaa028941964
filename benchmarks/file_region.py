"""The ``file`` region's hit cost by the number of entries it holds, beside Beaker's own ``file`` namespace.

For each size, a region is filled with that many entries of one value (20
rows of two columns, about 400 bytes pickled), in a temporary directory,
and a hit reads one of them, a different one each call:

- *pyramid_sessioncache file*: ``Region.get(key)`` on a ``file`` region:
  one file opened and read, its signature checked, its pickle loaded.
  (A cached query's hit reads its tables' versions too, one small file
  each, whatever the size of the region.)
- *Beaker's file namespace*: ``beaker.cache.Cache(type="file").get(key)``,
  which keeps a namespace in one pickle and loads it whole on every read.
  It is filled in one write (filling it one entry at a time rewrites the
  whole file each time).

The two rows of a size are timed together, interleaved (``timing.py``).
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time

from beaker.cache import Cache

from pyramid_sessioncache import Region

from .timing import Budget, Timing, measure_many

SIZES = (100, 1_000, 10_000)
QUICK_SIZES = (10, 100, 1_000)
ROWS = (("ours", "pyramid_sessioncache file"), ("beaker", "Beaker's file namespace"))
#: How many different entries the hits read, in turn.
PROBES = 64
VALUE = [(i, f"name {i}") for i in range(20)]


def run(sizes: tuple[int, ...], budget: Budget) -> dict[tuple[str, int], Timing]:
    """Return ``{(row, size): Timing}`` for every row of :data:`ROWS` and size of ``sizes``."""
    directory = tempfile.mkdtemp(prefix="sessioncache-bench-file-")
    results: dict[tuple[str, int], Timing] = {}
    try:
        for size in sizes:
            for row, timing in _one_size(os.path.join(directory, str(size)), size, budget).items():
                results[(row, size)] = timing
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return results


def _one_size(directory: str, size: int, budget: Budget) -> dict[str, Timing]:
    region = Region("bench", {"type": "file", "data_dir": directory}, "bench", secret=b"benchmark secret" * 2)
    for i in range(size):
        region.put(f"key {i}", VALUE)
    beaker = Cache("bench", type="file", data_dir=os.path.join(directory, "beaker"))
    namespace = beaker.namespace
    namespace.acquire_write_lock()
    try:
        for i in range(size):
            namespace.set_value(f"key {i}".encode(), (time.time(), None, VALUE))
    finally:
        namespace.release_write_lock()
    keys = [f"key {i * size // PROBES}" for i in range(min(size, PROBES))]
    for key in keys:  # every probe is there, and the same
        assert region.get(key) == VALUE and beaker.get(key) == VALUE
    ours, theirs = itertools.cycle(keys), itertools.cycle(keys)
    return measure_many({"ours": lambda: region.get(next(ours)), "beaker": lambda: beaker.get(next(theirs))}, budget)
