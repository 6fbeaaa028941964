"""Options given as Python values: checked as the ini's are, refused at the call, nothing stored.

``SessionCache(...)`` and ``CacheRegions(...)`` check every option at
start-up; ``FromCache``, ``RelationshipCache`` and ``cached_query`` check
``expire`` and ``cache_key`` when called, before any SQL runs.  A refused
call leaves nothing behind: the next valid reader misses, stores, and hits.
"""

from __future__ import annotations

import logging

import pytest
from pyramid.config import Configurator
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker
from webtest import TestApp

from pyramid_sessioncache import (
    CacheRegions,
    FromCache,
    InvalidOptionError,
    RelationshipCache,
    SessionCache,
    SessionCacheError,
    cache_parameters,
    cached_query,
    get_engine,
)
from pyramid_sessioncache.storage.options import MAX_EXPIRE

from .conftest import SECRET, SQLCounter
from .models import Person

BAD_EXPIRES = [
    pytest.param(0, id="zero"),
    pytest.param(-5, id="negative"),
    pytest.param(float("inf"), id="inf"),
    pytest.param(1.5, id="float"),
    pytest.param("60", id="str"),
    pytest.param(True, id="bool"),
    pytest.param(MAX_EXPIRE + 1, id="over-ten-years"),
    pytest.param(10**20, id="huge"),
]


def by_id(person_id: int):
    return select(Person).where(Person.id == person_id)


def _from_cache(session, expire):
    return session.scalars(by_id(3).options(FromCache("memory", expire=expire))).all()


def _relationship_cache(session, expire):
    option = RelationshipCache(Person.addresses, "memory", expire=expire)
    return [person.addresses for person in session.scalars(by_id(3).options(option))]


def _cached_query(session, expire):
    return cached_query(session, by_id(3), "memory", expire=expire).scalars().all()


def _legacy_query(session, expire):
    return cached_query(session, session.query(Person).filter(Person.id == 3), "memory", expire=expire).all()


CALLS = {
    "FromCache": _from_cache,
    "RelationshipCache": _relationship_cache,
    "cached_query": _cached_query,
    "cached_query(Query)": _legacy_query,
}


def assert_a_valid_reader_misses_then_hits(Session, sql, person_id: int = 3) -> None:
    """Nothing was stored for the statement, and the region still works: one miss, then a hit."""
    for expected in (1, 0):
        sql.reset()
        with Session() as session:
            assert cached_query(session, by_id(person_id), "memory", expire=60).scalars().one().id == person_id
        assert sql.count == expected


@pytest.mark.parametrize("expire", BAD_EXPIRES)
@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_bad_expire_is_refused_at_the_call(Session, sql, call, expire):
    with Session() as session:
        with pytest.raises(InvalidOptionError, match="invalid option expire = ") as raised:
            CALLS[call](session, expire)
        assert sql.count == 0
        assert not session.in_transaction()
    error = raised.value
    assert isinstance(error, SessionCacheError) and isinstance(error, ValueError) and isinstance(error, TypeError)
    assert error.option == "expire"
    assert_a_valid_reader_misses_then_hits(Session, sql)


def test_request_cached_query_checks_expire_before_the_view_runs_sql(db_url):
    def person(request):
        expire = {"bad": "60", "good": 60}[request.params["expire"]]
        found = request.cached_query(by_id(3), region="shared", expire=expire).scalars().one()
        return {"name": found.name}

    config = Configurator(settings={"sqlalchemy.url": db_url, "cache.regions": "shared"})
    config.include("pyramid_sessioncache")
    config.add_route("person", "/person")
    config.add_view(person, route_name="person", renderer="json")
    web = TestApp(config.make_wsgi_app())
    sql = SQLCounter(get_engine(config.registry))
    with pytest.raises(InvalidOptionError, match="invalid option expire = '60'"):
        web.get("/person?expire=bad")
    assert sql.count == 0
    for expected in (1, 0):
        sql.reset()
        assert web.get("/person?expire=good").json == {"name": "person 3"}
        assert sql.count == expected


@pytest.fixture
def shared_cache(region_options, region):
    """A cache with every shared region (``region`` adds Redis to the options)."""
    return SessionCache(region_options, secret=SECRET)


@pytest.mark.parametrize("expire", BAD_EXPIRES)
def test_a_region_refuses_a_bad_expire_and_keeps_working(shared_cache, region, expire):
    found = shared_cache.region(region)
    found.put("kept", "value")
    with pytest.raises(InvalidOptionError, match="expire"):
        found.put("bad", "value", expire=expire)
    created = []
    with pytest.raises(InvalidOptionError, match="expire"):
        found.get_or_create("bad", lambda: created.append(1) or "created", expire=expire)
    assert created == []
    assert found.get("bad") is None
    assert found.get("kept") == "value"
    assert found.available()


def test_an_entry_with_an_unusable_lifetime_reads_as_missing(cache):
    # Written through Beaker's own API, which checks nothing: readers are not broken by it.
    region = cache.region("memory")
    region.cache_for().put("foreign", "value", expiretime="60")
    assert region.get("foreign") is None
    assert region.get_or_create("foreign", lambda: "fresh") == ("fresh", False)
    assert region.get("foreign") == "fresh"


def test_a_negative_expire_never_switches_a_redis_region_off(engine, sql, redis_url):
    cache = SessionCache({"redis": {"type": "ext:redis", "url": redis_url}}, secret=SECRET)
    Session = sessionmaker(bind=engine, info=cache.session_info())
    with Session() as session, pytest.raises(InvalidOptionError, match="expire"):
        cached_query(session, by_id(7), "redis", expire=-5)
    assert sql.count == 0
    assert cache.region("redis").available()
    for expected in (1, 0):
        sql.reset()
        with Session() as session:
            assert cached_query(session, by_id(7), "redis").scalars().one().id == 7
        assert sql.count == expected


def test_a_redis_url_with_options_redis_py_knows_is_accepted_and_caches(engine, sql, redis_url):
    """The URL check refuses only what redis-py cannot use: its own options and a database pass, and work."""
    url = f"{redis_url}?db=3&socket_timeout=2&socket_connect_timeout=2&client_name=sessioncache"
    cache = SessionCache({"redis": {"type": "ext:redis", "url": url}}, secret=SECRET)
    Session = sessionmaker(bind=engine, info=cache.session_info())
    try:
        for expected in (1, 0):
            sql.reset()
            with Session() as session:
                assert cached_query(session, by_id(8), "redis").scalars().one().id == 8
            assert sql.count == expected
    finally:
        cache.close()


DIRECTORY = object()  # replaced by a temporary directory
REDIS_URL = "redis://127.0.0.1:1/0"  # never connected to: the options are refused first


@pytest.mark.parametrize(
    ("options", "option", "message"),
    [
        ({"type": "memory", "expire": 0}, "expire", "positive"),
        ({"type": "memory", "expire": -5}, "expire", "positive"),
        ({"type": "memory", "expire": float("inf")}, "expire", "an int"),
        ({"type": "memory", "expire": "60"}, "expire", "an int"),
        ({"type": "memory", "expire": True}, "expire", "an int"),
        ({"type": "memory", "expire": 10**20}, "expire", "at most"),
        ({"type": "memory", "max_items": 0}, "max_items", "positive"),
        ({"type": "memory", "max_items": "50"}, "max_items", "an int"),
        ({"type": "memory", "enabled": "false"}, "enabled", "True or False"),
        ({"type": "memory", "timeout": 5}, "timeout", "does not use it"),
        ({"type": "memory", "key_length": 250}, "key_length", "fixed length"),
        ({"type": "file", "data_dir": DIRECTORY, "max_items": 50}, "max_items", "type file does not use it"),
        ({"type": "ext:local_session", "max_bytes": 50}, "max_bytes", "does not use it"),
        ({"type": "ext:local_session", "max_items": 0}, "max_items", "positive"),
        ({"type": "ext:redis", "url": REDIS_URL, "max_items": 50}, "max_items", "does not use it"),
        ({"type": "ext:redis", "url": REDIS_URL, "timeout": 10**20}, "timeout", "at most"),
        ({"type": "ext:redis", "url": REDIS_URL, "password": "a password, long"}, "password", "does not use it"),
        ({"type": "ext:redis"}, "url", "needs a url"),
        ({"type": "file"}, "data_dir", "needs a data_dir"),
        ({"type": "memroy"}, "type", "unknown cache type"),
        ({"type": "memory", "expier": 60}, "expier", "unknown option 'expier'"),
        ({"type": "ext:memcached", "url": "127.0.0.1:1", "expire": 31 * 86400}, "expire", "at most 2592000 seconds"),
        ({"type": "ext:redis", "url": 6379}, "url", "must be a URL"),
        ({"type": "file", "data_dir": ""}, "data_dir", "must not be empty"),
        ({"type": "file", "data_dir": b"/tmp"}, "data_dir", "must be a string"),
        ({"type": "ext:redis", "url": "redis://127.0.0.1:6379/1O"}, "url", "not a whole number"),
        ({"type": "ext:redis", "url": REDIS_URL + "?sockettimeout=1"}, "url", "did you mean socket_timeout"),
        ({"type": "ext:redis", "url": "tcp://127.0.0.1:6379/0"}, "url", "starts with redis://"),
    ],
)
def test_bad_region_options_given_in_python(tmp_path, options, option, message):
    options = {key: str(tmp_path) if value is DIRECTORY else value for key, value in options.items()}
    with pytest.raises(InvalidOptionError, match=message) as raised:
        SessionCache({"r": options}, secret=SECRET)
    assert raised.value.option == option
    assert raised.value.region == "r"
    assert f"invalid option {option} of cache region 'r' = " in str(raised.value)
    assert not list(tmp_path.iterdir())  # refused before the backend made anything


@pytest.mark.parametrize(
    ("arguments", "option", "message"),
    [
        ({"secret": b"k"}, "secret", "at least 16"),
        ({"secret": "short"}, "secret", "at least 16"),
        ({"secret": 1234567890123456789}, "secret", "a string"),
        ({"retry_after": 0}, "retry_after", "positive"),
        ({"retry_after": float("inf")}, "retry_after", "positive"),
        ({"retry_after": float("nan")}, "retry_after", "positive"),
        ({"retry_after": "5"}, "retry_after", "a number"),
        ({"retry_after": True}, "retry_after", "a number"),
        ({"invalidation": "sometimes"}, "invalidation", "'auto' or 'manual'"),
        ({"default_region": 5}, "default_region", "a string"),
        ({"writes_also": {"order": [""]}}, "writes_also", "table names"),
        ({"writes_also": ["order"]}, "writes_also", "maps a table name"),
    ],
)
def test_bad_cache_options_given_in_python(arguments, option, message):
    with pytest.raises(InvalidOptionError, match=message) as raised:
        SessionCache({"local": {"type": "ext:local_session"}}, **arguments)
    assert raised.value.option == option


@pytest.mark.parametrize("name", ["bad\nname", "two words", "", "x" * 101, 5])
def test_region_names_are_checked(name):
    with pytest.raises(InvalidOptionError, match="region name"):
        SessionCache({name: {"type": "memory"}})


def test_regions_and_their_options_are_mappings():
    with pytest.raises(InvalidOptionError, match="options are a mapping"):
        SessionCache({"r": ["type", "memory"]})
    with pytest.raises(InvalidOptionError, match="must map each region name"):
        SessionCache([("r", {"type": "memory"})])


def test_ready_regions_keep_their_own_options():
    regions = CacheRegions({"m": {"type": "memory"}})
    with pytest.raises(InvalidOptionError, match="give it to CacheRegions"):
        SessionCache(regions, secret=SECRET)
    with pytest.raises(InvalidOptionError, match="give it to CacheRegions"):
        SessionCache(regions, retry_after=1)
    with pytest.raises(InvalidOptionError, match="retry_after"):
        CacheRegions({"m": {"type": "memory"}}, retry_after=0)
    assert SessionCache(regions).regions is regions


def test_good_python_options_are_kept(tmp_path):
    cache = SessionCache(
        {
            "m": {"type": "memory", "expire": MAX_EXPIRE, "max_items": 5, "enabled": True},
            "f": {"type": "file", "data_dir": tmp_path, "lock_dir": str(tmp_path / "locks")},
            "l": {"type": "ext:local_session", "expire": None},
        },
        retry_after=0.5,
        secret=b"sixteen bytes...",
    )
    assert cache.region("m").expire == MAX_EXPIRE
    assert cache.region("m").retry_after == 0.5
    cache.region("f").put("k", "v")  # a Path is a directory too
    assert cache.region("f").get("k") == "v"


BAD_LABELS = [
    pytest.param("people\nINFO forged line", id="newline"),
    pytest.param("people\r", id="carriage-return"),
    pytest.param("people\u2028forged", id="line-separator"),
    pytest.param("\x1b[31mred", id="escape"),
    pytest.param("x" * 201, id="too-long"),
    pytest.param(5, id="int"),
    pytest.param(b"people", id="bytes"),
]


@pytest.mark.parametrize("label", BAD_LABELS)
def test_a_bad_cache_key_is_refused_at_the_call(Session, sql, label):
    with Session() as session:
        with pytest.raises(InvalidOptionError, match="invalid option cache_key = "):
            cached_query(session, by_id(3), "memory", cache_key=label)
        with pytest.raises(InvalidOptionError, match="cache_key"):
            FromCache("memory", cache_key=label)
        with pytest.raises(InvalidOptionError, match="cache_key"):
            cache_parameters(by_id(3), session, "memory", cache_key=label)
    assert sql.count == 0
    assert_a_valid_reader_misses_then_hits(Session, sql)


def test_a_bad_region_argument_is_refused_at_the_call():
    with pytest.raises(InvalidOptionError, match="region name"):
        FromCache(5)


def test_a_label_cannot_forge_a_log_line(Session, caplog):
    forged = "people\n2024-01-01 INFO [app] forged line"
    with caplog.at_level(logging.DEBUG, logger="pyramid_sessioncache"), Session() as session:
        with pytest.raises(InvalidOptionError):
            cached_query(session, by_id(4), "memory", cache_key=forged)
        assert not caplog.records
        # An option whose label is changed after its checks is still logged on one line.
        option = FromCache("memory", cache_key="people")
        option.cache_key = forged
        session.scalars(by_id(4).options(option)).all()
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("cache miss: region memory key ")
    assert "\n" not in lines[0] and "\\n" in lines[0]
