"""What somebody who can write to a region's backend does: read and write its raw bytes.

No mocks: the bytes go to the real Redis server, where the region reads them.
"""

from __future__ import annotations

from typing import Any

from pyramid_sessioncache import Region

#: The out-of-process region types, whose values are signed.
SIGNED_TYPES = ("redis",)


def options(kind: str, tmp_path, redis_url: str | None = None) -> dict[str, Any]:
    """The options of a region of ``kind`` (``redis``)."""
    return {"type": "ext:redis", "url": redis_url}


class Backend:
    """Raw access to the entries and table versions of one region."""

    def __init__(self, region: Region) -> None:
        self.region = region
        self.entries = region.cache_for().namespace
        assert region.tokens is not None
        self.versions = region.tokens.namespace

    @staticmethod
    def _key(key: str | bytes) -> bytes:
        return key.encode("ascii", "backslashreplace") if isinstance(key, str) else key

    def entry(self, key: str | bytes) -> bytes | None:
        """The stored bytes of the entry ``key``."""
        return self.entries.client.get(self.entries._format_key(self._key(key)))

    def set_entry(self, key: str | bytes, data: bytes | str) -> None:
        """Overwrite the entry ``key`` with ``data``."""
        self.entries.client.set(self.entries._format_key(self._key(key)), data)

    def version(self, table: str) -> bytes | None:
        """The stored bytes of ``table``'s version."""
        return self.versions.client.get(self.versions._format_key(self._key(table)))

    def set_version(self, table: str, data: bytes | str) -> None:
        """Overwrite ``table``'s version with ``data``."""
        self.versions.client.set(self.versions._format_key(self._key(table)), data)
