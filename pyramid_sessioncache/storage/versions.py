"""Table versions: tokens that say whether an entry still holds what its tables hold.

A region keeps, beside its entries and in the same backend, one *version*
per table (a name; storage knows nothing of tables).  An entry records the
versions of the tables it read, as they were before its query ran; it is
valid while every one of them is still there and unchanged.  A commit that
wrote to a table gives it a new version, in every region.

Design (what a backend that anybody else can write to must not defeat):

- **Tokens.**  A version is the string ``"<counter>:<nonce>:<mac>"``: a
  counter, 16 random bytes and an HMAC-SHA256, under the application's
  secret, of the format, the place (the versions namespace, which names
  the region, and the table's name), the counter and the nonce.  A token
  is never reused: the nonce is new every time one is written, so an entry
  that recorded a token is valid only while *that very write* is current.
  That alone makes invalidation correct, whatever the counters do:
  versions are read before an entry's query runs and bumped after a
  commit, so a commit the entry did not see always replaced the token it
  recorded.  A token copied from another table, region or application
  does not check; nor does garbage (bad bytes, a Redis list, a truncated
  value, a bare integer): each reads as "no valid version", so every entry
  that read the table is a miss, with one warning, never an exception.
- **No going back.**  A token's counter is signed with it, so nobody
  without the secret can make one up, but anybody who can write to the
  backend can put back a token seen earlier, to make the entries recorded
  under it valid again.  Each process therefore remembers the highest
  counter it has seen per table of each region, and treats a lower one as
  invalid ("everything read from that table is invalid": misses, never
  stale data).  A process that never saw the newer token (started after
  it) cannot tell; entries' ``expire`` bounds that.
- **Bumping.**  A bump proposes, per table, ``highest seen + 1`` with a new
  nonce, and writes it with the backend's :func:`~.api.raise_many`: a
  compare-and-set on the counter, atomic per key (a Lua script on Redis,
  one round trip; a lock for files, ``dbm`` and memory).  Two processes
  bumping at once both end with a version whose counter is at least as
  high as what either proposed, newer than anything an entry stored
  before either bump.  When the backend holds a higher counter (another
  process bumped more often, or this one just started), the bump checks
  its signature and proposes one above it, once.  If that is refused
  too, the counter held rose between two reads that both followed this
  commit: another process wrote a new token after it, which invalidates
  everything this bump would, so the bump stops there.  No bump ever
  writes below a counter it was shown, so no process sees a version go
  back because of contention.  A forged counter that claims to be higher
  is simply written over.  A bump the backend refuses (Redis at
  ``maxmemory`` refuses writes but not ``DEL``) deletes the versions
  instead: an entry whose version is missing is never valid.
- **Creating.**  An entry records only versions that exist: before a
  miss's query, missing versions are added (``SET NX``, counter
  ``highest seen + 1``) and unusable ones (garbage, bad signature,
  rolled back) replaced by a bump; if some are still unusable the entry
  is not stored.  Entries then record the tokens they read.
- **Cost.**  A hit reads its entry and its versions in one backend read
  (one ``MGET`` on Redis).  Checking a token's signature costs an HMAC;
  tokens already checked are remembered by their exact bytes (per table),
  so a hit costs a dictionary look-up and a comparison per table.
- **In-process regions** (``memory``): nobody else can write there; tokens
  are made the same way (with a key of the process's own) but read without
  checks.
- **Entries' own versions.**  Beside tables, a name may be one entry's own
  (:func:`entry_version`): under manual invalidation an entry records the
  version of its key, which invalidating that one entry bumps.  There is
  one per key stored or invalidated, so, unlike tables', their number
  follows the application's data: each process remembers the highest
  counter of at most :data:`REMEMBERED_ENTRIES` of them (a name it forgot
  is as one it never saw, see above), and each backend keeps them as it
  keeps entries (bounded in memory, expiring elsewhere: see each backend).
  One that is gone reads as missing: never valid.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
from collections.abc import Sequence
from typing import Any

from .. import forks
from . import api
from .keys import encode_key

#: Part of every token's signed message: a change of format reads as invalid.
FORMAT = b"sessioncache versions 1"
#: How many checked tokens a region remembers.
REMEMBERED = 4096
#: No token is longer (a counter of 15 digits, a nonce, a signature).
LONGEST = 96
#: What begins the name of an entry's own version (see :func:`entry_version`).
ENTRY = "entry."
#: How many entries' own versions a process remembers the highest counter of.
REMEMBERED_ENTRIES = 10_000
#: Seconds an entry's own version is kept, out of the process, after it was
#: last written: a day, or the region's ``expire`` if longer (see ``Region``).
ENTRY_LIFETIME = 24 * 3600

log = logging.getLogger(__name__)


def entry_version(key: str) -> str:
    """The name of the version of the entry stored under ``key``, beside its region's table versions.

    It holds a dot, which no table's version name does (the engine keeps
    a table's name after its schema's dot), so an entry's version and a
    table's never share a name.
    """
    return ENTRY + key


def is_entry_version(key: bytes) -> bool:
    """Whether ``key``, a key of a versions namespace, holds an entry's own version (:func:`entry_version`)."""
    return key.startswith(_ENTRY_KEY)


_ENTRY_KEY = encode_key(ENTRY)


class Versions:
    """The table versions of one region, kept in ``namespace``.

    :param namespace: a Beaker namespace of the region's backend, best one
        that implements :class:`~.api.ManyKeys`.
    :param place: the namespace's name, signed into every token.
    :param secret: the application's secret; None for a region inside the
        process, whose tokens are then signed with a key of its own and
        read unchecked.
    """

    def __init__(self, namespace: Any, place: str, secret: bytes | None) -> None:
        self.namespace = namespace
        self.place = place
        self.trusted = secret is None
        key = os.urandom(32) if secret is None else secret
        self._base = hmac.new(key, FORMAT + b"\0" + place.encode("utf-8", "surrogateescape") + b"\0", hashlib.sha256)
        #: Table name -> the highest counter seen in this process (of at
        #: most :data:`REMEMBERED_ENTRIES` entries' own versions).
        self.highest: dict[str, int] = {}
        self._entries = 0  # entries' versions in highest
        # (name, exact value read) -> (counter, token): tokens already checked.
        self._known: dict[tuple[str, Any], tuple[int, str]] = {}
        self._complained: set[str] = set()
        self._lock = forks.lock()

    def __repr__(self) -> str:
        return f"<Versions of {self.place!r}>"

    # -- tokens

    def _mac(self, name: str, counter: int, nonce: str) -> str:
        mac = self._base.copy()
        mac.update(f"{name}\0{counter}\0{nonce}".encode("utf-8", "surrogateescape"))
        return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode("ascii")

    def new(self, name: str, counter: int | None = None) -> str:
        """Return a new token for ``name``: ``counter`` (default: one above the highest seen) and a new nonce."""
        if counter is None:
            counter = self.highest.get(name, 0) + 1
        nonce = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode("ascii")
        return f"{counter}:{nonce}:{self._mac(name, counter, nonce)}"

    def _verify(self, name: str, raw: Any) -> tuple[int, str] | None:
        """``(counter, token)`` of a value read for ``name``, or None if it is not a token of this place."""
        if not isinstance(raw, (bytes, str)) or len(raw) > LONGEST:
            return None
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("ascii")
            except UnicodeDecodeError:
                return None
        parts = raw.split(":")
        if len(parts) != 3 or not parts[0].isdigit() or len(parts[0]) > 15 or not parts[0].isascii():
            return None
        counter, nonce, mac = parts
        if not hmac.compare_digest(mac, self._mac(name, int(counter), nonce)):
            return None
        return int(counter), raw

    def check(self, names: Sequence[str], raw: Sequence[Any]) -> tuple[str | None, ...]:
        """Return the usable token of each of ``names`` from the values ``raw`` read for them.

        None where a value is missing, is not a token of this place (bad
        bytes, wrong type, truncated, bad signature: logged once), or has a
        counter below the highest this process has seen for the name
        (rolled back: logged once).
        """
        if self.trusted:
            return tuple(raw)
        found: list[str | None] = []
        highest = self.highest
        for name, value in zip(names, raw, strict=True):
            if value is None:
                found.append(None)
                continue
            known = self._known.get((name, value))
            if known is None:
                known = self._verify(name, value)
                if known is None:
                    self._complain(
                        "unreadable",
                        "ignored the version of %r in cache namespace %r: not a valid token "
                        "(forged, corrupted or of another application); entries that read it are misses",
                        name,
                    )
                    found.append(None)
                    continue
                if len(self._known) >= REMEMBERED:
                    self._known.clear()
                self._known[(name, value)] = known
            counter, token = known
            seen = highest.get(name, 0)
            if counter < seen:
                self._complain(
                    "rolled back",
                    "ignored the version of %r in cache namespace %r: it went back (from %d to %d here), "
                    "so entries that read it are misses until it is bumped",
                    name,
                    seen,
                    counter,
                )
                found.append(None)
                continue
            if counter > seen:
                self._saw(name, counter)
            found.append(token)
        return tuple(found)

    def _complain(self, kind: str, message: str, name: str, *args: Any) -> None:
        args = (name, self.place, *args)
        if kind in self._complained:
            log.debug(message, *args)
            return
        self._complained.add(kind)
        log.warning(message + " (further ones are logged at DEBUG)", *args)

    # -- the backend

    def read(self, names: Sequence[str]) -> tuple[str | None, ...]:
        """Return the usable tokens of ``names`` (see :meth:`check`), in one backend read.

        Backend errors propagate.
        """
        return self.check(names, api.read_many(self.namespace, [encode_key(name) for name in names]))

    def create(self, names: Sequence[str]) -> tuple[str, ...] | None:
        """Return the tokens of ``names`` for an entry about to be stored, making the missing and unusable ones.

        Missing versions are added (never overwriting one another process
        added first), unusable ones (garbage, bad signature, rolled back)
        replaced by a bump.  Returns None if some are still unusable.
        Backend errors propagate.
        """
        keys = [encode_key(name) for name in names]
        raw = api.read_many(self.namespace, keys)
        found = self.check(names, raw)
        if None not in found:
            return found  # type: ignore[return-value]
        missing = {key: self.new(name) for name, key, value in zip(names, keys, raw, strict=True) if value is None}
        broken = [
            name for name, value, token in zip(names, raw, found, strict=True) if value is not None and token is None
        ]
        if missing:
            api.add_many(self.namespace, missing)
        if broken:
            self.bump(broken)
        found = self.check(names, api.read_many(self.namespace, keys))
        if None in found:
            # Added by nobody and still unreadable: the key holds what SET NX
            # does not overwrite (a Redis list, say).
            self.bump([name for name, token in zip(names, found, strict=True) if token is None])
            found = self.check(names, api.read_many(self.namespace, keys))
        return None if None in found else found  # type: ignore[return-value]

    def bump(self, names: Sequence[str] | set[str]) -> None:
        """Give each of ``names`` a new token with a higher counter; see the module's docstring.

        Backend errors propagate.
        """
        proposals = {name: self.highest.get(name, 0) + 1 for name in names}
        by_key = {encode_key(name): name for name in proposals}
        for attempt in range(2):
            tokens = {encode_key(name): self.new(name, counter) for name, counter in proposals.items()}
            refused = {by_key[key]: held for key, held in api.raise_many(self.namespace, tokens).items()}
            for name, counter in proposals.items():
                if name not in refused:
                    self._saw(name, counter)
            proposals, forced = {}, {}
            for name, held in refused.items():
                known = self._verify(name, held)
                if known is None:  # a forged counter: not a reason to stay below it
                    forced[name] = self.highest.get(name, 0) + 1
                    continue
                self._saw(name, known[0])
                if attempt == 0:
                    proposals[name] = known[0] + 1
                # else: a token written since the first attempt, so after the
                # commit this bump is for, already invalidates what it would.
            if forced:
                self._write(forced)
            if not proposals:
                return

    def discard(self, names: Sequence[str] | set[str]) -> None:
        """Remove the versions of ``names``, so that no entry that recorded them is ever valid again.

        What a bump that cannot be written falls back to: a backend may
        refuse every write yet still delete (Redis at ``maxmemory``).  A
        missing version never matches, and the next entry stored for a name
        gives it a new token (see :meth:`create`).  Backend errors propagate.
        """
        api.delete_many(self.namespace, [encode_key(name) for name in names])

    def _write(self, counters: dict[str, int]) -> None:
        api.write_many(
            self.namespace, {encode_key(name): self.new(name, counter) for name, counter in counters.items()}
        )
        for name, counter in counters.items():
            self._saw(name, counter)

    def _saw(self, name: str, counter: int) -> None:
        with self._lock:  # two threads must not put a lower counter over a higher one
            highest = self.highest
            if counter > highest.get(name, 0):
                if name not in highest and name.startswith(ENTRY):
                    self._entries += 1
                    if self._entries > REMEMBERED_ENTRIES:
                        self._forget_entries()
                highest[name] = counter

    def _forget_entries(self) -> None:
        # Entries' versions, not tables': their number follows the data.
        # Forgotten, one is as a version this process never saw.
        for name in [name for name in self.highest if name.startswith(ENTRY)]:
            del self.highest[name]
        self._entries = 1
