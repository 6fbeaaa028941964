"""Signed entries over a namespace of raw bytes: what the ``file`` and ``dbm`` backends share.

A backend that keeps bytes outside the process provides a namespace of
raw values (where and how the bytes are kept is its own concern: one file
per key, one database per region).  Mixing :class:`SignedNamespace` in
front of it gives the entries Beaker's ``Cache`` reads and writes, in
Beaker's stored format, pickled and signed for their namespace and key
(``signing.py``), and unpickled only after their signature checks::

    class SignedFileNamespace(SignedNamespace, FileNamespace):
        log = log

        def _signed(self, key): ...  # the bytes stored for key, or KeyError
        def _store(self, key, data): ...  # keep data for key
"""

from __future__ import annotations

import logging
import pickle
import time
from typing import Any

from beaker.container import NamespaceManager

from .. import signing
from ..keys import key_bytes


class SignedNamespace(NamespaceManager):
    """The entries of a region, pickled and signed, over a namespace of raw values.

    :param namespace: the namespace's name.
    :param data_dir: a directory only this user can write (checked by the region).
    :param secret: the application's secret.
    :param lock_dir: where lock files go (default: ``<data_dir>/sessioncache-locks``).
    :param max_bytes: the region's ``max_entry_bytes``: a larger entry is
        a miss (a backend may not even read it).

    A subclass names the namespace of raw values after this class, a
    logger for the complaints about entries that do not check, and how an
    entry's bytes are read (``_signed()``) and kept (``_store()``).
    """

    #: Where entries that do not check are reported (the backend's module logger).
    log: logging.Logger

    def __init__(
        self,
        namespace: str,
        data_dir: str,
        secret: bytes,
        lock_dir: str | None = None,
        max_bytes: int = 1024 * 1024,
        **kw: Any,
    ) -> None:
        super().__init__(namespace, data_dir, lock_dir, max_bytes + signing.HEADER)
        self.codec = signing.Codec(secret, namespace, self.log)

    def _signed(self, key: bytes) -> bytes:
        """Return the bytes stored for ``key``; ``KeyError`` if there are none it can use."""
        raise NotImplementedError

    def _store(self, key: bytes, data: bytes) -> None:
        """Keep ``data``, a signed entry, for ``key``."""
        raise NotImplementedError

    def __getitem__(self, key: Any) -> Any:
        key = key_bytes(key)
        return self.codec.decode(key, self._signed(key))

    def __setitem__(self, key: Any, value: Any) -> None:
        self.set_value(key, value)

    def set_value(self, key: Any, value: Any, expiretime: int | None = None) -> None:
        """Pickle, sign and store ``value`` (Beaker's API)."""
        self.set_pickled(key, pickle.dumps(value, pickle.HIGHEST_PROTOCOL), expiretime)

    def set_pickled(self, key: Any, payload: bytes, expiretime: int | None = None, value: Any = None) -> None:
        """Sign and store ``payload`` (a pickle) for ``expiretime`` seconds (None: no expiry)."""
        key = key_bytes(key)
        self._store(key, self.codec.encode(key, payload, expiretime, time.time()))
