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
- Beaker's ``Cache`` turns a string key into bytes in its private
  ``_get_value`` (``get``, ``put``, ``remove``, ``in``: every access goes
  through it) with ``backslashreplace``, which gives two strings the same
  bytes.  ``Cache``, the Beaker cache of a region, does it there as regions do
  (``storage/keys.py``), so that it reads what the region stored.
"""

from __future__ import annotations

import contextlib
from typing import Any

from beaker import cache as beaker_cache

from .storage.keys import key_bytes


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


class Cache(beaker_cache.Cache):
    """A Beaker ``Cache`` whose string keys are the bytes a region stores them under.

    Beaker encodes a key with ``backslashreplace``, under which ``"é"`` and
    the four characters ``"\\xe9"`` are one key; a region keeps them apart
    (see ``storage/keys.py``), and so does this ``Cache``.
    """

    def _get_value(self, key: Any, **kw: Any) -> Any:
        # Beaker 1.13, 1.14: bytes are used as they are.
        return super()._get_value(key_bytes(key), **kw)


def cache_on(namespace: Any, expire: int | None) -> Cache:
    """Return a :class:`Cache` over an already built namespace manager.

    ``Cache.__init__`` only builds namespaces from a type name in the
    process-wide ``clsmap``; this sets the same attributes it sets
    (Beaker 1.13, 1.14) without registering anything globally.
    """
    cache = Cache.__new__(Cache)
    cache.namespace_name = namespace.namespace
    cache.namespace = namespace
    cache.expiretime = expire
    cache.starttime = None
    cache.nsargs = {}
    return cache
