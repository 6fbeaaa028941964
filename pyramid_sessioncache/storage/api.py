"""What storage asks of a backend beyond Beaker's namespace managers.

A region stores through a Beaker ``NamespaceManager`` (``[key]``,
``set_value``, read/write locks, a creation lock), so that
``beaker.cache.Cache`` reads what a region wrote.  Beaker reads and writes
one key at a time; table versions are read and written several at once,
so a backend that can do that in one operation (a dictionary under one
lock, Redis's ``MGET``/``MSET``) implements :class:`ManyKeys`.

Table versions are plain strings (or their bytes) that start with a
counter, ``"<counter>:..."`` (see ``versions.py``); :func:`raise_many`
replaces a version only by one with a higher counter, atomically, which is
how two processes bumping a table at once both end above what either read.
:func:`delete_many` removes versions: what is left when a new one cannot be
written (a Redis at ``maxmemory`` refuses every write but ``DEL``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class ManyKeys(Protocol):
    """A namespace that reads and writes several keys in one operation."""

    def get_many(self, keys: Sequence[bytes]) -> list[Any]:
        """Return the values of ``keys``, None where a key has none."""

    def set_many(self, values: Mapping[bytes, Any]) -> None:
        """Store every key and value of ``values``."""

    def add_many(self, values: Mapping[bytes, Any]) -> None:
        """Store the keys of ``values`` that have no value, leaving the others as they are."""

    def raise_many(self, values: Mapping[bytes, Any]) -> dict[bytes, Any]:
        """Store each of ``values`` unless its key holds a counter at least as high (see :func:`counter_of`).

        Atomically per key.  Returns what the keys that were not written
        hold.
        """


def read_many(namespace: Any, keys: Sequence[bytes]) -> list[Any]:
    """Return the values of ``keys`` in ``namespace`` (None where missing), in one read if it can."""
    get_many = getattr(namespace, "get_many", None)  # ManyKeys, without isinstance's cost on every hit
    if get_many is not None:
        return get_many(keys)
    namespace.acquire_read_lock()
    try:
        return [_get(namespace, key) for key in keys]
    finally:
        namespace.release_read_lock()


def write_many(namespace: Any, values: Mapping[bytes, Any]) -> None:
    """Store ``values`` in ``namespace``, in one write if it can."""
    set_many = getattr(namespace, "set_many", None)
    if set_many is not None:
        set_many(values)
        return
    namespace.acquire_write_lock()
    try:
        for key, value in values.items():
            namespace[key] = value
    finally:
        namespace.release_write_lock()


def add_many(namespace: Any, values: Mapping[bytes, Any]) -> None:
    """Store the keys of ``values`` that ``namespace`` has no value for; atomically where it can."""
    add = getattr(namespace, "add_many", None)
    if add is not None:
        add(values)
        return
    namespace.acquire_write_lock()
    try:
        for key, value in values.items():
            if not namespace.has_key(key):
                namespace[key] = value
    finally:
        namespace.release_write_lock()


def delete_many(namespace: Any, keys: Sequence[bytes]) -> None:
    """Remove ``keys`` (those that exist) from ``namespace``, in one write if it can.

    A namespace does it in one operation with a ``delete_many(keys)`` of its
    own; otherwise one key at a time, under its write lock.
    """
    native = getattr(namespace, "delete_many", None)
    if native is not None:
        native(keys)
        return
    namespace.acquire_write_lock()
    try:
        for key in keys:
            with contextlib.suppress(KeyError):  # nothing to delete
                del namespace[key]
    finally:
        namespace.release_write_lock()


def raise_many(namespace: Any, values: Mapping[bytes, Any]) -> dict[bytes, Any]:
    """Store each of ``values`` in ``namespace`` unless its key holds a counter at least as high.

    Returns ``{key: value held}`` for the keys left as they were; under the
    namespace's write lock where it has no ``raise_many`` of its own.
    """
    native = getattr(namespace, "raise_many", None)
    if native is not None:
        return native(values)
    refused: dict[bytes, Any] = {}
    namespace.acquire_write_lock()
    try:
        for key, value in values.items():
            held = _get(namespace, key)
            if held is not None and counter_of(held) >= counter_of(value):
                refused[key] = held
            else:
                namespace[key] = value
    finally:
        namespace.release_write_lock()
    return refused


def counter_of(value: Any) -> int:
    """The counter a version value starts with (``b"12:..."``: 12), or -1 when it has none.

    Read without checking the value's signature: a forged value may claim
    any counter, so a caller checks what :func:`raise_many` refused.
    """
    if isinstance(value, str):
        value = value.encode("ascii", "replace")
    if not isinstance(value, bytes):
        return -1
    digits, colon, _ = value.partition(b":")
    if not colon or not digits.isdigit() or len(digits) > 15:
        return -1
    return int(digits)


def _get(namespace: Any, key: bytes) -> Any:
    try:
        return namespace[key]
    except KeyError:
        return None
