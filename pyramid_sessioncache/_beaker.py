"""The few places where we reach into Beaker's module globals.

Beaker keeps its backends in ``beaker.cache.clsmap``, a lazily filled
registry that no longer accepts item assignment (Beaker 1.13 turned it into
``beaker.cache._backends``).  Registering a backend at run time, as the old
``create_session_container`` did with ``clsmap[name] = ...``, now means
writing to its private ``_clsmap`` dictionary.  That is isolated here.
"""

from __future__ import annotations

import contextlib
from typing import Any

from beaker import cache as beaker_cache
from beaker.ext.redisnm import RedisNamespaceManager


def _load_entry_points() -> None:
    # A failed look-up makes Beaker load the ``beaker.backends`` entry points
    # once; doing it first keeps a later look-up from finding our name taken
    # and warning about a "NamespaceManager name conflict".
    with contextlib.suppress(KeyError):
        beaker_cache.clsmap["pyramid_sessioncache: load entry points"]


def register_backend(name: str, namespace_class: type) -> None:
    """Make ``name`` a Beaker cache type served by ``namespace_class``."""
    _load_entry_points()
    beaker_cache.clsmap._clsmap[name] = namespace_class  # Beaker >= 1.13


def backend(name: str) -> type:
    """Return the namespace class of the Beaker cache type ``name``."""
    return beaker_cache.clsmap[name]


def read_many(namespace: Any, keys: list[bytes]) -> list[Any]:
    """Return the values of ``keys`` in ``namespace`` (None where missing), in one read.

    Beaker's namespace API reads one key at a time; on Redis that would be
    one round trip per key, so Redis gets an ``MGET`` on the keys as
    Beaker's ``RedisNamespaceManager._format_key`` spells them.
    """
    if isinstance(namespace, RedisNamespaceManager):
        raw = namespace.client.mget([namespace._format_key(key) for key in keys])
        return [None if value is None else value.decode() for value in raw]
    namespace.acquire_read_lock()
    try:
        return [_get(namespace, key) for key in keys]
    finally:
        namespace.release_read_lock()


def write_many(namespace: Any, values: dict[bytes, str]) -> None:
    """Store ``values`` in ``namespace``, in one write (``MSET`` on Redis)."""
    if isinstance(namespace, RedisNamespaceManager):
        namespace.client.mset({namespace._format_key(key): value for key, value in values.items()})
        return
    namespace.acquire_write_lock()
    try:
        for key, value in values.items():
            namespace[key] = value
    finally:
        namespace.release_write_lock()


def _get(namespace: Any, key: bytes) -> Any:
    try:
        return namespace[key]
    except KeyError:
        return None
