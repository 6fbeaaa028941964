"""Signed pickles: what leaves the process is checked, bound to its place, before it is unpickled.

A signed value is ``PREFIX | signature | deadline | payload``:

- ``PREFIX`` names the format; a value of another format does not check.
- ``signature``: HMAC-SHA256, under the application's secret, of the
  format, what the value is (an entry), the *place* it was written to (its
  namespace, which names the region, and its key, each length-prefixed so
  that no two places sign the same message), the deadline and the payload.
  A value copied to another key, another region or another application
  does not check: it reads as a miss, like a forged one.
- ``deadline``: when the value expires, in seconds since the epoch (0:
  never), a big-endian double.  It can be read without the secret (the
  ``file`` backend sweeps expired files by it) and is signed with the rest.
- ``payload``: a pickle, unpickled only after the signature checks.

Example::

    data = dumps(secret, {"a": 1}, namespace="sessioncache.v2.long_term", key=b"k")
    loads(secret, data, namespace="sessioncache.v2.long_term", key=b"k")       # {"a": 1}
    loads(secret, data, namespace="sessioncache.v2.long_term", key=b"other")   # INVALID
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import pickle
import struct
from typing import Any

from .keys import key_bytes

#: Marks the format, so that a change of format reads as a miss.
PREFIX = b"sc2:"
_DIGEST = hashlib.sha256().digest_size
_DEADLINE = struct.Struct(">d")
#: Bytes before the payload: prefix, signature, deadline.
HEADER = len(PREFIX) + _DIGEST + _DEADLINE.size
#: What :func:`loads` returns for data whose signature does not check.
INVALID: Any = object()


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


class Signer:
    """Signs and checks the values of one place: a namespace, for one purpose.

    :param secret: the application's secret, the same in every process.
    :param namespace: the namespace the values are stored in (it names the region).
    :param purpose: what the values are (``b"entry"``), so that a value of
        one kind never checks as another.

    The namespace part of the message is hashed once, here; signing or
    checking a value then costs one HMAC of its key and payload.
    """

    __slots__ = ("_base",)

    def __init__(self, secret: bytes, namespace: str, purpose: bytes = b"entry") -> None:
        prefix = _field(PREFIX) + _field(purpose) + _field(namespace.encode("utf-8", "surrogateescape"))
        self._base = hmac.new(secret, prefix, hashlib.sha256)

    def _mac(self, key: bytes | str, head: bytes, payload: bytes | memoryview) -> bytes:
        mac = self._base.copy()
        mac.update(_field(key_bytes(key)))
        mac.update(head)
        mac.update(payload)
        return mac.digest()

    def seal(self, key: bytes | str, payload: bytes, deadline: float = 0.0) -> bytes:
        """Return ``payload`` signed for ``key``, expiring at ``deadline`` (0: never)."""
        head = _DEADLINE.pack(deadline)
        return PREFIX + self._mac(key, head, payload) + head + payload

    def open(self, key: bytes | str, data: bytes) -> memoryview | None:
        """Return the payload :meth:`seal` signed for ``key`` in ``data``, or None if it does not check."""
        if not isinstance(data, bytes) or len(data) < HEADER or not data.startswith(PREFIX):
            return None
        view = memoryview(data)
        signature = view[len(PREFIX) : len(PREFIX) + _DIGEST]
        head = view[len(PREFIX) + _DIGEST : HEADER]
        payload = view[HEADER:]
        if not hmac.compare_digest(signature, self._mac(key, bytes(head), payload)):
            return None
        return payload

    def dumps(self, key: bytes | str, value: Any, deadline: float = 0.0) -> bytes:
        """Pickle ``value`` and sign it for ``key``."""
        return self.seal(key, pickle.dumps(value, pickle.HIGHEST_PROTOCOL), deadline)

    def loads(self, key: bytes | str, data: bytes) -> Any:
        """Return the value signed for ``key`` in ``data``, or :data:`INVALID`.

        Unpickling errors of a value whose signature checks (one written by
        an older version of the application, say) propagate.
        """
        payload = self.open(key, data)
        return INVALID if payload is None else pickle.loads(payload)


def deadline(data: bytes) -> float:
    """Return the deadline written in ``data``, unchecked (0.0: never expires or unreadable)."""
    if len(data) < HEADER or not data.startswith(PREFIX):
        return 0.0
    return float(_DEADLINE.unpack_from(data, len(PREFIX) + _DIGEST)[0])


def signature(data: bytes) -> bytes:
    """Return the signature part of ``data`` as :meth:`Signer.seal` wrote it (unchecked)."""
    return data[len(PREFIX) : len(PREFIX) + _DIGEST]


def dumps(secret: bytes, value: Any, namespace: str = "", key: bytes | str = b"") -> bytes:
    """Pickle ``value`` and sign it with ``secret`` for ``key`` in ``namespace``."""
    return Signer(secret, namespace).dumps(key, value)


def loads(secret: bytes, data: bytes, namespace: str = "", key: bytes | str = b"") -> Any:
    """Return the value :func:`dumps` signed for the same place, or :data:`INVALID`."""
    return Signer(secret, namespace).loads(key, data)


class Codec:
    """The signed values of one namespace, and its complaints about those that do not check.

    A namespace that keeps values outside the process writes them with
    :meth:`encode` and reads them with :meth:`decode`, which unpickles
    nothing whose signature fails, and raises ``KeyError`` (a miss) for
    anything it cannot use.  Each kind of problem is logged once as a
    warning per namespace, then at DEBUG: a flood of forged entries cannot
    flood the log.
    """

    def __init__(self, secret: bytes, namespace: str, log: logging.Logger) -> None:
        self.namespace = namespace
        self.signer = Signer(secret, namespace)
        self._log = log
        self._complained: set[str] = set()

    def encode(self, key: bytes | str, payload: bytes, expire: float | None = None, now: float = 0.0) -> bytes:
        """Return ``payload`` (a pickle) signed for ``key``, expiring ``expire`` seconds after ``now``."""
        return self.signer.seal(key, payload, now + expire if expire else 0.0)

    def decode(self, key: bytes | str, data: bytes) -> Any:
        """Return the value stored as ``data`` under ``key``; ``KeyError`` if it cannot be used."""
        key = key_bytes(key)
        payload = self.signer.open(key, data)
        if payload is None:
            self.complain(
                "signature",
                "ignored an entry with a bad signature in cache namespace %r (forged, corrupted, "
                "or written under another key, region or secret); it reads as a miss",
                self.namespace,
            )
            raise KeyError(key)
        try:
            return pickle.loads(payload)
        except Exception as exc:  # signed by us, but by code that differs from this one
            self.complain(
                "unpickling",
                "ignored an entry of cache namespace %r that cannot be unpickled (%s: %s); it reads as a miss",
                self.namespace,
                type(exc).__name__,
                exc,
            )
            raise KeyError(key) from None

    def complain(self, kind: str, message: str, *args: Any) -> None:
        """Log ``message`` as a warning the first time ``kind`` happens, then at DEBUG."""
        if kind in self._complained:
            self._log.debug(message, *args)
            return
        self._complained.add(kind)
        self._log.warning(message + " (further ones are logged at DEBUG)", *args)
