"""Signed pickles: what leaves the process is checked before it is unpickled."""

from __future__ import annotations

import hashlib
import hmac
import pickle
from typing import Any

#: Marks the format, so that a change of format reads as a miss.
PREFIX = b"sc1:"
_DIGEST = hashlib.sha256().digest_size
#: What :func:`loads` returns for data whose signature does not check.
INVALID = object()


def dumps(secret: bytes, value: Any) -> bytes:
    """Pickle ``value`` and sign it with ``secret``."""
    payload = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    return PREFIX + hmac.new(secret, payload, hashlib.sha256).digest() + payload


def signature(data: bytes) -> bytes:
    """Return the signature part of ``data`` as :func:`dumps` wrote it (unchecked)."""
    return data[len(PREFIX) : len(PREFIX) + _DIGEST]


def loads(secret: bytes, data: bytes) -> Any:
    """Return the value :func:`dumps` signed, or :data:`INVALID` if the signature does not check."""
    if not data.startswith(PREFIX):
        return INVALID
    signature = data[len(PREFIX) : len(PREFIX) + _DIGEST]
    payload = data[len(PREFIX) + _DIGEST :]
    if not hmac.compare_digest(signature, hmac.new(secret, payload, hashlib.sha256).digest()):
        return INVALID
    return pickle.loads(payload)
