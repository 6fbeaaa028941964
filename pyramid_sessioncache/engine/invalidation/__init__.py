"""Automatic invalidation: what an entry read, what a transaction wrote, and versions.

Every shared entry records the tables its result read, and the version
token each of those tables had *before* the query ran.  A hit reads the
current tokens (one backend read: ``MGET`` on Redis) and is served only if
none changed.  When a transaction that wrote to tables commits, each
written table gets a new random token in every shared region, so every
process sharing the backend stops serving entries that read it; nothing
has to list or flush keys.  Reading the tokens before the query means a
write that commits while the query runs leaves the entry already stale.

- :mod:`.reads`: the tables a statement, a loaded result and a statement
  shape read.
- :mod:`.writes`: the tables a transaction writes, and publishing them at
  commit.
- :mod:`.versions`: reading versions for a new entry and checking an
  entry's versions on a hit.
- :mod:`.notify`: on PostgreSQL, opt-in, the committed writes of any
  client: statement triggers, ``NOTIFY`` at commit and a listener thread.
"""

from .reads import ALL_TABLES

__all__ = ["ALL_TABLES"]
