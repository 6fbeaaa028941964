"""Creation locks: one caller regenerates a missing entry, the others wait for it, never for long.

When an entry is missing, the first caller takes the entry's creation
lock and runs the query; the others wait for the entry.  Waiting is
bounded, on every backend, by the region option ``lock_timeout``
(seconds, :data:`DEFAULT_LOCK_TIMEOUT` by default):

- a waiter polls (every :data:`POLL` seconds) for the lock and for the
  entry; it takes the entry as soon as it is stored, without the lock;
- after ``lock_timeout`` seconds it runs the query itself, uncached (it
  takes the lock first if it is free by then, and stores what it gets);
- a lock whose holder died is taken over: a ``file`` or ``dbm`` lock is an
  ``flock`` that dies with its process; a Redis lock is a key with a TTL of
  ``lock_timeout`` (not Beaker's 15 minutes); a ``memory`` lock is a
  thread lock that a failing regenerator releases as it unwinds (the
  other types are refused: see ``region.py``).  A regeneration that
  takes longer than ``lock_timeout`` is then taken for dead: on Redis,
  another caller may regenerate the entry at the same time;
- a regenerator that ends without storing an entry (its query failed, or
  its result may not be shared) leaves a *notice* beside the entry before
  it releases the lock.  Waiters that see it stop waiting: the first to
  take the lock retries under it (at most one retry at a time, and what it
  gets is stored), the others run the query uncached, in parallel.  So a
  query that keeps failing costs each request about two query times,
  never one query time per request ahead of it; each request sees its own
  error, as it would without a cache.

Nothing here holds a database connection: the caller begins its
transaction only when it runs the query (see ``engine/hook.py``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import weakref
from typing import Any, Protocol

from .. import forks
from .backends.filelock import FileLock

log = logging.getLogger(__name__)

#: Seconds a waiter waits for a regenerating entry before it runs the query itself.
DEFAULT_LOCK_TIMEOUT = 10.0
#: Seconds between two looks at the lock and the entry while waiting.
POLL = 0.05


class CreationLock(Protocol):
    """The creation lock of one entry."""

    def acquire(self, timeout: float) -> bool:
        """Take the lock, waiting at most ``timeout`` seconds; return whether it was taken."""

    def release(self) -> None:
        """Release the lock (a lock taken over meanwhile is left to its new holder)."""


class _Polled:
    """A lock that can only be tried: tried every :data:`POLL` seconds until the timeout."""

    def _try(self) -> bool:  # pragma: no cover - every subclass has its own
        raise NotImplementedError

    def acquire(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if self._try():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(POLL, left))


class ThreadLocks:
    """The creation locks of a ``memory`` region: a thread lock per entry, kept while in use."""

    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[bytes, Any] = weakref.WeakValueDictionary()
        self._guard = forks.lock()

    def __call__(self, namespace: Any, key: bytes) -> CreationLock:
        with self._guard:
            lock = self._locks.get(key)
            if lock is None:
                lock = self._locks[key] = forks.lock()
        return _ThreadLock(lock)


class _ThreadLock:
    def __init__(self, lock: Any) -> None:
        self._lock = lock  # held here, so the dictionary keeps it while it is in use

    def acquire(self, timeout: float) -> bool:
        return self._lock.acquire(timeout=max(timeout, 0))

    def release(self) -> None:
        self._lock.release()


class FileLocks:
    """The creation locks of a ``file`` or ``dbm`` region: ``flock`` on a file per entry.

    The kernel releases an ``flock`` when its process dies, so a killed
    regenerator never holds up the others.
    """

    def __init__(self, directory: str) -> None:
        self.directory = os.path.join(directory, "sessioncache-locks")

    def __call__(self, namespace: Any, key: bytes) -> CreationLock:
        digest = hashlib.sha256(namespace.namespace.encode() + b"\0" + key).hexdigest()
        return _FileLock(os.path.join(self.directory, digest + ".lock"))


class _FileLock(_Polled):
    # The file namespace's own lock (backends/filelock.py): private files,
    # removed on release, so no lock file is left behind per entry.
    def __init__(self, path: str) -> None:
        self._lock = FileLock(path)

    def _try(self) -> bool:
        return self._lock.acquire(wait=False)

    def release(self) -> None:
        if self._lock.held:
            self._lock.release()


class RedisLocks:
    """The creation locks of a Redis region: ``SET NX PX`` with a TTL of ``lock_timeout``.

    Released only by its holder (redis-py's ``Lock``, a token checked in a
    script); a holder that died loses it when the TTL ends.
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl

    def __call__(self, namespace: Any, key: bytes) -> CreationLock:
        from .. import _beaker

        name = "sessioncache_lock:" + _beaker.redis_key(namespace, key)
        return _RedisLock(namespace.client.lock(name, timeout=self.ttl, sleep=POLL, thread_local=False))


class _RedisLock(_Polled):
    def __init__(self, lock: Any) -> None:
        self._lock = lock

    def _try(self) -> bool:
        return bool(self._lock.acquire(blocking=False))

    def release(self) -> None:
        from redis.exceptions import LockError

        try:
            self._lock.release()
        except LockError:  # its TTL ended and another caller may hold it now: theirs
            log.debug("creation lock %r had expired when released", self._lock.name)


def locks_for(kind: str, options: dict[str, Any], lock_timeout: float) -> Any:
    """Return the lock factory, ``factory(namespace, key) -> CreationLock``, of a region of type ``kind``."""
    if kind == "memory":
        return ThreadLocks()
    if kind in ("file", "dbm"):
        return FileLocks(options.get("lock_dir") or options["data_dir"])
    if kind == "ext:redis":
        return RedisLocks(lock_timeout)
    # ext:local_session never locks (a Session is one thread); any other
    # type is refused when its region is built (see region.py).
    return ThreadLocks()
