"""The ``file`` backend: one signed file per entry, shared by the processes of one machine.

Beaker's own ``file`` namespace keeps a whole region in one pickle, read
and rewritten whole on every access (unpickled before anything could check
it), and leaves a lock file per key behind.  This one:

- keeps each entry in a file of its own, named by a hash of its key, under
  ``<data_dir>/sessioncache/<namespace hash>/<2 hex digits>/``: a hit
  opens one file, whatever the number of entries;
- writes a file whole, into a temporary file of the same directory, then
  ``os.replace()``: a reader sees the old entry or the new one, never a
  part, so reading takes no lock;
- signs what it writes for its namespace and key (``signing.py``) and
  unpickles a file only after its signature checks; a file larger than
  the region's ``max_entry_bytes`` is not even read;
- creates files 0600 and directories 0700, in a ``data_dir`` that only
  this user can write (checked at start-up, ``directories.py``);
- removes an expired entry when it is read, and sweeps a bounded part of
  the region (one of its 256 subdirectories: expired entries and values,
  temporary files and lock files left by a process that died) every
  :attr:`FileNamespace.SWEEP_EVERY` writes;
- locks the creation of an entry (stampede) with a :class:`~.filelock.FileLock`,
  whose file is removed when it is let go.

:class:`FileNamespace` holds raw values (table versions, see
``versions.py``, which are signed themselves); :class:`SignedFileNamespace`
adds the entries Beaker's ``Cache`` reads and writes, in Beaker's stored
format, so ``Region.cache_for().get(key)`` reads what the region wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from beaker.container import NamespaceManager

from .. import api, signing
from ..keys import key_bytes
from .directories import make_directory
from .filelock import FileLock, remove_abandoned
from .signed import SignedNamespace

log = logging.getLogger(__name__)

#: How many subdirectories a namespace spreads its files over.
SUBDIRECTORIES = 256
#: Temporary files and lock files older than this (seconds) were left by a process that died.
ABANDONED_AFTER = 60.0
#: The end of the name of a file whose value expires (see :attr:`FileNamespace.expiring`).
EXPIRING = ".expiring"


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _read(path: str, limit: int) -> tuple[bytes, os.stat_result] | None:
    """The bytes of the file ``path`` and its status, or None if it is missing.

    Raises ``ValueError`` if it is larger than ``limit`` bytes: it is not read.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        status = os.fstat(descriptor)
        size = status.st_size
        if size > limit:
            raise ValueError(f"{size} bytes")
        # Files are replaced, never written in place: read the size fstat gave.
        data = os.read(descriptor, size)
        while len(data) < size:
            more = os.read(descriptor, size - len(data))
            if not more:
                break
            data += more
        return data, status
    finally:
        os.close(descriptor)


def _temporary(directory: str, data: bytes) -> str:
    """Write ``data`` to a new temporary file (mode 0600) of ``directory``, created if missing; return its path.

    Temporary files end in ``.tmp``: a sweep removes those a process that died left behind.
    """
    try:
        descriptor, temporary = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=directory)
    except FileNotFoundError:
        make_directory(directory)
        descriptor, temporary = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return temporary


class FileNamespace(NamespaceManager):
    """Raw values in files, one per key, under ``<data_dir>/sessioncache/<namespace hash>/``.

    :param namespace: the namespace's name.
    :param data_dir: a directory only this user can write (checked by the
        region).
    :param lock_dir: where lock files go (default: ``<data_dir>/sessioncache-locks``).
    :param max_bytes: files larger than this are not read.
    """

    #: A bounded sweep every this many writes (see :meth:`sweep`).
    SWEEP_EVERY = 32
    #: Which raw values expire (a region's versions: entries' own, see
    #: ``versions.py``): None for none.  Their files end in :data:`EXPIRING`.
    expiring: Callable[[bytes], bool] | None = None
    #: Seconds such a value is kept after it was last written: a sweep removes it after.
    lifetime: float = math.inf

    def __init__(
        self, namespace: str, data_dir: str, lock_dir: str | None = None, max_bytes: int = 4096, **kw: Any
    ) -> None:
        super().__init__(namespace)
        digest = _digest(namespace.encode("utf-8", "surrogateescape"))
        self.directory = os.path.join(data_dir, "sessioncache", digest)
        self.lock_directory = os.path.join(lock_dir or os.path.join(data_dir, "sessioncache-locks"), digest)
        self.max_bytes = max_bytes
        self._writes = 0
        self._next_sweep = random.randrange(SUBDIRECTORIES)
        make_directory(self.directory)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.namespace!r} in {self.directory!r}>"

    def path(self, key: bytes) -> str:
        """The file that holds ``key``'s value."""
        digest = _digest(key)
        path = os.path.join(self.directory, digest[:2], digest[2:])
        return path + EXPIRING if self.expiring is not None and self.expiring(key) else path

    def get_creation_lock(self, key: bytes) -> FileLock:
        """The lock one creator of ``key``'s value holds while the others wait (its file is removed after)."""
        return FileLock(os.path.join(self.lock_directory, _digest(key) + ".lock"))

    def _replace(self, path: str, data: bytes) -> None:
        """Write ``path`` whole: a temporary file, then ``os.replace()``."""
        temporary = _temporary(os.path.dirname(path), data)
        try:
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        self._wrote()

    def _add(self, path: str, data: bytes) -> None:
        """Write ``path`` whole unless it exists (a hard link fails on an existing name)."""
        temporary = _temporary(os.path.dirname(path), data)
        try:
            with contextlib.suppress(FileExistsError):
                os.link(temporary, path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        self._wrote()

    def _wrote(self) -> None:
        self._writes += 1
        if self._writes % self.SWEEP_EVERY == 0:
            self.sweep()

    def _raw(self, key: bytes) -> bytes | None:
        try:
            found = _read(self.path(key), self.max_bytes)
        except ValueError:
            return b""  # too large: not a value of ours, and not read
        return None if found is None else found[0]

    # ManyKeys: raw values (table versions), a few bytes each.

    def get_many(self, keys: Sequence[bytes]) -> list[Any]:
        """Return the raw values of ``keys`` (None where missing)."""
        return [self._raw(key) for key in keys]

    def set_many(self, values: Mapping[bytes, Any]) -> None:
        """Store every key and value of ``values``."""
        for key, value in values.items():
            self._replace(self.path(key), _bytes(value))

    def add_many(self, values: Mapping[bytes, Any]) -> None:
        """Store the keys of ``values`` that have no value, each atomically."""
        for key, value in values.items():
            self._add(self.path(key), _bytes(value))

    def raise_many(self, values: Mapping[bytes, Any]) -> dict[bytes, Any]:
        """:func:`~pyramid_sessioncache.storage.api.raise_many`, under a lock of the namespace."""
        lock = FileLock(os.path.join(self.lock_directory, "versions.lock"))
        lock.acquire()
        try:
            refused = {}
            for key, value in values.items():
                held = self._raw(key)
                if held is not None and api.counter_of(held) >= api.counter_of(value):
                    refused[key] = held
                else:
                    self._replace(self.path(key), _bytes(value))
            return refused
        finally:
            lock.release()

    def __contains__(self, key: Any) -> bool:
        return os.path.exists(self.path(key_bytes(key)))

    def __delitem__(self, key: Any) -> None:
        try:
            os.unlink(self.path(key_bytes(key)))
        except FileNotFoundError:
            raise KeyError(key) from None

    def do_remove(self) -> None:
        """Remove every file of the namespace: renamed away at once, then deleted."""
        gone = f"{self.directory}.removed-{uuid.uuid4().hex}"
        try:
            os.rename(self.directory, gone)
        except FileNotFoundError:
            return
        shutil.rmtree(gone, ignore_errors=True)
        make_directory(self.directory)

    def keys(self) -> list:
        """Not supported: files are named by a hash of their key."""
        raise NotImplementedError("a file namespace names its files by a hash of their key")

    # Removing what is no longer needed.

    def _expired(self, path: str, now: float) -> bool:
        try:
            with open(path, "rb") as file:
                head = file.read(signing.HEADER)
        except OSError:
            return False
        deadline = signing.deadline(head)
        return 0 < deadline <= now

    def sweep(self) -> int:
        """Remove the expired entries of one subdirectory, and files left by processes that died.

        The subdirectories are swept in turn, one per call: the cost of a
        sweep is bounded by one subdirectory's files.  Returns how many
        files were removed.
        """
        index, self._next_sweep = self._next_sweep, (self._next_sweep + 1) % SUBDIRECTORIES
        directory = os.path.join(self.directory, f"{index:02x}")
        now = time.time()
        removed = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(directory):
                try:
                    if entry.name.endswith(".tmp"):
                        if entry.stat().st_mtime < now - ABANDONED_AFTER:
                            os.unlink(entry.path)
                            removed += 1
                    elif entry.name.endswith(EXPIRING):
                        if entry.stat().st_mtime < now - self.lifetime:
                            os.unlink(entry.path)
                            removed += 1
                    elif self._expired(entry.path, now):
                        os.unlink(entry.path)
                        removed += 1
                except OSError:
                    continue
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.lock_directory):
                with contextlib.suppress(OSError):
                    if entry.stat().st_mtime < now - ABANDONED_AFTER and remove_abandoned(entry.path):
                        removed += 1
        return removed


class SignedFileNamespace(SignedNamespace, FileNamespace):
    """The entries of a ``file`` region: Beaker's stored format, pickled and signed, one file each.

    Parameters are :class:`~.signed.SignedNamespace`'s: a file larger than
    the region's ``max_entry_bytes`` is not read.
    """

    log = log

    def _signed(self, key: bytes) -> bytes:
        path = self.path(key)
        try:
            found = _read(path, self.max_bytes)
        except ValueError as exc:
            self.codec.complain(
                "size", "ignored an entry of cache namespace %r larger than the region allows (%s)", self.namespace, exc
            )
            raise KeyError(key) from None
        if found is None:
            raise KeyError(key)
        data, status = found
        deadline = signing.deadline(data)
        if 0 < deadline <= time.time():
            # Expired: gone, as from Redis (one caller regenerates it, the
            # others wait), unless a writer has just replaced it.
            with contextlib.suppress(OSError):
                now = os.stat(path)
                if (now.st_dev, now.st_ino) == (status.st_dev, status.st_ino):
                    os.unlink(path)
            raise KeyError(key)
        return data

    def _store(self, key: bytes, data: bytes) -> None:
        self._replace(self.path(key), data)


def _bytes(value: Any) -> bytes:
    return value.encode("ascii") if isinstance(value, str) else value
