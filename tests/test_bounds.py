"""Byte bounds: an entry's size in every region, a memory region's bytes, a Session's local entries."""

from __future__ import annotations

import gc
import logging
import os
import tracemalloc

import pytest
import redis
from sqlalchemy import String, TypeDecorator, create_engine, func, literal, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from pyramid_sessioncache import FromCache, SessionCache, cache_parameters, cached_query, parse_settings
from pyramid_sessioncache.storage import signing
from pyramid_sessioncache.storage.backends import local_session
from pyramid_sessioncache.storage.backends.memory import LRUDict

from .conftest import SECRET
from .models import Person
from .tampering import Backend, options

KIB = 1024


def blob(chars: int, region: str, tag: int = 0):
    """A query whose one value is ``chars`` characters long (``tag`` makes it another key)."""
    return select(func.hex(func.zeroblob(chars // 2)), literal(tag)).options(FromCache(region))


@pytest.fixture(params=["memory", "file", "dbm", "redis"])
def kind(request) -> str:
    return request.param


@pytest.fixture
def bounded(kind, tmp_path, request) -> SessionCache:
    """A region ``r`` of ``kind`` whose entries are at most 100 KiB."""
    if kind == "memory":
        region = {"type": "memory"}
    else:
        region = options(kind, tmp_path, request.getfixturevalue("redis_url") if kind == "redis" else None)
    if kind == "redis":  # what earlier tests left in region "r" is no entry of this one's
        redis.Redis.from_url(request.getfixturevalue("redis_url")).flushall()
    cache = SessionCache({"r": {**region, "max_entry_bytes": 100 * KIB}}, secret=SECRET)
    yield cache
    if kind == "redis":
        redis.Redis.from_url(request.getfixturevalue("redis_url")).flushall()


def stored_sizes(cache: SessionCache) -> list[int]:
    """The sizes of the entries region ``r`` holds, as its backend holds them."""
    region = cache.region("r")
    namespace = region.cache_for().namespace
    if region.type == "memory":
        return list(namespace.dictionary._sizes.values())
    if region.type == "ext:redis":
        client = namespace.client
        return [client.strlen(key) for key in client.scan_iter(f"beaker_cache:{region.namespace_name}:*")]
    if region.type == "file":
        return [
            os.path.getsize(os.path.join(root, name))
            for root, _, names in os.walk(namespace.directory)
            for name in names
        ]
    namespace.acquire_read_lock()
    try:
        keys = list(namespace.db.keys())  # a dbm object is not iterable
        return [len(namespace.db[key]) for key in keys]
    finally:
        namespace.release_read_lock()


def test_an_entry_larger_than_max_entry_bytes_runs_uncached(engine, sql, bounded, kind, caplog):
    Session = sessionmaker(bind=engine, info=bounded.session_info())
    with caplog.at_level(logging.WARNING, logger="pyramid_sessioncache"):
        for _ in range(2):
            for tag in range(30):  # a flood of distinct large results: 30 x 200 KiB
                with Session() as session:
                    assert len(session.execute(blob(200 * KIB, "r", tag)).scalar()) == 200 * KIB
    # None was stored: each ran, and the first of its shape twice (it learnt
    # the tables it reads: see engine/hook.py).
    assert sql.count == 61
    too_large = [r for r in caplog.records if "max_entry_bytes" in r.getMessage()]
    assert len(too_large) == 1  # once per kind of query and region, not per key
    assert stored_sizes(bounded) == []
    sql.reset()
    for _ in range(2):
        with Session() as session:
            assert len(session.execute(blob(50 * KIB, "r")).scalar()) == 50 * KIB
    assert sql.count == 1  # a smaller one is stored, and hit
    sizes = stored_sizes(bounded)
    assert len(sizes) == 1 and 50 * KIB < sizes[0] <= 100 * KIB + signing.HEADER


def test_redis_memory_holds_under_a_flood_of_large_results(engine, redis_url):
    cache = SessionCache({"r": {"type": "ext:redis", "url": redis_url, "max_entry_bytes": 64 * KIB}}, secret=SECRET)
    client = redis.Redis.from_url(redis_url)
    Session = sessionmaker(bind=engine, info=cache.session_info())
    with Session() as session:
        session.execute(blob(10, "r")).all()
    before = client.info("memory")["used_memory"]
    for tag in range(40):  # 40 x 256 KiB: 10 MiB if they were stored
        with Session() as session:
            session.execute(blob(256 * KIB, "r", tag)).all()
    assert client.info("memory")["used_memory"] - before < 1024 * KIB
    client.flushall()


def test_a_memory_region_keeps_within_max_bytes_under_a_flood(engine):
    # About 1.5 KiB per entry: a budget of 128 KiB keeps about 90 of them.
    cache = SessionCache({"r": {"type": "memory", "max_bytes": 128 * KIB}})
    Session = sessionmaker(bind=engine, info=cache.session_info())
    dictionary = cache.region("r").cache_for().namespace.dictionary

    def flood(start: int, count: int) -> None:
        for tag in range(start, start + count):
            with Session() as session:
                session.execute(blob(KIB, "r", tag)).all()

    flood(0, 200)  # fills the budget, and warms every cache along the way
    gc.collect()
    tracemalloc.start()
    try:
        flood(200, 100)
        gc.collect()
        before, _ = tracemalloc.get_traced_memory()
        flood(300, 600)  # 600 KiB more of pickles, more in objects, if nothing were dropped
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert dictionary.bytes <= 128 * KIB
    assert 60 < len(dictionary) < 130
    assert after - before < 128 * KIB


def test_lru_dict_counts_bytes_and_drops_the_least_recently_used():
    lru = LRUDict(max_items=None, max_bytes=100)
    lru.put("a", 1, 40)
    lru.put("b", 2, 40)
    assert lru["a"] == 1  # a is now the most recent
    lru.put("c", 3, 40)  # over 100: b goes
    assert "b" not in lru and "a" in lru and lru.bytes == 80
    lru.put("a", 4, 10)  # replaced: counted once
    assert lru.bytes == 50
    del lru["a"]
    assert lru.bytes == 40
    lru.put("huge", 5, 101)  # larger than the whole budget: not kept
    assert "huge" not in lru and lru.bytes == 40
    with pytest.raises(KeyError):
        del lru["nothing"]
    lru.clear()
    assert len(lru) == 0 and lru.bytes == 0
    items = LRUDict(max_items=2, max_bytes=None)
    for key in "xyz":
        items[key] = key
    assert items.keys() == ["y", "z"] and items.bytes == 0


def test_a_session_keeps_a_bounded_number_of_local_entries(engine, sql):
    cache = SessionCache({"local": {"type": "ext:local_session", "max_items": 50}})
    Session = sessionmaker(bind=engine, info=cache.session_info())
    namespace = cache.region("local").namespace_name

    def read(session, tag: int) -> int:
        """Run the query of ``tag``; return how many SQL statements it sent."""
        sql.reset()
        cached_query(session, select(Person.name, literal(tag)).where(Person.id == 1), "local").all()
        return sql.count

    with Session() as session:
        for tag in range(500):  # a flood: 500 distinct queries in one request
            read(session, tag)
        assert len(local_session.entries(session)[namespace]) == 50
        assert read(session, 0) == 1  # the oldest went
        assert read(session, 460) == 0  # the 50 most recent stayed (0 pushed 450 out)
        for tag in range(1000, 1049):  # 49 more push out the 49 least recently used ...
            read(session, tag)
        assert read(session, 460) == 0  # ... not 460, read since
        assert read(session, 461) == 1
        assert len(local_session.entries(session)[namespace]) == 50
    default = SessionCache({"local": {"type": "ext:local_session"}})
    with sessionmaker(bind=engine, info=default.session_info())() as session:
        cached_query(session, select(Person.name), "local").all()
        assert local_session.entries(session)[default.region("local").namespace_name].max_items == 1000


def test_the_objects_of_shared_hits_a_session_keeps_are_bounded(engine):
    cache = SessionCache({"m": {"type": "memory"}})
    Session = sessionmaker(bind=engine, info=cache.session_info())

    def query(tag: int):
        return select(Person).where(Person.id == 1 + tag % 20, literal(tag) == tag)

    for tag in range(local_session.DEFAULT_MAX_ITEMS + 50):
        with Session() as session:
            cached_query(session, query(tag), "m").all()
    with Session() as session:
        for _ in range(2):  # the second hit of an entry keeps its objects
            for tag in range(local_session.DEFAULT_MAX_ITEMS + 50):
                cached_query(session, query(tag), "m").all()
        built = local_session.entries(session)[cache.region("m").namespace_name + ".objects"]
        assert len(built) == local_session.DEFAULT_MAX_ITEMS


class Base(DeclarativeBase):
    pass


class Counted:
    """A column value that counts how often it is pickled."""

    pickled = 0

    def __init__(self, text: str) -> None:
        self.text = text

    def __reduce__(self):
        Counted.pickled += 1
        return (Counted, (self.text,))


class CountedText(TypeDecorator):
    """Text read back as a :class:`Counted`."""

    impl = String
    cache_ok = True

    def process_result_value(self, value, dialect):
        return None if value is None else Counted(value)


class Thing(Base):
    __tablename__ = "thing"
    id: Mapped[int] = mapped_column(primary_key=True)
    payload = mapped_column(CountedText())


def test_a_value_is_pickled_once_when_it_is_stored(kind, tmp_path, request):
    engine = create_engine(f"sqlite:///{tmp_path / 'things.sqlite'}")
    Base.metadata.create_all(engine)
    with sessionmaker(bind=engine)() as session:
        session.add(Thing(id=1, payload="counted"))
        session.commit()
    if kind == "memory":
        region = {"type": "memory"}
    else:
        region = options(kind, tmp_path, request.getfixturevalue("redis_url") if kind == "redis" else None)
    if kind == "redis":  # what earlier tests left in region "r" is no entry of this one's
        redis.Redis.from_url(request.getfixturevalue("redis_url")).flushall()
    cache = SessionCache({"r": region}, secret=SECRET)
    Session = sessionmaker(bind=engine, info=cache.session_info())
    stmt = select(Thing.payload).where(Thing.id == 1).options(FromCache("r"))
    with Session() as session:  # learns the tables the shape reads
        session.execute(stmt).all()
    cache.region("r").clear()
    Counted.pickled = 0
    with Session() as session:
        session.execute(stmt).all()
    # Stored: pickled once (its size and what is written are one pickle).
    # The caller gets a copy of its own, a value that can change in place.
    assert Counted.pickled == 2
    with Session() as session:
        assert isinstance(session.execute(stmt).scalar(), Counted)  # a hit: a copy of its own, nothing stored
    assert Counted.pickled == 3
    engine.dispose()


def test_bound_settings_are_read_and_checked(tmp_path):
    from pyramid.exceptions import ConfigurationError

    settings = parse_settings(
        {
            "cache.regions": "m f",
            "cache.max_entry_bytes": "5000",
            "cache.m.max_bytes": "1000000",
            "cache.f.type": "file",
            "cache.f.data_dir": str(tmp_path),
            "cache.f.allow_shared_dir": "false",
            "sessioncache.secret": SECRET,
        }
    )
    assert settings.regions["m"] == {"type": "memory", "max_entry_bytes": 5000, "max_bytes": 1000000}
    assert settings.regions["f"]["allow_shared_dir"] is False
    cache = SessionCache(settings.regions, secret=settings.secret)
    assert cache.region("m").max_entry_bytes == cache.region("f").max_entry_bytes == 5000
    assert cache.region("m").cache_for().namespace.dictionary.max_bytes == 1000000
    for key, value in (
        ("cache.m.max_bytes", "lots"),
        ("cache.m.max_entry_bytes", "0"),
        ("cache.m.allow_shared_dir", "maybe"),
    ):
        with pytest.raises(ConfigurationError, match=key):
            parse_settings({"cache.regions": "m", key: value})


@pytest.mark.parametrize("kind", ["file", "dbm", "redis"], indirect=True)  # nobody else writes to memory
def test_a_planted_entry_larger_than_the_region_allows_is_a_miss(engine, sql, bounded, kind, caplog):
    Session = sessionmaker(bind=engine, info=bounded.session_info())
    stmt = blob(10, "r")
    with Session() as session:
        session.execute(stmt).all()
        key = cache_parameters(stmt, session=session)[1]
    Backend(bounded.region("r")).set_entry(key, signing.PREFIX + b"x" * (1024 * KIB))
    sql.reset()
    with caplog.at_level(logging.WARNING, logger="pyramid_sessioncache"), Session() as session:
        session.execute(stmt).all()
    assert sql.count == 1
    assert [r for r in caplog.records if r.levelno == logging.WARNING]
