"""The few places where we reach into Beaker's module globals.

Beaker keeps its backends in ``beaker.cache.clsmap``, a lazily filled
registry that no longer accepts item assignment (Beaker 1.13 turned it into
``beaker.cache._backends``).  Registering a backend at run time, as the old
``create_session_container`` did with ``clsmap[name] = ...``, now means
writing to its private ``_clsmap`` dictionary.  That is isolated here.
"""

from __future__ import annotations

import contextlib

from beaker import cache as beaker_cache


def _load_entry_points() -> None:
    # A failed look-up makes Beaker load the ``beaker.backends`` entry points
    # once; doing it first keeps a later look-up from finding our name taken
    # and warning about a "NamespaceManager name conflict".
    with contextlib.suppress(KeyError):
        beaker_cache.clsmap["pyramid_sessioncache: load entry points"]


def register_backend(name: str, namespace_class: type) -> None:
    """Make ``name`` a Beaker cache type served by ``namespace_class``."""
    _load_entry_points()
    beaker_cache.clsmap._clsmap[name] = namespace_class  # Beaker >= 1.13


def backend(name: str) -> type:
    """Return the namespace class of the Beaker cache type ``name``."""
    return beaker_cache.clsmap[name]
