"""Exceptions raised for mistakes a user of the add-on can make.

Every error the add-on raises at a call site derives from
:class:`SessionCacheError`, so an application can catch them all at once.
Configuration mistakes found at start-up raise
:class:`pyramid.exceptions.ConfigurationError` instead (see ``settings.py``),
which wraps :class:`InvalidOptionError` for the options the engine checks.
"""

from __future__ import annotations

from typing import Any

from .masking import shown


class SessionCacheError(Exception):
    """Base class of the errors raised by pyramid_sessioncache."""


class UnknownRegionError(SessionCacheError, LookupError):
    """A cache region name that is not configured was asked for."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = sorted(known)
        choices = ", ".join(self.known) or "none are configured"
        super().__init__(
            f"unknown cache region {name!r}; configured regions: {choices} (add it to the 'cache.regions' setting)"
        )


class NotCacheableError(SessionCacheError, TypeError):
    """Something that is not a cacheable SELECT was given to the cache."""


class NoRegionsError(SessionCacheError):
    """A query asked for caching on a session that knows no cache regions."""


class UnpicklableResultError(SessionCacheError, TypeError):
    """A result could not be stored in an out-of-process region."""


class DatabaseNameError(SessionCacheError, ValueError):
    """The ``sessioncache_database`` execution option of a bind is not a usable name."""

    def __init__(self, name: object) -> None:
        self.name = name
        super().__init__(
            f"the 'sessioncache_database' execution option must be a non-empty string naming the database, "
            f"not {name!r}: give the same name to every engine that reads the same data"
        )


class InvalidOptionError(SessionCacheError, ValueError, TypeError):
    """An option has a value of the wrong type or out of range, or one nothing would use.

    Raised where the option is given: ``SessionCache(...)`` and
    ``CacheRegions(...)`` for region and cache options,
    ``FromCache(...)``, ``RelationshipCache(...)`` and ``cached_query(...)``
    for ``expire`` and ``cache_key``, before anything is executed or
    stored.  It is a :class:`ValueError` and a :class:`TypeError`, the
    exceptions a bad argument raises in Python.

    Its message shows the value masked when the option may hold a secret
    (see :mod:`pyramid_sessioncache.masking`); the value itself is not kept.

    :param option: the option's name, e.g. ``"expire"``.
    :param value: the value given.
    :param reason: what is wrong, and what to give instead.
    :param region: the name of the cache region the option belongs to, if any.
    """

    def __init__(self, option: str, value: Any, reason: str, region: str | None = None) -> None:
        self.option = option
        #: The value as the message shows it (masked if secret).
        self.shown = shown(option, value)
        self.reason = reason
        self.region = region
        where = f" of cache region {region!r}" if region is not None else ""
        super().__init__(f"invalid option {option}{where} = {self.shown}: {reason}")


class UnsafeRegionError(SessionCacheError, ValueError):
    """A cache region is configured in a way that would let others run code in, or read, the application.

    Raised when the regions are built (at start-up).
    """


class UnsignedBackendError(UnsafeRegionError):
    """A region's backend type unpickles what it reads before any signature could be checked."""


class MissingSecretError(UnsafeRegionError):
    """A region that keeps its values outside the process has no secret to sign them with."""


class SharedDirectoryError(UnsafeRegionError):
    """A region's ``data_dir`` or ``lock_dir`` can be written by other users."""
