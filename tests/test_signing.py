"""Values from Redis are unpickled only after their signature checks."""

from __future__ import annotations

import logging
import pickle

import pytest
import redis
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from pyramid_sessioncache import FromCache, SessionCache, cache_parameters, signing

from .conftest import SECRET
from .models import Person

UNPICKLED = []


class Payload:
    """Unpickling this runs code: what a forged entry would do."""

    def __reduce__(self):
        return (UNPICKLED.append, ("forged entry was unpickled",))


@pytest.fixture
def redis_cache(redis_url):
    return SessionCache({"redis": {"type": "ext:redis", "url": redis_url}}, secret=SECRET)


def _stored(Session, stmt):
    with Session() as session:
        session.execute(stmt).all()
        beaker_cache, key = cache_parameters(stmt, session=session)
    namespace = beaker_cache.namespace
    return namespace.client, namespace._format_key(key)


@pytest.mark.parametrize("forge", ["unsigned pickle", "signed with another secret", "signature flipped"])
def test_forged_entries_are_misses_and_never_unpickled(engine, sql, redis_cache, redis_url, forge, caplog):
    Session = sessionmaker(bind=engine, info=redis_cache.session_info())
    stmt = select(Person.name).where(Person.id == 1).options(FromCache("redis"))
    client, redis_key = _stored(Session, stmt)
    good = client.get(redis_key)
    assert good.startswith(signing.PREFIX)
    forged = {
        "unsigned pickle": pickle.dumps((0, None, Payload())),
        "signed with another secret": signing.dumps(b"somebody else's secret", (0, None, Payload())),
        "signature flipped": good[:10] + bytes([good[10] ^ 1]) + good[11:],
    }[forge]
    client.set(redis_key, forged)
    sql.reset()
    with caplog.at_level(logging.WARNING, logger="pyramid_sessioncache"), Session() as session:
        assert session.execute(stmt).all() == [("person 1",)]
    assert sql.count == 1  # a miss: read from the database
    assert UNPICKLED == []
    assert any("bad signature" in record.getMessage() for record in caplog.records)
    assert client.get(redis_key).startswith(signing.PREFIX)  # and stored again, signed


def test_values_round_trip_signed(redis_url):
    data = signing.dumps(b"k" * 16, {"a": [1, 2]})
    assert signing.loads(b"k" * 16, data) == {"a": [1, 2]}
    assert signing.loads(b"x" * 16, data) is signing.INVALID
    assert signing.loads(b"k" * 16, b"garbage") is signing.INVALID


def test_a_redis_region_needs_a_secret(redis_url):
    with pytest.raises(ValueError, match="needs a secret"):
        SessionCache({"redis": {"type": "ext:redis", "url": redis_url}})
    assert redis.Redis.from_url(redis_url).ping()


def test_the_same_bytes_are_checked_and_unpickled_once(engine, sql, redis_cache, monkeypatch):
    calls = []
    original = signing.loads

    def counting_loads(secret, data):
        calls.append(len(data))
        return original(secret, data)

    monkeypatch.setattr(signing, "loads", counting_loads)
    Session = sessionmaker(bind=engine, info=redis_cache.session_info())
    stmt = select(Person).where(Person.id < 4).options(FromCache("redis"))
    with Session() as session:
        first = session.scalars(stmt).all()
    with Session() as session:
        calls.clear()
        second = session.scalars(stmt).all()
        third = session.scalars(stmt).all()
        assert second == third and [p.name for p in second] == [p.name for p in first]
    assert calls == []  # the bytes read were those already checked and unpickled
