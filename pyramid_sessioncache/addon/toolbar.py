"""A pyramid_debugtoolbar panel listing the cache look-ups of a request.

Add it to the toolbar in the ini file::

    pyramid.includes = pyramid_debugtoolbar
    debugtoolbar.includes = pyramid_sessioncache.addon.toolbar
"""

from __future__ import annotations

from typing import Any

from pyramid_debugtoolbar.panels import DebugPanel

from ..engine import stats


class SessionCacheDebugPanel(DebugPanel):
    """The region, outcome and key of every cache look-up of the request's ``dbsession``."""

    name = "sessioncache"
    template = "pyramid_sessioncache.addon:templates/toolbar.dbtmako"
    title = "Cached queries"
    nav_title = "Cache"

    def __init__(self, request: Any) -> None:
        self.request = request
        self.data: dict[str, Any] = {"lookups": [], "hits": 0}

    @property
    def has_content(self) -> bool:
        return bool(self.data["lookups"])

    @property
    def nav_subtitle(self) -> str:
        return f"{self.data['hits']}/{len(self.data['lookups'])} hits"

    def process_response(self, response: Any) -> None:
        # Only a dbsession the request made: the panel must not open one.
        session = self.request.__dict__.get("dbsession")
        lookups = list(stats.lookups(session)) if session is not None else []
        self.data = {"lookups": lookups, "hits": sum(lookup.hit for lookup in lookups)}


def includeme(config: Any) -> None:
    """Register the panel (``debugtoolbar.includes = pyramid_sessioncache.addon.toolbar``)."""
    config.add_debugtoolbar_panel(SessionCacheDebugPanel)
