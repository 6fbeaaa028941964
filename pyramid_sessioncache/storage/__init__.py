"""Storage: cache regions over Beaker namespaces.  It knows nothing of queries or requests.

- ``region.py``: a named region (its options, its failures, its version
  tokens) and the regions of one application.
- ``api.py``: what storage asks of a backend beyond Beaker's namespaces.
- ``signing.py``: signed pickles, checked before they are unpickled.
- ``backends/``: ``local_session`` (entries on a SQLAlchemy Session),
  ``memory`` (bounded, per region) and ``redis`` (signed entries, versions
  read with them).
"""
