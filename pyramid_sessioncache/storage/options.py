"""Region options: how each is read from an ini string, how it is checked, which region types use it.

One table serves both entrances.  :data:`REGION_OPTIONS` gives each option
a ``convert`` (an ini string to a Python value, for the Pyramid add-on's
``cache.*`` settings) and a ``check`` (a Python value, whoever gave it);
:func:`checked_region` runs the checks on the options a
:class:`~pyramid_sessioncache.Region` is built with, so ``SessionCache(...)``
and the ini accept and refuse the same values.  :data:`REGION_TYPES` says
which options each region type uses: an option its type would ignore is
an error, as is an option that is not in the table.

A bad value raises :class:`~pyramid_sessioncache.InvalidOptionError`,
naming the option and its value (masked when it may be a secret); the
add-on turns it into a ``ConfigurationError`` naming the setting.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

from .. import _beaker
from ..errors import InvalidOptionError
from ..masking import hide_url_passwords

#: The longest ``expire`` (and ``timeout``) of any entry, in seconds: ten
#: years.  Far longer than any cache needs (leave ``expire`` out for entries
#: that never expire), far below what a backend refuses (Redis takes at
#: most about 2**63 / 1000 seconds) and within a signed 32-bit number.
MAX_EXPIRE = 10 * 365 * 24 * 3600
#: memcached reads an expiry longer than 30 days as a Unix time, in 1970.
MEMCACHED_MAX_EXPIRE = 30 * 24 * 3600
#: The longest ``retry_after``, in seconds: a day.
MAX_RETRY_AFTER = 24 * 3600.0
#: The longest ``lock_timeout``, in seconds: an hour.
MAX_LOCK_TIMEOUT = 3600.0
#: The shortest ``secret``, in characters.
MIN_SECRET = 16
#: The longest region name.
MAX_REGION_NAME = 100

LOCAL_TYPE = "ext:local_session"
#: The schemes of the URLs redis-py connects to.
REDIS_SCHEMES = ("redis", "rediss", "unix")


class Option(NamedTuple):
    """How an option is read from an ini string and checked.

    ``convert(text)`` returns the Python value of an ini string; ``check(value)``
    returns the value to use (the same, or a normalized equivalent).  Both
    raise ``ValueError`` or ``TypeError`` with a message saying what to give.
    """

    convert: Callable[[str], Any]
    check: Callable[[Any], Any]


class RegionType(NamedTuple):
    """What a region type does with the options.

    ``uses``: the options it uses besides :data:`COMMON_OPTIONS`;
    ``requires``: the options it cannot do without; ``max_expire``: its
    longest ``expire``.
    """

    uses: frozenset[str]
    requires: frozenset[str] = frozenset()
    max_expire: int = MAX_EXPIRE


# -- converters: an ini string to a Python value ------------------------------------------

#: The words of ``pyramid.settings.asbool``.
_TRUE = frozenset({"t", "true", "y", "yes", "on", "1"})
_FALSE = frozenset({"f", "false", "n", "no", "off", "0"})


def _int(text: str) -> int:
    return int(text.strip())


def _number(text: str) -> float:
    return float(text.strip())


def _boolean(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError("must be true or false")


def _stripped(text: str) -> str:
    return text.strip()


def _as_is(text: str) -> str:
    return text


# -- checks: a Python value, whoever gave it ----------------------------------------------


def _name_of(value: Any) -> str:
    return type(value).__name__


def _seconds(value: Any, maximum: int = MAX_EXPIRE) -> int | None:
    if value is None:
        return None
    if type(value) is not int:
        raise TypeError(f"must be a whole number of seconds (an int), or None for the default; not a {_name_of(value)}")
    if not 0 < value <= maximum:
        raise ValueError(
            f"must be a positive whole number of seconds, at most {maximum}; 0 or less does not mean "
            "'never': leave it out (None) for entries that never expire"
        )
    return value


def _positive_int(value: Any) -> int:
    if type(value) is not int:
        raise TypeError(f"must be a whole number (an int), not a {_name_of(value)}")
    if value <= 0:
        raise ValueError("must be a positive whole number")
    return value


def _bool(value: Any) -> bool:
    if type(value) is not bool:
        raise TypeError(f"must be True or False, not a {_name_of(value)}")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"must be a string, not a {_name_of(value)}")
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _directory(value: Any) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    return _text(value)


def _url(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, bytes)):
        raise TypeError(f"must be a URL (a string), or a client object where Beaker takes one; not a {_name_of(value)}")
    return _text(value) if isinstance(value, str) else value


def _redis_url(url: str) -> str:
    """Return ``url`` if redis-py can use it as Beaker will give it (``redis.Redis.from_url(url)``).

    Checked without connecting, so that start-up stops on a URL that would
    fail every request: a scheme redis-py refuses, a bad port, a database
    that is not a whole number (redis-py silently uses database 0 for
    ``/1O``), a query value it cannot convert, an option it does not know
    (it passes those to the connection, which raises ``TypeError`` at the
    first connection).  Raises ``ValueError`` saying which.
    """
    try:
        import redis
        from redis.connection import URL_QUERY_ARGUMENT_PARSERS
    except ImportError:  # pragma: no cover - the type check refuses ext:redis without redis-py
        return url
    parts = urlsplit(url)
    if parts.scheme not in REDIS_SCHEMES:
        raise ValueError("a Redis URL starts with redis://, rediss:// or unix://")
    try:
        port = parts.port
    except ValueError as exc:  # not a number, or out of range
        raise ValueError(f"the port is not usable: {exc}") from None
    if port == 0:
        raise ValueError("the port must be from 1 to 65535")
    if parts.scheme == "unix" and not parts.path:
        raise ValueError("a unix:// URL needs the path of the socket: unix:///run/redis/redis.sock")
    query = parse_qs(parts.query)
    database = unquote(parts.path).replace("/", "")  # as redis-py reads it
    if parts.scheme != "unix" and database and "db" not in query and not database.isdigit():
        raise ValueError(
            f"the database {database!r} is not a whole number (redis-py would use database 0): "
            "redis://host:6379/0, or ?db=0"
        )
    try:
        pool = redis.ConnectionPool.from_url(url)
    except ValueError as exc:  # a query value it cannot convert
        raise ValueError(f"redis-py cannot use it: {hide_url_passwords(str(exc))}") from None
    db = pool.connection_kwargs.get("db", 0)
    if type(db) is not int or db < 0:
        raise ValueError("the database must be a whole number, 0 or more")
    try:
        # Builds what redis-py would connect with (nothing is sent): an
        # option it does not know fails here, not at the first request.
        pool.connection_class(**pool.connection_kwargs)
    except TypeError as exc:
        found = re.search(r"keyword argument '([^']+)'", str(exc))
        unknown = f"{found[1]!r}{_did_you_mean(found[1], sorted(URL_QUERY_ARGUMENT_PARSERS))}" if found else "in it"
        raise ValueError(
            f"redis-py knows no option {unknown}: it would fail at the first connection; "
            "remove the option or correct its name"
        ) from None
    except Exception as exc:  # redis-py refuses a value: never a request's problem later
        raise ValueError(f"redis-py cannot use it: {type(exc).__name__}: {hide_url_passwords(str(exc))}") from None
    return url


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _memcache_module(value: Any) -> str:
    if _text(value) not in ("auto", "memcache", "cmemcache", "bmemcached"):
        raise ValueError("must be auto, memcache, cmemcache or bmemcached")
    return value


def _region_type(value: Any) -> str:
    from beaker.exceptions import InvalidCacheBackendError

    kind = _text(value)
    if kind == LOCAL_TYPE:
        return kind
    if kind == "ext:sqla":
        raise ValueError("ext:sqla needs Python objects; use ext:database with a url")
    try:
        backend = _beaker.backend(kind)
    except KeyError:
        raise ValueError("unknown cache type") from None
    if isinstance(backend, InvalidCacheBackendError):
        raise ValueError(f"cache type is not usable here: {backend}")
    return kind


def _retry_after(value: Any) -> float:
    if type(value) not in (int, float):
        raise TypeError(f"must be a number of seconds, not a {_name_of(value)}")
    if not (math.isfinite(value) and 0 < value <= MAX_RETRY_AFTER):
        raise ValueError(f"must be a positive number of seconds, at most {MAX_RETRY_AFTER:g}")
    return float(value)


def _lock_timeout(value: Any) -> float:
    if type(value) not in (int, float):
        raise TypeError(f"must be a number of seconds, not a {_name_of(value)}")
    if not (math.isfinite(value) and 0 < value <= MAX_LOCK_TIMEOUT):
        raise ValueError(
            f"must be a positive number of seconds, at most {MAX_LOCK_TIMEOUT:g}: how long a request waits "
            "for another that regenerates the same entry before it runs the query itself"
        )
    return float(value)


def _secret(value: Any) -> str | bytes:
    if not isinstance(value, (str, bytes)):
        raise TypeError(f"must be a string (or bytes), not a {_name_of(value)}")
    if len(value.strip()) < MIN_SECRET:
        raise ValueError(f"must be at least {MIN_SECRET} characters: a long random string, the same in every process")
    return value


#: Region options: name -> how to read and check it.  Options not in this
#: table are refused, so a typo stops start-up instead of being ignored.
REGION_OPTIONS: Mapping[str, Option] = MappingProxyType(
    {
        "type": Option(_stripped, _region_type),
        "expire": Option(_int, _seconds),
        "enabled": Option(_boolean, _bool),
        "max_items": Option(_int, _positive_int),
        "max_bytes": Option(_int, _positive_int),
        "max_entry_bytes": Option(_int, _positive_int),
        "allow_shared_dir": Option(_boolean, _bool),
        "lock_timeout": Option(_number, _lock_timeout),
        "url": Option(_stripped, _url),
        "data_dir": Option(_stripped, _directory),
        "lock_dir": Option(_stripped, _directory),
        "timeout": Option(_int, _seconds),
        "memcache_module": Option(_stripped, _memcache_module),
        "username": Option(_stripped, _text),
        "password": Option(_as_is, _text),
        "table_name": Option(_stripped, _text),
        "schema_name": Option(_stripped, _text),
        "near": Option(_boolean, _bool),
        "near_max_items": Option(_int, _positive_int),
        "near_max_bytes": Option(_int, _positive_int),
    }
)

#: Options every region type uses.
COMMON_OPTIONS = frozenset({"type", "expire", "enabled"})

#: Beaker options that no region of this add-on uses, and why.
NOT_USED: Mapping[str, str] = MappingProxyType(
    {
        "key_length": "the keys of pyramid_sessioncache are digests of a fixed length, never cut "
        "(Beaker's key_length is for its cache decorators); remove it",
        "protocol": "no region type of pyramid_sessioncache uses it; remove it",
    }
)

_DIRECTORIES = frozenset({"data_dir", "lock_dir", "allow_shared_dir"})
#: Every region type that stores pickled values measures them.
_MEASURED = frozenset({"max_entry_bytes"})
#: Options of every region that other requests share (see ``locks.py``).
_SHARED = frozenset({"lock_timeout"})

#: What each region type uses.  A type registered by another package (a
#: ``beaker.backends`` entry point) gets every option Beaker passes on to
#: its namespace, but not ``max_items``, which is this package's own.
REGION_TYPES: Mapping[str, RegionType] = MappingProxyType(
    {
        "memory": RegionType(frozenset({"max_items", "max_bytes"}) | _MEASURED | _SHARED),
        LOCAL_TYPE: RegionType(frozenset({"max_items"})),
        "file": RegionType(_DIRECTORIES | _MEASURED | _SHARED, frozenset({"data_dir"})),
        "dbm": RegionType(_DIRECTORIES | _MEASURED | _SHARED, frozenset({"data_dir"})),
        # A Redis password goes in the URL: redis://:password@host:6379/0.
        "ext:redis": RegionType(
            frozenset({"url", "timeout", "near", "near_max_items", "near_max_bytes"}) | _MEASURED | _SHARED,
            frozenset({"url"}),
        ),
        "ext:rediscluster": RegionType(
            frozenset({"url", "timeout", "username", "password"}) | _SHARED, frozenset({"url"})
        ),
        "ext:memcached": RegionType(
            frozenset({"url", "memcache_module"}) | _DIRECTORIES | _SHARED, frozenset({"url"}), MEMCACHED_MAX_EXPIRE
        ),
        "ext:database": RegionType(
            frozenset({"url", "table_name", "schema_name"}) | _DIRECTORIES | _SHARED, frozenset({"url"})
        ),
        "ext:mongodb": RegionType(frozenset({"url"}) | _SHARED, frozenset({"url"})),
    }
)
_OTHER_TYPE = RegionType(
    frozenset(REGION_OPTIONS)
    - COMMON_OPTIONS
    - {"max_items", "max_bytes", "max_entry_bytes", "allow_shared_dir", "near", "near_max_items", "near_max_bytes"}
)

#: Options of a whole set of regions (:class:`~pyramid_sessioncache.CacheRegions`).
REGIONS_OPTIONS: Mapping[str, Option] = MappingProxyType(
    {
        "retry_after": Option(_number, _retry_after),
        "secret": Option(_stripped, _secret),
    }
)


def region_type(kind: str) -> RegionType:
    """Return what the region type ``kind`` (already checked) does with the options."""
    return REGION_TYPES.get(kind, _OTHER_TYPE)


def uses(kind: str, option: str) -> bool:
    """Whether a region of type ``kind`` uses ``option``."""
    return option in COMMON_OPTIONS or option in region_type(kind).uses


def checked(table: Mapping[str, Option], option: str, value: Any, region: str | None = None) -> Any:
    """Return ``value`` checked as the option ``option`` of ``table``.

    Raises :class:`~pyramid_sessioncache.InvalidOptionError` for an unknown
    option or a bad value.
    """
    spec = table.get(option)
    if spec is None:
        reason = NOT_USED.get(option) or f"unknown option {option!r} (known: {', '.join(sorted(table))})"
        raise InvalidOptionError(option, value, reason, region)
    try:
        return spec.check(value)
    except (TypeError, ValueError) as exc:
        raise InvalidOptionError(option, value, str(exc), region) from None


def from_setting(table: Mapping[str, Option], option: str, raw: Any, region: str | None = None) -> Any:
    """Return the value of an ini setting: ``raw`` converted if it is a string, then checked.

    A Python value (settings given to a ``Configurator`` in code) is
    checked as it is.  Raises :class:`~pyramid_sessioncache.InvalidOptionError`.
    """
    spec = table.get(option)
    if spec is None or not isinstance(raw, str):
        return checked(table, option, raw, region)
    try:
        return spec.check(spec.convert(raw))
    except (TypeError, ValueError) as exc:  # shown as written, not as converted
        raise InvalidOptionError(option, raw, str(exc) or "not a valid value", region) from None


def region_name(name: Any) -> str:
    """Return ``name`` if it can name a region: printable, without spaces, at most 100 characters.

    Else raise ``ValueError`` or ``TypeError``.
    """
    if not isinstance(name, str):
        raise TypeError(f"a region name is a string, not a {_name_of(name)}")
    if not name or len(name) > MAX_REGION_NAME:
        raise ValueError(f"a region name has 1 to {MAX_REGION_NAME} characters")
    if not name.isprintable() or any(char.isspace() for char in name):
        raise ValueError("a region name has no spaces or control characters")
    return name


def checked_region(name: Any, options: Any) -> dict[str, Any]:
    """Return the options of the region ``name``, checked: every value, and that its type uses each.

    ``type`` defaults to ``memory``.  Raises
    :class:`~pyramid_sessioncache.InvalidOptionError` naming the first bad
    option.
    """
    try:
        region_name(name)
    except (TypeError, ValueError) as exc:
        raise InvalidOptionError("region", name, str(exc)) from None
    if not isinstance(options, Mapping):
        raise InvalidOptionError("options", options, "a region's options are a mapping of name to value", name)
    kind = checked(REGION_OPTIONS, "type", options.get("type", "memory"), name)
    found = region_type(kind)
    result: dict[str, Any] = {"type": kind}
    for option, value in options.items():
        if option == "type":
            continue
        if option in REGION_OPTIONS and not uses(kind, option):
            users = sorted(other for other, known in REGION_TYPES.items() if option in known.uses)
            raise InvalidOptionError(
                option,
                value,
                f"a region of type {kind} does not use it (used by: {', '.join(users)}); remove it",
                name,
            )
        result[option] = checked(REGION_OPTIONS, option, value, name)
    url = result.get("url")
    if kind == "ext:redis" and isinstance(url, str):  # else a client object Beaker uses as it is
        try:
            _redis_url(url)
        except ValueError as exc:
            raise InvalidOptionError("url", url, str(exc), name) from None
    missing = sorted(found.requires - result.keys())
    if missing:
        raise InvalidOptionError(missing[0], None, f"a region of type {kind} needs a {missing[0]}", name)
    for option in ("expire", "timeout"):
        value = result.get(option)
        if value is not None and value > found.max_expire:
            raise InvalidOptionError(
                option, value, f"a region of type {kind} keeps an entry at most {found.max_expire} seconds", name
            )
    return result


def check_expire(expire: Any, maximum: int = MAX_EXPIRE) -> int | None:
    """Return ``expire``, an entry's lifetime given at a call: a positive int of seconds, or None.

    Raises :class:`~pyramid_sessioncache.InvalidOptionError` for anything
    else (``0``, a negative number, a ``bool``, a ``float``, a ``str``, more
    than ``maximum``), so that no entry is ever stored with a lifetime its
    readers cannot use.
    """
    if expire is None or (type(expire) is int and 0 < expire <= maximum):
        return expire
    try:
        return _seconds(expire, maximum)
    except (TypeError, ValueError) as exc:
        raise InvalidOptionError("expire", expire, str(exc)) from None
