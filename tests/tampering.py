"""What somebody who can write to a region's backend does: read and write its raw bytes.

No mocks: the bytes go to the real Redis server, the real files and the
real ``dbm`` database, where the region reads them.
"""

from __future__ import annotations

import os
from typing import Any

from pyramid_sessioncache import Region
from pyramid_sessioncache.storage.keys import key_bytes

#: The out-of-process region types, whose values are signed.
SIGNED_TYPES = ("file", "dbm", "redis")


def options(kind: str, tmp_path, redis_url: str | None = None) -> dict[str, Any]:
    """The options of a region of ``kind`` (``file``, ``dbm``, ``redis``) in ``tmp_path``."""
    if kind == "redis":
        return {"type": "ext:redis", "url": redis_url}
    return {"type": kind, "data_dir": str(tmp_path / f"{kind}-data"), "lock_dir": str(tmp_path / f"{kind}-locks")}


class Backend:
    """Raw access to the entries and table versions of one region."""

    def __init__(self, region: Region) -> None:
        self.region = region
        self.entries = region.cache_for().namespace
        assert region.tokens is not None
        self.versions = region.tokens.namespace

    def _get(self, namespace: Any, key: bytes) -> bytes | None:
        kind = self.region.type
        if kind == "ext:redis":
            return namespace.client.get(namespace._format_key(key))
        if kind == "file":
            try:
                with open(namespace.path(key), "rb") as file:
                    return file.read()
            except FileNotFoundError:
                return None
        namespace.acquire_read_lock()
        try:
            return namespace.db.get(key)
        finally:
            namespace.release_read_lock()

    def _set(self, namespace: Any, key: bytes, data: bytes | str) -> None:
        kind = self.region.type
        if isinstance(data, str):
            data = data.encode()
        if kind == "ext:redis":
            namespace.client.set(namespace._format_key(key), data)
        elif kind == "file":
            path = namespace.path(key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as file:
                file.write(data)
        else:
            namespace.acquire_write_lock()
            try:
                namespace.db[key] = data
            finally:
                namespace.release_write_lock()

    def entry(self, key: str | bytes) -> bytes | None:
        """The stored bytes of the entry ``key``."""
        return self._get(self.entries, key_bytes(key))

    def set_entry(self, key: str | bytes, data: bytes | str) -> None:
        """Overwrite the entry ``key`` with ``data``."""
        self._set(self.entries, key_bytes(key), data)

    def version(self, table: str) -> bytes | None:
        """The stored bytes of ``table``'s version."""
        return self._get(self.versions, key_bytes(table))

    def set_version(self, table: str, data: bytes | str) -> None:
        """Overwrite ``table``'s version with ``data``."""
        self._set(self.versions, key_bytes(table), data)
