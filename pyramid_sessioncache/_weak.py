"""Weak sets that other threads change while one reads them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def members(items: Iterable[Any]) -> list[Any]:
    """The members of ``items``, a ``weakref.WeakSet``, although other threads change it meanwhile.

    Reading a ``WeakSet`` raises ``RuntimeError`` ("Set changed size
    during iteration") when another thread adds a member meanwhile, or
    drops one that died just before the reading began: a commit that tells
    every cache of the process must not fail because a thread made a cache
    at that moment.  Changes are rare: the set is read again until a
    reading completes.
    """
    while True:
        try:
            return list(items)
        except RuntimeError:
            continue
