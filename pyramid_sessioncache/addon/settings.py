"""Reading and validating the add-on's ini settings.

Regions follow pyramid_beaker's ``cache.`` convention: ``cache.regions``
names them, ``cache.<option>`` sets a default for every region and
``cache.<region>.<option>`` sets one region's value.  The add-on's own
options use the ``sessioncache.`` prefix.  Everything is parsed once, at
start-up, into a frozen :class:`Settings`; a bad value raises
:class:`pyramid.exceptions.ConfigurationError` naming the key and the value.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from pyramid.exceptions import ConfigurationError
from pyramid.settings import aslist, falsey, truthy

from ..storage.region import SIGNED_TYPES

#: Region types whose namespace lives outside the process and so needs a URL.
URL_TYPES = frozenset({"ext:redis", "ext:rediscluster", "ext:memcached", "ext:database", "ext:mongodb"})
#: Region types that keep their data in files and so need a directory.
DIRECTORY_TYPES = frozenset({"file", "dbm"})
LOCAL_TYPE = "ext:local_session"

DEFAULT_REGIONS = MappingProxyType({"local_session": MappingProxyType({"type": LOCAL_TYPE})})


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("must be a positive whole number of seconds")
    return number


def _secret(value: str) -> str:
    value = value.strip()
    if len(value) < 16:
        raise ValueError("must be at least 16 characters: a long random string, the same in every process")
    return value


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError("must be a positive number of seconds")
    return number


def _boolean(value: str) -> bool:
    word = value.strip().lower()
    if word in truthy:
        return True
    if word in falsey:
        return False
    raise ValueError("must be true or false")


def _region_type(value: str) -> str:
    from beaker.cache import clsmap
    from beaker.exceptions import InvalidCacheBackendError

    value = value.strip()
    if value == LOCAL_TYPE:
        return value
    try:
        backend = clsmap[value]
    except KeyError:
        raise ValueError("unknown cache type") from None
    if isinstance(backend, InvalidCacheBackendError):
        raise ValueError(f"cache type is not usable here: {backend}")
    if value == "ext:sqla":
        raise ValueError("ext:sqla needs Python objects; use ext:database with a url")
    return value


def _text(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


#: Region options: name -> converter from the ini string.  Options not in
#: this table are refused, so a typo stops start-up instead of being ignored.
REGION_OPTIONS: Mapping[str, Callable[[str], Any]] = MappingProxyType(
    {
        "type": _region_type,
        "expire": _positive_int,
        "enabled": _boolean,
        "url": _text,
        "data_dir": _text,
        "lock_dir": _text,
        "key_length": _positive_int,
        "max_items": _positive_int,
        "max_bytes": _positive_int,
        "max_entry_bytes": _positive_int,
        "allow_shared_dir": _boolean,
        "timeout": _positive_int,
        "memcache_module": _text,
        "protocol": _text,
        "username": _text,
        "password": str,
        "table_name": _text,
        "schema_name": _text,
    }
)


def _invalidation(value: str) -> str:
    value = value.strip().lower()
    if value not in ("auto", "manual"):
        raise ValueError("must be auto or manual")
    return value


_TABLE = r"[A-Za-z_][\w$]*(?:\.[A-Za-z_][\w$]*)?"
_DEPENDENCY = re.compile(rf"^\s*({_TABLE})\s*:\s*({_TABLE}(?:[\s,]+{_TABLE})*)\s*,?\s*$")


def _writes_also(value: str) -> Mapping[str, tuple[str, ...]]:
    declared: dict[str, tuple[str, ...]] = {}
    for line in value.strip().splitlines():
        if not line.strip():
            continue
        match = _DEPENDENCY.match(line)
        if match is None:
            raise ValueError(f"cannot read {line.strip()!r}: write one 'table: table, table' per line")
        table, also = match.groups()
        declared[table] = declared.get(table, ()) + tuple(name for name in re.split(r"[\s,]+", also) if name)
    if not declared:
        raise ValueError("must name at least one 'table: table, table'")
    return MappingProxyType(declared)


#: The add-on's own options: name -> converter.
ADDON_OPTIONS: Mapping[str, Callable[[str], Any]] = MappingProxyType(
    {
        "default_region": _text,
        "invalidation": _invalidation,
        "retry_after": _positive_float,
        "secret": _secret,
        "writes_also": _writes_also,
    }
)


@dataclass(frozen=True)
class Settings:
    """The add-on's settings, parsed and checked.

    ``regions`` maps each region name to its Beaker options (already
    converted: ``expire`` is an ``int``, ``enabled`` a ``bool``).
    """

    regions: Mapping[str, Mapping[str, Any]]
    default_region: str
    invalidation: str = "auto"
    retry_after: float = 5.0
    secret: str | None = None
    #: What a write to a table also changes that the schema does not say
    #: (``sessioncache.writes_also``): table -> tables.
    writes_also: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))


def _fail(key: str, value: Any, why: str) -> ConfigurationError:
    return ConfigurationError(f"invalid setting {key} = {value!r}: {why}")


def _checked(table: Mapping[str, Callable[[str], Any]], key: str, option: str, raw: Any) -> Any:
    convert = table.get(option)
    if convert is None:
        known = ", ".join(sorted(table))
        raise _fail(key, raw, f"unknown option {option!r} (known: {known})")
    if not isinstance(raw, str):
        return raw
    try:
        return convert(raw)
    except ValueError as exc:
        raise _fail(key, raw, str(exc) or "not a valid value") from None


def parse_settings(settings: Mapping[str, Any]) -> Settings:
    """Parse the ``cache.*`` and ``sessioncache.*`` keys of ``settings``.

    Returns a :class:`Settings`.  Raises
    :class:`pyramid.exceptions.ConfigurationError` naming the first bad key.
    Without ``cache.regions`` the app gets one region, ``local_session``,
    of type ``ext:local_session``.
    """
    addon: dict[str, Any] = {}
    for key, raw in settings.items():
        if key.startswith("sessioncache."):
            option = key[len("sessioncache.") :]
            addon[option] = _checked(ADDON_OPTIONS, key, option, raw)

    names = aslist(settings.get("cache.regions", ""), flatten=True)
    names = [name.strip(",") for name in names if name.strip(",")]
    defaults: dict[str, Any] = {}
    per_region: dict[str, dict[str, Any]] = {name: {} for name in names}
    for key, raw in settings.items():
        if not key.startswith("cache.") or key == "cache.regions":
            continue
        rest = key[len("cache.") :]
        region, dot, option = rest.partition(".")
        if dot and region in per_region:
            per_region[region][option] = _checked(REGION_OPTIONS, key, option, raw)
        elif not dot:
            defaults[rest] = _checked(REGION_OPTIONS, key, rest, raw)
        else:
            raise _fail(key, raw, f"region {region!r} is not listed in cache.regions")

    if not names:
        regions: Mapping[str, Mapping[str, Any]] = DEFAULT_REGIONS
    else:
        regions = {}
        for name in names:
            options = {"type": "memory", **defaults, **per_region[name]}
            _check_region(name, options)
            regions[name] = MappingProxyType(options)
        regions = MappingProxyType(regions)

    signed = [name for name, options in regions.items() if options["type"] in SIGNED_TYPES]
    if signed and "secret" not in addon:
        raise _fail(
            "sessioncache.secret",
            None,
            f"region {signed[0]!r} is {regions[signed[0]]['type']}: its values are signed, "
            "set a long random secret, the same in every process",
        )
    default_region = addon.pop("default_region", None) or next(iter(regions))
    if default_region not in regions:
        raise _fail(
            "sessioncache.default_region",
            default_region,
            f"not a configured region (cache.regions = {', '.join(regions)})",
        )
    return Settings(
        regions=regions,
        default_region=default_region,
        invalidation=addon.pop("invalidation", "auto"),
        retry_after=addon.pop("retry_after", 5.0),
        secret=addon.pop("secret", None),
        writes_also=addon.pop("writes_also", MappingProxyType({})),
    )


def _check_region(name: str, options: Mapping[str, Any]) -> None:
    kind = options["type"]
    if kind in URL_TYPES and "url" not in options:
        raise _fail(f"cache.{name}.url", None, f"a region of type {kind} needs a url")
    if kind in DIRECTORY_TYPES and "data_dir" not in options:
        raise _fail(f"cache.{name}.data_dir", None, f"a region of type {kind} needs a data_dir")
