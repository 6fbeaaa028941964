"""Options given as Python values: checked as the ini's are, at start-up.

``SessionCache(...)`` and ``CacheRegions(...)`` check every option with
the checks the ini's settings go through: a bad value, or a region option
its region type would ignore, raises ``InvalidOptionError``.
"""

from __future__ import annotations

import pytest

from pyramid_sessioncache import CacheRegions, InvalidOptionError, SessionCache
from pyramid_sessioncache.storage.options import MAX_EXPIRE

from .conftest import SECRET

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
        ({"type": "ext:local_session", "max_items": 50}, "max_items", "does not use it"),
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
