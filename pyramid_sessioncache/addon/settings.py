"""Reading and validating the add-on's ini settings.

Regions follow pyramid_beaker's ``cache.`` convention: ``cache.regions``
names them, ``cache.<option>`` sets a default for every region and
``cache.<region>.<option>`` sets one region's value.  A region's name
may hold dots, as with pyramid_beaker: a key belongs to the longest
listed name it starts with.  The add-on's own options use the
``sessioncache.`` prefix.  Everything is parsed once, at
start-up, into a frozen :class:`Settings`; a bad value raises
:class:`pyramid.exceptions.ConfigurationError` naming the key and the value.

The options, their converters from ini strings and their checks are the
engine's (``storage/options.py`` for regions, ``engine/cache_options.py``
for the cache): strings are converted here, then every value, string or
not, goes through the checks ``SessionCache(...)`` runs, and their
:class:`~pyramid_sessioncache.InvalidOptionError` becomes a
``ConfigurationError`` naming the setting.  A value that may be a secret
is masked in the message, as is the password of a URL (see ``masking.py``).
A default (``cache.<option>``) applies to the regions whose type uses it;
one that no region uses is an error, as is a region's own option that its
type would ignore.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from pyramid.exceptions import ConfigurationError
from pyramid.settings import aslist

from ..engine.cache_options import CACHE_OPTIONS
from ..errors import InvalidOptionError
from ..masking import hide_url_passwords, shown
from ..storage import options as region_options
from ..storage.options import LOCAL_TYPE, Option
from ..storage.region import SIGNED_TYPES

DEFAULT_REGIONS = MappingProxyType({"local_session": MappingProxyType({"type": LOCAL_TYPE})})

#: Region options (``cache.*``): name -> how to read and check it; the
#: table ``SessionCache(...)`` checks its Python values with.
REGION_OPTIONS: Mapping[str, Option] = region_options.REGION_OPTIONS
#: The add-on's own options (``sessioncache.*``), likewise: the cache's,
#: and whether to listen for PostgreSQL's notifications.
ADDON_OPTIONS: Mapping[str, Option] = MappingProxyType(
    {**CACHE_OPTIONS, "postgresql_notify": region_options.REGION_OPTIONS["enabled"]}
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
    secret: str | bytes | None = field(default=None, repr=False)
    #: What a write to a table also changes that the schema does not say
    #: (``sessioncache.writes_also``): table -> tables.
    writes_also: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    #: Listen for every committed write on PostgreSQL (``sessioncache.postgresql_notify``).
    postgresql_notify: bool = False


def _fail(key: str, value: Any, why: str) -> ConfigurationError:
    return ConfigurationError(f"invalid setting {key} = {shown(key, value)}: {why}")


def invalid_option(exc: InvalidOptionError, settings: Mapping[str, Any]) -> ConfigurationError:
    """The ``ConfigurationError`` naming the setting of ``exc``, an option refused by ``SessionCache(...)``.

    A region's option is ``cache.<region>.<option>``, or the default
    ``cache.<option>`` if only that is set; any other is ``sessioncache.<option>``.
    """
    if exc.region is None:
        key = f"sessioncache.{exc.option}"
    else:
        key = f"cache.{exc.region}.{exc.option}"
        if key not in settings and f"cache.{exc.option}" in settings:
            key = f"cache.{exc.option}"
    return ConfigurationError(f"invalid setting {key} = {exc.shown}: {hide_url_passwords(exc.reason)}")


def _setting(table: Mapping[str, Option], key: str, option: str, raw: Any) -> Any:
    """The value of the setting ``key``: converted if a string, checked as the engine checks it."""
    try:
        return region_options.from_setting(table, option, raw)
    except InvalidOptionError as exc:
        raise ConfigurationError(f"invalid setting {key} = {exc.shown}: {exc.reason}") from None


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
            addon[option] = _setting(ADDON_OPTIONS, key, option, raw)

    names = aslist(settings.get("cache.regions", ""), flatten=True)
    names = [name.strip(",") for name in names if name.strip(",")]
    for name in names:
        try:
            region_options.region_name(name)
        except (TypeError, ValueError) as exc:
            raise _fail("cache.regions", settings["cache.regions"], str(exc)) from None
    defaults: dict[str, Any] = {}
    per_region: dict[str, dict[str, Any]] = {name: {} for name in names}
    # Longest first: a region may be named with dots, as pyramid_beaker
    # allows (``cache.long.term.expire`` is region long.term's expire, even
    # when a region called long is listed too).
    by_length = sorted(names, key=len, reverse=True)
    for key, raw in settings.items():
        if not key.startswith("cache.") or key == "cache.regions":
            continue
        rest = key[len("cache.") :]
        region = next((name for name in by_length if rest.startswith(f"{name}.")), None)
        if region is not None:
            option = rest[len(region) + 1 :]
            per_region[region][option] = _setting(REGION_OPTIONS, key, option, raw)
        elif "." not in rest:
            defaults[rest] = _setting(REGION_OPTIONS, key, rest, raw)
        else:
            unknown = rest.partition(".")[0]
            raise _fail(key, raw, f"region {unknown!r} is not listed in cache.regions")

    if not names:
        if defaults:
            option = next(iter(defaults))
            raise _fail(f"cache.{option}", settings[f"cache.{option}"], "no region uses it: cache.regions lists none")
        regions: Mapping[str, Mapping[str, Any]] = DEFAULT_REGIONS
    else:
        regions = MappingProxyType({name: _region(name, defaults, per_region[name], settings) for name in names})
        _check_defaults_used(defaults, regions, settings)

    signed = [name for name, options in regions.items() if options["type"] in SIGNED_TYPES]
    if signed and "secret" not in addon:
        raise _fail(
            "sessioncache.secret",
            None,
            f"region {signed[0]!r} is {regions[signed[0]]['type']}: its values are signed, "
            "set a long random secret, the same in every process",
        )
    if addon.get("postgresql_notify") and addon.get("invalidation", "auto") != "auto":
        raise _fail(
            "sessioncache.postgresql_notify",
            settings["sessioncache.postgresql_notify"],
            f"it invalidates what other clients' commits change, which sessioncache.invalidation = "
            f"{addon['invalidation']} never does: set sessioncache.invalidation = auto, or remove it",
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
        postgresql_notify=addon.pop("postgresql_notify", False),
    )


def _region(
    name: str, defaults: Mapping[str, Any], own: Mapping[str, Any], settings: Mapping[str, Any]
) -> Mapping[str, Any]:
    """The checked options of region ``name``: its own, and the defaults its type uses."""
    kind = own.get("type", defaults.get("type", "memory"))
    options = {option: value for option, value in defaults.items() if region_options.uses(kind, option)}
    options.update(own)
    options["type"] = kind
    try:
        return MappingProxyType(region_options.checked_region(name, options))
    except InvalidOptionError as exc:
        given_here = exc.option in own or exc.option not in defaults
        key = f"cache.{name}.{exc.option}" if given_here else f"cache.{exc.option}"
        raise _fail(key, settings.get(key), exc.reason) from None  # the value as written


def _check_defaults_used(
    defaults: Mapping[str, Any], regions: Mapping[str, Mapping[str, Any]], settings: Mapping[str, Any]
) -> None:
    """A default (``cache.<option>``) that no region's type uses would be ignored: an error."""
    for option in defaults:
        if not any(region_options.uses(options["type"], option) for options in regions.values()):
            kinds = ", ".join(sorted({options["type"] for options in regions.values()}))
            raise _fail(
                f"cache.{option}", settings[f"cache.{option}"], f"no region uses it (their types: {kinds}); remove it"
            )
