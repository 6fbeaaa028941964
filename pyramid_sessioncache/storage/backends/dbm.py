"""The ``dbm`` backend: a region in one database of Python's ``dbm``, every value signed.

Beaker's own ``dbm`` namespace unpickles what it reads before anything
could check it.  This one shares a database between processes the way
Beaker's does (a file lock per database: readers share it, a writer holds
it alone; the database is opened and closed around each access), and:

- signs every entry for its namespace and key (``signing.py``) and
  unpickles it only after the signature checks;
- creates the database files 0600 and its directories 0700, in a
  ``data_dir`` that only this user can write (checked at start-up);
- locks the creation of an entry with a :class:`~.filelock.FileLock`, which
  leaves no file behind (Beaker's leaves one per key);
- makes its directories again if they are removed while it runs (a
  temporary-files cleaner);
- treats a database it cannot read (an index ``dbm.dumb`` cannot parse
  after a crash or a full disk) as a failure of its backend, an
  ``OSError``: the region answers from the database, logs a warning, and
  the damaged files are removed, to be made again when it is next tried.

What it cannot change: the whole region is one database, which keeps the
space of entries it replaced, and with ``dbm.dumb`` (the only ``dbm`` of
Pythons built without gdbm or ndbm) opening it reads its whole index, so a
hit costs more as the region grows.  Expired entries stay until they are
written again, and entries' own versions (manual invalidation, see
``versions.py``) stay.  Prefer ``file``, which has none of these limits.
"""

from __future__ import annotations

import contextlib
import dbm
import hashlib
import importlib
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from beaker.container import OpenResourceNamespaceManager
from beaker.synchronization import file_synchronizer

from .. import api
from ..keys import key_bytes
from .directories import FILE_MODE, make_directory
from .filelock import FileLock
from .signed import SignedNamespace

log = logging.getLogger(__name__)

#: What the ``dbm`` modules may add to a database's name (and SQLite's, of a database not made here).
_SUFFIXES = ("", ".db", ".dat", ".dir", ".bak", ".pag", "-wal", "-shm", "-journal")
#: The ``dbm`` modules this backend makes and opens databases with, in the order
#: ``dbm.open()`` chose a new one's before Python 3.13.  Not ``dbm.sqlite3``,
#: which 3.13 tries first: its database keeps a ``-shm`` file mapped into the
#: memory of every process that opens it, and one damaged (truncated) while
#: mapped kills the process (SIGBUS) where the others raise an error.
_MODULES = ("dbm.gnu", "dbm.ndbm", "dbm.dumb")


def _module_for_new() -> Any:
    """The first of :data:`_MODULES` this Python has (``dbm.dumb`` is in every Python)."""
    for name in _MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:  # built without gdbm or ndbm
            continue
    raise ImportError("no dbm module")  # pragma: no cover - dbm.dumb is pure Python


def _raise_if_unreadable(path: str) -> None:
    """Raise the ``OSError`` (``PermissionError``) of a file of the database at ``path`` this process cannot read."""
    for suffix in _SUFFIXES:
        try:
            os.close(os.open(path + suffix, os.O_RDONLY))
        except FileNotFoundError:
            continue


def _open(path: str, flag: str) -> Any:
    """Open the database at ``path`` (``flag``: ``"r"`` or ``"c"``), making a new one with :func:`_module_for_new`.

    An existing database of another kind (``dbm.sqlite3``, a format this
    Python cannot read) raises ``dbm.error``, as an unreadable one does.
    """
    kind = dbm.whichdb(path)
    if not kind:
        # whichdb() answers None (no database) or "" also where it cannot
        # read a file that is there: the disk's failure, not damage.
        _raise_if_unreadable(path)
    if kind is None and flag == "c":  # none there yet
        return _module_for_new().open(path, "c", FILE_MODE)
    if kind not in _MODULES:  # None: none there (flag "r"); "": not a database dbm knows
        raise dbm.error[0](f"no dbm database of {', '.join(_MODULES)} at {path!r} (found: {kind!r})")
    return importlib.import_module(kind).open(path, flag, FILE_MODE)


class DamagedDatabaseError(OSError):
    """A ``dbm`` database's files cannot be read (a crash while its index was written, a full disk).

    An ``OSError``, so the region treats it as any failure of its backend:
    the query is answered from the database, a warning is logged, and the
    region is tried again after ``retry_after``, on new files.
    """


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class DBMNamespace(OpenResourceNamespaceManager):
    """Raw values in a ``dbm`` database at ``<data_dir>/sessioncache-dbm/<namespace hash>``.

    :param namespace: the namespace's name.
    :param data_dir: a directory only this user can write (checked by the region).
    :param lock_dir: where lock files go (default: ``<data_dir>/sessioncache-locks``).
    :param max_bytes: values larger than this are not used.
    """

    def __init__(
        self, namespace: str, data_dir: str, lock_dir: str | None = None, max_bytes: int = 4096, **kw: Any
    ) -> None:
        digest = _digest(namespace.encode("utf-8", "surrogateescape"))
        directory = os.path.join(data_dir, "sessioncache-dbm")
        make_directory(directory)
        self.file = os.path.join(directory, digest)
        self.lock_directory = os.path.join(lock_dir or os.path.join(data_dir, "sessioncache-locks"), digest)
        make_directory(self.lock_directory)
        self.max_bytes = max_bytes
        self.db: Any = None
        self._remove_on_close = False
        super().__init__(namespace)
        try:
            self.acquire_write_lock()  # creates the database
        except DamagedDatabaseError:  # its files are removed: made again now
            self.acquire_write_lock()
        self.release_write_lock()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.namespace!r} in {self.file!r}>"

    def get_access_lock(self) -> Any:
        # Named after the database's path: Beaker shares synchronizers by name.
        return file_synchronizer(identifier=f"sessioncache-dbm/{self.file}", lock_dir=self.lock_directory)

    def get_creation_lock(self, key: bytes) -> FileLock:
        """The lock one creator of ``key``'s value holds while the others wait (its file is removed after)."""
        return FileLock(os.path.join(self.lock_directory, _digest(key_bytes(key)) + ".lock"))

    def acquire_read_lock(self) -> None:
        self._lock_directory()
        super().acquire_read_lock()

    def acquire_write_lock(self, wait: bool = True, replace: bool = False) -> Any:
        self._lock_directory()
        return super().acquire_write_lock(wait, replace)

    def _lock_directory(self) -> None:
        # Removed while running (a temporary-files cleaner): made again
        # here, mode 0700, before Beaker's lock makes it with the umask's.
        if not os.path.isdir(self.lock_directory):
            make_directory(self.lock_directory)

    def do_open(self, flags: str, replace: bool) -> None:
        try:
            try:
                self.db = _open(self.file, "r" if flags == "r" else "c")
            except Exception:
                if not self._missing():
                    raise
                # Never made, or removed (by another process, or with its
                # directory by a temporary-files cleaner): made again.
                make_directory(os.path.dirname(self.file))
                self.db = _open(self.file, "c")
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                raise  # the disk, not the database (full, permissions): a backend failure
            raise self._damaged(exc) from None
        except Exception as exc:  # dbm.error, or dbm.dumb's SyntaxError or ValueError on its index
            raise self._damaged(exc) from None

    def do_close(self) -> None:
        if self.db is not None:
            try:
                self.db.close()
            finally:
                self.db = None
                if self._remove_on_close:
                    self._remove_on_close = False
                    self.do_remove()

    def do_remove(self) -> None:
        for suffix in _SUFFIXES:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.file + suffix)

    def _missing(self) -> bool:
        """Whether none of the database's files exist."""
        return not any(os.path.exists(self.file + suffix) for suffix in _SUFFIXES)

    def _damaged(self, exc: BaseException) -> DamagedDatabaseError:
        """Remove the files of the database that raised ``exc`` (now, or once closed); return the error to raise.

        The next open makes a new, empty database: the region's entries
        and versions are lost, which costs misses, never stale rows (a
        missing version never matches).
        """
        if self.db is None:
            self.do_remove()
        else:
            self._remove_on_close = True
        return DamagedDatabaseError(
            f"dbm database {self.file!r} cannot be read ({type(exc).__name__}: {exc}); "
            "its files are removed, to be made again"
        )

    def _raw(self, key: bytes) -> bytes | None:
        try:
            value = self.db[key]
        except KeyError:
            return None
        except OSError:
            raise
        except Exception as exc:  # an index entry dbm.dumb cannot use
            raise self._damaged(exc) from None
        return value if len(value) <= self.max_bytes else b""

    def __contains__(self, key: Any) -> bool:
        return key_bytes(key) in self.db

    def __delitem__(self, key: Any) -> None:
        del self.db[key_bytes(key)]

    def keys(self) -> list:
        return list(self.db.keys())

    # ManyKeys: raw values (table versions), each operation under one lock.

    def get_many(self, keys: Sequence[bytes]) -> list[Any]:
        """Return the raw values of ``keys`` (None where missing)."""
        self.acquire_read_lock()
        try:
            return [self._raw(key) for key in keys]
        finally:
            self.release_read_lock()

    def set_many(self, values: Mapping[bytes, Any]) -> None:
        """Store every key and value of ``values``."""
        self.acquire_write_lock()
        try:
            for key, value in values.items():
                self.db[key] = value
        finally:
            self.release_write_lock()

    def add_many(self, values: Mapping[bytes, Any]) -> None:
        """Store the keys of ``values`` that have no value."""
        self.acquire_write_lock()
        try:
            for key, value in values.items():
                if key not in self.db:
                    self.db[key] = value
        finally:
            self.release_write_lock()

    def raise_many(self, values: Mapping[bytes, Any]) -> dict[bytes, Any]:
        """:func:`~pyramid_sessioncache.storage.api.raise_many`, under the database's write lock."""
        refused = {}
        self.acquire_write_lock()
        try:
            for key, value in values.items():
                held = self._raw(key)
                if held is not None and api.counter_of(held) >= api.counter_of(value):
                    refused[key] = held
                else:
                    self.db[key] = value
        finally:
            self.release_write_lock()
        return refused


class SignedDBMNamespace(SignedNamespace, DBMNamespace):
    """The entries of a ``dbm`` region: Beaker's stored format, pickled and signed.

    Parameters are :class:`~.signed.SignedNamespace`'s.  Whoever calls
    ``set_value()`` or ``set_pickled()`` holds the database's write lock
    (Beaker's ``Value`` does).
    """

    log = log

    def _signed(self, key: bytes) -> bytes:
        data = self._raw(key)
        if data is None:
            raise KeyError(key)
        return data

    def _store(self, key: bytes, data: bytes) -> None:
        self.db[key] = data
