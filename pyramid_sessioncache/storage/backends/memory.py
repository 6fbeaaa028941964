"""A bounded in-process Beaker namespace for ``memory`` regions.

Beaker's own ``memory`` namespaces live in a module-global dictionary and
grow without bound: a flood of distinct query parameters would fill the
process.  This one belongs to its region and keeps at most ``max_items``
entries and ``max_bytes`` bytes, dropping the least recently used first.

An entry's size is the length of its pickle, measured once when it is
stored (a region pickles what it stores anyway, to check its size); the
objects themselves take a few times more room than their pickle, so
``max_bytes`` bounds the process's memory within that factor.
"""

from __future__ import annotations

import pickle
import sys
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from beaker.container import AbstractDictionaryNSManager

from ... import forks
from .. import api

#: Entries a ``memory`` region keeps unless ``max_items`` says otherwise.
DEFAULT_MAX_ITEMS = 10_000
#: Bytes (of pickles) a ``memory`` region keeps unless ``max_bytes`` says otherwise.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


def measure(value: Any) -> int:
    """The size counted for ``value``: the length of its pickle, or its shallow size if it has none."""
    try:
        return len(pickle.dumps(value, pickle.HIGHEST_PROTOCOL))
    except Exception:  # unpicklable: an estimate is all there is
        return sys.getsizeof(value)


class LRUDict:
    """A thread-safe mapping bounded in entries and bytes, least recently used out first.

    :param max_items: most entries kept (None: no bound).
    :param max_bytes: most bytes kept, as counted by :meth:`put` (None: no
        bound, and nothing is measured).
    :param bounded: with ``max_items``, ``bounded(key)`` says whether a key
        counts, and may be dropped; the others are kept whatever their
        number (a region's table versions, beside its entries' own), and
        ``max_bytes`` is not enforced.
    """

    def __init__(
        self, max_items: int | None, max_bytes: int | None = None, bounded: Callable[[Any], bool] | None = None
    ) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        #: Bytes counted for the entries held.
        self.bytes = 0
        self._data: OrderedDict = OrderedDict()
        self._sizes: dict[Any, int] = {}
        self._bounded = bounded
        self._counted = 0  # keys held that bounded() counts
        self._lock = forks.lock()

    def __getitem__(self, key: Any) -> Any:
        with self._lock:
            value = self._data[key]
            self._data.move_to_end(key)
            return value

    def __setitem__(self, key: Any, value: Any) -> None:
        self.put(key, value, measure(value) if self.max_bytes is not None else 0)

    def put(self, key: Any, value: Any, size: int) -> None:
        """Store ``value`` under ``key``, counted as ``size`` bytes; one larger than ``max_bytes`` is not kept."""
        with self._lock:
            if self.max_bytes is not None and size > self.max_bytes:
                self._pop(key)
                return
            self.bytes += size - self._sizes.get(key, 0)
            self._sizes[key] = size
            self._set(key, value)
            self._evict()

    def _set(self, key: Any, value: Any) -> None:
        """Store ``value`` under ``key`` as the most recently used; the caller evicts."""
        if self._bounded is not None and key not in self._data and self._bounded(key):
            self._counted += 1
        self._data[key] = value
        self._data.move_to_end(key)

    def _evict(self) -> None:
        """Drop the least recently used keys over the bounds (of those ``bounded`` counts, if given)."""
        data = self._data
        if self._bounded is not None:
            while self.max_items is not None and self._counted > self.max_items:
                old = next(iter(data))
                if self._bounded(old):
                    self._pop(old)
                else:
                    data.move_to_end(old)  # kept: passed over until it is older than a counted one again
            return
        while (self.max_items is not None and len(data) > self.max_items) or (
            self.max_bytes is not None and self.bytes > self.max_bytes
        ):
            old, _ = data.popitem(last=False)
            self.bytes -= self._sizes.pop(old, 0)

    def _pop(self, key: Any) -> None:
        if self._data.pop(key, _MISSING) is not _MISSING:
            self.bytes -= self._sizes.pop(key, 0)
            if self._bounded is not None and self._bounded(key):
                self._counted -= 1

    def __delitem__(self, key: Any) -> None:
        with self._lock:
            if key not in self._data:
                raise KeyError(key)
            self._pop(key)

    def __contains__(self, key: Any) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def get_many(self, keys: Any) -> list:
        """Return the values of ``keys`` (None where missing), under one lock."""
        with self._lock:
            return [self._data.get(key) for key in keys]

    def set_many(self, values: Mapping) -> None:
        """Store every key and value of ``values``."""
        for key, value in values.items():
            self[key] = value

    def add_many(self, values: Mapping) -> None:
        """Store the keys of ``values`` that have no value, under one lock (not counted in bytes)."""
        with self._lock:
            for key, value in values.items():
                if key not in self._data:
                    self._set(key, value)
            self._evict()

    def raise_many(self, values: Mapping) -> dict:
        """:func:`~pyramid_sessioncache.storage.api.raise_many`, under one lock (not counted in bytes)."""
        refused = {}
        with self._lock:
            for key, value in values.items():
                held = self._data.get(key)
                if held is not None and api.counter_of(held) >= api.counter_of(value):
                    refused[key] = held
                else:
                    self._set(key, value)
            self._evict()
        return refused

    def keys(self) -> list:
        with self._lock:
            return list(self._data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._sizes.clear()
            self.bytes = 0
            self._counted = 0


_MISSING = object()


class BoundedMemoryNamespace(AbstractDictionaryNSManager):
    """A Beaker namespace in this process's memory, of at most ``max_items`` entries and ``max_bytes`` bytes."""

    def __init__(
        self,
        namespace: str,
        max_items: int | None = DEFAULT_MAX_ITEMS,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        bounded: Callable[[Any], bool] | None = None,
        **kw: Any,
    ) -> None:
        AbstractDictionaryNSManager.__init__(self, namespace)
        self.dictionary = LRUDict(max_items, max_bytes, bounded)

    def set_sized(self, key: bytes, value: Any, size: int) -> None:
        """Store ``value`` (in Beaker's stored format) counted as ``size`` bytes, measured by the caller."""
        self.dictionary.put(key, value, size)

    def get_many(self, keys: Any) -> list:
        """Return the values of ``keys`` (None where missing), in one read."""
        return self.dictionary.get_many(keys)

    def set_many(self, values: Any) -> None:
        """Store every key and value of ``values``."""
        self.dictionary.set_many(values)

    def add_many(self, values: Any) -> None:
        """Store the keys of ``values`` that have no value."""
        self.dictionary.add_many(values)

    def raise_many(self, values: Any) -> dict:
        """Store values whose counter is higher than the one held (see ``api.raise_many``)."""
        return self.dictionary.raise_many(values)
