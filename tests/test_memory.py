"""Entries hold data, never what made them: requests end, and their Sessions and listeners go.

A cached value must not keep alive the Session that loaded it, the
caller's Session, the request (which ``session.info`` reaches), a
connection or a query context: an application caching thousands of
entries would keep thousands of requests.  After thousands of requests,
each storing a new entry, the live Sessions and Requests (counted with
:mod:`gc`) are those of before, SQLAlchemy's global listener registry has
not grown, and the memory the entries take (:mod:`tracemalloc`) is what
their data needs, in every region type.
"""

from __future__ import annotations

import gc
import tracemalloc
import weakref
from types import MappingProxyType, ModuleType

import pytest
from pyramid.request import Request
from sqlalchemy import select
from sqlalchemy.event import registry
from sqlalchemy.orm import Mapper, attributes, joinedload, sessionmaker
from sqlalchemy.orm import Session as SASession
from sqlalchemy.orm.instrumentation import ClassManager
from sqlalchemy.orm.interfaces import MapperProperty
from sqlalchemy.orm.path_registry import PathRegistry
from sqlalchemy.sql.schema import SchemaItem
from sqlalchemy.types import TypeEngine
from webtest import TestApp

from pyramid_sessioncache import cached_query

from .app import make_app
from .models import Person

#: Requests per region, each storing an entry of its own; then those measured
#: with tracemalloc (which slows each request several times).  Beaker's file
#: namespace rewrites one file holding every entry per write: fewer there.
REQUESTS = {"local": 2000, "memory": 2000, "redis": 1000, "file": 100}
MEASURED = {"local": 300, "memory": 300, "redis": 200, "file": 50}
#: Bytes a ``memory`` entry of one person may take in this process: its
#: data (one object's column values, identity key, a row), the Beaker
#: tuple and the key (~75 characters), the LRU slot, and the shell's
#: column names: about 3 KiB measured, where a request's Session, identity
#: map and listeners, kept by the entry, took ten times that.
MEMORY_ENTRY_BYTES = 6 * 1024
#: Bytes per request that may stay for regions whose entries live elsewhere
#: (a file, Redis) or die with the request (``ext:local_session``): none
#: of their own; what tracemalloc sees is the process's bounded caches
#: filling (sqlite3's statements, urllib's splits, dictionaries resized),
#: 0.4 to 1.8 KiB a request over these few requests.
OTHER_ENTRY_BYTES = 4 * 1024


def live(kind: type) -> int:
    return sum(1 for obj in gc.get_objects() if isinstance(obj, kind))


def listeners() -> int:
    return len(registry._key_to_collection)


def _app(db_url, any_region, region_options):
    options = {key: str(value) for key, value in region_options[any_region].items()}
    return TestApp(make_app(db_url, options))


def test_requests_end_with_their_sessions(db_url, any_region, region_options):
    app = _app(db_url, any_region, region_options)

    def requests(first: int, count: int) -> None:
        for n in range(first, first + count):
            assert app.get(f"/people/{n % 20 + 1}/variant/{n}").json == {"name": f"person {n % 20 + 1}"}

    requests(-20, 20)  # warm: compiled statements, memoized attributes, the pool
    gc.collect()
    sessions, requests_alive, registered = live(SASession), live(Request), listeners()
    requests(0, REQUESTS[any_region])
    gc.collect()
    assert live(SASession) <= sessions
    assert live(Request) <= requests_alive
    assert listeners() <= registered
    count = MEASURED[any_region]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        requests(REQUESTS[any_region], count)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    bound = MEMORY_ENTRY_BYTES if any_region == "memory" else OTHER_ENTRY_BYTES
    assert grown / count < bound, f"{grown / count:.0f} bytes per request"


#: What the objects of an entry reach that belongs to the process, not to a
#: request: the mappers, their properties and loader paths, tables and types.
#: (The attribute implementations behind a collection's adapter are
#: ``_AttributeImpl`` in SQLAlchemy 2.1, ``AttributeImpl`` in 2.0.)
GLOBAL = (
    ClassManager,
    Mapper,
    MapperProperty,
    PathRegistry,
    SchemaItem,
    TypeEngine,
    getattr(attributes, "_AttributeImpl", None) or attributes.AttributeImpl,
    ModuleType,
    MappingProxyType,
)


def _referents(root: object, limit: int = 100_000) -> list:
    """Every object reachable from ``root`` (classes, modules and functions' globals left out)."""
    seen = {id(root)}
    todo, found = [root], []
    while todo and len(found) < limit:
        obj = todo.pop()
        found.append(obj)
        for child in gc.get_referents(obj):
            if isinstance(child, (type, *GLOBAL)) or id(child) in seen:
                continue
            if isinstance(child, dict) and "__builtins__" in child:  # a module's globals
                continue
            seen.add(id(child))
            todo.append(child)
    return found


@pytest.mark.parametrize("unique", [False, True], ids=["rows", "joined collection"])
def test_a_stored_value_reaches_no_session(Session, cache, unique):
    stmt = select(Person).where(Person.id <= 2).order_by(Person.id)
    if unique:
        stmt = stmt.options(joinedload(Person.addresses))
    marker = type("Marker", (), {})()
    with Session(info={**cache.session_info(), "request": marker}) as session:
        result = cached_query(session, stmt, region="memory")
        (result.unique() if unique else result).scalars().all()
        local = cached_query(session, stmt, region="local")
        (local.unique() if unique else local).scalars().all()
        values = [stored for _, _, stored in cache.regions["memory"].cache_for().namespace.dictionary._data.values()]
        values += list(session.info["sessioncache.local"].values())
        assert values
        for value in values:
            reached = _referents(value)
            assert not [obj for obj in reached if isinstance(obj, SASession) or obj is marker]
            assert not [obj for obj in reached if type(obj).__name__ in ("QueryContext", "Connection", "Request")]
            assert not [obj for obj in reached if type(obj).__name__ == "function" and obj.__closure__]


def test_the_engine_alone_keeps_no_session(engine, cache):
    Session = sessionmaker(bind=engine, info=cache.session_info())
    stmt = select(Person).where(Person.id == 1)

    def one_request(n: int) -> weakref.ref:
        marker = type("Marker", (), {})()  # what a request would be
        with Session(info={**cache.session_info(), "request": marker}) as session:
            cached_query(session, stmt.where(Person.name != f"nobody {n}"), region="memory").scalar_one()
        return weakref.ref(marker)

    refs = [one_request(n) for n in range(500)]
    gc.collect()
    assert [ref for ref in refs if ref() is not None] == []
