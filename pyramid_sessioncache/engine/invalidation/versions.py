"""Versions: checking that a shared entry is still what its tables hold."""

from __future__ import annotations

from typing import Any

from ...storage.region import Region, Validator
from ...storage.versions import entry_version
from .reads import ALL_TABLES

#: The version every entry records under manual invalidation: that of
#: every table, which :func:`~pyramid_sessioncache.invalidate_region` and
#: :func:`~pyramid_sessioncache.invalidate_tables` bump.
MANUAL = (ALL_TABLES,)


def manual(key: str) -> tuple[str, str]:
    """The versions an entry stored under ``key`` records under manual invalidation.

    :data:`MANUAL`, and the entry's own, which
    :func:`~pyramid_sessioncache.invalidate` bumps: a query that read its
    rows before the commit that invalidated them read the versions before
    too, so what it stores after is void.  Read with the entry, in the
    same backend read.
    """
    return (ALL_TABLES, entry_version(key))


def valid(region: Region, tables: tuple[str, ...]) -> Validator:
    """Return the validator of entries that read ``tables`` in ``region``.

    An entry is valid while every version of the tables it read is there
    and is the one it was stored with: a version that disappeared (evicted,
    deleted) never matches.  ``now`` are those versions when the backend
    read them with the entry (Redis), else None and they are read here.
    An entry that did not record the version of each of ``tables`` (one
    stored under manual invalidation, which records :func:`manual`
    versions, before a restart with automatic invalidation, or one stored
    before entries recorded their own) is not valid: no write to them
    would void it.
    """

    def check(value: Any, now: Any) -> bool:
        if value.tables != tables:  # rare: asked here only, off the common hit's path
            if not set(tables).issubset(value.tables):
                return False
            now = None  # what was read with the entry is for other tables
        if now is None:
            now = region.versions(value.tables)
        return now is not None and now == value.versions and None not in now

    return check
