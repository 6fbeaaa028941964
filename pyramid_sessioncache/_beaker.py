"""Where we go beyond Beaker's public API, in one place.

Checked on Beaker 1.13 and 1.14 (1.14.1 by the test suite).

- Beaker keeps its backends in ``beaker.cache.clsmap``, a lazily filled
  registry that no longer accepts item assignment (Beaker 1.13 turned it
  into ``beaker.cache._backends``).  Registering a backend at run time, as
  the old ``create_session_container`` did with ``clsmap[name] = ...``, now
  means writing to its private ``_clsmap`` dictionary.
- A ``Cache`` over a namespace manager we built ourselves (a signed Redis
  namespace) is made without registering a type in that global registry.
- Redis reads and writes several keys at once (``MGET``/``MSET``) on keys
  spelled as Beaker's ``RedisNamespaceManager._format_key`` spells them.
"""

from __future__ import annotations

import contextlib
from typing import Any

from beaker import cache as beaker_cache


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


def backend(name: str) -> Any:
    """Return the namespace class of the Beaker cache type ``name`` (``KeyError`` if unknown)."""
    return beaker_cache.clsmap[name]


def redis_key(namespace: Any, key: bytes) -> str:
    """The Redis key under which Beaker's ``RedisNamespaceManager`` ``namespace`` stores ``key``."""
    return namespace._format_key(key)


def cache_on(namespace: Any, expire: int | None) -> beaker_cache.Cache:
    """Return a Beaker ``Cache`` over an already built namespace manager.

    ``Cache.__init__`` only builds namespaces from a type name in the
    process-wide ``clsmap``; this sets the same attributes it sets
    (Beaker 1.13, 1.14) without registering anything globally.
    """
    cache = beaker_cache.Cache.__new__(beaker_cache.Cache)
    cache.namespace_name = namespace.namespace
    cache.namespace = namespace
    cache.expiretime = expire
    cache.starttime = None
    cache.nsargs = {}
    return cache
