r"""Keys as namespaces store them: the bytes of a string key, which no other string has.

Beaker's ``Cache`` turns a string key into bytes with
``key.encode("ascii", "backslashreplace")``, which gives two strings the
same bytes: ``"é"`` and the four characters ``"\xe9"`` both become
``b"\xe9"``.  Two ``FromCache(cache_key=...)`` labels would then share one
entry, and the versions named after their keys one version, each signed
for the other's name (both always a miss).  :func:`encode_key` doubles every
backslash first, so that each backslash in its bytes begins an escape
(``\\``, ``\xNN``, ``\uNNNN``, ``\UNNNNNNNN``): the bytes read back,
with Python's ``unicode_escape`` codec, as the one string they came from.

Everything that must agree on a key's bytes goes through :func:`encode_key`:
a region's entries (so their signatures, file names and Redis keys), its
versions namespace (so :func:`~.versions.is_entry_version`), and the
Beaker ``Cache`` that :meth:`~pyramid_sessioncache.Region.cache_for`
returns (see ``_beaker.py``), so that ``beaker_cache.get(key)`` still reads
what a region stored under ``key``.
"""

from __future__ import annotations


def encode_key(key: str) -> bytes:
    r"""Return the bytes ``key`` is stored under, which no other string is stored under.

    A key of ASCII characters without a backslash (every key the add-on
    makes without a label, and most labelled ones) is its own ASCII bytes,
    as Beaker would store it; a backslash is doubled, and any other
    character is a backslash escape::

        encode_key("people:3f2a")  # b"people:3f2a"
        encode_key("é")            # b"\\xe9"
        encode_key("\\xe9")        # b"\\\\xe9"
    """
    if key.isascii() and "\\" not in key:  # the hit path's keys: nothing more than an ASCII encoding
        return key.encode()
    return key.replace("\\", "\\\\").encode("ascii", "backslashreplace")


def key_bytes(key: bytes | str) -> bytes:
    """Return ``key`` as a namespace stores it: :func:`encode_key` of a string, bytes as they are."""
    return encode_key(key) if isinstance(key, str) else key
