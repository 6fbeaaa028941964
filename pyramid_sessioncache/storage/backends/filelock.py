"""File locks between processes that leave no file behind (the ``file`` and ``dbm`` backends' creation locks).

Beaker's ``FileSynchronizer`` keeps one lock file per key for ever: a
region that has seen a million keys has a million lock files.  A
:class:`FileLock` removes its file when it lets go, and stays correct
while doing so: a process that was waiting on the file being removed
notices (the path no longer names the file it locked) and starts again
on a new file.

It is a creation lock as Beaker's ``Value`` and :class:`~pyramid_sessioncache.Region`
use it: ``acquire(wait=False)`` returns False at once if another thread or
process holds it; ``acquire()`` waits; ``release()``.  ``flock`` locks
belong to an open file, so two threads of one process exclude each other
too, and a child forked while one was held shares it: :meth:`FileLock.release`
unlocks the file for both.  Not reentrant.
"""

from __future__ import annotations

import fcntl
import os
import threading

from .directories import FILE_MODE, make_directory


class FileLock:
    """An exclusive lock on the file ``path``, removed on release.

    :param path: the lock file; its directory is created (mode 0700) if
        missing.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._held = threading.local()

    def __repr__(self) -> str:
        return f"<FileLock {self.path!r}>"

    def acquire(self, wait: bool = True) -> bool:
        """Take the lock; without ``wait``, return False at once if it is held elsewhere."""
        flags = fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB
        while True:
            try:
                descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
            except FileNotFoundError:
                make_directory(os.path.dirname(self.path))
                continue
            try:
                fcntl.flock(descriptor, flags)
            except BlockingIOError:
                os.close(descriptor)
                return False
            except BaseException:
                os.close(descriptor)
                raise
            try:
                mine = os.fstat(descriptor)
                now = os.stat(self.path)
            except FileNotFoundError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                self._held.descriptor = descriptor
                return True
            # The holder removed the file while we waited on it: start again.
            os.close(descriptor)

    def release(self) -> None:
        """Let go, removing the file first, so that nobody can lock it afterwards."""
        descriptor = self._held.descriptor
        del self._held.descriptor
        try:
            os.unlink(self.path)
        except FileNotFoundError:  # pragma: no cover - only a holder removes it
            pass
        finally:
            # Unlocked before it is closed: a process forked while this was
            # held shares the open file, and would keep it locked for ever.
            try:
                fcntl.flock(descriptor, fcntl.LOCK_UN)
            finally:
                os.close(descriptor)

    @property
    def held(self) -> bool:
        """Whether this thread holds the lock."""
        return hasattr(self._held, "descriptor")


def remove_abandoned(path: str) -> bool:
    """Remove the lock file ``path`` if nobody holds it (left by a process that died); return whether removed."""
    lock = FileLock(path)
    if not os.path.exists(path) or not lock.acquire(wait=False):
        return False
    lock.release()
    return True
