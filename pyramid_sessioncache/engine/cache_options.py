"""The options of a :class:`~pyramid_sessioncache.SessionCache` and of one cached query, checked.

:data:`CACHE_OPTIONS` is the table of the cache's own options (the
``sessioncache.*`` settings of the Pyramid add-on): how each is read from
an ini string and how it is checked.  ``SessionCache(...)`` runs the same
checks on the Python values it is given, so the ini and the code accept
and refuse the same values.  ``retry_after`` and ``secret`` belong to the
regions: their entries are those of ``storage/options.py``.

The options of one query (``expire`` and ``cache_key``, given to
:class:`~pyramid_sessioncache.FromCache`,
:class:`~pyramid_sessioncache.RelationshipCache` or
:func:`~pyramid_sessioncache.cached_query`) are checked by
:func:`check_label` and :func:`~pyramid_sessioncache.storage.options.check_expire`
when the option is made, before anything runs; both cost a type check
when the value is fine, since ``cached_query()`` makes an option per call.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from ..errors import InvalidOptionError
from ..storage.options import REGIONS_OPTIONS, Option, region_name

#: The longest ``cache_key`` label, in characters.
MAX_LABEL = 200


def _stripped(text: str) -> str:
    return text.strip()


def _invalidation(value: Any) -> str:
    if value not in ("auto", "manual"):
        raise ValueError("must be 'auto' or 'manual'")
    return value


_TABLE = r"[A-Za-z_][\w$]*(?:\.[A-Za-z_][\w$]*)?"
_DEPENDENCY = re.compile(rf"^\s*({_TABLE})\s*:\s*({_TABLE}(?:[\s,]+{_TABLE})*)\s*,?\s*$")


def _read_writes_also(text: str) -> Mapping[str, tuple[str, ...]]:
    declared: dict[str, tuple[str, ...]] = {}
    for line in text.strip().splitlines():
        if not line.strip():
            continue
        match = _DEPENDENCY.match(line)
        if match is None:
            raise ValueError(f"cannot read {line.strip()!r}: write one 'table: table, table' per line")
        table, also = match.groups()
        declared[table] = declared.get(table, ()) + tuple(_names(also))
    if not declared:
        raise ValueError("must name at least one 'table: table, table'")
    return MappingProxyType(declared)


def _names(text: str) -> list[str]:
    return [name for name in re.split(r"[\s,]+", text) if name] or [text]


def _writes_also(value: Any) -> Mapping[str, tuple[str, ...]]:
    if not isinstance(value, Mapping):
        raise TypeError(f"writes_also maps a table name to table names, not a {type(value).__name__}")
    declared: dict[str, tuple[str, ...]] = {}
    for table, also in value.items():
        # A string names its tables as the ini does: "audit, log".
        names = _names(also) if isinstance(also, str) else list(also) if isinstance(also, Iterable) else [also]
        if not isinstance(table, str) or not table.strip() or not all(isinstance(n, str) and n.strip() for n in names):
            raise ValueError(f"writes_also maps a table name to table names, not {table!r}: {also!r}")
        declared[table.strip()] = tuple(name.strip() for name in names)
    return MappingProxyType(declared)


#: The cache's own options: name -> how to read and check it.
CACHE_OPTIONS: Mapping[str, Option] = MappingProxyType(
    {
        "default_region": Option(_stripped, region_name),
        "invalidation": Option(lambda text: text.strip().lower(), _invalidation),
        "retry_after": REGIONS_OPTIONS["retry_after"],
        "secret": REGIONS_OPTIONS["secret"],
        "writes_also": Option(_read_writes_also, _writes_also),
    }
)


def check_label(label: Any) -> str | None:
    """Return ``label``, a ``cache_key``: None, or a printable string of at most 200 characters.

    The label starts the entry's key and appears in DEBUG log lines: a
    newline or another control character in it is refused, so that it
    cannot forge a log line.  Raises
    :class:`~pyramid_sessioncache.InvalidOptionError`.
    """
    if label is None or (type(label) is str and len(label) <= MAX_LABEL and label.isprintable()):
        return label
    if not isinstance(label, str):
        reason = f"must be a string, or None; not a {type(label).__name__}"
    elif len(label) > MAX_LABEL:
        reason = f"must be at most {MAX_LABEL} characters, not {len(label)}"
    elif label.isprintable():  # a str subclass
        return label
    else:
        reason = "must be printable: no newline, tab or other control character"
    raise InvalidOptionError("cache_key", label, reason)


def check_region_argument(region: Any) -> str | None:
    """Return ``region``, a region name given to a caching option, or None; else raise :class:`~pyramid_sessioncache.InvalidOptionError`."""
    if region is None or type(region) is str:
        return region
    raise InvalidOptionError(
        "region", region, f"must be a region name (a string), or None; not a {type(region).__name__}"
    )
