"""Database identity: which data a bind's connections see, as text for cache keys.

A URL does not say which data an engine reads.  Two SQLite databases in
memory share the URL ``sqlite://``; an engine made with ``creator=``
connects wherever its function does; two PostgreSQL engines with one URL
read different tables when their ``connect_args`` set another
``search_path``.  ``keys.py`` puts :func:`database_identity` in every key
instead of the URL, so that two engines whose connections can see
different data never share an entry, while processes that share a backend
(Redis) and a database compute the same identity and share entries.

The first rule that applies gives the identity:

1. **An explicit name**: the ``sessioncache_database`` execution option
   of the engine or connection, for instance::

       engine = create_engine(url, execution_options={"sessioncache_database": "main"})

   Every bind given one name is trusted to read the same data, in every
   process.  It is how to say that two engines are one database (a primary
   and its replica, an engine made with ``creator=`` in several processes),
   and how to tell apart what cannot be detected (below).

2. **Process-local**: a random token, one per connection pool, when
   nothing says which database the connections reach in a way another
   process could repeat: an engine made with ``creator=`` (or given a
   ``pool=``), one with a ``do_connect`` event listener (it may connect
   with other arguments), SQLite in memory in any spelling (``sqlite://``,
   ``:memory:``, ``mode=memory``, ``file::memory:?cache=shared``,
   ``vfs=memdb``), a SQLite file that does not exist yet, and
   ``connect_args`` holding objects that have no stable text.  Entries
   are shared by the engines of one pool (``engine.execution_options()``
   copies share their parent's) and by no other process.  A new pool
   (``engine.dispose()``) or a forked child gets a new token: after
   either, a database in memory is no longer the one the token named.
   Each connection of a pool in memory (``sqlite://`` gives each thread
   its own) has a database of its own: its look-ups are keyed apart too
   (see ``connection_state``).

3. **Portable**: a digest of what the driver connects with: backend and
   driver, user, host, port, database, the URL's query (sorted), the
   ``connect_args`` that ``create_engine()`` passes to the driver beyond
   what the URL says, and for PostgreSQL the ``PG*`` environment variables
   that libpq reads when the URL leaves a part out.  For a SQLite file:
   its resolved absolute path, the file itself (device and inode) and the
   host name.  Passwords, and connect arguments and query parameters whose
   name says they hold a secret, are left out: changing a password is not
   changing the database.

What cannot be detected, and needs an explicit name when it makes two
engines with the same URL and ``connect_args`` read different data: a
``connect`` event listener that runs ``SET search_path`` (SQLAlchemy's
own dialects listen to that event too, so a listener there says
nothing), a server-side default (``ALTER ROLE ... SET search_path``), a
host name, service file or DSN string that leads another process to
another server.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
import weakref
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from sqlalchemy.engine import URL, Connection, Engine

from .. import _sqlalchemy
from ..errors import DatabaseNameError

log = logging.getLogger(__name__)

#: The execution option that names the database of a bind explicitly.
NAME_OPTION = "sessioncache_database"

#: Words that mark a connect argument or URL query parameter as a secret.
SECRET_WORDS = ("password", "passwd", "pwd", "passphrase", "secret", "token")

#: What libpq reads from the environment when the URL and the connect
#: arguments leave a part out; one of them (``PGOPTIONS``) can set the
#: ``search_path``.
LIBPQ_ENVIRONMENT = (
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGDATABASE",
    "PGUSER",
    "PGOPTIONS",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGSYSCONFDIR",
    "PGTARGETSESSIONATTRS",
)

# The identity found for each connection pool (rules 2 and 3).  It is
# about the process's pools, which two applications in one process can
# share, so it lives here rather than on a SessionCache; weak, so that a
# disposed pool takes its entry with it.
_found: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_watching_forks = False


class _ProcessLocal(Exception):
    """Raised inside this module: the database has no name another process would give it."""

    def __init__(self, reason: str, in_memory: bool = False) -> None:
        super().__init__(reason)
        self.in_memory = in_memory


def database_identity(bind: Engine | Connection) -> str:
    """Return a text naming the data that ``bind``'s connections see.

    :param bind: an ``Engine`` (``engine.execution_options()`` copies
        included) or a ``Connection``.

    The text is ``"name:"`` followed by the ``sessioncache_database``
    execution option when the bind has one; otherwise ``"local:"`` and a
    random token for a database no other process can be known to reach,
    or ``"db:"`` and a digest that every process connecting the same way
    computes alike (see the module's documentation for the rules).  What
    is detected is computed once per connection pool.  Raises
    :class:`~pyramid_sessioncache.DatabaseNameError` when the option is not
    a non-empty string.

    Example::

        >>> database_identity(create_engine("sqlite://")) != database_identity(create_engine("sqlite://"))
        True
        >>> database_identity(create_engine(url, execution_options={"sessioncache_database": "main"}))
        'name:main'
    """
    name = bind.get_execution_options().get(NAME_OPTION)
    if name is not None:
        if not isinstance(name, str) or not name.strip():
            raise DatabaseNameError(name)
        return f"name:{name}"
    engine = bind.engine
    pool = engine.pool
    found = _found.get(pool)
    if found is None:
        found = _found.setdefault(pool, _identify(engine))
    return found


def portable_text(engine: Engine) -> str:
    """Return the text whose digest names ``engine``'s database in every process (rule 3).

    For debugging and tests: it shows what the identity is made of.
    Raises ``ValueError`` for an engine whose identity is process-local.
    """
    try:
        return _portable_text(engine)
    except _ProcessLocal as local:
        raise ValueError(f"the database of {engine!r} has a process-local identity: {local}") from None


def _identify(engine: Engine) -> str:
    _watch_forks()
    try:
        text = _portable_text(engine)
    except _ProcessLocal as local:
        if local.in_memory:
            log.debug("cache entries of %r stay in this process: %s", engine, local)
        else:
            log.info(
                "cache entries of %r stay in this process: %s; to share them with other processes, "
                "name the database with the %r execution option",
                engine,
                local,
                NAME_OPTION,
            )
    except Exception:  # whatever went wrong, never take another engine's name
        log.warning("cache entries of %r stay in this process: its connect arguments could not be read", engine)
        log.debug("reading the connect arguments of %r failed", engine, exc_info=True)
    else:
        return "db:" + hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
    return "local:" + secrets.token_hex(16)


def _watch_forks() -> None:
    # A forked child inherits the parent's pools and tokens, but a database
    # in memory diverges from the parent's at once.
    global _watching_forks
    if not _watching_forks and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_found.clear)
        _watching_forks = True


def _portable_text(engine: Engine) -> str:
    url = engine.url
    arguments = _sqlalchemy.connect_arguments(engine.pool)
    if arguments is None:  # its URL may be a placeholder ("sqlite://"): it says nothing
        raise _ProcessLocal("it connects with a creator= function or a pool of its own")
    if engine.dialect.dispatch.do_connect:
        raise _ProcessLocal("a do_connect event listener may connect it with other arguments")
    args, kwargs = arguments
    url_kwargs = engine.dialect.create_connect_args(url)[1]
    parts: dict[str, Any] = {
        "driver": url.drivername,
        "user": url.username,
        "host": url.host,
        "port": url.port,
        "query": {name: value for name, value in url.query.items() if not _secret(name)},
        # What the URL gives is above (the positional arguments come from
        # it alone); the dialect adds objects of its own (psycopg's
        # adapters): keep what connect_args added or changed.
        "connect_args": {
            name: value
            for name, value in kwargs.items()
            if not _secret(name) and not (name in url_kwargs and _same(url_kwargs[name], value))
        },
    }
    if engine.dialect.name == "sqlite":
        parts["file"] = _sqlite_file(url, args, kwargs)
    else:
        parts["database"] = url.database
    if engine.dialect.name == "postgresql":
        parts["environment"] = {name: os.environ[name] for name in LIBPQ_ENVIRONMENT if name in os.environ}
    return _text(parts)


def _sqlite_file(url: URL, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    """Name the SQLite file the driver opens: host, real path, device and inode."""
    (filename,) = args  # pysqlite's one argument; anything else ends in _identify's fallback
    if _in_memory(url, filename):
        raise _ProcessLocal("its SQLite database is in memory", in_memory=True)
    path = _uri_path(filename) if kwargs.get("uri") else filename
    if path in ("", ":memory:"):
        raise _ProcessLocal("its SQLite database is in memory", in_memory=True)
    real = os.path.realpath(path)
    try:
        found = os.stat(real)
    except OSError:
        # Created by the first connection: what another process would find
        # there later may be another file.
        raise _ProcessLocal(f"its SQLite file {real} does not exist yet") from None
    return f"{socket.gethostname()}:{real}:{found.st_dev}:{found.st_ino}"


def _in_memory(url: URL, filename: str) -> bool:
    """Whether SQLite keeps this database in memory (or in a temporary file of one connection)."""
    name = filename.partition("?")[0]
    return (
        name in ("", ":memory:")
        or name.startswith("file::memory:")
        or "mode=memory" in filename
        or "vfs=memdb" in filename
        or url.query.get("mode") == "memory"
        or url.query.get("vfs") == "memdb"
    )


def _uri_path(filename: str) -> str:
    """The file path of a SQLite URI filename (``file:data.db?mode=ro``)."""
    if not filename.startswith("file:"):
        return filename  # with uri=True, a name that is no URI is a plain file name
    rest = filename[len("file:") :].partition("?")[0].partition("#")[0]
    if rest.startswith("//"):
        authority, slash, path = rest[2:].partition("/")
        if authority not in ("", "localhost"):
            raise _ProcessLocal(f"its SQLite URI names a host, {authority!r}")
        rest = slash + path
    return unquote(rest)


def _secret(name: Any) -> bool:
    return isinstance(name, str) and any(word in name.lower() for word in SECRET_WORDS)


def _same(url_value: Any, value: Any) -> bool:
    return url_value is value or bool(url_value == value)


def _text(value: Any) -> str:
    """A text for ``value`` that every process gives alike, or raise :class:`_ProcessLocal`."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return f"{type(value).__name__}:{value!r}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_text(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(sorted(f"{_text(k)}:{_text(v)}" for k, v in value.items())) + "}"
    raise _ProcessLocal(f"a connect argument has no text another process would give it ({type(value).__name__})")
