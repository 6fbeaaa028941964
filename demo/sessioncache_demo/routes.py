"""The demo's URLs."""

from __future__ import annotations

from typing import Any


def includeme(config: Any) -> None:
    """Add the demo's routes and its static files."""
    config.add_static_view("static", "sessioncache_demo:static", cache_max_age=3600)
    config.add_route("home", "/")
    config.add_route("people", "/people")
    config.add_route("person", r"/people/{id:[0-9]+}")
    config.add_route("person_edit", r"/people/{id:[0-9]+}/edit")
    config.add_route("stats", "/stats")
