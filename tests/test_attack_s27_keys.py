"""Attack s27: keys that Beaker's encoding (``backslashreplace``) gives the same bytes.

``"é"`` and the four characters ``"\\xe9"`` were stored under one key:
two labels (``FromCache(cache_key=...)``) or two keys of a region shared
one entry and one entry's version.  Every key must now be stored under
bytes of its own, in every region, and still hit itself; hits are proven
by counting statements.
"""

from __future__ import annotations

import contextlib
import sqlite3

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, select, update
from sqlalchemy.orm import sessionmaker

from pyramid_sessioncache import FromCache, SessionCache, cache_parameters, invalidate
from pyramid_sessioncache.engine.cache_options import MAX_LABEL
from pyramid_sessioncache.storage.keys import encode_key, key_bytes
from pyramid_sessioncache.storage.versions import entry_version, is_entry_version

from .conftest import SECRET, SQLCounter, use_region

_COUNT = Table("s27k_count", MetaData(), Column("id", Integer, primary_key=True), Column("n", Integer))
_COUNTS = select(_COUNT.c.n).order_by(_COUNT.c.id)

#: Pairs of keys that ``key.encode("ascii", "backslashreplace")`` gives the same bytes.
_ALIKE = [
    ("é", "\\xe9"),
    ("ü:x", "\\xfc:x"),
    ("\u20ac", "\\u20ac"),
    ("\U0001f600", "\\U0001f600"),
    ("entry.é", "entry.\\xe9"),
    ("\\é", "\\\\xe9"),
]
#: Keys that must each be stored apart from every other, and read back.
_ODD = [
    "",
    "\\",
    "\\\\",
    "\\\\\\",
    "\\x",
    "\\x00",
    "\x00",
    "a\x00b",
    "\x7f",
    "\x80",
    "\xff",
    "\\xff",
    "\U0010ffff",
    "\\U0010ffff",
    "\ud83d\ude00",  # a surrogate pair as two code points: not the character they stand for
    "\U0001f600",
    "\\ud83d\\ude00",
    "entry.",
    "entry.\\",
    "entry\\.",
    "entr\\y.",
    "\\entry.",
    "ascii:0123456789abcdef",
    "é" * 600,  # longer than Redis keys Beaker spells in full
    "\\xe9" * 600,
    "é" * MAX_LABEL,  # the longest labels
    "\\xe9" * (MAX_LABEL // 4),
    "\U0001f600" * MAX_LABEL,
    "\\U0001f600" * (MAX_LABEL // 10),
    *(key for pair in _ALIKE if pair[0] != "\U0001f600" for key in pair),
]
#: Those that may label a query: printable, and not too long.
_LABELS = [key for key in _ODD if key.isprintable() and len(key) <= MAX_LABEL]


def _database(tmp_path) -> str:
    path = tmp_path / "keys.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE s27k_count (id INTEGER PRIMARY KEY, n INTEGER); INSERT INTO s27k_count VALUES (1, 0);"
    )
    db.commit()
    db.close()
    return f"sqlite:///{path}"


def _rows(session, region: str, label: str) -> list[tuple]:
    return [tuple(row) for row in session.execute(_COUNTS.options(FromCache(region, cache_key=label))).all()]


def _region(request, region_options, tmp_path, name: str) -> str:
    """Return the region ``name``, made ready in ``region_options``: ``dbm``, or Redis with a ``near`` cache too."""
    if name == "dbm":
        region_options["dbm"] = {"type": "dbm", "data_dir": str(tmp_path / "dbm"), "lock_dir": str(tmp_path / "dbm-l")}
    elif name == "near":
        region_options["near"] = {"type": "ext:redis", "url": request.getfixturevalue("redis_url"), "near": True}
    return use_region(request, region_options, name)


@contextlib.contextmanager
def _region_and_session(request, region_options, tmp_path, name: str):
    """The region ``name`` of a new SessionCache (see :func:`_region`), and a Session to use it with."""
    _region(request, region_options, tmp_path, name)
    cache = SessionCache(region_options, secret=SECRET)
    with sessionmaker(create_engine("sqlite://"))() as session:
        region = cache.region(name)
        # Redis outlives a test (one server per worker): what another test stored under these keys goes.
        for key in {*_ODD, *(key for pair in _ALIKE for key in pair)}:
            region.remove(key, session)
        yield region, session
    cache.close()


# The encoding ---------------------------------------------------------------------------------------------


def test_every_key_has_bytes_of_its_own_that_read_back_as_it():
    assert len(set(_ODD)) == len(_ODD)
    encoded = [encode_key(key) for key in _ODD]
    assert len(set(encoded)) == len(_ODD)
    for key, data in zip(_ODD, encoded, strict=True):
        assert data.isascii()
        assert data.decode("unicode_escape") == key  # decodable, so no two keys share bytes
        assert key_bytes(key) == data and key_bytes(data) is data
        assert is_entry_version(data) == key.startswith("entry.")
        assert is_entry_version(encode_key(entry_version(key)))


def test_plain_keys_are_stored_as_beaker_stores_them():
    # The add-on's own keys (hex digests, labels of plain ASCII) keep
    # their bytes: what a running version stored is still found.
    for key in ["", "0123456789abcdef" * 2, "people:0123456789abcdef", "a b/c?d=e&f:%s{}", "\x00\x7f"]:
        assert encode_key(key) == key.encode("ascii", "backslashreplace")


# A region's own API: put, get, remove, and its Beaker Cache ------------------------------------------------


@pytest.mark.parametrize("name", ["local", "memory", "file", "dbm", "redis", "near"])
def test_a_region_keeps_keys_that_beaker_encodes_alike_apart(tmp_path, request, region_options, name):
    with _region_and_session(request, region_options, tmp_path, name) as (region, session):
        for first, second in _ALIKE:
            region.put(first, ("value of", first), session)
            assert region.get(second, session) is None
            region.put(second, ("value of", second), session)
            assert region.get(first, session) == ("value of", first)
            assert region.get(second, session) == ("value of", second)
            beaker_cache = region.cache_for(session)
            assert beaker_cache.get(first) == ("value of", first)
            assert beaker_cache.get(second) == ("value of", second)
            region.remove(first, session)
            assert region.get(first, session) is None
            assert region.get(second, session) == ("value of", second)
            assert second in beaker_cache and first not in beaker_cache


@pytest.mark.parametrize("name", ["local", "memory", "file", "dbm", "redis", "near"])
def test_a_region_reads_back_every_odd_key(tmp_path, request, region_options, name):
    with _region_and_session(request, region_options, tmp_path, name) as (region, session):
        for n, key in enumerate(_ODD):
            region.put(key, n, session)
        assert [region.get(key, session) for key in _ODD] == list(range(len(_ODD)))


# Labels: hits, counted ------------------------------------------------------------------------------------


@pytest.mark.parametrize("invalidation", ["manual", "auto"])
@pytest.mark.parametrize("name", ["local", "memory", "file", "dbm", "redis", "near"])
def test_labels_that_beaker_encodes_alike_are_each_a_hit_and_invalidated_alone(
    tmp_path, request, region_options, name, invalidation
):
    # One Session throughout, so that the local region keeps its entries.
    region = _region(request, region_options, tmp_path, name)
    cache = SessionCache(region_options, invalidation=invalidation, secret=SECRET)
    engine = create_engine(_database(tmp_path))
    counter = SQLCounter(engine)
    labels = [label for pair in _ALIKE for label in pair]
    with sessionmaker(engine, info=cache.session_info())() as session:
        assert [_rows(session, region, label) for label in labels] == [[(0,)]] * len(labels)
        assert counter.count == len(labels)  # each its own entry
        counter.reset()
        assert [_rows(session, region, label) for label in labels] == [[(0,)]] * len(labels)
        assert counter.count == 0  # each a hit
        for label in labels:
            invalidate(_COUNTS, session, region, cache_key=label, cache=cache)
            assert _rows(session, region, label) == [(0,)]
            assert counter.count == 1  # its own entry forgotten...
            assert _rows(session, region, label) == [(0,)]
            assert counter.count == 1  # ... and stored again
            counter.reset()
        assert [_rows(session, region, label) for label in labels] == [[(0,)]] * len(labels)
        assert counter.count == 0  # none forgotten with another
    engine.dispose()
    cache.close()


@pytest.mark.parametrize("name", ["memory", "file", "dbm", "redis", "near"])
def test_odd_labels_hit_themselves_and_are_invalidated_by_their_own_name(tmp_path, request, region_options, name):
    # Manual invalidation: each entry records its own version, named after
    # its key, in the versions namespace beside the table versions.
    region = _region(request, region_options, tmp_path, name)
    cache = SessionCache(region_options, invalidation="manual", secret=SECRET)
    engine = create_engine(_database(tmp_path))
    Sess = sessionmaker(engine, info=cache.session_info())
    with Sess() as session:
        assert {label: _rows(session, region, label) for label in _LABELS} == dict.fromkeys(_LABELS, [(0,)])
    counter = SQLCounter(engine)
    with Sess() as session:
        assert {label: _rows(session, region, label) for label in _LABELS} == dict.fromkeys(_LABELS, [(0,)])
    assert counter.count == 0  # each a hit, in a new Session
    for n, label in enumerate(_LABELS[-4:], 1):  # "entry.é", "entry.\\xe9", "\\é", "\\\\xe9"
        with Sess() as session:
            session.execute(update(_COUNT).values(n=n))
            again = invalidate(_COUNTS, session, region, cache_key=label, cache=cache)
            session.commit()
        again()
        with Sess() as session:
            counter.reset()
            assert _rows(session, region, label) == [(n,)]
            assert _rows(session, region, label) == [(n,)]
            assert counter.count == 1  # read once, then a hit
    engine.dispose()
    cache.close()


@pytest.mark.parametrize("name", ["local", "memory", "file", "dbm", "redis", "near"])
def test_cache_parameters_give_the_beaker_cache_and_key_of_what_a_label_stored(tmp_path, request, region_options, name):
    region = _region(request, region_options, tmp_path, name)
    cache = SessionCache(region_options, secret=SECRET)
    engine = create_engine(_database(tmp_path))
    with sessionmaker(engine, info=cache.session_info())() as session:
        for stored, other in _ALIKE:
            assert _rows(session, region, stored) == [(0,)]
            beaker_cache, key = cache_parameters(_COUNTS, session, region, cache_key=stored)
            assert key.startswith(stored + ":")
            assert key in beaker_cache
            assert beaker_cache.get(key) is not None
            _, other_key = cache_parameters(_COUNTS, session, region, cache_key=other)
            assert other_key not in beaker_cache  # nothing stored under the other label
            beaker_cache.remove(key)
            counter = SQLCounter(engine)
            assert _rows(session, region, stored) == [(0,)]
            assert counter.count == 1  # removed through Beaker's Cache: a miss
    engine.dispose()
    cache.close()
