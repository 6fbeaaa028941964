"""What storage asks of a backend beyond Beaker's namespace managers.

A region stores through a Beaker ``NamespaceManager`` (``[key]``,
``set_value``, read/write locks, a creation lock), so that
``beaker.cache.Cache`` reads what a region wrote.  Beaker reads and writes
one key at a time; table versions are read and written several at once,
so a backend that can do that in one operation (a dictionary under one
lock, Redis's ``MGET``/``MSET``) implements :class:`ManyKeys`.
"""

from __future__ import annotations

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


def _get(namespace: Any, key: bytes) -> Any:
    try:
        return namespace[key]
    except KeyError:
        return None
