"""Redis namespaces: signed entries, and table versions read with them in one ``MGET``."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from beaker.ext.redisnm import RedisNamespaceManager

from ... import _beaker
from .. import signing

log = logging.getLogger(__name__)


class RedisVersionsNamespace(RedisNamespaceManager):
    """Beaker's Redis namespace, reading and writing several plain-text values at once."""

    def get_many(self, keys: Sequence[bytes]) -> list[Any]:
        """Return the values of ``keys`` (None where missing), in one ``MGET``."""
        raw = self.client.mget([_beaker.redis_key(self, key) for key in keys])
        return [None if value is None else value.decode() for value in raw]

    def set_many(self, values: Mapping[bytes, Any]) -> None:
        """Store ``values``, in one ``MSET``."""
        self.client.mset({_beaker.redis_key(self, key): value for key, value in values.items()})

    def add_many(self, values: Mapping[bytes, Any]) -> None:
        """Store the keys of ``values`` that have no value (``SET NX``), in one round trip."""
        pipeline = self.client.pipeline(transaction=False)
        for key, value in values.items():
            pipeline.set(_beaker.redis_key(self, key), value, nx=True)
        pipeline.execute()


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
        return self.decode(key, self.client.get(_beaker.redis_key(self, key)))

    def get_with_versions(
        self, key: bytes, versions: RedisVersionsNamespace, names: Iterable[bytes]
    ) -> tuple[Any, tuple]:
        """Read the entry ``key`` and the values of ``names`` in ``versions``, in one ``MGET``.

        Both namespaces belong to one region, so one server.  Raises
        ``KeyError`` when the entry is missing or its signature fails.
        """
        keys = [_beaker.redis_key(self, key), *(_beaker.redis_key(versions, name) for name in names)]
        entry, *raw = self.client.mget(keys)
        return self.decode(key, entry), tuple(None if value is None else value.decode() for value in raw)

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
            self.client.set(_beaker.redis_key(self, key), data, ex=int(expiretime))
        else:
            self.client.set(_beaker.redis_key(self, key), data)
