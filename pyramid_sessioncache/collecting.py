"""Whether the running thread is inside a garbage collection.

A collection runs in whatever thread allocated at that moment, perhaps
while it holds a lock of the add-on's or of a backend's.  What it
finalizes runs there too: a connection an application lost, checked back
into its pool, publishes the writes its transaction left (see
``engine/invalidation/writes.py``), which takes those locks again.  Such
work asks :func:`in_collection` and, if so, is done in a thread of its own
that waits for the locks instead of for itself.
"""

from __future__ import annotations

import gc
import threading
from typing import Any

#: The thread running the current collection, or None.
_collector: int | None = None


def _phase(phase: str, info: Any) -> None:
    global _collector
    _collector = threading.get_ident() if phase == "start" else None


def in_collection() -> bool:
    """Whether the running thread is inside a garbage collection (its finalizers included)."""
    return _collector == threading.get_ident()


gc.callbacks.append(_phase)
