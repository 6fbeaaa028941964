"""Hostile review of 7f7c7fc: "what only the cache held is gone".

Each case runs the same steps with the cache and compares with a plain
Session (``gc.collect()`` where the application lets go).
"""

from __future__ import annotations

import gc
import sys
import threading
import time
import weakref

import pytest
from sqlalchemy import JSON, select, update
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    joinedload,
    mapped_column,
    selectinload,
    sessionmaker,
)
from sqlalchemy.orm import (
    Session as PlainSession,
)

from pyramid_sessioncache import RelationshipCache, SessionCache, cached_query

from .conftest import SECRET, use_region
from .models import Address, Person

POINT = select(Person).where(Person.id == 1)


def _rename(engine, name: str = "renamed") -> None:
    with PlainSession(engine) as other:
        other.execute(update(Person).where(Person.id == 1).values(name=name))
        other.commit()


def _restreet(engine, street: str = "moved") -> None:
    with PlainSession(engine) as other:
        other.execute(update(Address).where(Address.id == 1).values(street=street))
        other.commit()


SHAPES = {
    "point": lambda: select(Person).where(Person.id == 1),
    "two_entities": lambda: select(Person, Address).join(Person.addresses).where(Person.id == 1),
    "entity_and_column": lambda: select(Person.name, Person).where(Person.id == 1),
    "selectin": lambda: select(Person).where(Person.id == 1).options(selectinload(Person.addresses)),
    "joined": lambda: select(Person).where(Person.id == 1).options(joinedload(Person.addresses)),
    "address_joined_person": lambda: select(Address).where(Address.id == 1).options(joinedload(Address.person)),
    "address": lambda: select(Address).where(Address.id == 1),
    "addresses_with_person_id": lambda: select(Address, Address.person_id).where(Address.person_id == 1),
    "address_selectin_person": lambda: select(Address).where(Address.id == 1).options(selectinload(Address.person)),
    "outer_none": lambda: (
        select(Person, Address)
        .outerjoin(Address, (Address.person_id == Person.id) & (Address.id < 0))
        .where(Person.id.in_([1, 2]))
        .order_by(Person.id)
    ),
}


def _read(session, shape, region):
    result = cached_query(session, SHAPES[shape](), region=region)
    if shape == "joined":
        result = result.unique()
    return result.all()


def _refs(rows):
    found = []
    for row in rows:
        for value in row:
            if hasattr(type(value), "_sa_class_manager"):
                found.append(weakref.ref(value))
    return found


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("reads", [1, 2, 3])
@pytest.mark.parametrize("region", ["local", "memory", "file"])
def test_no_object_survives_after_the_app_drops_it(engine, Session, shape, reads, region):
    with Session() as other:
        _read(other, shape, region)
    with Session() as session:
        refs = []
        for _ in range(reads):
            refs.extend(_refs(_read(session, shape, region)))
        _rename(engine)  # voids local entries too
        gc.collect()
        alive = [ref() for ref in refs if ref() is not None]
        assert alive == []
        assert len(session.identity_map) == 0


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("region", ["local", "memory", "file"])
def test_after_a_commit_plain_reads_are_fresh(engine, Session, shape, region):
    with Session() as other:
        _read(other, shape, region)
    with Session() as session:
        for _ in range(3):
            _read(session, shape, region)
        gc.collect()
        _rename(engine)
        _restreet(engine)
        assert session.get(Person, 1).name == "renamed"
        assert session.get(Address, 1).street == "moved"


@pytest.mark.parametrize("read", ["get", "uncached", "cached"])
def test_manual_invalidation_local_entry_keeps_no_stale_object_for_plain_reads(engine, read):
    """The manual-invalidation twin of test_kept_alive's local case: a commit voids local entries in every mode.

    It did not with ``invalidation="manual"``: the entry kept its objects
    alive, and plain reads returned the old values.
    """
    cache = SessionCache({"local": {"type": "ext:local_session"}}, invalidation="manual", secret=SECRET)
    Session = sessionmaker(engine, info=cache.session_info())
    with Session() as session:
        for _ in range(2):
            cached_query(session, POINT, region="local").all()
        gc.collect()
        _rename(engine)
        gc.collect()
        reads = {
            "get": lambda: session.get(Person, 1),
            "uncached": lambda: session.scalars(POINT).one(),
            "cached": lambda: cached_query(session, POINT, region="local").scalar_one(),
        }
        assert reads[read]().name == "renamed"


def test_relationship_cache_lazy_load_kept_alive(engine, Session):
    option = RelationshipCache(Person.addresses, "memory")
    with Session() as other:
        assert other.scalars(select(Person).where(Person.id == 1).options(option)).one().addresses
    with Session() as session:
        refs = []
        for _ in range(3):
            person = session.scalars(select(Person).where(Person.id == 1).options(option)).one()
            refs.extend(weakref.ref(a) for a in person.addresses)
            refs.append(weakref.ref(person))
            del person
        gc.collect()
        _restreet(engine)
        assert [r() for r in refs if r() is not None] == []
        assert session.get(Address, 1).street == "moved"


class ActsWhenAsked(str):
    """An application's key of ``Session.info``: the first time it is asked about once armed, ``act()`` runs.

    It stands for a thread switch at that point: another thread's commit
    or write runs while this thread reads its Session's ``info``.
    """

    def __new__(cls, value, act):
        made = super().__new__(cls, value)
        made.act = act
        made.armed = False
        return made

    def startswith(self, *args):
        if self.armed:
            self.armed = False
            self.act()
        return str.startswith(self, *args)

    __hash__ = str.__hash__
    __eq__ = str.__eq__


def test_a_commit_while_a_miss_copies_the_sessions_info_does_not_break_the_miss(engine, Session):
    """drop_everywhere() pops session.info of every Session, from the committing thread.

    A shared miss copies the caller's info for its loader (loader.load()),
    iterating the dict: a commit at that moment (another thread's) changes
    its size, and the miss fails with RuntimeError.
    """
    from .models import Tag

    key = ActsWhenAsked("application key", lambda: _rename(engine, "renamed meanwhile"))
    with Session() as session:
        session.info[key] = "value"
        cached_query(session, POINT, region="memory").all()
        cached_query(session, POINT, region="memory").all()  # a hit: the Session keeps local namespaces
        key.armed = True
        tags = cached_query(session, select(Tag).order_by(Tag.id), region="memory").scalars().all()
        assert not key.armed
        assert [tag.id for tag in tags] == [1, 2, 3]


def test_commits_in_one_thread_while_another_misses(engine, Session):
    """The same, with real threads: a reader missing and hitting while a writer commits."""
    from .models import Tag

    errors: list[BaseException] = []
    stop = threading.Event()

    def reader():
        with Session() as session:
            for i in range(2000):
                session.info[f"app {i}"] = i
            while not stop.is_set():
                try:
                    cached_query(session, POINT, region="memory").all()
                    cached_query(session, select(Tag), region="memory").all()
                    session.rollback()
                except BaseException as error:  # noqa: BLE001 - reported by the test
                    errors.append(error)
                    stop.set()

    def writer():
        n = 0
        while not stop.is_set():
            with PlainSession(engine) as other:
                other.execute(update(Tag).where(Tag.id == 1).values(name=f"tag {n}"))
                other.commit()
            n += 1

    _run_for([threading.Thread(target=reader), threading.Thread(target=writer)], 3, stop, switch=1e-6)
    assert errors == []


def _run_for(threads: list, seconds: float, stop: threading.Event, switch: float) -> None:
    """Run ``threads`` (the writer last), switching every ``switch`` seconds, until ``seconds`` pass, ``stop`` is set or the writer ends."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(switch)
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not stop.is_set() and threads[-1].is_alive():
            time.sleep(0.02)
        stop.set()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)


def _holding_only_a_child(session, cached: bool):
    statement = select(Person).where(Person.id == 1).options(selectinload(Person.addresses))
    for _ in range(3):
        if cached:
            person = cached_query(session, statement, region="memory").scalar_one()
        else:
            person = session.scalars(statement).one()
        child = person.addresses[0]
        del person
    gc.collect()
    return child


@pytest.mark.parametrize("cached", [False, True])
def test_holding_only_a_child_lets_the_parent_go(engine, Session, cached):
    with Session() as other:
        _holding_only_a_child(other, True)
    with Session() as session:
        child = _holding_only_a_child(session, cached)
        _rename(engine)
        assert child.street == "1 Main St"
        assert "person" not in child.__dict__
        assert session.get(Person, 1).name == "renamed"


SINGLE_NONE = (
    select(Address)
    .select_from(Person)
    .outerjoin(Address, (Address.person_id == Person.id) & (Person.id == 2))
    .where(Person.id.in_([1, 2]))
    .order_by(Person.id, Address.id)
)


@pytest.mark.parametrize("region", ["memory", "local"])
def test_outer_join_none_rows_on_every_hit(Session, region, sql):
    with Session() as session:
        plain = [None if a is None else a.id for a in session.scalars(SINGLE_NONE).all()]
    with Session() as session:
        seen = []
        for _ in range(4):
            rows = cached_query(session, SINGLE_NONE, region=region).scalars().all()
            seen.append([None if a is None else a.id for a in rows])
        assert seen == [plain] * 4
        assert plain[0] is None


@pytest.mark.parametrize("region", ["memory", "local"])
def test_joined_eager_demands_unique_on_every_hit(Session, region):
    from sqlalchemy.exc import InvalidRequestError

    statement = select(Person).where(Person.id == 1).options(joinedload(Person.addresses))
    with Session() as session:
        held = []
        for _ in range(4):
            with pytest.raises(InvalidRequestError):
                cached_query(session, statement, region=region).all()
            held.append(cached_query(session, statement, region=region).unique().scalar_one())
        assert all(person is held[0] for person in held)


class _S28Base(DeclarativeBase):
    pass


class S28Doc(_S28Base):
    __tablename__ = "s28_doc"

    id: Mapped[int] = mapped_column(primary_key=True)
    data: Mapped[dict] = mapped_column(JSON)


def _doc_steps(session, read):
    """What the rows of three reads of ``select(S28Doc, S28Doc.data)`` say, the application holding the first doc."""
    seen = []
    first = None
    for step in range(3):
        doc, data = read(session).one()
        if first is None:
            first = doc
        seen.append((doc is first, data is doc.data, dict(data), dict(doc.data)))
        data["changed in place"] = step  # the row's own copy: nothing else may see it
    first.data["held and changed"] = True  # JSON is not tracked: no flush, a pending change the ORM keeps
    doc, data = read(session).one()
    seen.append((doc is first, data is doc.data, dict(data), dict(doc.data)))
    return seen


def test_rows_sharing_a_json_value_with_a_held_object_read_as_uncached(engine, Session):
    _S28Base.metadata.create_all(engine)
    with PlainSession(engine) as writer:
        writer.add(S28Doc(id=1, data={"a": 1}))
        writer.commit()
    statement = select(S28Doc, S28Doc.data).where(S28Doc.id == 1)
    with Session() as session:
        plain = _doc_steps(session, lambda s: s.execute(statement))
    with Session() as other:
        cached_query(other, statement, region="memory").all()
    with Session() as session:
        cached = _doc_steps(session, lambda s: cached_query(s, statement, region="memory"))
    assert cached == plain


@pytest.mark.parametrize("region", ["local", "memory"])
def test_a_read_begun_after_a_commit_never_sees_what_it_replaced(engine, Session, region):
    """Threads: a writer commits names 0, 1, 2...; readers' local or shared reads begun after commit n read >= n."""
    _readers_and_a_writer(engine, Session, region)


@pytest.mark.parametrize("region", ["local", "memory"])
def test_on_postgresql_read_committed_readers_in_one_long_transaction_read_fresh(pg_url, cache, region):
    """The same on PostgreSQL, each reader in one transaction at READ COMMITTED: each statement sees earlier commits."""
    from sqlalchemy import create_engine

    pg = create_engine(pg_url, pool_size=10)
    try:
        _readers_and_a_writer(pg, sessionmaker(pg, info=cache.session_info()), region, long_transactions=True)
    finally:
        pg.dispose()


def _readers_and_a_writer(engine, Session, region, long_transactions=False):
    _rename(engine, "0")
    committed = [0]
    errors: list[BaseException] = []
    stale: list[tuple[int, int]] = []
    stop = threading.Event()

    def reader(uncached_every: int) -> None:
        with Session() as session:
            step = 0
            while not stop.is_set():
                step += 1
                try:
                    before = committed[0]
                    if step % uncached_every == 0:
                        name = session.get(Person, 1).name
                    else:
                        name = cached_query(session, POINT, region=region).scalar_one().name
                    if int(name) < before:
                        stale.append((int(name), before))
                        stop.set()
                    if not long_transactions and step % 11 == 0:
                        session.rollback()
                except BaseException as error:  # noqa: BLE001 - reported by the test
                    errors.append(error)
                    stop.set()

    def writer() -> None:
        n = 0
        while not stop.is_set() and n < 400:
            n += 1
            _rename(engine, str(n))
            committed[0] = n

    threads = [threading.Thread(target=reader, args=(every,)) for every in (2, 3, 5, 7)]
    _run_for([*threads, threading.Thread(target=writer)], 4, stop, switch=1e-5)
    assert errors == []
    assert stale == []


@pytest.fixture
def redis_region(request, region_options):
    """The real Redis region (asked for before ``Session``: the cache is made with it)."""
    return use_region(request, region_options, "redis")


@pytest.mark.parametrize("shape", ["point", "two_entities", "selectin", "address", "outer_none"])
def test_redis_hits_keep_nothing_alive_and_plain_reads_are_fresh(redis_region, engine, Session, sql, shape):
    with Session() as other:
        _read(other, shape, redis_region)
    with Session() as session:
        refs = []
        for _ in range(3):
            refs.extend(_refs(_read(session, shape, redis_region)))
        sql.reset()
        rows = _read(session, shape, redis_region)
        assert sql.count == 0  # a hit
        del rows
        gc.collect()
        assert [ref() for ref in refs if ref() is not None] == []
        _rename(engine)
        _restreet(engine)
        assert session.get(Person, 1).name == "renamed"
        assert session.get(Address, 1).street == "moved"


def _described(rows, held_ids):
    """Rows as plain data: each entity by class, identity, loaded columns and whether it is one the application holds."""
    out = []
    for row in rows:
        described = []
        for value in row:
            if hasattr(type(value), "_sa_class_manager"):
                loaded = {k: v for k, v in vars(value).items() if not k.startswith("_") and isinstance(v, (int, str))}
                keys = sorted(k for k in vars(value) if not k.startswith("_"))
                described.append((type(value).__name__, sorted(loaded.items()), keys, id(value) in held_ids))
            else:
                described.append(value)
        out.append(tuple(described))
    return out


def _steps(session, shape, read):
    held = None
    seen = []
    for step in range(4):
        rows = read(session, shape)
        if held is None:
            held = rows  # the application holds the first read's rows only
        seen.append(_described(rows, {id(v) for row in held for v in row}))
        del rows
        gc.collect()
        if step == 1:
            _rename(session.get_bind(), f"renamed {step}")
    return seen


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("region", ["local", "memory"])
def test_each_read_gives_what_an_uncached_read_gives(engine, Session, shape, region):
    def uncached(session, shape):
        result = session.execute(SHAPES[shape]())
        return (result.unique() if shape == "joined" else result).all()

    with Session() as session:
        plain = _steps(session, shape, uncached)
    _rename(engine, "person 1")
    with Session() as other:
        _read(other, shape, region)
    with Session() as session:
        cached = _steps(session, shape, lambda s, shape: _read(s, shape, region))
    assert cached == plain


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("region", ["local", "memory"])
def test_a_pending_change_survives_the_drop_of_every_sessions_entries(engine, cache, cached, region):
    """An object changed without a flush (autoflush off), let go by the application: the Session keeps it, and its change."""
    Session = sessionmaker(engine, info=cache.session_info(), autoflush=False)
    with Session() as other:
        cached_query(other, POINT, region=region).all()
    with Session() as session:
        for _ in range(3):
            person = (cached_query(session, POINT, region=region) if cached else session.execute(POINT)).scalar_one()
        person.name = "changed here"
        del person
        gc.collect()
        _restreet(engine)  # another transaction commits: every Session's local entries are dropped
        gc.collect()
        again = (cached_query(session, POINT, region=region) if cached else session.execute(POINT)).scalar_one()
        assert again.name == "changed here"
        assert session.get(Person, 1) is again
        session.commit()
    with PlainSession(engine) as check:
        assert check.get(Person, 1).name == "changed here"


def test_a_local_load_begun_between_a_commits_count_and_its_drop_keeps_no_stale_object(engine, Session, monkeypatch):
    """A commit counts (``SessionCache.commits``), then drops every Session's entries; a local load may begin between.

    This Session keeps a local entry of person 1.  Another thread commits
    a new name; its publication after the database committed is held just
    before the drop, and a local load of persons 1 and 2 begins: it reads
    the new count, and its query finds the object the void entry still
    holds, which the ORM does not overwrite (the old name).  The drop comes
    while the query runs (between its rows), and the entry is stored
    after it, under the new count: it must not be kept, nor keep the old
    name alive for ``Session.get()``.  A plain Session reads the new name
    once the commit returned.
    """
    from sqlalchemy import event

    from pyramid_sessioncache.storage.backends import local_session

    real_drop = local_session.drop_everywhere
    drops = []
    first_done, after_first = threading.Event(), threading.Event()
    in_window, go_on, dropped = threading.Event(), threading.Event(), threading.Event()

    def held_drop() -> None:
        drops.append(threading.current_thread())
        if len(drops) == 2:  # the publication after the database committed
            in_window.set()
            assert go_on.wait(10)
        real_drop()
        if len(drops) == 1:  # the publication before the database commits
            first_done.set()
            assert after_first.wait(10)
        elif len(drops) == 2:
            dropped.set()

    both = select(Person).where(Person.id.in_([1, 2])).order_by(Person.id)
    with Session() as session:

        def resolved(target, context) -> None:
            # Person 2 is new to the Session: its load event comes after person 1's row was read.
            if target.id == 2 and in_window.is_set() and not go_on.is_set():
                go_on.set()
                assert dropped.wait(10)

        monkeypatch.setattr(local_session, "drop_everywhere", held_drop)
        writer = threading.Thread(target=_rename, args=(engine,))
        event.listen(Person, "load", resolved)
        try:
            writer.start()
            assert first_done.wait(10)
            cached_query(session, POINT, region="local").all()  # before the database commits: the old row, kept
            gc.collect()
            after_first.set()
            assert in_window.wait(10)
            rows = cached_query(session, both, region="local").scalars().all()
            writer.join(10)
        finally:
            event.remove(Person, "load", resolved)
            after_first.set()
            go_on.set()
        assert dropped.is_set() and not writer.is_alive()
        assert [person.name for person in rows] == ["person 1", "person 2"]  # the kept object, as it was
        del rows
        gc.collect()
        after = cached_query(session, both, region="local").scalars().all()
        assert [person.name for person in after] == ["renamed", "person 2"]
        del after
        gc.collect()
        assert session.get(Person, 1).name == "renamed"
