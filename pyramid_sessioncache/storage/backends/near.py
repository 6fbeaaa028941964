"""The near cache of a Redis region: recently read keys kept in the process, dropped when Redis says they changed.

With ``cache.<region>.near = true`` on an ``ext:redis`` region, each
process keeps the entries and table versions it read last (at most
``near_max_items`` keys, least recently used out first), so that a hit
sends nothing to Redis.  Redis says when one of them changes, by
*server-assisted client-side caching* in broadcasting mode: a connection
of the near cache's own runs, in a thread,

    CLIENT TRACKING ON BCAST PREFIX <entries' prefix> PREFIX <versions' prefix> REDIRECT <its own id>
    SUBSCRIBE __redis__:invalidate

and from then on the server sends it the name of every key under those
prefixes that anybody writes, deletes, or that expires (a null instead
after ``FLUSHALL``/``FLUSHDB``).  Broadcasting mode tracks prefixes, not
what each connection read, so the connections that read need nothing.

What keeps it correct (see ``docs/backends.md``):

- **Nothing without the connection.**  Keys are served only while the
  connection is subscribed.  When it is lost (closed, killed, or silent:
  a ``PING`` is sent after :data:`HEALTH_CHECK` idle seconds and must be
  answered within as long again), everything held is dropped and reads go
  to Redis until a new connection is subscribed, which drops everything
  again (it may have missed messages).  A forked child starts with
  nothing, and its own connection.
- **No reply stored after its invalidation.**  A reader takes a
  :class:`Stamp` before it sends its read: the generation (bumped when
  everything is dropped) and a counter per key (of the key's bucket,
  bumped when the key is invalidated).  What it read is stored only if
  the stamp still holds, under the lock that invalidations take: an
  invalidation processed between the read and the store refuses it; one
  processed after the store drops it.
- **Our own writes** (entries set or deleted, versions bumped, a region
  cleared) invalidate here, synchronously, once Redis has answered them:
  :meth:`NearCache.invalidate` is called by the namespaces of
  ``backends/redis.py`` before their write returns.
- **Only checked values**: the namespaces store an entry after its
  signature checked and it was unpickled, a version after it checked as a
  token; expiry: an entry is kept until the deadline signed into it, never
  longer than Redis keeps it.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from ... import forks
from ..._weak import members

log = logging.getLogger(__name__)

#: Keys a near cache holds unless ``near_max_items`` says otherwise.
DEFAULT_MAX_ITEMS = 10_000
#: Bytes (as read from Redis) a near cache holds unless ``near_max_bytes`` says otherwise.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
#: The channel Redis sends invalidations on (RESP2, with ``REDIRECT``).
CHANNEL = "__redis__:invalidate"
#: Idle seconds after which the connection is asked for a ``PING``; it must answer within as long again.
HEALTH_CHECK = 1.0
#: How long the listening thread waits for a message before it looks at the clock and its stop flag.
POLL = 0.25
#: Seconds between two attempts to connect, at most.
MAX_BACKOFF = 1.0
#: Per-key counters: a key counts in bucket ``hash(key) % BUCKETS`` (two keys of a bucket only cost stores).
BUCKETS = 4096


class Stamp(NamedTuple):
    """What a reader saw before it read: the generation and the counters of its keys' buckets."""

    generation: int
    counters: tuple[int, ...]


class NearCache:
    """The keys of one Redis region that this process read last, valid while Redis has not said they changed.

    :param client: the region's ``redis.Redis`` client; the listening
        connection is made with its connection options (same server, same
        database), in RESP2.
    :param prefixes: the prefixes of the region's keys (entries, versions).
    :param max_items: most keys held.
    :param max_bytes: most bytes held, counted as the length of what Redis
        sent for each key (the objects take a few times more).
    :param name: the region's name, for the log.

    Keys are the full Redis keys (``str``).  The listening thread starts
    at once; until it is subscribed, :meth:`get_many` returns None.
    """

    def __init__(
        self,
        client: Any,
        prefixes: Sequence[str],
        max_items: int = DEFAULT_MAX_ITEMS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        name: str = "",
    ) -> None:
        self.client = client
        self.prefixes = tuple(prefixes)
        self.max_items = max_items
        self.max_bytes = max_bytes
        #: Bytes held, as counted by :meth:`put_many`.
        self.held_bytes = 0
        self.name = name
        #: Whether keys may be served: the connection is subscribed and nothing was missed since everything was dropped.
        self.live = False
        #: The Redis client id of the listening connection (None while there is none).
        self.connection_id: int | None = None
        #: Invalidation messages heard from Redis.
        self.messages = 0
        #: Reads served from the process.
        self.hits = 0
        #: Replies not stored because an invalidation or a drop came between their read and their store.
        self.refused = 0
        self._generation = 0
        self._counters = [0] * BUCKETS
        self._held: OrderedDict[str, tuple[Any, float, int]] = OrderedDict()
        self._lock = forks.lock()
        self._stop = forks.event()
        self._thread: threading.Thread | None = None
        #: The keys whose change says that a namespace of the region was cleared (see :data:`CLEARED`).
        self.cleared_keys = frozenset(prefix + CLEARED for prefix in self.prefixes)
        siblings(client, self.prefixes).add(self)
        _all.add(self)
        self.start()

    def __repr__(self) -> str:
        return f"<NearCache of {self.name!r} live={self.live} keys={len(self._held)}>"

    def __len__(self) -> int:
        return len(self._held)

    # -- reading and storing

    def get_many(self, keys: Sequence[str]) -> list[Any] | None:
        """Return the values held for every one of ``keys``, or None if one is not held (or nothing may be served)."""
        if not self.live:
            if self._thread is None and not self._stop.is_set():
                self._restart()
            return None
        now = time.time()
        held = self._held
        values = []
        with self._lock:
            if not self.live:
                return None
            for key in keys:
                item = held.get(key)
                if item is None:
                    return None
                if item[1] <= now:
                    self._pop(key)
                    return None
                held.move_to_end(key)
                values.append(item[0])
            self.hits += 1
        return values

    def stamp(self, keys: Iterable[str]) -> Stamp | None:
        """Return the :class:`Stamp` to take before reading ``keys`` from Redis; None if nothing may be stored."""
        if not self.live:
            return None
        counters = self._counters
        with self._lock:
            return Stamp(self._generation, tuple(counters[hash(key) % BUCKETS] for key in keys))

    def put_many(
        self, stamp: Stamp | None, keys: Sequence[str], items: Sequence[tuple[Any, float, int] | None]
    ) -> bool:
        """Store ``items[i]``, a ``(value, deadline, size)`` (or None: not stored), under ``keys[i]``, if ``stamp`` holds.

        ``stamp`` is what :meth:`stamp` returned for ``keys`` before they
        were read.  Returns whether they were stored: not if anything was
        invalidated or dropped since then.  ``deadline`` is a time (as
        ``time.time()``) after which the value is not served
        (``math.inf``: never); ``size`` the bytes it counts for.
        """
        if stamp is None:
            return False
        counters = self._counters
        held = self._held
        with self._lock:
            if (
                not self.live
                or stamp.generation != self._generation
                or any(counters[hash(key) % BUCKETS] != seen for key, seen in zip(keys, stamp.counters, strict=True))
            ):
                self.refused += 1
                return False
            for key, item in zip(keys, items, strict=True):
                if item is not None and item[2] <= self.max_bytes:
                    self._pop(key)
                    held[key] = item
                    self.held_bytes += item[2]
            while len(held) > self.max_items or self.held_bytes > self.max_bytes:
                _, (_, _, size) = held.popitem(last=False)
                self.held_bytes -= size
        return True

    def _pop(self, key: str) -> None:
        item = self._held.pop(key, None)
        if item is not None:
            self.held_bytes -= item[2]

    # -- invalidating

    def invalidate(self, keys: Iterable[Any]) -> None:
        """Drop ``keys`` (``str`` or ``bytes``), and refuse what readers that began before read of them."""
        counters = self._counters
        held = self._held
        with self._lock:
            for key in keys:
                if isinstance(key, bytes):
                    key = key.decode("utf-8", "surrogateescape")
                counters[hash(key) % BUCKETS] += 1
                if key in held:
                    self._pop(key)

    def heard(self, keys: Any) -> None:
        """Apply what Redis sent on :data:`CHANNEL`: the keys that changed, or None for every key (a flush)."""
        self.messages += 1
        if keys is None:  # FLUSHALL, FLUSHDB
            self.invalidate_all()
            return
        keys = keys if isinstance(keys, list) else [keys]
        cleared = self.cleared_keys
        if any((key.decode("utf-8", "surrogateescape") if isinstance(key, bytes) else key) in cleared for key in keys):
            self.invalidate_all()  # the region was cleared, in this process or another
        else:
            self.invalidate(keys)

    def invalidate_all(self) -> None:
        """Drop every key, and refuse what every reader that began before read."""
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        self._generation += 1
        self._held.clear()
        self.held_bytes = 0

    def _went_live(self, connection_id: int) -> None:
        with self._lock:
            if self._stop.is_set():  # closed while connecting: it stays closed
                return
            self._drop()
            self.connection_id = connection_id
            self.live = True
        log.info("near cache of region %r: listening for invalidations (client id %s)", self.name, connection_id)

    def _lost(self, why: Any) -> None:
        with self._lock:
            was = self.live
            self.live = False
            self.connection_id = None
            self._drop()
        if was:
            log.warning(
                "near cache of region %r lost its invalidation connection (%s): reads go to Redis until it is back",
                self.name,
                why,
            )

    # -- the listening thread

    def start(self) -> None:
        """Start the listening thread (done by the constructor, and in a forked child at its first read)."""
        self._stop.clear()
        thread = threading.Thread(
            target=_listen,
            args=(weakref.ref(self), self._stop, self.client, self.prefixes),
            name=f"sessioncache near cache {self.name}",
            daemon=True,
        )
        self._thread = thread
        thread.start()

    def close(self) -> None:
        """Stop listening and drop everything; nothing is served from here on."""
        self._stop.set()
        thread, self._thread = self._thread, None
        with self._lock:
            self.live = False
            self._drop()
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    def wait_live(self, timeout: float) -> bool:
        """Wait until keys may be served, at most ``timeout`` seconds; return whether they may."""
        deadline = time.monotonic() + timeout
        while not self.live and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.live

    def _restart(self) -> None:
        # In a forked child: the listening thread stayed in the parent.
        with _starting:
            if self._thread is None and not self._stop.is_set():
                self.start()


_all: weakref.WeakSet[NearCache] = weakref.WeakSet()
_siblings: dict[tuple[tuple[Any, ...], tuple[str, ...]], weakref.WeakSet[NearCache]] = {}

#: Appended to a namespace's prefix: the key a clear writes after deleting the
#: entries, so that every process drops everything it holds, also what Redis no
#: longer does (after ``SWAPDB``, which Redis does not broadcast).  No entry key
#: has a NUL in it (keys are printable labels and digests).
CLEARED = "\x00cleared"
#: Seconds the cleared key lives: it is its change that is heard, not its value.
CLEARED_LIFETIME = 60


def siblings(client: Any, prefixes: Sequence[str]) -> weakref.WeakSet[NearCache]:
    """The near caches of this process over ``prefixes`` on ``client``'s server, made now or later.

    Every Redis namespace of the process writes through it (with a near
    cache of its own or not: two applications may configure one region
    name on one server, one of them near, however their URLs are spelt):
    see :func:`written`.
    """
    return _siblings.setdefault((server_of(client), tuple(prefixes)), weakref.WeakSet())


def written(nears: Iterable[NearCache], keys: Sequence[str]) -> None:
    """Our own write of ``keys`` was answered: :meth:`~NearCache.invalidate` them in ``nears`` (see :func:`siblings`)."""
    for near in members(nears):
        near.invalidate(keys)


def written_all(nears: Iterable[NearCache]) -> None:
    """Our own write of unknown keys (a region cleared) was answered: drop everything in ``nears``.

    Other processes hear of it by the region's cleared key (see
    :data:`CLEARED`), which the namespace writes.
    """
    for near in members(nears):
        near.invalidate_all()


def server_of(client: Any) -> tuple[Any, ...]:
    """The Redis server and database ``client`` talks to: host, port or socket, database number, user.

    Two URLs of one server that differ in their options (a timeout, a
    spelt-out ``db=0``) name the same keys.
    """
    kwargs = client.connection_pool.connection_kwargs
    return (
        kwargs.get("host"),
        kwargs.get("port"),
        kwargs.get("path"),
        int(kwargs.get("db") or 0),
        kwargs.get("username"),
    )


_starting = forks.lock()


def _after_fork() -> None:
    # This process has heard nothing since the fork, holds what the parent
    # held, and has no listening thread: it drops everything, and connects
    # on its first read (its locks are released: see forks.py).
    for near in list(_all):
        near.live = False
        near.connection_id = None
        near._drop()
        near._thread = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _connect(client: Any, prefixes: Sequence[str]) -> tuple[Any, int]:
    """A new RESP2 connection to the client's server, tracking ``prefixes`` for itself and subscribed."""
    pool = client.connection_pool
    options = dict(pool.connection_kwargs)
    options["protocol"] = 2  # invalidations as pub/sub messages on CHANNEL
    for timeout in ("socket_timeout", "socket_connect_timeout"):  # never a read or connect that hangs
        if options.get(timeout) is None:
            options[timeout] = 2.0
    connection = pool.connection_class(**options)
    try:
        connection.connect()
        connection.send_command("CLIENT", "ID")
        connection_id = int(connection.read_response())
        arguments: list[Any] = ["CLIENT", "TRACKING", "ON", "BCAST"]
        for prefix in prefixes:
            arguments += ["PREFIX", prefix]
        connection.send_command(*arguments, "REDIRECT", connection_id)
        connection.read_response()
        connection.send_command("SUBSCRIBE", CHANNEL)
        answer = connection.read_response()
        if not (isinstance(answer, list) and answer and answer[0] in (b"subscribe", "subscribe")):
            raise ConnectionError(f"unexpected answer to SUBSCRIBE: {answer!r}")
    except BaseException:
        connection.disconnect()
        raise
    return connection, connection_id


def _listen(ref: weakref.ref[NearCache], stop: threading.Event, client: Any, prefixes: Sequence[str]) -> None:
    """The listening thread: connect, serve invalidations, and start again whenever the connection is lost."""
    import redis

    failures = 0
    while not stop.is_set():
        try:
            connection, connection_id = _connect(client, prefixes)
        except (redis.RedisError, OSError) as exc:
            failures += 1
            near = ref()
            if near is None:
                return
            if failures == 1:
                log.warning("near cache of region %r cannot connect to Redis (%s); retrying", near.name, exc)
            del near
            stop.wait(min(MAX_BACKOFF, 0.05 * 2 ** min(failures, 10)))
            continue
        failures = 0
        why: Any = "stopped"
        try:
            near = ref()
            if near is None or stop.is_set():
                return
            near._went_live(connection_id)
            del near
            why = _serve(ref, stop, connection)
        except (redis.RedisError, OSError, ValueError) as exc:
            why = exc
        finally:
            near = ref()
            if near is not None:
                near._lost(why)
            del near
            connection.disconnect()


def _serve(ref: weakref.ref[NearCache], stop: threading.Event, connection: Any) -> str:
    """Apply every invalidation the connection receives; return why it stopped (errors propagate)."""
    heard = time.monotonic()
    pinged = False
    while not stop.is_set():
        if not connection.can_read(timeout=POLL):
            if ref() is None:
                return "the near cache is gone"
            idle = time.monotonic() - heard
            if pinged and idle > 2 * HEALTH_CHECK:
                return f"no answer to PING within {HEALTH_CHECK:g} s"
            if not pinged and idle > HEALTH_CHECK:
                connection.send_command("PING")
                pinged = True
            continue
        message = connection.read_response()
        heard = time.monotonic()
        pinged = False
        if not isinstance(message, list) or len(message) < 3 or message[0] not in (b"message", "message"):
            continue  # the answer to PING
        near = ref()
        if near is None:
            return "the near cache is gone"
        near.heard(message[2])
        del near
    return "stopped"


def deadline_of(expire_at: float) -> float:
    """The deadline to keep a value until, from a signed deadline (0: none, so ``math.inf``)."""
    return expire_at if expire_at > 0 else math.inf
