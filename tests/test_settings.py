"""Settings: read once at start-up; every bad value stops it, naming key and value."""

from __future__ import annotations

import pytest
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError

from pyramid_sessioncache import SessionCache, get_session_cache, parse_settings

GOOD = {
    "cache.regions": "local_session, short_term, long_term",
    "cache.type": "memory",
    "cache.local_session.type": "ext:local_session",
    "cache.short_term.expire": "60",
    "cache.long_term.type": "ext:redis",
    "cache.long_term.url": "redis://127.0.0.1:6379/0",
    "cache.long_term.expire": "3600",
    "sessioncache.default_region": "local_session",
    "sessioncache.secret": "a long random string",
}


def test_design_settings_parse():
    settings = parse_settings(GOOD)
    assert list(settings.regions) == ["local_session", "short_term", "long_term"]
    assert settings.regions["short_term"] == {"type": "memory", "expire": 60}
    assert parse_settings({"cache.regions": "a", "cache.a.max_items": "50"}).regions["a"]["max_items"] == 50
    assert settings.regions["long_term"]["type"] == "ext:redis"
    assert settings.regions["long_term"]["expire"] == 3600
    assert settings.default_region == "local_session"
    with pytest.raises(TypeError):
        settings.regions["x"] = {}


def test_defaults_without_regions():
    settings = parse_settings({})
    assert dict(settings.regions) == {"local_session": {"type": "ext:local_session"}}
    assert settings.default_region == "local_session"


def test_region_defaults_apply_to_every_region(tmp_path):
    settings = parse_settings(
        {
            "cache.regions": "a b",
            "cache.type": "file",
            "cache.data_dir": str(tmp_path),
            "cache.b.type": "memory",
            "sessioncache.secret": "a secret, long enough",
        }
    )
    assert settings.regions["a"] == {"type": "file", "data_dir": str(tmp_path)}
    assert settings.regions["b"]["type"] == "memory"
    assert settings.default_region == "a"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("cache.short_term.type", "memroy", "unknown cache type"),
        ("cache.short_term.expire", "soon", "invalid literal"),
        ("cache.short_term.expire", "-5", "positive"),
        ("sessioncache.default_region", "nowhere", "not a configured region"),
        ("cache.long_term.url", None, "needs a url"),
        ("sessioncache.default_regoin", "short_term", "unknown option 'default_regoin'"),
        ("cache.short_term.expier", "60", "unknown option 'expier'"),
        ("cache.medium.expire", "60", "not listed in cache.regions"),
        ("cache.short_term.enabled", "perhaps", "must be true or false"),
        ("cache.short_term.type", "ext:sqla", "ext:database"),
        ("sessioncache.secret", None, "its values are signed"),
        ("sessioncache.secret", "short", "at least 16 characters"),
        ("sessioncache.writes_also", "order audit_log", "one 'table: table, table' per line"),
        ("sessioncache.writes_also", "order:", "one 'table: table, table' per line"),
        ("sessioncache.writes_also", "\n  order: audit; drop table x", "cannot read"),
        ("sessioncache.writes_also", "  ", "at least one"),
        ("cache.long_term.url", "redis://127.0.0.1:notaport/0", "the port is not usable"),
        ("cache.long_term.url", "redis://127.0.0.1:0/0", "the port must be from 1 to 65535"),
        ("cache.long_term.url", "http://127.0.0.1:6379/0", "starts with redis://, rediss:// or unix://"),
        ("cache.long_term.url", "redis://127.0.0.1:6379/0?socket_timeout=abc", "'socket_timeout'"),
        ("cache.long_term.url", "redis://127.0.0.1:6379/1O", "'1O' is not a whole number"),
        ("cache.long_term.url", "redis://127.0.0.1:6379/0?db=-1", "0 or more"),
        ("cache.long_term.url", "redis://127.0.0.1:6379/0?sockettimeout=0.5", "did you mean socket_timeout?"),
        ("cache.long_term.url", "redis://127.0.0.1:6379/0?protocol=7", "protocol must be"),
        ("cache.long_term.url", "unix://", "needs the path of the socket"),
    ],
)
def test_bad_settings_name_key_and_value(key, value, message):
    settings = dict(GOOD)
    if value is None:
        settings.pop(key)
    else:
        settings[key] = value
    with pytest.raises(ConfigurationError) as raised:
        parse_settings(settings)
    assert key in str(raised.value)
    assert message in str(raised.value)
    if value is not None and key != "sessioncache.secret":
        assert repr(value) in str(raised.value)


DIRECTORY = object()  # replaced by a temporary directory


@pytest.mark.parametrize(
    ("changes", "key", "message"),
    [
        ({"cache.short_term.expire": "100000000000000000000"}, "cache.short_term.expire", "at most 315360000"),
        ({"cache.short_term.expire": "315360001"}, "cache.short_term.expire", "at most 315360000"),
        ({"cache.long_term.expire": "315360001"}, "cache.long_term.expire", "at most 315360000"),
        (
            {
                "cache.short_term.type": "file",
                "cache.short_term.data_dir": DIRECTORY,
                "cache.short_term.max_items": "50",
            },
            "cache.short_term.max_items",
            "a region of type file does not use it (used by: ext:local_session, memory)",
        ),
        ({"cache.local_session.max_bytes": "50"}, "cache.local_session.max_bytes", "does not use it"),
        ({"cache.local_session.max_items": "0"}, "cache.local_session.max_items", "positive"),
        ({"cache.long_term.max_items": "50"}, "cache.long_term.max_items", "ext:redis does not use it"),
        ({"cache.short_term.timeout": "5"}, "cache.short_term.timeout", "does not use it"),
        ({"cache.long_term.username": "me"}, "cache.long_term.username", "does not use it"),
        ({"cache.short_term.key_length": "250"}, "cache.short_term.key_length", "fixed length"),
        ({"cache.lock_dir": DIRECTORY}, "cache.lock_dir", "no region uses it"),
        (
            {
                "cache.short_term.type": "ext:memcached",
                "cache.short_term.url": "127.0.0.1:1",
                "cache.short_term.expire": "2678400",
            },
            "cache.short_term.expire",
            "at most 2592000 seconds",
        ),
        ({"cache.regions": "x" * 101}, "cache.regions", "1 to 100 characters"),
        ({"sessioncache.retry_after": "inf"}, "sessioncache.retry_after", "positive"),
        ({"sessioncache.retry_after": "100000"}, "sessioncache.retry_after", "at most 86400"),
        ({"cache.short_term.expire": -5}, "cache.short_term.expire", "positive"),
        ({"cache.short_term.expire": 0}, "cache.short_term.expire", "positive"),
        ({"cache.short_term.expire": 1.5}, "cache.short_term.expire", "an int"),
        ({"cache.short_term.max_items": 0}, "cache.short_term.max_items", "positive"),
        ({"cache.short_term.enabled": 1}, "cache.short_term.enabled", "True or False"),
        ({"sessioncache.retry_after": 0}, "sessioncache.retry_after", "positive"),
        ({"sessioncache.secret": b"k"}, "sessioncache.secret", "at least 16"),
        ({"sessioncache.invalidation": None}, "sessioncache.invalidation", "'auto' or 'manual'"),
    ],
)
def test_every_value_is_checked_as_the_engine_checks_it(tmp_path, changes, key, message):
    """Values the ini used to let through, and Python values given to a Configurator in code."""
    settings = {**GOOD, **{k: str(tmp_path) if v is DIRECTORY else v for k, v in changes.items()}}
    with pytest.raises(ConfigurationError) as raised:
        parse_settings(settings)
    text = str(raised.value)
    assert f"invalid setting {key} = " in text
    assert message in text
    value = settings[key]
    if key == "sessioncache.secret":
        assert "<hidden bytes of 1 characters>" in text
    elif isinstance(value, str):
        assert repr(value) in text
    else:
        assert f" = {value!r}:" in text
    assert not list(tmp_path.iterdir())


def test_the_ini_and_python_refuse_the_same_values():
    settings = {"cache.regions": "r", "cache.r.type": "file", "cache.r.data_dir": "/nowhere", "cache.r.max_items": "5"}
    with pytest.raises(ConfigurationError, match="cache.r.max_items = '5': a region of type file does not use it"):
        parse_settings(settings)
    with pytest.raises(ValueError, match="max_items of cache region 'r' = 5: a region of type file does not use it"):
        SessionCache({"r": {"type": "file", "data_dir": "/nowhere", "max_items": 5}})


def test_a_default_applies_to_the_regions_whose_type_uses_it(tmp_path):
    settings = parse_settings(
        {
            "cache.regions": "m f",
            "cache.max_items": "5",
            "cache.f.type": "file",
            "cache.data_dir": str(tmp_path),
            "sessioncache.secret": "a long random secret",
        }
    )
    assert dict(settings.regions["m"]) == {"type": "memory", "max_items": 5}
    assert dict(settings.regions["f"]) == {"type": "file", "data_dir": str(tmp_path)}


def test_a_default_is_named_when_a_region_refuses_it():
    settings = {"cache.regions": "m", "cache.m.type": "ext:memcached", "cache.m.url": "127.0.0.1:1"}
    with pytest.raises(ConfigurationError, match="cache.expire = '2678400': a region of type ext:memcached keeps"):
        parse_settings({**settings, "cache.expire": "2678400"})


def test_a_default_without_regions_is_an_error():
    with pytest.raises(ConfigurationError, match="cache.expire = '60': no region uses it"):
        parse_settings({"cache.expire": "60"})
    assert dict(parse_settings({"cache.regions": "r", "cache.enabled": "off"}).regions["r"]) == {
        "type": "memory",
        "enabled": False,
    }


def test_include_checks_python_values_in_the_settings():
    config = Configurator(settings={**GOOD, "cache.short_term.expire": -5})
    with pytest.raises(ConfigurationError, match="cache.short_term.expire = -5: must be a positive"):
        config.include("pyramid_sessioncache")


def test_declared_writes_parse():
    settings = parse_settings(
        {**GOOD, "sessioncache.writes_also": "\n order: audit_log, order_total\n person: summary\n"}
    )
    assert dict(settings.writes_also) == {"order": ("audit_log", "order_total"), "person": ("summary",)}
    assert dict(parse_settings(GOOD).writes_also) == {}


def test_declared_writes_given_as_python_values_are_checked():
    with pytest.raises(ValueError, match="writes_also"):
        SessionCache({"l": {"type": "ext:local_session"}}, writes_also={"order": [""]})
    cache = SessionCache({"l": {"type": "ext:local_session"}}, writes_also={"Order": "Audit_Log"})
    assert cache.writes_also == {"order": frozenset({"audit_log"})}


def test_file_region_needs_a_directory():
    with pytest.raises(ConfigurationError, match="cache.f.data_dir"):
        parse_settings({"cache.regions": "f", "cache.f.type": "file"})


def test_include_stops_startup_on_bad_settings():
    config = Configurator(settings={**GOOD, "cache.short_term.expire": "soon"})
    with pytest.raises(ConfigurationError, match="cache.short_term.expire"):
        config.include("pyramid_sessioncache")


def test_include_stops_startup_on_a_bad_engine_url():
    config = Configurator(settings={"sqlalchemy.url": "nosuchdb://x"})
    with pytest.raises(ConfigurationError, match="sqlalchemy.url"):
        config.include("pyramid_sessioncache")


def test_including_twice_is_harmless():
    config = Configurator(settings=GOOD)
    config.include("pyramid_sessioncache")
    config.include("pyramid_sessioncache")
    config.commit()
    assert list(get_session_cache(config.registry).regions) == ["local_session", "short_term", "long_term"]


def test_two_apps_keep_their_own_regions():
    first = Configurator(settings={"cache.regions": "a", "cache.a.expire": "5"})
    second = Configurator(settings={"cache.regions": "a, b", "cache.a.expire": "9"})
    for config in (first, second):
        config.include("pyramid_sessioncache")
        config.commit()
    one, two = get_session_cache(first.registry), get_session_cache(second.registry)
    assert list(one.regions) == ["a"] and list(two.regions) == ["a", "b"]
    assert one.region("a").expire == 5 and two.region("a").expire == 9
    one.region("a").put("k", "first")
    assert two.region("a").get("k") is None
    assert one.region("a").get("k") == "first"


def test_postgresql_notify_needs_postgresql(tmp_path):
    config = Configurator(
        settings={"sqlalchemy.url": f"sqlite:///{tmp_path / 'x.sqlite'}", "sessioncache.postgresql_notify": "true"}
    )
    config.include("pyramid_sessioncache")
    with pytest.raises(ConfigurationError, match="sessioncache.postgresql_notify"):
        config.commit()  # once the application's engine is known
    with pytest.raises(ConfigurationError, match="true or false"):
        parse_settings({"sessioncache.postgresql_notify": "sometimes"})


def test_a_bad_redis_url_stops_include_naming_the_setting_with_its_password_hidden():
    """Refused at start-up, never connected to; the password is not in the message."""
    settings = {**GOOD, "cache.long_term.url": "redis://:hunter2-password@127.0.0.1:6379/0?sockettimeout=1"}
    with pytest.raises(ConfigurationError) as raised:
        Configurator(settings=settings).include("pyramid_sessioncache")
    message = str(raised.value)
    assert "invalid setting cache.long_term.url = 'redis://:***@127.0.0.1:6379/0?sockettimeout=1'" in message
    assert "'sockettimeout' (did you mean socket_timeout?)" in message
    assert "hunter2" not in message


def test_an_option_only_the_built_region_checks_is_named_as_a_setting():
    """``near_max_items`` without ``near`` is refused by the region itself: the error still names the setting."""
    settings = {**GOOD, "cache.long_term.near_max_items": "5"}
    with pytest.raises(ConfigurationError, match=r"invalid setting cache.long_term.near_max_items = 5: .*near = true"):
        Configurator(settings=settings).include("pyramid_sessioncache")


@pytest.mark.parametrize("order", ["long.term, long", "long, long.term"])
def test_a_region_name_may_hold_dots_as_with_pyramid_beaker(order):
    """``cache.long.term.expire`` is region long.term's, whichever of long and long.term is listed first."""
    parsed = parse_settings(
        {
            "cache.regions": order,
            "cache.long.term.expire": "60",
            "cache.long.term.max_items": "5",
            "cache.long.expire": "7",
        }
    )
    assert dict(parsed.regions["long.term"]) == {"type": "memory", "expire": 60, "max_items": 5}
    assert dict(parsed.regions["long"]) == {"type": "memory", "expire": 7}
    with pytest.raises(ConfigurationError, match="cache.long.term.expier = '60': unknown option 'expier'"):
        parse_settings({"cache.regions": order, "cache.long.term.expier": "60"})
    with pytest.raises(ConfigurationError, match="cache.longer.expire = '60': region 'longer' is not listed"):
        parse_settings({"cache.regions": order, "cache.longer.expire": "60"})
