"""The ``file`` backend: one private signed file per entry, no lock files left, a hit that does not grow.

And the ``dbm`` backend's damaged files and removed directories.
"""

from __future__ import annotations

import contextlib
import dbm
import os
import shutil
import sqlite3
import stat
import tempfile
import threading
import time

import pytest
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from pyramid_sessioncache import FromCache, SessionCache
from pyramid_sessioncache.errors import SharedDirectoryError
from pyramid_sessioncache.storage.backends.filelock import FileLock

from .conftest import SECRET
from .models import Person


@pytest.fixture
def data_dir(tmp_path) -> str:
    return str(tmp_path / "data")


@pytest.fixture
def lock_dir(tmp_path) -> str:
    return str(tmp_path / "locks")


def file_cache(data_dir, lock_dir=None, **more) -> SessionCache:
    region = {"type": "file", "data_dir": data_dir, **more}
    if lock_dir:
        region["lock_dir"] = lock_dir
    return SessionCache({"f": region}, secret=SECRET)


def files_under(directory: str) -> list[str]:
    return [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]


def by_id(person_id: int):
    return select(Person.name).where(Person.id == person_id).options(FromCache("f"))


def test_files_are_private_and_no_lock_file_is_left(engine, sql, data_dir, lock_dir):
    cache = file_cache(data_dir, lock_dir)
    Session = sessionmaker(bind=engine, info=cache.session_info())
    for person_id in range(1, 21):
        with Session() as session:
            session.execute(by_id(person_id)).all()
    files = files_under(data_dir)
    entries = [path for path in files if f"{os.sep}sessioncache{os.sep}" in path]
    assert len(entries) >= 20
    for path in files:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    for root, directories, _ in os.walk(data_dir):
        for name in directories:
            assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700
    assert files_under(lock_dir) == []  # every creation lock removed its file
    assert not [path for path in files if path.endswith(".tmp")]


def test_a_shared_data_dir_is_refused(tmp_path, data_dir):
    os.makedirs(data_dir)
    os.chmod(data_dir, 0o777)
    with pytest.raises(SharedDirectoryError, match=f"cache.f.data_dir = '{data_dir}'.*other users can write.*0777"):
        file_cache(data_dir)
    os.chmod(data_dir, 0o770)
    with pytest.raises(SharedDirectoryError, match="its group can write"):
        file_cache(data_dir)
    assert file_cache(data_dir, allow_shared_dir=True).region("f").get("anything") is None
    os.chmod(data_dir, 0o700)
    assert file_cache(data_dir).region("f").get("anything") is None


def test_a_directory_above_that_others_can_write_is_refused_unless_sticky(tmp_path):
    above = tmp_path / "open"
    above.mkdir()
    os.chmod(above, 0o777)
    with pytest.raises(SharedDirectoryError, match=f"other users can write to {above} "):
        file_cache(str(above / "data"))
    os.chmod(above, 0o1777)  # like /tmp: others cannot rename what is not theirs
    assert file_cache(str(above / "data")).region("f").get("anything") is None


def test_a_shared_lock_dir_is_refused(data_dir, lock_dir):
    os.makedirs(lock_dir)
    os.chmod(lock_dir, 0o777)
    with pytest.raises(SharedDirectoryError, match="cache.f.lock_dir"):
        file_cache(data_dir, lock_dir)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory away takes root")
def test_a_directory_of_another_user_is_refused(data_dir):
    os.makedirs(data_dir)
    os.chown(data_dir, 4242, -1)
    with pytest.raises(SharedDirectoryError, match="belongs to another user"):
        file_cache(data_dir)


def test_the_add_on_names_the_setting_at_start_up(data_dir):
    os.makedirs(data_dir)
    os.chmod(data_dir, 0o757)
    settings = {"cache.regions": "f", "cache.f.type": "file", "cache.f.data_dir": data_dir}
    config = Configurator(settings={**settings, "sessioncache.secret": SECRET})
    with pytest.raises(ConfigurationError, match="cache.f.data_dir.*cache.f.allow_shared_dir = true"):
        config.include("pyramid_sessioncache")
    config = Configurator(settings={**settings, "sessioncache.secret": SECRET, "cache.f.allow_shared_dir": "true"})
    config.include("pyramid_sessioncache")
    config.commit()


def test_an_expired_entry_is_removed_when_read(data_dir):
    region = file_cache(data_dir).region("f")
    # 3 s: read back within it on a loaded machine too (1 s was not always).
    region.put("short", "value", expire=3)
    region.put("long", "value")
    path = region.cache_for().namespace.path(b"short")
    assert os.path.exists(path) and region.get("short") == "value"
    time.sleep(3.1)
    assert region.get("short") is None
    assert not os.path.exists(path)
    assert region.get("long") == "value"


def test_a_sweep_removes_expired_entries_and_what_dead_processes_left(data_dir, lock_dir):
    region = file_cache(data_dir, lock_dir).region("f")
    namespace = region.cache_for().namespace
    for i in range(40):
        region.put(f"short {i}", i, expire=1)
    region.put("long", "value")
    old = time.time() - 3600
    leftover = os.path.join(os.path.dirname(namespace.path(b"long")), ".half-written.tmp")
    with open(leftover, "wb") as file:
        file.write(b"x")
    os.utime(leftover, (old, old))
    abandoned = os.path.join(namespace.lock_directory, "abandoned.lock")
    held = FileLock(os.path.join(namespace.lock_directory, "held.lock"))
    held.acquire()
    with open(abandoned, "wb"):
        pass
    for path in (abandoned, held.path):
        os.utime(path, (old, old))
    time.sleep(1.1)
    removed = sum(namespace.sweep() for _ in range(256))  # each sweep looks at 1/256 of the region
    assert removed == 40 + 2
    assert region.get("long") == "value"
    assert not os.path.exists(leftover) and not os.path.exists(abandoned)
    assert os.path.exists(held.path)  # somebody holds it: left alone
    held.release()
    assert not os.path.exists(held.path)


def test_writes_sweep_as_they_go(data_dir):
    region = file_cache(data_dir).region("f")
    namespace = region.cache_for().namespace
    for i in range(200):
        region.put(f"short {i}", i, expire=1)
    time.sleep(1.1)
    before = len(files_under(namespace.directory))
    namespace.SWEEP_EVERY = 4  # sooner than by default, to keep the test short
    for i in range(namespace.SWEEP_EVERY * 64):
        region.put(f"other {i % 10}", i)  # the same ten entries, over and over
    assert len(files_under(namespace.directory)) < before - 20  # a quarter of the region was swept


def io_counters() -> dict[str, int]:
    with open("/proc/self/io") as file:
        return {name: int(value) for name, value in (line.split(": ") for line in file)}


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux's /proc/self/io")
def test_a_hit_reads_its_entry_alone_whatever_the_size_of_the_region(data_dir):
    # Beaker's file namespace read and rewrote the whole region on every access.
    region = file_cache(data_dir).region("f")
    value = [(i, f"name {i}") for i in range(20)]

    def bytes_of_a_hit() -> tuple[int, int]:
        before = io_counters()
        assert region.get("probe") == value
        after = io_counters()
        return after["rchar"] - before["rchar"], after["wchar"] - before["wchar"]

    region.put("probe", value)
    small = [bytes_of_a_hit() for _ in range(5)]
    for i in range(2000):
        region.put(f"key {i}", value)
    large = [bytes_of_a_hit() for _ in range(5)]
    # Reading /proc/self/io counts too: its size changes with its digits.
    assert abs(min(large)[0] - min(small)[0]) <= 8
    assert min(small)[1] == min(large)[1] == 0  # and writes nothing
    assert min(small)[0] < 2 * os.path.getsize(region.cache_for().namespace.path(b"probe"))


def test_beaker_cache_reads_and_writes_what_the_region_does(data_dir):
    region = file_cache(data_dir).region("f")
    beaker_cache = region.cache_for()
    region.put("mine", {"a": 1})
    assert beaker_cache.get("mine") == {"a": 1}
    beaker_cache.put("theirs", [1, 2])
    assert region.get("theirs") == [1, 2]
    assert "theirs" in beaker_cache
    region.remove("theirs")
    assert region.get("theirs") is None
    region.clear()
    assert region.get("mine") is None
    assert files_under(region.cache_for().namespace.directory) == []
    region.put("after", 1)
    assert region.get("after") == 1


def test_a_region_too_large_to_read_is_not_read(data_dir, caplog):
    region = file_cache(data_dir, max_entry_bytes=1000).region("f")
    region.put("small", "x" * 100)
    path = region.cache_for().namespace.path(b"small")
    with open(path, "ab") as file:
        file.write(b"x" * 10_000)  # somebody makes it huge
    assert region.get("small") is None


def test_file_locks_exclude_each_other_and_leave_nothing(tmp_path):
    path = str(tmp_path / "locks" / "one.lock")
    counter = tmp_path / "counter"
    counter.write_text("0")
    errors = []

    def work() -> None:
        try:
            for _ in range(30):
                lock = FileLock(path)
                lock.acquire()
                try:
                    value = int(counter.read_text())
                    time.sleep(0.0005)
                    counter.write_text(str(value + 1))
                finally:
                    lock.release()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert counter.read_text() == str(6 * 30)  # no two holders at once
    assert not os.path.exists(path)
    holder, other = FileLock(path), FileLock(path)
    assert holder.acquire(wait=False) and holder.held
    assert not other.acquire(wait=False)  # held elsewhere: no wait
    holder.release()
    assert other.acquire(wait=False)
    other.release()
    assert os.listdir(tmp_path / "locks") == []


@pytest.mark.parametrize("kind", ["file", "dbm"])
def test_a_region_of_files_needs_a_data_dir(kind):
    with pytest.raises(ValueError, match="data_dir"):
        SessionCache({"f": {"type": kind}}, secret=SECRET)


# -- dbm: damaged files, removed directories ------------------------------------------------


def dbm_cache(data_dir, lock_dir) -> SessionCache:
    region = {"type": "dbm", "data_dir": data_dir, "lock_dir": lock_dir}
    return SessionCache({"f": region}, secret=SECRET, retry_after=0.1)


def _counts(Session, sql, person_id: int = 3) -> list[int]:
    """Read ``person_id`` three times, ``retry_after`` apart; return the statements each read ran."""
    counts = []
    for _ in range(3):
        sql.reset()
        with Session() as session:
            assert session.execute(by_id(person_id)).all() == [(f"person {person_id}",)]
        counts.append(sql.count)
        time.sleep(0.15)
    return counts


@pytest.mark.parametrize("damage", [b"\x00\x01not an index\n", b"'k', (0, 1)\n'half a line", b"1, (0, 1)\n"])
@pytest.mark.parametrize("which", ["entries", "versions"])
def test_a_damaged_dbm_database_is_a_miss_then_made_again(engine, sql, data_dir, lock_dir, caplog, damage, which):
    """An index dbm.dumb cannot read: answered from the database with a warning, never an error; then cached again."""
    cache = dbm_cache(data_dir, lock_dir)
    Session = sessionmaker(bind=engine, info=cache.session_info())
    with Session() as session:
        session.execute(by_id(3)).all()  # stored
    region = cache.region("f")
    namespace = region.cache_for().namespace if which == "entries" else region.tokens.namespace
    with open(namespace.file + ".dir", "wb") as file:
        file.write(damage)
    with caplog.at_level("WARNING", logger="pyramid_sessioncache"):
        assert _counts(Session, sql) == [1, 1, 0]  # a miss, stored in new files once retried, a hit
    assert "cannot be read" in caplog.text and "its files are removed" in caplog.text
    for path in files_under(data_dir):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path


def test_a_dbm_region_makes_its_databases_with_the_modules_it_knows(data_dir, lock_dir):
    """Not with ``dbm.sqlite3``, which ``dbm.open()`` makes new databases with from Python 3.13 on."""
    cache = dbm_cache(data_dir, lock_dir)
    region = cache.region("f")
    for namespace in (region.cache_for().namespace, region.tokens.namespace):
        assert dbm.whichdb(namespace.file) in ("dbm.gnu", "dbm.ndbm", "dbm.dumb"), namespace.file
    cache.close()


def test_a_sqlite_database_where_a_dbm_region_keeps_its_own_is_a_miss_then_made_again(
    engine, sql, data_dir, lock_dir, caplog
):
    """One ``dbm.sqlite3`` made (Python 3.13's ``dbm.open()``): removed with its ``-wal`` and ``-shm``, made anew."""
    cache = dbm_cache(data_dir, lock_dir)
    Session = sessionmaker(bind=engine, info=cache.session_info())
    with Session() as session:
        session.execute(by_id(3)).all()  # stored
    namespace = cache.region("f").cache_for().namespace
    for suffix in (".dat", ".dir", ".bak"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(namespace.file + suffix)
    planted = sqlite3.connect(namespace.file)  # held open: its -wal and -shm stay
    planted.execute("PRAGMA journal_mode = WAL")
    planted.execute("CREATE TABLE IF NOT EXISTS Dict (key BLOB UNIQUE NOT NULL, value BLOB NOT NULL)")
    planted.commit()
    assert os.path.exists(namespace.file + "-wal") and os.path.exists(namespace.file + "-shm")
    try:
        with caplog.at_level("WARNING", logger="pyramid_sessioncache"):
            assert _counts(Session, sql) == [1, 1, 0]  # a miss, stored in new files once retried, a hit
    finally:
        planted.close()
    assert "cannot be read" in caplog.text
    assert dbm.whichdb(namespace.file) in ("dbm.gnu", "dbm.ndbm", "dbm.dumb")
    assert not any(os.path.exists(namespace.file + suffix) for suffix in ("-wal", "-shm"))


def _as_another_user(body) -> int:
    """Run ``body()`` (it returns an exit code) where mode 000 means unreadable: in a child, as nobody, when root."""
    if os.geteuid() != 0:
        return body()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            os.setgid(65534)
            os.setuid(65534)
            code = body()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.parametrize("access", ["read", "write"])
def test_a_dbm_index_the_process_cannot_read_is_a_backend_failure_and_is_kept(access):
    """Not taken for a damaged database (``whichdb()`` says "none there" of what it cannot open) and removed."""
    import ast  # noqa: F401 - what dbm.dumb imports, imported before the child is nobody
    import dbm.dumb  # noqa: F401
    import encodings.latin_1  # noqa: F401

    from pyramid_sessioncache.storage.backends.dbm import DamagedDatabaseError, DBMNamespace

    # pytest's own temporary directories are root's alone: nobody could not reach this one.
    data_dir = tempfile.mkdtemp(prefix="sessioncache-dbm-", dir="/tmp")
    if os.geteuid() == 0:
        os.chown(data_dir, 65534, 65534)

    def body() -> int:
        namespace = DBMNamespace("ns", data_dir, os.path.join(data_dir, "locks"))
        namespace.set_many({b"k": b"v"})
        os.chmod(namespace.file + ".dir", 0)
        try:
            if access == "read":
                namespace.get_many([b"k"])
            else:
                namespace.set_many({b"x": b"y"})
        except DamagedDatabaseError:
            return 1  # removed as damaged
        except PermissionError:
            pass
        else:
            return 2
        if not os.path.exists(namespace.file + ".dir"):
            return 3
        os.chmod(namespace.file + ".dir", 0o600)
        return 0 if namespace.get_many([b"k"]) == [b"v"] else 4

    try:
        assert _as_another_user(body) == 0
    finally:
        shutil.rmtree(data_dir)


def test_a_dbm_database_damaged_before_start_up_is_made_again(engine, sql, data_dir, lock_dir):
    dbm_cache(data_dir, lock_dir).close()
    for path in files_under(data_dir):
        if path.endswith(".dir"):
            with open(path, "wb") as file:
                file.write(b"'k', (0, 1)\n'half a line")
    Session = sessionmaker(bind=engine, info=dbm_cache(data_dir, lock_dir).session_info())
    assert _counts(Session, sql)[1:] == [0, 0]


def test_dbm_directories_removed_while_running_are_made_again_private(engine, sql, data_dir, lock_dir):
    """A temporary-files cleaner removes data_dir and lock_dir: pages are answered, then caching resumes."""
    cache = dbm_cache(data_dir, lock_dir)
    Session = sessionmaker(bind=engine, info=cache.session_info())
    assert _counts(Session, sql, 4)[1:] == [0, 0]
    shutil.rmtree(data_dir)
    shutil.rmtree(lock_dir)
    counts = _counts(Session, sql, 4)
    assert counts[0] == 1 and counts[-1] == 0, counts
    namespace = cache.region("f").cache_for().namespace
    made = [data_dir, os.path.dirname(namespace.file), lock_dir, namespace.lock_directory]
    for path in made:  # as at start-up (Beaker's access lock makes its own below them)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700, path
