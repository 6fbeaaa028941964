"""Redis namespaces: signed entries, and table versions read with them in one ``MGET``.

Single keys are read with ``MGET`` too: it answers nil for a key that holds
another type (a list planted where an entry should be), where ``GET`` would
raise ``WRONGTYPE``.
"""

from __future__ import annotations

import logging
import math
import pickle
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from beaker.ext.redisnm import RedisNamespaceManager

from ... import _beaker
from .. import signing

log = logging.getLogger(__name__)

#: ``raise_many`` in one round trip: per key, SET unless the string held
#: starts with a counter at least as high (see ``api.counter_of``); a key of
#: another type is overwritten.  Returns the keys refused and what they hold.
_RAISE = """
local refused = {}
for i, key in ipairs(KEYS) do
  local new = ARGV[i]
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
    redis.call('SET', key, new)
  end
end
return refused
"""


class RedisVersionsNamespace(RedisNamespaceManager):
    """Beaker's Redis namespace, reading and writing several raw values at once."""

    def get_many(self, keys: Sequence[bytes]) -> list[Any]:
        """Return the values of ``keys`` (bytes; None where missing or not a string), in one ``MGET``."""
        return self.client.mget([_beaker.redis_key(self, key) for key in keys])

    def set_many(self, values: Mapping[bytes, Any]) -> None:
        """Store ``values``, in one ``MSET``."""
        self.client.mset({_beaker.redis_key(self, key): value for key, value in values.items()})

    def add_many(self, values: Mapping[bytes, Any]) -> None:
        """Store the keys of ``values`` that have no value (``SET NX``), in one round trip."""
        pipeline = self.client.pipeline(transaction=False)
        for key, value in values.items():
            pipeline.set(_beaker.redis_key(self, key), value, nx=True)
        pipeline.execute()

    def raise_many(self, values: Mapping[bytes, Any]) -> dict[bytes, Any]:
        """Store the values whose counter is above the one held, atomically, in one round trip (a Lua script)."""
        script = getattr(self, "_raise", None)
        if script is None:
            script = self._raise = self.client.register_script(_RAISE)
        keys = {_beaker.redis_key(self, key): key for key in values}
        answer = script(keys=list(keys), args=list(values.values()))
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
    """

    #: How many decoded values a namespace remembers.
    REMEMBERED = 128

    def __init__(self, namespace: str, url: Any, secret: bytes, max_bytes: int = 1024 * 1024, **kw: Any) -> None:
        super().__init__(namespace, url, **kw)
        self.codec = signing.Codec(secret, namespace, log)
        #: Values longer than this (bytes) are not checked: nothing of ours is that long.
        self.max_bytes = max_bytes + signing.HEADER
        self._decoded: dict[bytes, tuple[bytes, bytes, Any]] = {}

    def __getitem__(self, key: Any) -> Any:
        return self.decode(key, self.client.mget([_beaker.redis_key(self, key)])[0])

    def get_with_versions(
        self, key: bytes, versions: RedisVersionsNamespace, names: Iterable[bytes]
    ) -> tuple[Any, list[Any]]:
        """Read the entry ``key`` and the raw values of ``names`` in ``versions``, in one ``MGET``.

        Both namespaces belong to one region, so one server.  Raises
        ``KeyError`` when the entry is missing or unusable.
        """
        keys = [_beaker.redis_key(self, key), *(_beaker.redis_key(versions, name) for name in names)]
        entry, *raw = self.client.mget(keys)
        return self.decode(key, entry), raw

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
        if len(self._decoded) >= self.REMEMBERED:
            self._decoded.clear()
        self._decoded[signing.signature(data)] = (key, data, value)

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
        if expiretime is not None:
            self.client.set(_beaker.redis_key(self, key), data, ex=max(1, math.ceil(expiretime)))
        else:
            self.client.set(_beaker.redis_key(self, key), data)
