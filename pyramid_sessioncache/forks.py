"""Thread locks (and events) that a forked child finds released.

Pre-fork servers (``gunicorn --preload``, uWSGI without ``lazy-apps``,
mod_wsgi daemon processes) import the application in a master process,
then fork their workers.  A ``threading.Lock`` that another thread of the
master held at the fork (a background thread of the add-on, a warm-up
running queries) stays held for ever in the worker: the thread that would
release it was not copied, and the worker hangs on its first use.

The add-on makes its locks with :func:`lock`, and its events (whose
``set()`` and ``wait()`` take a lock of their own) with :func:`event`: a
child process finds every one of them released, as CPython's own
``threading`` and ``logging`` modules do with theirs.  What a lock
guards is left as the fork found it; a module whose state is only valid
in the parent (a thread, a connection) resets that itself (see
``storage/backends/near.py``, ``storage/region.py``,
``engine/invalidation/notify.py`` and ``addon/__init__.py``).
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

from ._weak import members

#: Every lock and event made here and still in use.
_made: weakref.WeakSet[Any] = weakref.WeakSet()


def lock() -> Any:
    """Return a new ``threading.Lock`` that a process forked while it was held finds released.

    Example::

        self._lock = forks.lock()
        with self._lock:
            ...
    """
    made = threading.Lock()
    _made.add(made)
    return made


def rlock() -> Any:
    """Return a new ``threading.RLock`` that a process forked while it was held finds released."""
    made = threading.RLock()
    _made.add(made)
    return made


def event() -> Any:
    """Return a new ``threading.Event`` that a process forked while another thread set it or waited on it can use.

    The child keeps its flag (set or not); nobody waits on it there.
    """
    made = threading.Event()
    _made.add(made)
    return made


def _after_fork() -> None:
    # _at_fork_reinit() (CPython 3.9+, private) is what threading and
    # logging call on their own locks and events in a forked child: the
    # same object, released (an event keeps its flag).
    for made in members(_made):
        made._at_fork_reinit()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
