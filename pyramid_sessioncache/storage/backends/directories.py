"""Private directories for the ``file`` and ``dbm`` backends.

A region's files hold row values in clear (signed, not encrypted), and
whoever can write where they live can plant entries (which the signature
checks stop), lock files that never let go, or links that send the
region's writes elsewhere.  So a ``data_dir`` or ``lock_dir`` must be
writable by this user alone: the directory itself must belong to this user
(or root) and be writable by nobody else, and so must every directory
above it, except those with the sticky bit (``/tmp``), where others cannot
rename what is not theirs.  Directories the backends create are mode
0700, files 0600.
"""

from __future__ import annotations

import contextlib
import os
import stat

from ...errors import SharedDirectoryError

#: Mode of the directories the backends create.
DIRECTORY_MODE = 0o700
#: Mode of the files the backends create.
FILE_MODE = 0o600


def private_directory(path: str, setting: str, allow_shared: bool = False, allow_setting: str = "") -> str:
    """Create ``path`` (mode 0700) if it is missing and return it, resolved.

    :param setting: the setting that named it, for the error message
        (``"cache.long_term.data_dir"``).
    :param allow_shared: skip the check (``allow_shared_dir = true``).
    :param allow_setting: the setting that would skip the check, for the
        error message.

    Raises :class:`~pyramid_sessioncache.errors.SharedDirectoryError` when
    another user can write to it or to a directory above it (see the
    module's docstring).
    """
    os.makedirs(path, mode=DIRECTORY_MODE, exist_ok=True)
    real = os.path.realpath(path)
    if not allow_shared:
        problem = shared(real)
        if problem:
            raise SharedDirectoryError(
                f"invalid setting {setting} = {path!r}: {problem}, so they could plant or remove this "
                f"cache's files; use a directory only this user can write to (mode 0700), or set "
                f"{allow_setting or 'allow_shared_dir'} = true to accept it"
            )
    return real


def shared(directory: str) -> str | None:
    """Say why users other than this one can write to ``directory`` (resolved), or None if none can."""
    me = os.geteuid()
    current = directory
    while True:
        status = os.stat(current)
        if status.st_uid not in (me, 0):
            return f"{current} belongs to another user (uid {status.st_uid})"
        writable = status.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if writable and (current == directory or not status.st_mode & stat.S_ISVTX):
            who = "other users" if status.st_mode & stat.S_IWOTH else "its group"
            return f"{who} can write to {current} (mode {stat.S_IMODE(status.st_mode):04o})"
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


def make_directory(path: str) -> None:
    """Create ``path`` and the missing directories above it, each mode 0700."""
    try:
        os.mkdir(path, DIRECTORY_MODE)
    except FileNotFoundError:
        make_directory(os.path.dirname(path))
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, DIRECTORY_MODE)
    except FileExistsError:
        pass
