"""Redis namespaces: signed entries, and table versions read with them in one ``MGET``.

Single keys are read with ``MGET`` too: it answers nil for a key that holds
another type (a list planted where an entry should be), where ``GET`` would
raise ``WRONGTYPE``.

A region with a near cache (``near.py``) gives its entries' namespace a
:class:`~.near.NearCache`: reads (of an entry and the versions it needs)
are served from it when it holds every key they need, and store what they
read (once checked).  Every write of a
namespace, near or not, invalidates its keys in the process's near caches
over them (:func:`~.near.siblings`) before it returns.
"""

from __future__ import annotations

import logging
import math
import pickle
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from beaker.ext.redisnm import RedisNamespaceManager

from ... import _beaker
from .. import signing
from ..keys import key_bytes
from ..versions import ENTRY_LIFETIME, is_entry_version
from .near import CLEARED, CLEARED_LIFETIME, NearCache, deadline_of, written, written_all

log = logging.getLogger(__name__)

#: ``raise_many`` in one round trip: per key, SET unless the string held
#: starts with a counter at least as high (see ``api.counter_of``); a key of
#: another type is overwritten.  ``ARGV[#KEYS + i]``, when given and not 0,
#: is the lifetime of key ``i`` in seconds.  Returns the keys refused and
#: what they hold.
_RAISE = """
local refused = {}
for i, key in ipairs(KEYS) do
  local new = ARGV[i]
  local lifetime = tonumber(ARGV[#KEYS + i] or '0')
  local kind = redis.call('TYPE', key).ok
  local keep = false
  if kind == 'string' then
    local held = redis.call('GET', key)
    local digits = string.match(held, '^(%d+):')
    if digits and #digits <= 15 then
      keep = tonumber(digits) >= tonumber(string.match(new, '^(%d+):'))
    end
    if keep then
      refused[#refused + 1] = key
      refused[#refused + 1] = held
    end
  end
  if not keep then
    if lifetime > 0 then
      redis.call('SET', key, new, 'EX', lifetime)
    else
      redis.call('SET', key, new)
    end
  end
end
return refused
"""


class RedisVersionsNamespace(RedisNamespaceManager):
    """Beaker's Redis namespace, reading and writing several raw values at once.

    Table versions are kept for good; entries' own versions
    (:func:`~pyramid_sessioncache.storage.versions.entry_version`) expire :attr:`entry_lifetime`
    seconds after they were last written, so that their number follows
    the entries stored and invalidated in that time (one that expired
    reads as missing: its entries are misses).
    """

    #: The process's near caches over these keys (see :func:`~.near.siblings`): every write here invalidates its keys in them.
    nears: Iterable[NearCache] = ()
    #: Seconds an entry's own version is kept after it was last written (set by its region).
    entry_lifetime: int = ENTRY_LIFETIME

    def _written(self, keys: Iterable[bytes]) -> None:
        written(self.nears, [_beaker.redis_key(self, key) for key in keys])

    def _lifetime(self, key: bytes) -> int | None:
        return self.entry_lifetime if is_entry_version(key) else None

    def get_many(self, keys: Sequence[bytes]) -> list[Any]:
        """Return the values of ``keys`` (bytes; None where missing or not a string), in one ``MGET``."""
        return self.client.mget([_beaker.redis_key(self, key) for key in keys])

    def set_many(self, values: Mapping[bytes, Any]) -> None:
        """Store ``values``, in one ``MSET`` (one ``SET`` each, pipelined, when some expire)."""
        try:
            if any(map(is_entry_version, values)):
                pipeline = self.client.pipeline(transaction=False)
                for key, value in values.items():
                    pipeline.set(_beaker.redis_key(self, key), value, ex=self._lifetime(key))
                pipeline.execute()
            else:
                self.client.mset({_beaker.redis_key(self, key): value for key, value in values.items()})
        finally:
            self._written(values)

    def add_many(self, values: Mapping[bytes, Any]) -> None:
        """Store the keys of ``values`` that have no value (``SET NX``), in one round trip."""
        pipeline = self.client.pipeline(transaction=False)
        for key, value in values.items():
            pipeline.set(_beaker.redis_key(self, key), value, nx=True, ex=self._lifetime(key))
        try:
            pipeline.execute()
        finally:
            self._written(values)

    def delete_many(self, keys: Sequence[bytes]) -> None:
        """Delete ``keys``, in one ``DEL`` (which Redis runs even at ``maxmemory``, when it refuses every write)."""
        if not keys:
            return
        try:
            self.client.delete(*(_beaker.redis_key(self, key) for key in keys))
        finally:
            self._written(keys)

    def raise_many(self, values: Mapping[bytes, Any]) -> dict[bytes, Any]:
        """Store the values whose counter is above the one held, atomically, in one round trip (a Lua script)."""
        script = getattr(self, "_raise", None)
        if script is None:
            script = self._raise = self.client.register_script(_RAISE)
        keys = {_beaker.redis_key(self, key): key for key in values}
        args = list(values.values())
        if any(map(is_entry_version, values)):
            args += [self._lifetime(key) or 0 for key in values]
        try:
            answer = script(keys=list(keys), args=args)
        finally:
            self._written(values)
        refused = {}
        for i in range(0, len(answer), 2):
            name = answer[i].decode() if isinstance(answer[i], bytes) else answer[i]
            refused[keys[name]] = answer[i + 1]
        return refused


class SignedRedisNamespaceManager(RedisNamespaceManager):
    """Beaker's Redis namespace, with every value signed (HMAC-SHA256) for its key before it is stored.

    :param secret: the application's secret.
    :param max_bytes: the region's ``max_entry_bytes``: a longer value is
        a miss without being checked.

    A value is unpickled only after its signature checks, so an entry
    written by anyone without the secret (tampered, of another application)
    or moved from another key or region is never unpickled: it reads as
    missing, and is logged (once, then at DEBUG).

    The last values read are remembered with the key and the exact bytes
    they came from: reading the same bytes under the same key again returns
    the same (immutable) value without checking or unpickling them again.
    At most :attr:`REMEMBERED` of them, and :attr:`REMEMBERED_BYTES` bytes
    as read: a flood of large entries is not kept past what regions allow.
    """

    #: How many decoded values a namespace remembers.
    REMEMBERED = 128
    #: How many bytes (as read from Redis) of decoded values a namespace remembers.
    REMEMBERED_BYTES = 8 * 1024 * 1024
    #: The region's near cache, if it has one (see ``near.py``).
    near: NearCache | None = None
    #: The process's near caches over these keys (see :func:`~.near.siblings`): every write here invalidates its keys in them.
    nears: Iterable[NearCache] = ()

    def __init__(self, namespace: str, url: Any, secret: bytes, max_bytes: int = 1024 * 1024, **kw: Any) -> None:
        super().__init__(namespace, url, **kw)
        self.codec = signing.Codec(secret, namespace, log)
        #: Values longer than this (bytes) are not checked: nothing of ours is that long.
        self.max_bytes = max_bytes + signing.HEADER
        self._decoded: dict[bytes, tuple[bytes, bytes, Any]] = {}
        self._decoded_bytes = 0

    def __getitem__(self, key: Any) -> Any:
        if self.near is not None:
            return self._near_read(key, [_beaker.redis_key(self, key)], None)[0]
        return self.decode(key, self.client.mget([_beaker.redis_key(self, key)])[0])

    def get_with_versions(
        self,
        key: bytes,
        versions: RedisVersionsNamespace,
        names: Iterable[bytes],
        check: Callable[[Sequence[Any]], tuple[Any, ...]],
    ) -> tuple[Any, tuple[Any, ...]]:
        """Read the entry ``key`` and the versions ``names`` in ``versions``, in one ``MGET``.

        Returns the entry's value and ``check(raw values of names)``: the
        versions that are usable tokens, None for the others.  Both
        namespaces belong to one region, so one server.  Raises
        ``KeyError`` when the entry is missing or unusable.  With a near
        cache that holds them all, nothing is sent to Redis.
        """
        keys = [_beaker.redis_key(self, key), *(_beaker.redis_key(versions, name) for name in names)]
        if self.near is not None:
            return self._near_read(key, keys, check)
        entry, *raw = self.client.mget(keys)
        return self.decode(key, entry), check(raw)

    def _near_read(
        self, key: Any, keys: list[str], check: Callable[[Sequence[Any]], tuple[Any, ...]] | None
    ) -> tuple[Any, tuple[Any, ...]]:
        """:meth:`get_with_versions` (or, with no ``check``, a read of the entry alone) through the near cache."""
        near = self.near
        assert near is not None
        # Held with the key it was read for: Beaker spells a long key as the
        # SHA-1 of its bytes, which is also how a 40-character key is
        # spelled, and the near cache holds what it read by spelling.
        own = key_bytes(key)
        held = near.get_many(keys)
        if held is not None and held[0][0] == own:
            # Checked again (a dictionary look-up per version): a version
            # must never go back, whoever serves it.
            return held[0][1], (check(held[1:]) if check is not None else ())
        stamp = near.stamp(keys)  # before the read: see near.py
        entry, *raw = self.client.mget(keys)
        value = self.decode(key, entry)
        tokens = check(raw) if check is not None else ()
        if stamp is not None:
            items: list[tuple[Any, float, int] | None] = [
                ((own, value), deadline_of(signing.deadline(entry)), len(entry))
            ]
            items += [
                (version, math.inf, len(version)) if token is not None else None
                for version, token in zip(raw, tokens, strict=True)
            ]
            near.put_many(stamp, keys, items)
        return value, tokens

    def decode(self, key: Any, entry: bytes | None) -> Any:
        """Return the value stored as ``entry`` under ``key``; ``KeyError`` if none or unusable."""
        if entry is None:
            raise KeyError(key)
        known = self._decoded.get(signing.signature(entry))
        if known is not None and known[1] == entry and known[0] == key:
            return known[2]
        if len(entry) > self.max_bytes:
            self.codec.complain(
                "size", "ignored an entry of cache namespace %r larger than the region allows", self.namespace
            )
            raise KeyError(key)
        value = self.codec.decode(key, entry)
        self._remember(key, entry, value)
        return value

    def _remember(self, key: bytes, data: bytes, value: Any) -> None:
        if len(self._decoded) >= self.REMEMBERED or self._decoded_bytes + len(data) > self.REMEMBERED_BYTES:
            self._decoded.clear()
            self._decoded_bytes = 0
            if len(data) > self.REMEMBERED_BYTES:
                return
        self._decoded[signing.signature(data)] = (key, data, value)
        self._decoded_bytes += len(data)

    def set_value(self, key: Any, value: Any, expiretime: int | None = None) -> None:
        """Pickle, sign and store ``value`` (Beaker's API)."""
        self.set_pickled(key, pickle.dumps(value, pickle.HIGHEST_PROTOCOL), expiretime, value)

    def set_pickled(self, key: Any, payload: bytes, expiretime: int | None = None, value: Any = None) -> None:
        """Sign and store ``payload``, the pickle of ``value``, for ``expiretime`` seconds."""
        if expiretime is None and self.timeout is not None:
            expiretime = self.timeout
        data = self.codec.encode(key, payload, expiretime, time.time())
        if value is not None:
            self._remember(key, data, value)
        try:
            if expiretime is not None:
                self.client.set(_beaker.redis_key(self, key), data, ex=max(1, math.ceil(expiretime)))
            else:
                self.client.set(_beaker.redis_key(self, key), data)
        finally:
            written(self.nears, [_beaker.redis_key(self, key)])

    def __delitem__(self, key: Any) -> None:
        try:
            super().__delitem__(key)
        finally:
            written(self.nears, [_beaker.redis_key(self, key)])

    def do_remove(self) -> None:
        """Delete every entry of the namespace (Beaker's ``Cache.clear()``), and say so to every near cache.

        With or without a near cache here: other processes may have one
        (see :data:`~.near.CLEARED`).
        """
        try:
            prefix = _beaker.redis_key(self, b"")
            keys: list[Any] = []
            # The namespace escaped: Beaker's KEYS pattern takes a region
            # named "a[1]" for a pattern, and matches none of its keys.
            for key in self.client.scan_iter(match=_glob_escaped(prefix) + "*", count=1000):
                keys.append(key)
                if len(keys) >= 1000:
                    self.client.delete(*keys)
                    keys.clear()
            if keys:
                self.client.delete(*keys)
            self.client.set(prefix + CLEARED, b"", ex=CLEARED_LIFETIME)
        finally:
            written_all(self.nears)


def _glob_escaped(text: str) -> str:
    """``text`` as a Redis ``MATCH`` pattern that matches itself only."""
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)
