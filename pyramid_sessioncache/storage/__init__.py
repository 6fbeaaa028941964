"""Storage: cache regions over Beaker namespaces.  It knows nothing of queries or requests.

- ``region.py``: a named region (its options, its failures, its size
  limits) and the regions of one application; which backend types are
  allowed, and which are refused because they unpickle unchecked data.
- ``versions.py``: table versions, signed, counted, never going back.
- ``api.py``: what storage asks of a backend beyond Beaker's namespaces.
- ``keys.py``: the bytes a key is stored under, which no other key's are.
- ``signing.py``: signed pickles, bound to their place and checked before
  they are unpickled.
- ``backends/``: ``local_session`` (entries on a SQLAlchemy Session,
  bounded per Session), ``memory`` (bounded in entries and bytes, per
  region), ``redis`` (signed entries, versions read with them), ``file``
  (one signed file per entry) and ``dbm`` (signed); ``signed`` (the
  signed entries both keep), ``filelock`` and ``directories`` for the last two.
"""
