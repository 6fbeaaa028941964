"""The caching engine: no Pyramid, no zope, usable in any SQLAlchemy program.

- ``cache.py``: :class:`~pyramid_sessioncache.SessionCache`, an
  application's regions as its Sessions see them.
- ``options.py``: the ``FromCache`` and ``RelationshipCache`` ORM options.
- ``keys.py``: cache keys of statements; ``identity.py``: which database
  a bind reads, the part of every key that a URL cannot give.
- ``lookup.py``: the one decision both entrances share (key, bypass,
  autoflush, validity) and handing hits back.
- ``hook.py``: the ORM entrance (a ``do_orm_execute`` listener) and the
  Session events; ``early.py``: ``cached_query()``, which serves a hit
  before ``Session.execute()``.
- ``loader.py``: loading a shared region's miss; ``values.py``: what is
  stored; ``hydrate.py``: a stored value back into a Session's objects.
- ``entries.py``: finding and forgetting entries (explicit invalidation).
- ``invalidation/``: automatic invalidation (what was read, what was
  written, versions).
- ``info.py``: the ``Session.info`` keys; ``stats.py``: counters.
"""
