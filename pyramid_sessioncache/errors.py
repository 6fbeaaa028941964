"""Exceptions raised for mistakes a user of the add-on can make.

Every error the add-on raises at a call site derives from
:class:`SessionCacheError`, so an application can catch them all at once.
Configuration mistakes found at start-up raise
:class:`pyramid.exceptions.ConfigurationError` instead (see ``settings.py``).
"""


class SessionCacheError(Exception):
    """Base class of the errors raised by pyramid_sessioncache."""


class UnknownRegionError(SessionCacheError, LookupError):
    """A cache region name that is not configured was asked for."""

    def __init__(self, name: str, known: "list[str]") -> None:
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
