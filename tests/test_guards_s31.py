"""Guards (s31): cached reads around the Session's own state changes agree with uncached reads.

The late review of s30 ran these scenarios as scratch cases; they are kept
here so that none regresses.  Each runs its steps twice, on two fresh
copies of the seeded SQLite file: uncached (a plain Session: the truth) and
cached in a region (``local``, ``memory``, ``file``), and both runs must
observe the same; the cached run proves a hit (no SQL) first.  Covered:

1. ORM bulk ``update()`` / ``delete()`` with each ``synchronize_session``,
   then a commit or a rollback;
2. savepoints (``begin_nested()``), released or rolled back, then the
   outer transaction committed or rolled back;
3. ``session.merge()`` of an object a cached read returned, with and
   without ``load=False`` (``make_transient_to_detached()``);
4. ``refresh()`` and ``expire()`` (whole, some keys, ``expire_all()``),
   with or without a commit elsewhere first;
5. ``expire_on_commit=False`` Sessions, after a commit elsewhere;
6. a ``RelationshipCache`` lazy load run by a ``load`` listener during a
   cached query (what the listener saw, not how often it ran: a shared
   miss runs it in the loader Session too, see ``docs/performance.md``);
7. on PostgreSQL, a writer thread and four reader threads sharing a
   ``memory`` region: no reader sees a value never committed, or an older
   commit after a newer one, and each reads the last commit once it stops.

What a read observes is each object's loaded values and expired keys
(nothing is loaded to look) and whether it is the Session's own, in the
reading Session and in a new one.
"""

from __future__ import annotations

import shutil
import threading
import time

import pytest
from sqlalchemy import create_engine, delete, event, inspect, select, update
from sqlalchemy.orm import (
    Session,
    joinedload,
    make_transient,
    make_transient_to_detached,
    selectinload,
    sessionmaker,
)

from pyramid_sessioncache import FromCache, RelationshipCache, SessionCache

from .conftest import SECRET, SQLCounter
from .models import Address, Person

REGIONS = ["local", "memory", "file"]
STATEMENT = select(Person).where(Person.id <= 3).options(selectinload(Person.addresses)).order_by(Person.id)
JOINED = select(Person).where(Person.id <= 3).options(joinedload(Person.addresses)).order_by(Person.id)


@pytest.fixture
def fresh(tmp_path, seeded_sqlite):
    """A maker of engines, each on a fresh copy of the seeded SQLite file."""
    engines = []

    def make():
        path = tmp_path / f"db{len(engines)}.sqlite"
        shutil.copyfile(seeded_sqlite, path)
        engines.append(create_engine(f"sqlite:///{path}"))
        return engines[-1]

    yield make
    for engine in engines:
        engine.dispose()


def _state(obj) -> tuple:
    """What ``obj`` holds, read without loading anything: loaded values (related objects by state), expired keys."""
    state = inspect(obj)
    loaded = []
    for key in sorted(k for k in state.dict if not k.startswith("_")):
        value = state.dict[key]
        if isinstance(value, list):
            value = [_state(item) for item in value]
        elif hasattr(value, "_sa_instance_state"):
            value = inspect(value).identity
        loaded.append((key, value))
    return (type(obj).__name__, state.identity, tuple(loaded), tuple(sorted(state.expired_attributes)))


def _obj(session, cls, ident):
    obj = session.identity_map.get(inspect(cls).identity_key_from_primary_key([ident]))
    assert obj is not None
    return obj


class Run:
    """One run of a scenario on its own database: cached in ``region``, or (``None``) not at all."""

    def __init__(self, engine, region, cache, statement, **session_args) -> None:
        self.engine = engine
        self.statement = statement
        self.region = region
        info = {} if region is None else cache.session_info()
        self.Session = sessionmaker(engine, info=info, **session_args)
        self.sql = SQLCounter(engine)
        self.held: list = []  # every read's objects, held (a Session holds its objects weakly)

    def read(self, session) -> list:
        statement = self.statement if self.region is None else self.statement.options(FromCache(self.region))
        got = session.execute(statement).unique().scalars().all()
        self.held.append(got)
        return got

    def observe(self, session) -> list:
        """Read again: each object's state, and whether it is the Session's own."""
        return [(obj in session, _state(obj)) for obj in self.read(session)]

    def observe_new(self) -> list:
        with self.Session() as other:
            return self.observe(other)


def _run(engine, region, cache, steps, statement, **session_args) -> tuple[int, list]:
    """Read twice (the SQL of the second read), then each step: what the steps return."""
    run = Run(engine, region, cache, statement, **session_args)
    with run.Session() as session:
        run.read(session)
        run.sql.reset()
        run.read(session)
        second = run.sql.count
        return second, [step(run, session) for step in steps]


def agree(fresh, cache, region, steps, statement=STATEMENT, **session_args) -> None:
    """Run ``steps`` uncached, then cached in ``region``: the second cached read is a hit, and both observe the same."""
    truth_sql, truth = _run(fresh(), None, cache, steps, statement, **session_args)
    cached_sql, cached = _run(fresh(), region, cache, steps, statement, **session_args)
    assert truth_sql > 0
    assert cached_sql == 0
    assert cached == truth


def observe(run, session):
    return run.observe(session)


def observe_new(run, session):
    return run.observe_new()


def commit(run, session):
    session.commit()


def rollback(run, session):
    session.rollback()


def expire_all(run, session):
    session.expire_all()


def committed_elsewhere(run, session):
    """Another program renames person 2 and moves address 3's street, committed on a plain connection."""
    with run.engine.begin() as conn:
        conn.execute(update(Person.__table__).where(Person.__table__.c.id == 2).values(name="renamed elsewhere"))
        conn.execute(update(Address.__table__).where(Address.__table__.c.id == 3).values(street="moved elsewhere"))


# --- 1. ORM bulk update() / delete() with each synchronize_session -----------------------------------------

BULK = {
    "update-person": update(Person).where(Person.id == 2).values(name="renamed"),
    "update-address": update(Address).where(Address.person_id == 2).values(street="moved"),
    "delete-person": delete(Person).where(Person.id == 2),
    "delete-address": delete(Address).where(Address.id == 3),
}


@pytest.mark.parametrize("end", [commit, rollback], ids=["commit", "rollback"])
@pytest.mark.parametrize("sync", ["auto", "fetch", "evaluate", False])
@pytest.mark.parametrize("write", BULK.values(), ids=BULK)
@pytest.mark.parametrize("region", REGIONS)
def test_orm_bulk_writes(fresh, cache, region, write, sync, end):
    def bulk(run, session):
        session.execute(write, execution_options={"synchronize_session": sync})

    agree(fresh, cache, region, [bulk, observe, observe_new, end, observe, observe_new])


# --- 2. Savepoints ---------------------------------------------------------------------------------------


def _rename(session):
    _obj(session, Person, 2).name = "in savepoint"


def _bulk_rename(session):
    session.execute(update(Person).where(Person.id == 2).values(name="bulk in savepoint"))


def _add(session):
    session.add(Address(id=100, person_id=1, street="added in savepoint", postal_code_id=1))


def _delete(session):
    session.delete(_obj(session, Address, 3))


@pytest.mark.parametrize("outer", [commit, rollback], ids=["commit", "rollback"])
@pytest.mark.parametrize("end", ["commit", "rollback"])
@pytest.mark.parametrize("write", [_rename, _bulk_rename, _add, _delete], ids=["attribute", "bulk", "add", "delete"])
@pytest.mark.parametrize("begun", [False, True], ids=["savepoint-first", "written-first"])
@pytest.mark.parametrize("region", REGIONS)
def test_savepoints(fresh, cache, region, begun, write, end, outer):
    """``savepoint-first``: pysqlite sends no BEGIN before the SAVEPOINT, so its release commits (as uncached)."""

    def savepoint(run, session):
        if begun:  # the driver's transaction begins with this write: the savepoint is nested in it
            _obj(session, Person, 3).name = "before the savepoint"
            session.flush()
        nested = session.begin_nested()
        write(session)
        inside = [run.observe(session), run.observe_new()]
        getattr(nested, end)()
        return inside

    agree(fresh, cache, region, [savepoint, observe, observe_new, outer, observe, observe_new])


# --- 3. merge() of an object a cached read returned -----------------------------------------------------


def _returned(run):
    """Person 2 as another Session's (cached) read returned it, detached when that Session closed."""
    with run.Session() as other:
        return run.read(other)[1]


def merge_changed(run, session):
    person = _returned(run)
    person.name = "merged"
    session.merge(person)


def merge_unchanged(run, session):
    session.merge(_returned(run))


def merge_own(run, session):
    assert session.merge(_obj(session, Person, 2)) is _obj(session, Person, 2)


def merge_without_load(run, session):
    session.merge(_returned(run), load=False)


def merge_made_detached(run, session):
    """The returned object made transient, renamed, then detached again (clean): merged without load."""
    person = _returned(run)
    make_transient(person)
    person.name = "made detached"
    make_transient_to_detached(person)
    session.merge(person, load=False)


def merge_new_detached(run, session):
    person = Person(id=2, name="built detached")
    make_transient_to_detached(person)
    session.merge(person, load=False)


@pytest.mark.parametrize(
    "merge",
    [merge_changed, merge_unchanged, merge_own, merge_without_load, merge_made_detached, merge_new_detached],
    ids=lambda merge: merge.__name__,
)
@pytest.mark.parametrize("region", REGIONS)
def test_merge(fresh, cache, region, merge):
    agree(fresh, cache, region, [merge, observe, observe_new, commit, observe, observe_new])


# --- 4. refresh() and expire() between cached reads -----------------------------------------------------

TOUCH = {
    "refresh": lambda s: s.refresh(_obj(s, Person, 2)),
    "refresh-name": lambda s: s.refresh(_obj(s, Person, 2), ["name"]),
    "refresh-address": lambda s: s.refresh(_obj(s, Address, 3)),
    "expire": lambda s: s.expire(_obj(s, Person, 2)),
    "expire-name": lambda s: s.expire(_obj(s, Person, 2), ["name"]),
    "expire-addresses": lambda s: s.expire(_obj(s, Person, 2), ["addresses"]),
    "expire-address": lambda s: s.expire(_obj(s, Address, 3)),
    "expire-street": lambda s: s.expire(_obj(s, Address, 3), ["street"]),
    "expire_all": lambda s: s.expire_all(),
}


@pytest.mark.parametrize("statement", [STATEMENT, JOINED], ids=["selectinload", "joinedload"])
@pytest.mark.parametrize("elsewhere", [False, True], ids=["unchanged", "committed-elsewhere"])
@pytest.mark.parametrize("touch", TOUCH.values(), ids=TOUCH)
@pytest.mark.parametrize("region", REGIONS)
def test_refresh_and_expire(fresh, cache, region, touch, elsewhere, statement):
    def step(run, session):
        if elsewhere:
            committed_elsewhere(run, session)
        touch(session)

    agree(fresh, cache, region, [step, observe, observe, observe_new, expire_all, observe], statement)


# --- 5. expire_on_commit=False: a Session that keeps its objects over a commit elsewhere ---------------


def _orm(session):
    _obj(session, Person, 2).name = "renamed by the ORM"
    session.flush()


def _orm_delete(session):
    session.delete(_obj(session, Address, 3))
    session.flush()


def _orm_bulk(session):
    session.execute(update(Person).where(Person.id <= 2).values(name="renamed in bulk"))


ELSEWHERE = {"orm": _orm, "orm-delete": _orm_delete, "bulk": _orm_bulk}


@pytest.mark.parametrize("cached_writer", [True, False], ids=["writer-cached", "writer-plain"])
@pytest.mark.parametrize("write", ELSEWHERE.values(), ids=ELSEWHERE)
@pytest.mark.parametrize("region", REGIONS)
def test_a_session_that_keeps_its_objects(fresh, cache, region, write, cached_writer):
    def elsewhere(run, session):
        """Another Session, caching as the run's do or plain, reads the rows, then writes and commits."""
        with run.Session() if cached_writer else Session(run.engine) as writer:
            if cached_writer:
                run.read(writer)
            else:
                run.held.append(writer.execute(STATEMENT).scalars().all())
            write(writer)
            writer.commit()

    steps = [commit, elsewhere, observe, observe_new, rollback, observe, expire_all, observe, observe_new]
    agree(fresh, cache, region, steps, expire_on_commit=False)
    agree(fresh, cache, region, [elsewhere, observe, commit, observe, observe_new], expire_on_commit=False)


# --- 6. A RelationshipCache lazy load, run by a ``load`` listener during a cached query ----------------


@pytest.fixture
def addresses_on_load():
    """Each Person loaded reads its addresses (a lazy load) in a ``load`` listener: what the listener saw."""
    seen: set = set()

    def on_load(person, context):
        seen.add((person.id, tuple((a.id, a.street) for a in person.addresses)))

    event.listen(Person, "load", on_load)
    yield seen
    event.remove(Person, "load", on_load)


def _listener_reads(engine, Sess, statement, seen) -> tuple[list, list]:
    """Two Sessions, before and after address 3 moves, read twice each: what they saw; the SQL of each read."""
    sql = SQLCounter(engine)
    observed, statements = [], []
    for moved in (False, True):
        if moved:
            with engine.begin() as conn:
                conn.execute(update(Address.__table__).where(Address.__table__.c.id == 3).values(street="moved"))
        for _ in range(2):
            with Sess() as session:
                seen.clear()
                for _ in range(2):
                    sql.reset()
                    got = session.execute(statement).scalars().all()
                    statements.append(sql.count)
                streets = [[(a.id, a.street) for a in person.addresses] for person in got]
                observed.append(([_state(person) for person in got], streets, sorted(seen)))
    return observed, statements


@pytest.mark.parametrize(
    ("region", "relationship_region", "new_session_sql"),
    [
        ("local", "local", 4),  # a new Session misses both: the query and its three lazy loads
        ("local", "memory", 1),  # the lazy loads the listener runs are hits
        ("memory", "memory", 0),
        ("memory", "local", 0),
        ("file", "file", 0),
    ],
)
def test_a_relationship_cache_load_in_a_load_listener(
    fresh, cache, addresses_on_load, region, relationship_region, new_session_sql
):
    statement = select(Person).where(Person.id <= 3).order_by(Person.id)
    engine = fresh()
    truth, truth_sql = _listener_reads(engine, sessionmaker(engine), statement, addresses_on_load)
    engine = fresh()
    cached_statement = statement.options(RelationshipCache(Person.addresses, relationship_region), FromCache(region))
    Sess = sessionmaker(engine, info=cache.session_info())
    cached, cached_sql = _listener_reads(engine, Sess, cached_statement, addresses_on_load)
    assert cached == truth
    assert truth_sql == [4, 1] * 4
    # each Session's second read is a hit; so is a new Session's first, where the region is shared
    assert cached_sql[1::2] == [0] * 4
    assert cached_sql[2] == new_session_sql


@pytest.mark.parametrize("region", ["memory", "file"])
def test_how_often_a_load_listener_runs(fresh, cache, region):
    """Once per object uncached and on a hit; twice on a shared region's miss, as docs/hits.md says.

    The miss reads its rows into the add-on's own Session first (its
    objects are the listener's too), then builds the caller's. A miss that
    learns to run it once changes this test and the docs together.
    """
    calls: list[int] = []

    def on_load(person, context):
        calls.append(person.id)

    engine = fresh()
    Sess = sessionmaker(engine, info=cache.session_info())
    statement = select(Person).where(Person.id <= 3).order_by(Person.id)
    event.listen(Person, "load", on_load)
    try:
        counted = []
        for read in ("uncached", "miss", "hit"):
            calls.clear()
            with Sess() as session:
                if read == "uncached":
                    session.execute(statement).scalars().all()
                else:
                    session.execute(statement.options(FromCache(region))).scalars().all()
            counted.append(sorted(calls))
    finally:
        event.remove(Person, "load", on_load)
    assert counted == [[1, 2, 3], [1, 1, 2, 2, 3, 3], [1, 2, 3]]


# --- 7. PostgreSQL: a writer thread, four reader threads, one memory region -----------------------------


def test_readers_and_a_writer_on_postgresql(pg_url):
    engine = create_engine(pg_url, pool_size=6)
    cache = SessionCache({"memory": {"type": "memory"}}, secret=SECRET)
    Sess = sessionmaker(engine, info=cache.session_info())
    plain_statement = select(Person).where(Person.id <= 3).order_by(Person.id)
    statement = plain_statement.options(FromCache("memory"))
    committed = {pid: {f"person {pid}"} for pid in (1, 2, 3)}  # a value is added before its commit
    latest: dict = {}
    seen: list = []  # each reader's values, in order
    finals: list = []
    errors: list = []
    done = threading.Event()

    def names(session) -> list:
        return [(person.id, person.name) for person in session.execute(statement).scalars().all()]

    def writer() -> None:
        try:
            for i in range(24):
                pid = i % 3 + 1
                with Sess() as session:
                    if i % 4 == 3:  # written, flushed, never committed
                        session.get(Person, pid).name = f"rolled back {i}"
                        session.flush()
                        session.rollback()
                        continue
                    names(session)
                    committed[pid].add(f"v{i}")
                    latest[pid] = f"v{i}"
                    if i % 2:
                        session.execute(update(Person).where(Person.id == pid).values(name=f"v{i}"))
                    else:
                        session.get(Person, pid).name = f"v{i}"
                    session.commit()
                time.sleep(0.002)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            done.set()

    def reader() -> None:
        try:
            mine = []
            while not done.is_set():
                with Sess() as session:
                    mine.extend(names(session))
                time.sleep(0.001)
            seen.append(mine)
            with Sess() as session:
                finals.append(names(session))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert errors == []
        with Session(engine) as plain:
            truth = [(person.id, person.name) for person in plain.execute(plain_statement).scalars()]
        assert truth == sorted(latest.items())
        assert finals == [truth] * 4
        values = [value for mine in seen for value in mine]
        assert any(name.startswith("v") for _, name in values)  # the readers saw writes
        assert {(pid, name) for pid, name in values} <= {(pid, name) for pid in committed for name in committed[pid]}
        for mine in seen:  # a Session begun later never reads an older commit
            for pid in committed:
                order = [-1 if name.startswith("person") else int(name[1:]) for p, name in mine if p == pid]
                assert order == sorted(order)
        sql = SQLCounter(engine)
        with Sess() as session:
            assert names(session) == truth
        assert sql.count == 0  # served
    finally:
        engine.dispose()
