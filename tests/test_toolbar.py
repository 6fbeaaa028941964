"""The pyramid_debugtoolbar panel shows the request's cache look-ups."""

from __future__ import annotations

import re

from pyramid.config import Configurator
from pyramid.response import Response
from sqlalchemy import select
from webtest import TestApp

from .models import Person


def page(request):
    for _ in range(2):
        request.cached_query(select(Person).where(Person.id == 1), region="short_term").scalars().one()
    return Response("<html><body><p>cached</p></body></html>", content_type="text/html")


def test_panel_lists_lookups(db_url):
    config = Configurator(
        settings={
            "sqlalchemy.url": db_url,
            "cache.regions": "short_term",
            "debugtoolbar.hosts": "127.0.0.1",
            "debugtoolbar.includes": "pyramid_sessioncache.addon.toolbar",
        }
    )
    config.include("pyramid_debugtoolbar")
    config.include("pyramid_sessioncache")
    config.add_route("page", "/")
    config.add_view(page, route_name="page")
    web = TestApp(config.make_wsgi_app(), extra_environ={"REMOTE_ADDR": "127.0.0.1"})
    html = web.get("/").text
    toolbar_url = re.search(r'(/_debug_toolbar/[0-9a-f]+)["\']', html).group(1)
    toolbar = web.get(toolbar_url).text
    assert "Cached queries" in toolbar
    assert "1 of 2 cache look-ups were hits." in toolbar
    assert toolbar.count("short_term") >= 2
