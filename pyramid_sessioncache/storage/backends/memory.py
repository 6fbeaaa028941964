"""A bounded in-process Beaker namespace for ``memory`` regions.

Beaker's own ``memory`` namespaces live in a module-global dictionary and
grow without bound: a flood of distinct query parameters would fill the
process.  This one belongs to its region and keeps at most ``max_items``
entries, dropping the least recently used.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from beaker.container import AbstractDictionaryNSManager

from .. import api

#: Entries a ``memory`` region keeps unless ``max_items`` says otherwise.
DEFAULT_MAX_ITEMS = 10_000


class LRUDict:
    """A thread-safe mapping of at most ``max_items`` entries, least recently used out first."""

    def __init__(self, max_items: int | None) -> None:
        self.max_items = max_items
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def __getitem__(self, key: Any) -> Any:
        with self._lock:
            value = self._data[key]
            self._data.move_to_end(key)
            return value

    def __setitem__(self, key: Any, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            if self.max_items is not None:
                while len(self._data) > self.max_items:
                    self._data.popitem(last=False)

    def __delitem__(self, key: Any) -> None:
        with self._lock:
            del self._data[key]

    def __contains__(self, key: Any) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def get_many(self, keys: Any) -> list:
        """Return the values of ``keys`` (None where missing), under one lock."""
        with self._lock:
            return [self._data.get(key) for key in keys]

    def set_many(self, values: Any) -> None:
        """Store every key and value of ``values``, under one lock."""
        for key, value in values.items():
            self[key] = value

    def add_many(self, values: Any) -> None:
        """Store the keys of ``values`` that have no value, under one lock."""
        with self._lock:
            for key, value in values.items():
                self._data.setdefault(key, value)

    def raise_many(self, values: Any) -> dict:
        """:func:`~pyramid_sessioncache.storage.api.raise_many`, under one lock."""
        refused = {}
        with self._lock:
            for key, value in values.items():
                held = self._data.get(key)
                if held is not None and api.counter_of(held) >= api.counter_of(value):
                    refused[key] = held
                else:
                    self._data[key] = value
        return refused

    def keys(self) -> list:
        with self._lock:
            return list(self._data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


class BoundedMemoryNamespace(AbstractDictionaryNSManager):
    """A Beaker namespace in this process's memory, of at most ``max_items`` entries."""

    def __init__(self, namespace: str, max_items: int | None = DEFAULT_MAX_ITEMS, **kw: Any) -> None:
        AbstractDictionaryNSManager.__init__(self, namespace)
        self.dictionary = LRUDict(max_items)

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
