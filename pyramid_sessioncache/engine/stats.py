"""Hit and miss counters: per region, and the look-ups of one Session."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from . import info

#: How many look-ups a Session remembers.
MAX_LOOKUPS = 500


class Lookup(NamedTuple):
    """One cache look-up: the region, whether it hit, and the key."""

    region: str
    hit: bool
    key: str


@dataclass
class RegionStats:
    """Counters of one region, for this process."""

    hits: int = 0
    misses: int = 0
    invalidations: int = 0
    #: Entries written (a miss whose result was stored).
    stores: int = 0

    def count_store(self) -> None:
        """Count an entry written (the ``on_store`` of a region's look-up)."""
        self.stores += 1


@dataclass
class Stats:
    """The counters of every region of one application."""

    regions: dict[str, RegionStats] = field(default_factory=dict)

    def region(self, name: str) -> RegionStats:
        """Return the counters of region ``name``."""
        try:
            return self.regions[name]
        except KeyError:
            return self.regions.setdefault(name, RegionStats())


def record(stats: Stats, session: Any, region: str, hit: bool, key: str) -> None:
    """Count a look-up in ``stats`` and remember it on ``session``."""
    counters = stats.region(region)
    if hit:
        counters.hits += 1
    else:
        counters.misses += 1
    lookups(session).append(Lookup(region, hit, key))


def lookups(session: Any) -> deque:
    """Return the recent look-ups of ``session``, oldest first."""
    found = session.info.get(info.LOOKUPS)
    if found is None:
        found = session.info[info.LOOKUPS] = deque(maxlen=MAX_LOOKUPS)
    return found
