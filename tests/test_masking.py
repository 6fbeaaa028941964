"""Secrets never appear in an error: masked values, hidden URL passwords, in the ini and in Python.

Each case gives a secret in a way that is refused, then looks for the
secret's text in the whole printed exception (its chain included), as it
would appear in a log or on a console at start-up.
"""

from __future__ import annotations

import traceback

import pytest
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError

from pyramid_sessioncache import InvalidOptionError, SessionCache, parse_settings
from pyramid_sessioncache.masking import hide_url_passwords, is_secret_name, shown

SECRET_TEXT = "hunter2-correct-horse-battery"
SHORT_SECRET = "hunter2"

BASE = {"cache.regions": "r", "cache.r.type": "memory"}
REDIS = {"cache.regions": "r", "cache.r.type": "ext:redis", "cache.r.url": "redis://127.0.0.1:1/0"}


def printed(error: BaseException) -> str:
    """What a console shows of the exception and every exception chained to it (but the source lines)."""
    lines: list[str] = []
    seen: BaseException | None = error
    while seen is not None:
        lines.extend(traceback.format_exception_only(type(seen), seen))
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return "".join(lines)


@pytest.mark.parametrize(
    ("settings", "key", "secret"),
    [
        pytest.param({**BASE, "sessioncache.secrett": SECRET_TEXT}, "sessioncache.secrett", SECRET_TEXT, id="secrett"),
        pytest.param({**BASE, "sessioncache.secret": SHORT_SECRET}, "sessioncache.secret", SHORT_SECRET, id="short"),
        pytest.param({**BASE, "sessioncache.scret": SECRET_TEXT}, "sessioncache.scret", SECRET_TEXT, id="scret"),
        pytest.param({**BASE, "cache.r.pasword": SECRET_TEXT}, "cache.r.pasword", SECRET_TEXT, id="pasword"),
        pytest.param({**BASE, "cache.r.passwd": SECRET_TEXT}, "cache.r.passwd", SECRET_TEXT, id="passwd"),
        pytest.param({**BASE, "cache.r.pwd": SECRET_TEXT}, "cache.r.pwd", SECRET_TEXT, id="pwd"),
        pytest.param({**BASE, "cache.r.auth_token": SECRET_TEXT}, "cache.r.auth_token", SECRET_TEXT, id="token"),
        pytest.param({**BASE, "cache.r.api_key": SECRET_TEXT}, "cache.r.api_key", SECRET_TEXT, id="api_key"),
        pytest.param({**REDIS, "cache.r.password": SECRET_TEXT}, "cache.r.password", SECRET_TEXT, id="unused-password"),
        pytest.param({**BASE, "cache.password": SECRET_TEXT}, "cache.password", SECRET_TEXT, id="unused-default"),
        pytest.param(
            {**BASE, "cache.r.url": f"redis://:{SECRET_TEXT}@127.0.0.1:6379/0"}, "cache.r.url", SECRET_TEXT, id="url"
        ),
        pytest.param(
            {**BASE, "cache.r.url": f"redis://user:{SECRET_TEXT}@cache/0"}, "cache.r.url", SECRET_TEXT, id="user-url"
        ),
        pytest.param(
            {**BASE, "cache.r.url": f"redis://cache/0?password={SECRET_TEXT}"}, "cache.r.url", SECRET_TEXT, id="query"
        ),
        pytest.param(
            {**BASE, "cache.r.urll": f"redis://:{SECRET_TEXT}@cache/0"}, "cache.r.urll", SECRET_TEXT, id="unknown-url"
        ),
    ],
)
def test_the_ini_never_shows_a_secret(settings, key, secret):
    with pytest.raises(ConfigurationError) as raised:
        parse_settings(settings)
    assert f"invalid setting {key} = " in str(raised.value)
    assert secret not in printed(raised.value)


def test_a_masked_value_still_says_what_it_was():
    with pytest.raises(ConfigurationError) as raised:
        parse_settings({**BASE, "sessioncache.secret": SHORT_SECRET})
    assert "sessioncache.secret = <hidden str of 7 characters>: must be at least 16 characters" in str(raised.value)
    with pytest.raises(ConfigurationError) as raised:
        parse_settings({**BASE, "cache.r.url": f"redis://:{SECRET_TEXT}@127.0.0.1:6379/0"})
    assert "cache.r.url = 'redis://:***@127.0.0.1:6379/0': a region of type memory does not use it" in str(raised.value)


def test_a_database_url_never_shows_its_password():
    config = Configurator(settings={"sqlalchemy.url": f"nosuchdb://scott:{SECRET_TEXT}@db.example/app"})
    with pytest.raises(
        ConfigurationError, match=r"sqlalchemy.url = 'nosuchdb://scott:\*\*\*@db.example/app'"
    ) as raised:
        config.include("pyramid_sessioncache")
    assert SECRET_TEXT not in printed(raised.value)


@pytest.mark.parametrize(
    ("call", "secret"),
    [
        pytest.param(lambda: SessionCache({"r": {"type": "memory"}}, secret=SHORT_SECRET), SHORT_SECRET, id="short"),
        pytest.param(lambda: SessionCache({"r": {"type": "memory"}}, secret=b"hunter2"), "hunter2", id="short-bytes"),
        pytest.param(
            lambda: SessionCache({"r": {"type": "memory", "pasword": SECRET_TEXT}}), SECRET_TEXT, id="pasword"
        ),
        pytest.param(
            lambda: SessionCache({"r": {"type": "ext:redis", "url": "redis://h/0", "password": SECRET_TEXT}}),
            SECRET_TEXT,
            id="unused-password",
        ),
        pytest.param(
            lambda: SessionCache({"r": {"type": "memory", "url": f"redis://:{SECRET_TEXT}@h/0"}}),
            SECRET_TEXT,
            id="url",
        ),
        pytest.param(
            lambda: SessionCache({"r": {"type": "ext:redis", "url": f"redis://:{SECRET_TEXT}@h/0", "expire": 0}}),
            SECRET_TEXT,
            id="other-option-of-a-url-region",
        ),
    ],
)
def test_python_options_never_show_a_secret(call, secret):
    with pytest.raises(InvalidOptionError) as raised:
        call()
    assert secret not in printed(raised.value)


def test_settings_never_show_the_secret_in_their_repr():
    settings = parse_settings({**REDIS, "sessioncache.secret": SECRET_TEXT})
    assert settings.secret == SECRET_TEXT
    assert SECRET_TEXT not in repr(settings)


SECRET_NAMES = ["secret", "sessioncache.secrett", "scret", "password", "pasword", "passwd", "pwd", "token", "tokne"]
OTHER_NAMES = ["expire", "max_items", "url", "data_dir", "type", "cache_key", "key_length", "username"]


def test_only_secret_like_names_are_masked():
    for name in [*SECRET_NAMES, "api_key"]:
        assert is_secret_name(name), name
        assert SECRET_TEXT not in shown(name, SECRET_TEXT)
        assert shown(name, SECRET_TEXT) == f"<hidden str of {len(SECRET_TEXT)} characters>"
    # Other values stay readable; a region's name does not make its options secret.
    for name in [*OTHER_NAMES, "cache.tokens.expire"]:
        assert not is_secret_name(name), name
        assert shown(name, 60) == "60"


def test_url_passwords_are_hidden():
    hidden = {
        "redis://:pw@host:6379/0": "redis://:***@host:6379/0",
        "postgresql+psycopg://scott:tiger@db/app": "postgresql+psycopg://scott:***@db/app",
        "mongodb://user:p@ss@host/db": "mongodb://user:***@host/db",
        "redis://:p/a?s#s@host/0": "redis://:***@host/0",
        "redis://host/0?password=pw&db=1": "redis://host/0?password=***&db=1",
        "a;memcached://u:pw@one;memcached://u:pw@two": "a;memcached://u:***@one;memcached://u:***@two",
        "redis://:pw@h1:6379,redis://:pw@h2:6379": "redis://:***@h1:6379,redis://:***@h2:6379",
        "error connecting to redis://:pw@host: refused": "error connecting to redis://:***@host: refused",
    }
    kept = ["redis://user@host/0", "sqlite:////tmp/x.sqlite", "no url here"]
    assert {text: hide_url_passwords(text) for text in [*hidden, *kept]} == {**hidden, **{text: text for text in kept}}
