"""Where we go beyond Beaker's public API, in one place.

- Beaker keeps its backends in ``beaker.cache.clsmap``, a lazily filled
  registry that no longer accepts item assignment (Beaker 1.13 turned it
  into ``beaker.cache._backends``).  Registering a backend at run time, as
  the old ``create_session_container`` did with ``clsmap[name] = ...``, now
  means writing to its private ``_clsmap`` dictionary.
- A ``Cache`` over a namespace manager we built ourselves (a signed Redis
  namespace) is made without registering a type in that global registry.
- Beaker reads and writes one key at a time; Redis gets ``MGET``/``MSET``
  on keys spelled as Beaker's ``RedisNamespaceManager._format_key`` spells
  them.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from beaker import cache as beaker_cache
from beaker.ext.redisnm import RedisNamespaceManager

from . import signing

log = logging.getLogger(__name__)


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


def get_with(namespace: Any, key: bytes, versions: Any, version_keys: Any) -> tuple[Any, tuple]:
    """Read an entry of a signed Redis ``namespace`` and values of ``versions``, in one command.

    Both namespaces belong to one region, so one server: a single ``MGET``
    reads the entry and the versions together.  Raises ``KeyError`` when the
    entry is missing or its signature fails.
    """
    keys = [namespace._format_key(key), *(versions._format_key(name) for name in version_keys)]
    entry, *raw = namespace.client.mget(keys)
    return namespace.decode(key, entry), tuple(None if value is None else value.decode() for value in raw)


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


class SignedRedisNamespaceManager(RedisNamespaceManager):
    """Beaker's Redis namespace, with every value signed (HMAC-SHA256) before it is stored.

    A value is unpickled only after its signature checks, so an entry
    written by anyone without the secret (tampered, or of another
    application) is never unpickled: it reads as missing, and is logged.

    The last values read are remembered with the exact bytes they came
    from: reading the same bytes again returns the same (immutable) value
    without checking or unpickling them again.
    """

    #: How many decoded values a namespace remembers.
    REMEMBERED = 128

    def __init__(self, namespace: str, url: Any, secret: bytes, **kw: Any) -> None:
        super().__init__(namespace, url, **kw)
        self._secret = secret
        self._decoded: dict[bytes, tuple[bytes, Any]] = {}

    def __getitem__(self, key: Any) -> Any:
        return self.decode(key, self.client.get(self._format_key(key)))

    def decode(self, key: Any, entry: bytes | None) -> Any:
        """Return the value stored as ``entry`` under ``key``; ``KeyError`` if none or forged."""
        if entry is None:
            raise KeyError(key)
        signature = signing.signature(entry)
        known = self._decoded.get(signature)
        if known is not None and known[0] == entry:
            return known[1]
        value = signing.loads(self._secret, entry)
        if value is signing.INVALID:
            log.warning("ignored an entry with a bad signature in cache namespace %r", self.namespace)
            raise KeyError(key)
        self._remember(entry, value)
        return value

    def _remember(self, data: bytes, value: Any) -> None:
        if len(self._decoded) >= self.REMEMBERED:
            self._decoded.clear()
        self._decoded[signing.signature(data)] = (data, value)

    def set_value(self, key: Any, value: Any, expiretime: int | None = None) -> None:
        data = signing.dumps(self._secret, value)
        self._remember(data, value)
        if expiretime is None and self.timeout is not None:
            expiretime = self.timeout
        if expiretime is not None:
            self.client.set(self._format_key(key), data, ex=int(expiretime))
        else:
            self.client.set(self._format_key(key), data)


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
