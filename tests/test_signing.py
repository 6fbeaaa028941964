"""Values from outside the process are unpickled only after their signature checks, for their place."""

from __future__ import annotations

import logging
import os
import pickle

import pytest
import redis
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from pyramid_sessioncache import FromCache, SessionCache, cache_parameters, signing

from .conftest import SECRET
from .models import Person
from .tampering import SIGNED_TYPES, Backend, options

UNPICKLED = []


class Payload:
    """Unpickling this runs code: what a forged entry would do."""

    def __reduce__(self):
        return (UNPICKLED.append, ("forged entry was unpickled",))


class Renamed:
    """A class that a later version of the code no longer has."""


class OpensAFile:
    """Unpickling this creates a file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class RunsACommand:
    """Unpickling this runs a shell command that creates a file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(params=SIGNED_TYPES)
def kind(request) -> str:
    return request.param


@pytest.fixture
def signed_cache(kind, tmp_path, request) -> SessionCache:
    """Two regions of ``kind``, ``one`` and ``two``."""
    url = request.getfixturevalue("redis_url") if kind == "redis" else None
    regions = {name: options(kind, tmp_path / name, url) for name in ("one", "two")}
    cache = SessionCache(regions, secret=SECRET)
    yield cache
    if kind == "redis":  # every test starts from an empty server
        redis.Redis.from_url(url).flushall()


def by_id(person_id: int, region: str = "one"):
    return select(Person.name).where(Person.id == person_id).options(FromCache(region))


def stored_key(Session, stmt) -> str:
    """Run ``stmt`` (a miss that stores it) and return its key."""
    with Session() as session:
        session.execute(stmt).all()
        return cache_parameters(stmt, session=session)[1]


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_planted_pickle_runs_nothing_and_reads_as_a_miss(engine, sql, signed_cache, tmp_path, caplog):
    Session = sessionmaker(bind=engine, info=signed_cache.session_info())
    backend = Backend(signed_cache.region("one"))
    key = stored_key(Session, by_id(1))
    markers = []
    for payload in (OpensAFile, RunsACommand):
        for place, plant in (
            ("entry", lambda data: backend.set_entry(key, data)),
            ("person's version", lambda data: backend.set_version("person", data)),
            ("the version of every table", lambda data: backend.set_version("?", data)),
            ("an entry read through Beaker's API", lambda data: backend.set_entry(key + "x", data)),
        ):
            marker = tmp_path / f"{payload.__name__} in {place}"
            markers.append(marker)
            plant(pickle.dumps((0, None, payload(str(marker)))))  # Beaker's stored format
        sql.reset()
        with caplog.at_level(logging.WARNING, logger="pyramid_sessioncache"):
            for _ in range(2):
                with Session() as session:
                    assert session.execute(by_id(1)).all() == [("person 1",)]
            with Session() as session:
                beaker_cache, _ = cache_parameters(by_id(1), session=session)
                with pytest.raises(KeyError):
                    beaker_cache.get(key + "x")  # Beaker's API reads through the same checks
        assert sql.count == 1  # a miss, then the entry stored again is a hit
    assert not [marker for marker in markers if marker.exists()]
    assert warnings_of(caplog)


def test_forged_entries_are_misses_and_never_unpickled(engine, sql, signed_cache, caplog):
    Session = sessionmaker(bind=engine, info=signed_cache.session_info())
    backend = Backend(signed_cache.region("one"))
    key = stored_key(Session, by_id(1))
    namespace = signed_cache.region("one").namespace_name
    for forge in ("unsigned pickle", "signed with another secret", "signature flipped", "truncated"):
        good = backend.entry(key)
        assert good.startswith(signing.PREFIX)
        forged = {
            "unsigned pickle": pickle.dumps((0, None, Payload())),
            "signed with another secret": signing.dumps(b"another secret", (0, None, Payload()), namespace, key),
            "signature flipped": good[:10] + bytes([good[10] ^ 1]) + good[11:],
            "truncated": good[: len(good) // 2],
        }[forge]
        backend.set_entry(key, forged)
        sql.reset()
        with caplog.at_level(logging.WARNING, logger="pyramid_sessioncache"), Session() as session:
            assert session.execute(by_id(1)).all() == [("person 1",)]
        assert sql.count == 1, forge  # a miss: read from the database
        assert backend.entry(key).startswith(signing.PREFIX)  # and stored again, signed
    assert UNPICKLED == []
    assert [m for m in warnings_of(caplog) if "bad signature" in m]


def test_a_value_moved_to_another_key_is_a_miss_logged_once(engine, sql, signed_cache, caplog):
    Session = sessionmaker(bind=engine, info=signed_cache.session_info())
    backend = Backend(signed_cache.region("one"))
    one, two = stored_key(Session, by_id(1)), stored_key(Session, by_id(2))
    moved = backend.entry(one)
    sql.reset()
    with caplog.at_level(logging.WARNING, logger="pyramid_sessioncache"):
        for _ in range(3):
            backend.set_entry(two, moved)  # id=1's rows under id=2's key, every time
            with Session() as session:
                assert session.execute(by_id(2)).all() == [("person 2",)]
    assert sql.count == 3  # three misses
    bad = [m for m in warnings_of(caplog) if "bad signature" in m]
    assert len(bad) == 1, warnings_of(caplog)  # logged once, not per read
    with Session() as session:
        assert session.execute(by_id(1)).all() == [("person 1",)]  # the original is untouched
    assert sql.count == 3


def test_a_value_moved_to_another_region_is_a_miss(engine, sql, signed_cache):
    Session = sessionmaker(bind=engine, info=signed_cache.session_info())
    one, two = Backend(signed_cache.region("one")), Backend(signed_cache.region("two"))
    key = stored_key(Session, by_id(3, "one"))
    with Session() as session:
        session.get(Person, 3).name = "person 3 renamed"
        session.commit()
    key_two = stored_key(Session, by_id(3, "two"))  # the new name, in the other region
    assert key_two == key  # the same key text: only the region tells them apart
    two.set_entry(key, one.entry(key))
    sql.reset()
    with Session() as session:
        assert session.execute(by_id(3, "two")).all() == [("person 3 renamed",)]
    assert sql.count == 1


def test_a_value_of_another_application_is_a_miss(engine, sql, kind, tmp_path, request):
    url = request.getfixturevalue("redis_url") if kind == "redis" else None
    region = {"shared": options(kind, tmp_path, url)}
    ours = SessionCache(region, secret=SECRET)
    theirs = SessionCache(region, secret="another application's secret")
    for cache in (theirs, ours):
        with sessionmaker(bind=engine, info=cache.session_info())() as session:
            assert session.execute(by_id(4, "shared")).all() == [("person 4",)]
    assert sql.count == 2  # each misses what the other stored


def test_an_entry_that_checks_but_cannot_be_unpickled_is_a_miss(engine, sql, signed_cache, caplog):
    # Signed by this application, but by code that no longer has its class.
    Session = sessionmaker(bind=engine, info=signed_cache.session_info())
    region = signed_cache.region("one")
    key = stored_key(Session, by_id(5))
    payload = pickle.dumps((0, None, Renamed()), pickle.HIGHEST_PROTOCOL).replace(b"Renamed", b"Nowhere")
    Backend(region).set_entry(key, signing.Signer(SECRET.encode(), region.namespace_name).seal(key.encode(), payload))
    sql.reset()
    with caplog.at_level(logging.WARNING, logger="pyramid_sessioncache"), Session() as session:
        assert session.execute(by_id(5)).all() == [("person 5",)]
    assert sql.count == 1 and UNPICKLED == []
    assert any("cannot be unpickled" in message for message in warnings_of(caplog))


def test_signatures_bind_the_format_the_place_and_the_deadline():
    secret = b"k" * 16
    signer = signing.Signer(secret, "region a")
    data = signer.dumps(b"key", {"a": [1, 2]}, deadline=123.5)
    assert signer.loads(b"key", data) == {"a": [1, 2]}
    assert signing.deadline(data) == 123.5
    assert signing.Signer(secret, "region a").loads(b"key", data) == {"a": [1, 2]}
    others = [
        (signing.Signer(b"x" * 16, "region a"), b"key"),  # another secret
        (signing.Signer(secret, "region b"), b"key"),  # another region
        (signing.Signer(secret, "region a", purpose=b"version"), b"key"),  # another kind of value
        (signer, b"key2"),  # another key
        (signing.Signer(secret, "region ak"), b"ey"),  # the same bytes, split elsewhere
    ]
    for other, key in others:
        assert other.loads(key, data) is signing.INVALID
    assert signer.loads(b"key", data[:-1]) is signing.INVALID
    moved_deadline = data.replace(data[36:44], signing.Signer(secret, "x").seal(b"", b"", 999.0)[36:44])
    assert signer.loads(b"key", moved_deadline) is signing.INVALID
    assert signer.loads(b"key", b"garbage") is signing.INVALID
    assert signer.loads(b"key", data.replace(signing.PREFIX, b"sc1:")) is signing.INVALID
    assert signing.loads(secret, signing.dumps(secret, 7)) == 7
    assert signing.deadline(b"short") == 0.0


def test_a_redis_region_needs_a_secret(redis_url):
    from pyramid_sessioncache.errors import MissingSecretError

    with pytest.raises(MissingSecretError, match="needs a secret"):
        SessionCache({"redis": {"type": "ext:redis", "url": redis_url}})
    assert redis.Redis.from_url(redis_url).ping()


def test_every_out_of_process_type_needs_a_secret(tmp_path, kind, request):
    from pyramid.exceptions import ConfigurationError

    from pyramid_sessioncache import parse_settings
    from pyramid_sessioncache.errors import MissingSecretError

    url = request.getfixturevalue("redis_url") if kind == "redis" else None
    region = options(kind, tmp_path, url)
    with pytest.raises(MissingSecretError, match="sessioncache.secret"):
        SessionCache({"r": region})
    ini = {"cache.regions": "r", **{f"cache.r.{name}": value for name, value in region.items()}}
    with pytest.raises(ConfigurationError, match="sessioncache.secret"):
        parse_settings(ini)


@pytest.mark.parametrize("kind", ["ext:memcached", "ext:database", "ext:mongodb", "ext:rediscluster"])
def test_beaker_types_that_unpickle_unchecked_are_refused(kind):
    from pyramid_sessioncache.errors import UnsignedBackendError

    with pytest.raises(UnsignedBackendError, match=f"cache.r.type = '{kind}'.*unpickles"):
        SessionCache({"r": {"type": kind, "url": "anything://"}}, secret=SECRET)


def test_the_add_on_refuses_them_at_start_up(tmp_path):
    from pyramid.config import Configurator
    from pyramid.exceptions import ConfigurationError

    url = f"sqlite:///{tmp_path / 'cache.sqlite'}"
    settings = {"cache.regions": "r", "cache.r.type": "ext:database", "cache.r.url": url}
    config = Configurator(settings={**settings, "sessioncache.secret": SECRET})
    with pytest.raises(ConfigurationError, match="cache.r.type = 'ext:database'.*run code"):
        config.include("pyramid_sessioncache")


def test_the_same_bytes_are_checked_and_unpickled_once(engine, sql, redis_url, monkeypatch):
    cache = SessionCache({"redis": {"type": "ext:redis", "url": redis_url}}, secret=SECRET)
    calls = []
    original = signing.Signer.open

    def counting_open(self, key, data):
        calls.append(len(data))
        return original(self, key, data)

    monkeypatch.setattr(signing.Signer, "open", counting_open)
    Session = sessionmaker(bind=engine, info=cache.session_info())
    stmt = select(Person).where(Person.id < 4).options(FromCache("redis"))
    with Session() as session:
        first = session.scalars(stmt).all()
    with Session() as session:
        calls.clear()
        second = session.scalars(stmt).all()
        third = session.scalars(stmt).all()
        assert second == third and [p.name for p in second] == [p.name for p in first]
    assert calls == []  # the bytes read were those already checked and unpickled
