"""The panel at the foot of every page: this request's look-ups and SQL."""

from __future__ import annotations

from collections import Counter
from typing import Any

from pyramid.events import BeforeRender


class RequestPanel:
    """What the current request has cost so far, read when the template asks.

    The panel is rendered last, after the page's own content, so that the
    lazy loads run while rendering are counted too.
    """

    def __init__(self, request: Any) -> None:
        self.request = request

    @property
    def statements(self) -> list[str]:
        """The SQL statements sent so far."""
        return list(self.request.sql_log.statements)

    @property
    def lookups(self) -> list:
        """The cache look-ups so far (``Lookup(region, hit, key)``)."""
        return self.request.sessioncache.lookups

    def by_region(self) -> list[tuple[str, int, int]]:
        """Return ``(region, hits, misses)`` for each region looked up, in first-use order."""
        hits: Counter[str] = Counter()
        misses: Counter[str] = Counter()
        for lookup in self.lookups:
            (hits if lookup.hit else misses)[lookup.region] += 1
        regions = dict.fromkeys(lookup.region for lookup in self.lookups)
        return [(region, hits[region], misses[region]) for region in regions]


def _add_panel(event: BeforeRender) -> None:
    request = event.get("request")
    if request is not None:
        event["panel"] = RequestPanel(request)


def includeme(config: Any) -> None:
    """Give every template a ``panel`` (:class:`RequestPanel`)."""
    config.add_subscriber(_add_panel, BeforeRender)
