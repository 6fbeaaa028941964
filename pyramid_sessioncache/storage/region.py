"""Cache regions: named Beaker caches with their options, for one application.

A :class:`Region` stores opaque values under string keys; it knows nothing
of queries or requests.  Entries use Beaker's own stored format,
``(stored_time, expire, value)``, so the Beaker ``Cache`` of
:meth:`~pyramid_sessioncache.Region.cache_for` reads what a region wrote
(its keys are encoded as the region's: see ``keys.py``), while a look-up
costs one backend read (Beaker's ``Cache.get`` makes two: ``EXISTS`` then
``GET`` on Redis).

In-process namespaces belong to their region (``memory``: a dictionary of
its own bounded in entries and bytes, not Beaker's module-global one) or
to a Session (``ext:local_session``, bounded per Session), and are named
with a token unique to each :class:`CacheRegions`: two applications in one
process never see each other's entries.  Out-of-process namespaces are
named after the region alone, so every process of an application shares
them; they are the add-on's own (``ext:redis``, ``file``, ``dbm``), which
sign what they write for its place and unpickle nothing whose signature
does not check.  Beaker's other types unpickle what they read before
anything could check it, and are refused (:data:`REFUSED_TYPES`).

A value is pickled once when it is stored: for its size (a value larger
than ``max_entry_bytes`` is not stored), and, out of the process, as what
is signed and written.  Failures of a backend are contained here (see
:meth:`~pyramid_sessioncache.Region.available`); table versions are in ``versions.py``.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import pickle
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from beaker.cache import Cache

from .. import _beaker, forks
from ..errors import (
    InvalidOptionError,
    MissingSecretError,
    UnknownRegionError,
    UnpicklableResultError,
    UnsignedBackendError,
)
from . import locks
from . import options as region_options
from .backends import local_session
from .backends import near as near_cache
from .backends.dbm import DBMNamespace, SignedDBMNamespace
from .backends.directories import private_directory
from .backends.file import FileNamespace, SignedFileNamespace
from .backends.local_session import ScopedSessionNamespace
from .backends.memory import DEFAULT_MAX_BYTES, DEFAULT_MAX_ITEMS, BoundedMemoryNamespace
from .backends.redis import RedisVersionsNamespace, SignedRedisNamespaceManager
from .keys import encode_key
from .versions import ENTRY_LIFETIME, Versions, is_entry_version

#: Types whose values leave the process: signed for their place, and
#: checked before they are unpickled.  They need ``sessioncache.secret``.
SIGNED_TYPES = frozenset({"ext:redis", "file", "dbm"})
#: Beaker's types whose namespaces unpickle what they read before anything
#: could check it: whoever can write to the server could run code in every
#: process that reads it.
REFUSED_TYPES = frozenset({"ext:memcached", "ext:database", "ext:mongodb", "ext:rediscluster", "ext:google"})
#: The largest entry a region stores unless ``max_entry_bytes`` says otherwise (bytes of its pickle).
DEFAULT_MAX_ENTRY_BYTES = 1024 * 1024

#: Bumped when the format of stored values changes, so that processes
#: running different versions never read each other's entries (they share
#: their table versions: see ``Region._backend()``).
FORMAT = "v3"

log = logging.getLogger(__name__)

#: ``valid(value, versions)``: whether a stored value may be served.
Validator = Callable[[Any, Any], bool]


def always_valid(value: Any, versions: Any) -> bool:
    """The :data:`Validator` of entries that carry no versions to check."""
    return True


def _backend_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, EOFError, pickle.UnpicklingError]
    try:
        import redis
    except ImportError:  # pragma: no cover - redis is optional
        pass
    else:
        errors.append(redis.RedisError)
    return tuple(errors)


#: Errors that say a backend is unreachable or its data unreadable: the
#: region is skipped for a while and queries go to the database.
BACKEND_ERRORS = _backend_errors()


def _namespace_class(kind: str) -> Any:
    if kind == "ext:local_session":
        try:
            return _beaker.backend(kind)
        except KeyError:  # running from a source tree without entry points
            _beaker.register_backend(kind, ScopedSessionNamespace)
    return _beaker.backend(kind)


class Region:
    """One named cache region.

    :param name: the region's name, as in ``cache.regions``.
    :param options: Beaker options (``type``, ``expire``, ``url``,
        ``data_dir``...) and the add-on's own (``enabled``, ``max_items``,
        ``max_bytes``, ``max_entry_bytes``, ``allow_shared_dir``), as Python
        values; checked here (see ``options.py``), so a bad or unused one
        raises :class:`~pyramid_sessioncache.InvalidOptionError`.
    :param token: a string unique to the owning :class:`CacheRegions`.
    :param retry_after: seconds a region whose backend failed is left alone
        before it is tried again.
    :param secret: the key that signs what out-of-process regions store.

    Raises :class:`~pyramid_sessioncache.errors.UnsignedBackendError` for a
    type whose namespace would unpickle unchecked data,
    :class:`~pyramid_sessioncache.errors.MissingSecretError` for an
    out-of-process region without ``secret``, and
    :class:`~pyramid_sessioncache.errors.SharedDirectoryError` for a
    ``data_dir`` or ``lock_dir`` that other users can write.
    """

    def __init__(
        self,
        name: str,
        options: Mapping[str, Any],
        token: str,
        retry_after: float = 5.0,
        secret: bytes | None = None,
    ) -> None:
        nsargs = region_options.checked_region(name, options)
        self.name = name
        self.retry_after = retry_after
        self._down_until = 0.0
        # Table versions a commit could not bump while the backend was down,
        # each with the failure that kept it: bumped again in the background
        # (and before this process uses the region), and listed until a bump
        # that took them is written.
        self._pending: dict[str, int] = {}
        self._failures = itertools.count(1)
        self._pending_lock = forks.lock()
        # The thread that bumps the kept names every retry_after seconds
        # while there are any (see _retry_kept); set under _pending_lock.
        self._retrying: threading.Thread | None = None
        self._closed = forks.event()
        _all.add(self)
        self.type: str = nsargs.pop("type", "memory")
        self.expire: int | None = nsargs.pop("expire", None)
        #: The longest lifetime the backend keeps an entry for.
        self.max_expire = region_options.region_type(self.type).max_expire
        self.enabled: bool = nsargs.pop("enabled", True)
        #: The largest value stored, in bytes of its pickle (``ext:local_session``: not measured).
        self.max_entry_bytes: int = nsargs.pop("max_entry_bytes", DEFAULT_MAX_ENTRY_BYTES)
        max_items = nsargs.pop("max_items", None)
        max_bytes = nsargs.pop("max_bytes", DEFAULT_MAX_BYTES)
        allow_shared_dir = nsargs.pop("allow_shared_dir", False)
        near: bool = nsargs.pop("near", False)
        near_bounds = {
            option: nsargs.pop(option) for option in ("near_max_items", "near_max_bytes") if option in nsargs
        }
        for option, value in near_bounds.items():
            if not near:
                raise InvalidOptionError(
                    option, value, "it bounds the near cache: set near = true too, or remove it", name
                )
        #: Seconds a request waits for another that regenerates an entry (see ``locks.py``).
        self.lock_timeout: float = nsargs.pop("lock_timeout", locks.DEFAULT_LOCK_TIMEOUT)
        self._locks = locks.locks_for(self.type, nsargs, self.lock_timeout)
        backend = self._checked_type(secret)
        self.is_local = isinstance(backend, type) and issubclass(backend, ScopedSessionNamespace)
        #: True when values leave the process (and so are pickled and signed).
        self.out_of_process = not (self.is_local or self.type == "memory")
        if self.out_of_process and not secret:
            raise MissingSecretError(
                f"cache region {name!r} is {self.type}: its values are unpickled only after their "
                "signature checks, so it needs a secret (sessioncache.secret)"
            )
        if self.out_of_process:
            self.namespace_name = f"sessioncache.{FORMAT}.{name}"
        else:
            self.namespace_name = f"sessioncache.{FORMAT}.{token}.{name}"
        if self.type in ("file", "dbm"):
            self._private_directories(nsargs, allow_shared_dir)
        self._nsargs = nsargs
        self._too_large: set[Any] = set()
        #: The region's table versions (None for ``ext:local_session``).
        self.tokens: Versions | None = None
        #: The region's near cache (``ext:redis`` with ``near = true``), else None: see ``backends/near.py``.
        self.near: near_cache.NearCache | None = None
        self._shared: Any = None
        if self.is_local:
            self._nsargs["max_items"] = max_items or local_session.DEFAULT_MAX_ITEMS
        else:
            self._shared, self.tokens = self._backend(nsargs, secret, max_items, max_bytes)
        if near:
            self._near(
                near_bounds.get("near_max_items", near_cache.DEFAULT_MAX_ITEMS),
                near_bounds.get("near_max_bytes", near_cache.DEFAULT_MAX_BYTES),
            )

    def _near(self, max_items: int, max_bytes: int) -> None:
        """Give the region's Redis namespaces a near cache of their own (see ``backends/near.py``)."""
        assert self._shared is not None and self.tokens is not None
        entries, versions = self._shared.namespace, self.tokens.namespace
        prefixes = (_beaker.redis_key(entries, b""), _beaker.redis_key(versions, b""))
        self.near = entries.near = near_cache.NearCache(entries.client, prefixes, max_items, max_bytes, self.name)

    def close(self) -> None:
        """Stop what the region runs in the background (a near cache's listening thread, retries); harmless if none."""
        self._closed.set()
        if self.near is not None:
            self.near.close()

    def _checked_type(self, secret: bytes | None) -> Any:
        """The namespace class of this region's type; refuse a type that would unpickle unchecked data."""
        if self.type in REFUSED_TYPES:
            raise UnsignedBackendError(
                f"invalid setting cache.{self.name}.type = {self.type!r}: Beaker's {self.type} namespace "
                "unpickles what it reads before anything could check it, so whoever can write to that server "
                "could run code in this application; use ext:redis, file or dbm (signed with "
                "sessioncache.secret) or memory"
            )
        backend = _namespace_class(self.type)
        in_process = self.type == "memory" or (
            isinstance(backend, type) and issubclass(backend, ScopedSessionNamespace)
        )
        if not in_process and self.type not in SIGNED_TYPES:
            raise UnsignedBackendError(
                f"invalid setting cache.{self.name}.type = {self.type!r}: its namespace keeps values outside the "
                "process and pyramid_sessioncache cannot sign them; use ext:redis, file, dbm or memory"
            )
        return backend

    def _private_directories(self, nsargs: dict[str, Any], allow_shared: bool) -> None:
        """Check (and create) the directories of a ``file`` or ``dbm`` region; see ``backends/directories.py``."""
        if "data_dir" not in nsargs:
            raise ValueError(f"cache region {self.name!r} is {self.type}: it needs a data_dir")
        for option in ("data_dir", "lock_dir"):
            if option in nsargs:
                nsargs[option] = private_directory(
                    nsargs[option], f"cache.{self.name}.{option}", allow_shared, f"cache.{self.name}.allow_shared_dir"
                )

    def _backend(
        self, nsargs: dict[str, Any], secret: bytes | None, max_items: int | None, max_bytes: int | None
    ) -> tuple[Cache, Versions]:
        """The Beaker ``Cache`` of a shared region's entries, and its table versions."""
        # Out of the process, without FORMAT: processes of two releases (a
        # rolling deploy that changed the stored format) keep their entries
        # apart, but each one's commits must invalidate the other's entries.
        # A token of a format the other cannot read is a miss there (versions.py).
        versions_name = (
            f"sessioncache.versions.{self.name}" if self.out_of_process else f"{self.namespace_name}.versions"
        )
        entries: Any
        versions: Any
        if self.type == "memory":
            entries = BoundedMemoryNamespace(self.namespace_name, max_items or DEFAULT_MAX_ITEMS, max_bytes)
            # Table versions are kept; entries' own are as many as the entries
            # at most twice over (least recently written out first).
            kept = 2 * (max_items or DEFAULT_MAX_ITEMS)
            versions = BoundedMemoryNamespace(versions_name, kept, None, bounded=is_entry_version)
            return _beaker.cache_on(entries, self.expire), Versions(versions, versions_name, None)
        assert secret is not None
        signed = {"secret": secret, "max_bytes": self.max_entry_bytes, **nsargs}
        if self.type == "ext:redis":
            entries = SignedRedisNamespaceManager(self.namespace_name, **signed)
            versions = RedisVersionsNamespace(versions_name, **nsargs)
            prefixes = (_beaker.redis_key(entries, b""), _beaker.redis_key(versions, b""))
            entries.nears = versions.nears = near_cache.siblings(entries.client, prefixes)
            versions.entry_lifetime = self.entry_lifetime
        elif self.type == "file":
            entries = SignedFileNamespace(self.namespace_name, **signed)
            versions = FileNamespace(versions_name, **nsargs)
            versions.expiring, versions.lifetime = is_entry_version, self.entry_lifetime
        else:
            entries = SignedDBMNamespace(self.namespace_name, **signed)
            versions = DBMNamespace(versions_name, **nsargs)
        return _beaker.cache_on(entries, self.expire), Versions(versions, versions_name, secret)

    @property
    def entry_lifetime(self) -> int:
        """Seconds an entry's own version is kept after it was last written, out of the process (see ``versions.py``).

        :data:`~.versions.ENTRY_LIFETIME`, or the region's ``expire`` if
        longer.  Shorter than an entry's own ``expire``, it costs that
        entry a miss once its version is gone, never stale data.
        """
        return max(self.expire or 0, ENTRY_LIFETIME)

    def __repr__(self) -> str:
        return f"<Region {self.name!r} type={self.type!r} expire={self.expire!r}>"

    def cache_for(self, session: Any = None) -> Cache:
        """Return the Beaker ``Cache`` of this region (bound to ``session`` if local)."""
        if self._shared is not None:
            return self._shared
        return _beaker.Cache(self.namespace_name, type=self.type, expire=self.expire, session=session, **self._nsargs)

    def _namespace(self, session: Any) -> Any:
        if self._shared is not None:
            return self._shared.namespace
        return ScopedSessionNamespace(self.namespace_name, session=session, max_items=self._nsargs["max_items"])

    @property
    def unpublished(self) -> frozenset[str]:
        """Version names a bump could not write yet (the backend failed); written before the next use."""
        return frozenset(self._pending)

    def _down(self) -> bool:
        return bool(self._down_until) and time.monotonic() < self._down_until

    def available(self) -> bool:
        """Whether the backend may be used now (not failed within ``retry_after``)."""
        if self._down():
            return False
        if self._pending:
            # Still listed while it is written: a thread that looks meanwhile
            # writes it too, and never reads what it invalidates.
            self.bump(())
            # Failed, it may still have deleted the versions instead: then
            # nothing is pending, but the region is skipped all the same.
            return not self._pending and not self._down()
        return True

    def _failed(self, exc: BaseException, doing: str, unexpected: bool = False, quiet: bool = False) -> None:
        # One warning per outage: a bump is tried at every commit even while
        # the region is skipped (and by the thread retrying kept bumps, which
        # is ``quiet``), and each failure would say the same again.
        level = logging.DEBUG if quiet or self._down() else logging.WARNING
        self._down_until = time.monotonic() + self.retry_after
        log.log(
            level,
            "cache region %r (%s) failed %swhile %s: %s; queries go to the database, retrying in %ss",
            self.name,
            self.type,
            f"unexpectedly ({type(exc).__name__}) " if unexpected else "",
            doing,
            exc,
            self.retry_after,
            exc_info=exc if unexpected else None,
        )

    def _read(
        self, namespace: Any, key: bytes, valid: Validator = always_valid, tables: tuple = ()
    ) -> tuple[Any, bool] | None:
        versions = None
        try:
            if tables and isinstance(namespace, SignedRedisNamespaceManager):
                # The entry and its versions in one round trip.
                assert self.tokens is not None
                tokens = self.tokens
                stored, versions = namespace.get_with_versions(
                    key, tokens.namespace, map(encode_key, tables), lambda raw: tokens.check(tables, raw)
                )
            else:
                namespace.acquire_read_lock()
                try:
                    stored = namespace[key]
                finally:
                    namespace.release_read_lock()
        except KeyError:
            return None
        except BACKEND_ERRORS as exc:
            self._failed(exc, "reading")
            return None
        return self._unpack(stored, valid, versions)

    def _unpack(self, stored: Any, valid: Validator, versions: Any) -> tuple[Any, bool] | None:
        """``(value, fresh)`` from an entry in Beaker's stored format, or None if unusable."""
        try:
            stored_at, expire, value = stored
            if not valid(value, versions):
                return None
            return value, expire is None or time.time() < stored_at + expire
        except (TypeError, ValueError, AttributeError) as exc:
            # Signed by this application, but not what this code stores (an
            # entry put there through Beaker's API, say): a miss.
            log.debug("cache region %r: ignored an entry it cannot use (%s)", self.name, exc)
            return None

    def _write(self, namespace: Any, key: bytes, value: Any, expire: int | None, label: Any = None) -> bool:
        """Store ``value`` under ``key``; return whether it was written (not refused, the backend answering)."""
        stored = (time.time(), expire, value)
        payload = None
        if not self.is_local:
            # Pickled once: its size, and what leaves the process.
            try:
                payload = pickle.dumps(stored, pickle.HIGHEST_PROTOCOL)
            except (pickle.PicklingError, TypeError, AttributeError) as exc:
                if self.out_of_process:
                    raise UnpicklableResultError(
                        f"cannot store a value in cache region {self.name!r} "
                        f"(type {self.type}): it cannot be pickled: {exc}"
                    ) from exc
                self._refuse(label, f"it cannot be pickled to measure its size ({exc})")
                return False
            if len(payload) > self.max_entry_bytes:
                self._refuse(label, f"{len(payload)} bytes is more than max_entry_bytes = {self.max_entry_bytes}")
                return False
        if self._down():
            return False
        try:
            namespace.acquire_write_lock()
            try:
                if payload is None:
                    namespace.set_value(key, stored, expiretime=expire)
                elif self.out_of_process:
                    namespace.set_pickled(key, payload, expire, stored)
                else:
                    namespace.set_sized(key, stored, len(payload))
            finally:
                namespace.release_write_lock()
        except BACKEND_ERRORS as exc:
            self._failed(exc, "writing")
            return False
        return True

    def _refuse(self, label: Any, why: str) -> None:
        """Log, once per ``label`` (a kind of key), that a value was not stored."""
        if label in self._too_large or len(self._too_large) >= 1000:
            log.debug("cache region %r did not store a value of %s: %s", self.name, label, why)
            return
        self._too_large.add(label)
        log.warning(
            "cache region %r did not store a value%s: %s; such values run uncached (logged once per kind of query)",
            self.name,
            "" if label is None else f" of {label}",
            why,
        )

    def get(self, key: str, session: Any = None, default: Any = None) -> Any:
        """Return the fresh value stored under ``key``, or ``default``."""
        found = self._read(self._namespace(session), encode_key(key))
        if found is None or not found[1]:
            return default
        return found[0]

    def put(self, key: str, value: Any, session: Any = None, expire: int | None = None) -> None:
        """Store ``value`` under ``key`` for ``expire`` seconds (default: the region's).

        A value larger than ``max_entry_bytes`` is not stored (and logged).
        Raises :class:`~pyramid_sessioncache.InvalidOptionError` for an
        ``expire`` that is not a positive int within the backend's limit.
        """
        region_options.check_expire(expire, self.max_expire)
        self._write(self._namespace(session), encode_key(key), value, expire or self.expire)

    def remove(self, key: str, session: Any = None) -> None:
        """Forget the value stored under ``key``."""
        self.cache_for(session).remove_value(key)

    def clear(self, session: Any = None) -> None:
        """Forget every value of this region (of ``session``, for a local region)."""
        if self.is_local and session is None:
            return
        self.cache_for(session).clear()

    def versions(self, names: tuple[str, ...], create: bool = False) -> tuple | None:
        """Return the current version tokens of ``names``, in one read; None for a name that has none.

        None also stands for a version that cannot be used: unreadable,
        not signed for this region and name, or older than one this
        process has seen (see ``versions.py``).  With ``create``, names
        that have none get one first, as for an entry about to be stored:
        an entry records only versions that exist, so one whose version
        disappears later (evicted, deleted) is never valid again.  Returns
        None itself when the backend fails, or when ``create`` could not
        make every version usable.
        """
        if self._down() or self.tokens is None:
            return None
        try:
            if create:
                return self.tokens.create(names)
            return self.tokens.read(names)
        except BACKEND_ERRORS as exc:
            self._failed(exc, "reading table versions")
            return None

    def bump(self, names: Iterable[str]) -> None:
        """Give ``names`` new version tokens, so entries that saw the old ones are invalid.

        Tried even while the region is skipped for reads after a failure:
        a commit must reach every process that shares the backend as soon
        as it answers.  When the new versions cannot be written, the old
        ones are deleted, so that no process serves an entry that read them
        (an entry whose version is missing is never valid).  When that
        fails too (the backend is unreachable), the names are kept and
        bumped again every ``retry_after`` seconds by a thread of the
        region's own until that is written (a process that stays idle
        after the outage, a script that has ended its work, still tells
        the others), and with every bump and use of the region meanwhile.
        Never raises: whatever fails is logged, and the region is skipped
        for ``retry_after`` seconds.
        """
        self._bump(names, quiet=False)

    def _bump(self, names: Iterable[str], quiet: bool) -> None:
        if self.tokens is None:
            return
        with self._pending_lock:
            kept = dict(self._pending)
        names = set(names) | kept.keys()
        if not names:
            return
        try:
            self.tokens.bump(names)
        except Exception as exc:
            # A bump runs once the database has committed (and every cache of
            # the process hears every commit): nothing here may raise into the
            # commit, not even a fault that is no backend's failure (a
            # misconfigured client, a bug), which is logged with its traceback
            # and kept pending: the region is skipped until the bump is written.
            expected = isinstance(exc, BACKEND_ERRORS)
            discarded = self._discarded(names)
            if discarded and expected:
                self._published(kept)
                outcome = " (their versions were deleted instead)"
            else:
                self._keep(names)
                outcome = " (their versions were deleted; kept to invalidate again)" if discarded else " (kept)"
            self._failed(
                exc, "invalidating tables " + ", ".join(sorted(names)) + outcome, unexpected=not expected, quiet=quiet
            )
        else:
            self._published(kept)

    def _keep(self, names: set[str]) -> None:
        """List ``names`` as unpublished, by one more failure, and have them bumped again in the background."""
        with self._pending_lock:
            self._pending.update(dict.fromkeys(names, next(self._failures)))
            # Not alive: the thread of the parent, in a forked child.
            if not self._closed.is_set() and (self._retrying is None or not self._retrying.is_alive()):
                self._retrying = threading.Thread(
                    target=_retry_kept,
                    args=(weakref.ref(self), self._closed),
                    name=f"sessioncache kept bumps {self.name}",
                    daemon=True,
                )
                self._retrying.start()

    def _retried(self) -> bool:
        """Bump the kept names once more, quietly (the outage was logged); return whether some are still kept."""
        self._bump((), quiet=True)
        with self._pending_lock:
            if self._pending:
                return True
            self._retrying = None  # under the lock: a failure from now on starts another thread
            return False

    def _published(self, kept: dict[str, int]) -> None:
        """Unlist what was ``kept`` when a bump that has now been written began.

        Not a name that a failure listed again since: threads bump at once,
        and that failure's commit may have come after this bump's write.
        """
        with self._pending_lock:
            for name, failure in kept.items():
                if self._pending.get(name) == failure:
                    del self._pending[name]

    def _discarded(self, names: set[str]) -> bool:
        """Delete the versions of ``names``, whose bump failed; return whether they are gone.

        A backend that refuses writes may still delete (Redis at
        ``maxmemory`` refuses ``SET``, never ``DEL``): then no process
        serves an entry that read them, whether it saw the failure or not,
        and the next entry stored makes new ones (see ``versions.py``).
        """
        assert self.tokens is not None
        try:
            self.tokens.discard(names)
        except Exception:  # unreachable altogether (or broken): bumped when it answers again
            return False
        return True

    def get_or_create(
        self,
        key: str,
        create: Callable[[], Any],
        session: Any = None,
        expire: int | None = None,
        store: Callable[[Any], bool] = lambda value: True,
        valid: Validator = always_valid,
        tables: tuple = (),
        label: Any = None,
        on_store: Callable[[], None] | None = None,
    ) -> tuple[Any, bool]:
        """Return ``(value, hit)``: the stored value, or ``create()`` stored.

        When the value has expired, one caller regenerates it under the
        entry's creation lock while the others are served the previous
        value; when there is none, the others wait for it, at most
        ``lock_timeout`` seconds, then run ``create()`` themselves (see
        ``locks.py``, which also says what happens when the regenerator
        fails).  A value that ``valid(value, versions)`` rejects is never
        served; ``versions`` are the version tokens of ``tables`` when the
        backend could read them with the entry (Redis), else None.
        ``store(value)`` may refuse to store what ``create()`` returned.  A
        bad ``expire`` raises :class:`~pyramid_sessioncache.InvalidOptionError`
        before anything runs.  ``label`` says what kind of value ``key``
        holds (a statement's shape): a value too large to store is logged
        once per label.  ``on_store()`` is called once ``create()``'s value
        is written.
        """
        if expire is not None:
            region_options.check_expire(expire, self.max_expire)
        if self.is_local:
            return self._local(key, create, session, expire, store, valid, on_store)
        if not self.available():
            return create(), False
        namespace = self._namespace(session)
        bkey = encode_key(key)
        found = self._read(namespace, bkey, valid, tables)
        if found is not None and found[1]:
            return found[0], True
        if self._down():  # a failing backend: no lock
            return self._create(namespace, bkey, create, expire, store, label, on_store=on_store), False
        try:
            lock = self._locks(namespace, bkey)
            if found is not None:
                if not lock.acquire(0):
                    return found[0], True
            else:
                waited = self._wait(lock, namespace, bkey, valid, tables)
                if waited is not _LOCKED:
                    return waited if waited is not _ALONE else (create(), False)
        except BACKEND_ERRORS as exc:
            self._failed(exc, "locking")
            return create(), False
        try:
            again = self._read(namespace, bkey, valid)
            if again is not None and again[1]:
                return again[0], True
            return self._create(namespace, bkey, create, expire, store, label, notify=True, on_store=on_store), False
        finally:
            try:
                lock.release()
            except BACKEND_ERRORS as exc:
                self._failed(exc, "unlocking")

    def _wait(self, lock: locks.CreationLock, namespace: Any, bkey: bytes, valid: Validator, tables: tuple) -> Any:
        """Wait for ``lock`` or for the entry: ``_LOCKED``, ``(value, True)``, or ``_ALONE`` (run uncached)."""
        notice_key = bkey + _NOTICE
        before = self._read(namespace, notice_key)
        deadline = time.monotonic() + self.lock_timeout
        while True:
            if lock.acquire(min(locks.POLL, max(deadline - time.monotonic(), 0))):
                return _LOCKED
            found = self._read(namespace, bkey, valid, tables)
            if found is not None and found[1]:
                return found[0], True
            if self._down():  # the backend failed while we waited
                return _ALONE
            notice = self._read(namespace, notice_key)
            ended = notice is not None and (before is None or notice[0] != before[0])
            if ended or time.monotonic() >= deadline:
                # The regeneration ended without an entry, or took too long:
                # one caller at a time retries under the lock, the others run alone.
                if ended:
                    log.info("cache region %r: a regeneration ended without an entry; running the query", self.name)
                else:
                    log.warning(
                        "cache region %r: waited %ss for an entry being regenerated; running the query",
                        self.name,
                        self.lock_timeout,
                    )
                return _LOCKED if lock.acquire(0) else _ALONE

    def peek(self, key: str, session: Any, valid: Validator = always_valid, tables: tuple = ()) -> Any:
        """Return the fresh value that ``valid`` accepts under ``key``, or None; never waits, never creates.

        ``valid`` and ``tables`` are as for :meth:`get_or_create`.
        """
        if self.is_local:
            # The Session's own dictionary, read directly: no namespace
            # object, no lock (one Session is one thread); Beaker's format.
            namespaces = session.info.get(local_session.INFO_KEY)
            entries = None if namespaces is None else namespaces.get(self.namespace_name)
            if entries is None:
                return None
            bkey = encode_key(key)
            stored = entries.get(bkey)
            if stored is None:
                return None
            found = self._unpack(stored, valid, None)
            if found is not None and found[1]:
                entries.move_to_end(bkey)  # least recently used goes first
                return found[0]
            return None
        found = self._read(self._namespace(session), encode_key(key), valid, tables) if self.available() else None
        return found[0] if found is not None and found[1] else None

    def _local(self, key: str, create, session: Any, expire: int | None, store, valid, on_store) -> tuple[Any, bool]:
        value = self.peek(key, session, valid)
        if value is not None:
            return value, True
        return self._create(self._namespace(session), encode_key(key), create, expire, store, on_store=on_store), False

    def _create(self, namespace, bkey, create, expire, store, label=None, notify: bool = False, on_store=None) -> Any:
        """``create()``, stored if ``store`` accepts it; with ``notify``, tell waiters when nothing is stored."""
        stored = False
        try:
            value = create()
            if store(value):
                if self._write(namespace, bkey, value, expire or self.expire, label) and on_store is not None:
                    on_store()
                stored = not self._down()
            return value
        finally:
            if notify and not stored and not self._down():
                # Before the lock is released: the waiters stop waiting (see locks.py).
                self._write(namespace, bkey + _NOTICE, uuid.uuid4().hex, max(1, math.ceil(self.lock_timeout)))


_NOTHING: dict = {}
#: Appended to an entry's key: the key of the notice that its regeneration ended without an entry.
_NOTICE = b"\x00regeneration-ended"
#: What :meth:`Region._wait` returns when the caller holds the lock, or must run the query alone.
_LOCKED = object()
_ALONE = object()


#: Every region of the process, for :func:`_after_fork`.
_all: weakref.WeakSet[Region] = weakref.WeakSet()


def _after_fork() -> None:
    # The retrying thread stayed in the parent (the region's locks are
    # released in the child: see forks.py).
    for region in list(_all):
        region._retrying = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _retry_kept(ref: weakref.ref[Region], closed: threading.Event) -> None:
    """The thread that bumps a region's kept names every ``retry_after`` seconds until none is left.

    It holds the region weakly: a region nobody holds any more (its
    application gone) is left alone, as is a closed one.
    """
    while True:
        region = ref()
        if region is None:
            return
        wait = region.retry_after
        del region
        if closed.wait(wait):
            return
        region = ref()
        if region is None or not region._retried():
            return
        del region


class CacheRegions(Mapping[str, Region]):
    """The cache regions of one application, by name.

    :param regions: region name -> Beaker options, e.g.
        ``{"local_session": {"type": "ext:local_session"},
        "short_term": {"type": "memory", "expire": 60}}``.

    Looking up a name that is not configured raises
    :class:`~pyramid_sessioncache.UnknownRegionError`.
    """

    def __init__(
        self, regions: Mapping[str, Mapping[str, Any]], retry_after: float = 5.0, secret: bytes | None = None
    ) -> None:
        retry_after = region_options.checked(region_options.REGIONS_OPTIONS, "retry_after", retry_after)
        if secret is not None:
            region_options.checked(region_options.REGIONS_OPTIONS, "secret", secret)
        if not isinstance(regions, Mapping):
            raise InvalidOptionError("regions", regions, "must map each region name to its options")
        token = uuid.uuid4().hex[:12]
        self._regions = {name: Region(name, options, token, retry_after, secret) for name, options in regions.items()}

    def __getitem__(self, name: str) -> Region:
        try:
            return self._regions[name]
        except KeyError:
            raise UnknownRegionError(name, list(self._regions)) from None

    def __contains__(self, name: object) -> bool:
        return name in self._regions

    def __iter__(self) -> Iterator[str]:
        return iter(self._regions)

    def __len__(self) -> int:
        return len(self._regions)
