"""Adversarial review of today's changes (s18): hydrate, plans, private copies, mapping texts, owners, routing.

Each test compares what a cached run gives (counting SQL to prove the hit)
with an uncached run of the same query in a fresh Session.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from sqlalchemy import (
    JSON,
    ForeignKey,
    Integer,
    PickleType,
    String,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.ext.mutable import MutableComposite, MutableDict, MutableList
from sqlalchemy.ext.orderinglist import ordering_list
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    attribute_keyed_dict,
    column_property,
    composite,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)

from pyramid_sessioncache import FromCache, SessionCache, invalidate_tables
from pyramid_sessioncache.engine.values import mapping_text

from .conftest import SECRET, SQLCounter

ROOT = Path(__file__).resolve().parent.parent


class Base(DeclarativeBase):
    pass


@dataclasses.dataclass
class Point(MutableComposite):
    x: int
    y: int

    def __setattr__(self, key, value):
        object.__setattr__(self, key, value)
        self.changed()


class Doc(Base):
    __tablename__ = "s18_doc"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(50))
    data = mapped_column(JSON, nullable=True)
    mdata = mapped_column(MutableDict.as_mutable(JSON), nullable=True)
    mlist = mapped_column(MutableList.as_mutable(JSON), nullable=True)
    pick = mapped_column(PickleType, nullable=True)
    px: Mapped[int] = mapped_column(default=0)
    py: Mapped[int] = mapped_column(default=0)
    point: Mapped[Point] = composite("px", "py")
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("s18_doc.id"))
    children: Mapped[list[Doc]] = relationship(back_populates="parent", order_by="Doc.id")
    parent: Mapped[Doc | None] = relationship(back_populates="children", remote_side="Doc.id")
    items: Mapped[list[Item]] = relationship(
        back_populates="doc", order_by="Item.position", collection_class=ordering_list("position")
    )
    by_name: Mapped[dict[str, Item]] = relationship(
        collection_class=attribute_keyed_dict("name"), viewonly=True, overlaps="items,doc"
    )


class Item(Base):
    __tablename__ = "s18_item"
    id: Mapped[int] = mapped_column(primary_key=True)
    doc_id: Mapped[int] = mapped_column(ForeignKey("s18_doc.id"))
    position: Mapped[int] = mapped_column()
    name: Mapped[str] = mapped_column(String(30))
    doc: Mapped[Doc] = relationship(back_populates="items")


Doc.item_count = column_property(
    select(func.count(Item.id)).where(Item.doc_id == Doc.id).correlate_except(Item).scalar_subquery()
)


def _seed(engine):
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        root = Doc(title="root", data={"a": [1]}, mdata={"m": 1}, mlist=[1, 2], pick={"p": [1]}, px=1, py=2)
        for n in range(3):
            child = Doc(title=f"child {n}", data={"n": n}, mdata={"n": n}, mlist=[n], pick=[n], px=n, py=n)
            child.items = [Item(name=f"i{n}.{k}") for k in range(n + 1)]
            root.children.append(child)
            child.children.append(Doc(title=f"leaf {n}", data=None, mdata={}, mlist=[]))
        root.items = [Item(name=f"r{k}") for k in range(3)]
        session.add(root)
        session.commit()


@pytest.fixture
def db(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 's18.sqlite'}")
    _seed(engine)
    yield engine
    engine.dispose()


def _factory(engine, region_options, region="memory"):
    cache = SessionCache(region_options, default_region=region, secret=SECRET)
    return sessionmaker(engine, info=cache.session_info())


@pytest.fixture
def regions(tmp_path):
    return {
        "memory": {"type": "memory", "expire": 60},
        "file": {"type": "file", "data_dir": str(tmp_path / "c"), "lock_dir": str(tmp_path / "l")},
    }


@pytest.fixture(params=["memory", "file", "redis", "near"])
def shared(request, regions):
    """Each shared region kind: the region name to use."""
    if request.param == "redis":
        regions["redis"] = {"type": "ext:redis", "url": request.getfixturevalue("redis_url")}
    if request.param == "near":
        regions["near"] = {"type": "ext:redis", "url": request.getfixturevalue("redis_url"), "near": True}
    return request.param


def tree(*options):
    return (
        select(Doc)
        .where(Doc.parent_id.is_(None))
        .options(selectinload(Doc.children, recursion_depth=3), selectinload(Doc.items), *options)
        .order_by(Doc.id)
    )


def docs(*options):
    return select(Doc).options(selectinload(Doc.items), selectinload(Doc.by_name), *options).order_by(Doc.id)


def shape(objects, seen=None):
    out = []
    for doc in objects:
        out.append(
            (
                doc.title,
                doc.data,
                dict(doc.mdata or {}),
                list(doc.mlist or []),
                doc.pick,
                (doc.point.x, doc.point.y),
                doc.item_count,
                [(i.name, i.position) for i in doc.items],
                sorted(doc.by_name),
                type(doc.items).__name__,
            )
        )
    return out


def dump(engine):
    with engine.connect() as conn:
        return (
            conn.execute(text("select * from s18_doc order by id")).all(),
            conn.execute(text("select * from s18_item order by id")).all(),
        )


def _stored_and_hit(factory, engine, statement_fn, region):
    with factory() as session:
        session.scalars(statement_fn(FromCache(region))).all()  # stores
    sql = SQLCounter(engine)
    return sql


# --- 1. hydrate: collections, backrefs, trees, flushes ------------------------------------------


def _both_ways(db, regions, region, mutate, statement_fn=docs, tmp_path=None):
    """Run mutate(session, objects) on an uncached load and on a hit of a copy of the database; compare rows written."""
    import shutil

    path = Path(db.url.database)
    copy = path.with_name("copy.sqlite")
    shutil.copyfile(path, copy)
    other = create_engine(f"sqlite:///{copy}")
    try:
        with Session(db) as session:
            objects = session.scalars(statement_fn()).all()
            mutate(session, objects)
            session.commit()
        factory = _factory(other, regions, region)
        with factory() as session:
            session.scalars(statement_fn(FromCache(region))).all()
        sql = SQLCounter(other)
        with factory() as session:
            objects = session.scalars(statement_fn(FromCache(region))).all()
            assert sql.count == 0, sql.statements  # a hit
            mutate(session, objects)
            session.commit()
        assert dump(other) == dump(db)
    finally:
        other.dispose()


def test_hit_tree_and_collections_equal_uncached(db, regions, shared):
    with Session(db) as session:
        expected = shape(session.scalars(docs()).all())
        roots = session.scalars(tree()).all()
        expected_tree = [(c.title, [g.title for g in c.children], c.parent.title) for c in roots[0].children]
    factory = _factory(db, regions, shared)
    with factory() as session:
        session.scalars(docs(FromCache(shared))).all()
        session.scalars(tree(FromCache(shared))).all()
    sql = SQLCounter(db)
    with factory() as session:
        got = shape(session.scalars(docs(FromCache(shared))).all())
        roots = session.scalars(tree(FromCache(shared))).all()
        got_tree = [(c.title, [g.title for g in c.children], c.parent.title) for c in roots[0].children]
        assert sql.count == 0, sql.statements
    assert got == expected
    assert got_tree == expected_tree


def _reorder(session, objects):
    root = objects[0]
    item = root.items.pop(0)
    root.items.insert(2, item)
    root.items.append(Item(name="new"))
    objects[1].items.insert(0, Item(name="front"))


def test_ordering_list_changes_on_a_hit_flush_as_uncached(db, regions):
    _both_ways(db, regions, "memory", _reorder)


def _move_children(session, objects):
    root, c0, c1 = objects[0], objects[1], objects[2]
    leaf = c0.children[0]
    c1.children.append(leaf)  # backref: leaf.parent = c1, removed from c0.children
    c0.parent = None
    root.children.append(Doc(title="added"))


def test_backref_moves_on_a_hit_flush_as_uncached(db, regions):
    def statement_fn(*options):
        return select(Doc).options(selectinload(Doc.children), *options).order_by(Doc.id)

    _both_ways(db, regions, "memory", _move_children, statement_fn)


def test_backref_moves_on_a_file_hit_flush_as_uncached(db, regions):
    def statement_fn(*options):
        return select(Doc).options(selectinload(Doc.children), selectinload(Doc.parent), *options).order_by(Doc.id)

    _both_ways(db, regions, "file", _move_children, statement_fn)


def test_events_on_hit_match_uncached(db, regions):
    seen = []

    def on_load(target, context):
        seen.append(("load", target.title))

    def on_append(target, value, initiator):
        seen.append(("append", getattr(target, "title", None)))

    def on_init(target, collection, adapter):
        seen.append(("init", type(collection).__name__))

    event.listen(Doc, "load", on_load)
    event.listen(Doc.children, "append", on_append)
    event.listen(Doc.children, "init_collection", on_init)
    try:
        with Session(db) as session:
            session.scalars(tree()).all()
        expected = sorted(seen)
        factory = _factory(db, regions)
        with factory() as session:
            session.scalars(tree(FromCache("memory"))).all()
        seen.clear()
        sql = SQLCounter(db)
        with factory() as session:
            session.scalars(tree(FromCache("memory"))).all()
            assert sql.count == 0
        assert sorted(seen) == expected
    finally:
        event.remove(Doc, "load", on_load)
        event.remove(Doc.children, "append", on_append)
        event.remove(Doc.children, "init_collection", on_init)


def test_refresh_event_for_expired_objects_filled_by_a_hit(db, regions):
    """An expired object of the Session refilled by a query gets ``refresh``; by a hit?"""
    seen = []

    def on_refresh(target, context, attrs):
        seen.append(target.title)

    event.listen(Doc, "refresh", on_refresh)
    try:
        with Session(db) as session:
            held = session.scalars(select(Doc).order_by(Doc.id)).all()
            session.expire_all()
            session.scalars(select(Doc).order_by(Doc.id)).all()
        expected = sorted(seen)
        assert len(expected) == len(held)
        factory = _factory(db, regions)
        with factory() as session:
            session.scalars(select(Doc).order_by(Doc.id).options(FromCache("memory"))).all()
        seen.clear()
        with factory() as session:
            held = session.scalars(select(Doc).order_by(Doc.id)).all()
            session.expire_all()
            sql = SQLCounter(db)
            session.scalars(select(Doc).order_by(Doc.id).options(FromCache("memory"))).all()
            assert sql.count == 0
        assert sorted(seen) == expected
    finally:
        event.remove(Doc, "refresh", on_refresh)


@pytest.mark.parametrize("attribute", ["mdata", "mlist"])
def test_mutable_change_on_an_expired_object_refilled_by_a_hit_is_flushed(db, regions, attribute):
    """MutableDict/MutableList associate with their parent on ``load``/``refresh``."""

    def mutate(value):
        if attribute == "mdata":
            value["changed"] = True
        else:
            value.append("changed")

    # uncached
    with Session(db) as session:
        doc = session.get(Doc, 2)
        session.commit()  # expires
        session.scalars(select(Doc).order_by(Doc.id)).all()
        mutate(getattr(doc, attribute))
        session.commit()
    with Session(db) as session:
        expected = getattr(session.get(Doc, 2), attribute)
    assert "changed" in expected
    # cached, on a fresh copy of the value
    with Session(db) as session:
        doc = session.get(Doc, 3)
        getattr(doc, attribute)
    factory = _factory(db, regions)
    statement = select(Doc).order_by(Doc.id).options(FromCache("memory"))
    with factory() as session:
        session.scalars(statement).all()
    with factory() as session:
        doc = session.get(Doc, 3)
        session.commit()  # expires
        sql = SQLCounter(db)
        session.scalars(statement).all()
        assert sql.count == 0  # a hit filled the expired object
        mutate(getattr(doc, attribute))
        session.commit()
    with Session(db) as session:
        assert "changed" in getattr(session.get(Doc, 3), attribute)


@pytest.mark.parametrize("attribute", ["mdata", "mlist", "point"])
def test_mutable_change_on_a_new_object_of_a_hit_is_flushed(db, regions, shared, attribute):
    def mutate(doc):
        if attribute == "mdata":
            doc.mdata["changed"] = True
        elif attribute == "mlist":
            doc.mlist.append("changed")
        else:
            doc.point.x = 99

    def read(doc):
        return {"mdata": lambda: dict(doc.mdata), "mlist": lambda: list(doc.mlist), "point": lambda: doc.px}[
            attribute
        ]()

    with Session(db) as session:
        doc = session.get(Doc, 2)
        mutate(doc)
        session.commit()
    with Session(db) as session:
        expected = read(session.get(Doc, 2))
    factory = _factory(db, regions, shared)
    statement = select(Doc).where(Doc.id == 3).options(FromCache(shared))
    with factory() as session:
        session.scalars(statement).all()
    with factory() as session:
        sql = SQLCounter(db)
        doc = session.scalars(statement).one()
        assert sql.count == 0
        mutate(doc)
        session.commit()
    with Session(db) as session:
        got = read(session.get(Doc, 3))
    assert type(got) is type(expected) and got != read_initial(attribute, 3)


def read_initial(attribute, n):
    return {"mdata": {"n": 1}, "mlist": [1], "point": 1}[attribute]


# --- 3. values changed in place never reach another request ---------------------------------------


@pytest.mark.parametrize("how", ["hit", "miss"])
def test_in_place_change_never_reaches_another_request(db, regions, shared, how):
    statement = select(Doc).order_by(Doc.id).options(FromCache(shared))
    columns = select(Doc.id, Doc.data, Doc.mlist).order_by(Doc.id).options(FromCache(shared))
    mixed = select(Doc, Doc.data).order_by(Doc.id).options(FromCache(shared))
    with Session(db) as session:
        expected = shape(session.scalars(select(Doc).order_by(Doc.id)).all())
        expected_columns = [tuple(r) for r in session.execute(select(Doc.id, Doc.data, Doc.mlist).order_by(Doc.id))]
    factory = _factory(db, regions, shared)
    if how == "hit":
        with factory() as session:
            session.scalars(statement).all()
            session.execute(columns).all()
            session.execute(mixed).all()
    with factory() as session:
        objects = session.scalars(statement).all()
        rows = session.execute(columns).all()
        pairs = session.execute(mixed).all()
        for row in rows:
            row.data and row.data.update(evil=2)
            row.mlist.append("evil")
        for _doc, data in pairs:
            data and data.update(evil=3)
        for doc in objects:
            doc.data and doc.data.update(evil=1)
            doc.pick.append("evil") if isinstance(doc.pick, list) else None
            doc.mlist.append("evil")  # MutableList: flagged; rolled back below
        session.rollback()
    sql = SQLCounter(db)
    with factory() as session:
        objects = session.scalars(statement).all()
        got_columns = [tuple(r) for r in session.execute(columns)]
        assert sql.count == 0, sql.statements
        got = shape(objects)
    assert got == expected
    assert got_columns == expected_columns


def test_same_entry_twice_in_one_session_and_an_in_place_change(db, regions):
    """The second hit of a Session returns its own objects (changed in place) — as uncached does."""
    statement = select(Doc).where(Doc.id == 1).options(FromCache("memory"))
    with Session(db) as session:
        doc = session.scalars(select(Doc).where(Doc.id == 1)).one()
        doc.data["x"] = 1
        again = session.scalars(select(Doc).where(Doc.id == 1)).one()
        expected = (again is doc, dict(again.data))
    factory = _factory(db, regions)
    with factory() as session:
        session.scalars(statement).one()
    with factory() as session:
        sql = SQLCounter(db)
        doc = session.scalars(statement).one()
        doc.data["x"] = 1
        again = session.scalars(statement).one()
        assert sql.count == 0
        got = (again is doc, dict(again.data))
    assert got == expected


class TagStr(str):
    """A str subclass carrying a mutable list."""

    def __new__(cls, value):
        self = super().__new__(cls, value)
        self.notes = []
        return self


def test_tuple_holding_a_list_column_result_is_copied(db, regions):
    from sqlalchemy import literal, tuple_  # noqa: F401
    from sqlalchemy.types import TypeDecorator

    class ListInTuple(TypeDecorator):
        impl = String
        cache_ok = True

        def process_result_value(self, value, dialect):
            return (value, [value])

    statement = lambda *o: select(Doc.id, Doc.title.cast(ListInTuple)).order_by(Doc.id).options(*o)  # noqa: E731
    with Session(db) as session:
        expected = [tuple(r) for r in session.execute(statement())]
    factory = _factory(db, regions)
    with factory() as session:
        for _, value in session.execute(statement(FromCache("memory"))):
            value[1].append("evil")
    with factory() as session:
        sql = SQLCounter(db)
        got = [tuple(r) for r in session.execute(statement(FromCache("memory")))]
        assert sql.count == 0
    assert got == expected


# --- 2 / 4. plans and mapping texts ---------------------------------------------------------------


def test_mapping_text_ignores_type_arguments_but_is_shared_across_processes(tmp_path):
    program = textwrap.dedent(
        """
        import sys
        from sqlalchemy import create_engine, select
        from sqlalchemy.orm import sessionmaker
        from pyramid_sessioncache import FromCache, SessionCache
        from tests.conftest import SECRET, SQLCounter
        from tests.test_attack_s18_review import Doc, _seed
        engine = create_engine(sys.argv[1])
        if sys.argv[3] == "seed":
            _seed(engine)
        cache = SessionCache({"file": {"type": "file", "data_dir": sys.argv[2] + "/c", "lock_dir": sys.argv[2] + "/l"}},
                             default_region="file", secret=SECRET)
        factory = sessionmaker(engine, info=cache.session_info())
        sql = SQLCounter(engine)
        with factory() as session:
            docs = session.scalars(select(Doc).order_by(Doc.id).options(FromCache("file"))).all()
            print(sql.count, len(docs), [d.title for d in docs][:2])
        """
    )
    url = f"sqlite:///{tmp_path / 'p.sqlite'}"
    runs = [
        subprocess.run(
            [sys.executable, "-c", program, url, str(tmp_path), step],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split(" ", 2)
        for step in ("seed", "read")
    ]
    assert runs[0][1] == runs[1][1]
    assert int(runs[0][0]) > 0 and int(runs[1][0]) == 0, runs


def test_string_length_change_keeps_the_mapping_text():
    class B(DeclarativeBase):
        pass

    def make(length):
        B.registry.dispose()
        B.metadata.clear()
        return type(
            "S18Len",
            (B,),
            {
                "__tablename__": "t",
                "id": mapped_column(Integer, primary_key=True),
                "name": mapped_column(String(length)),
            },
        )

    before = mapping_text(make(50).__mapper__)
    after = mapping_text(make(100).__mapper__)
    B.registry.dispose()
    assert before == after


def test_column_property_added_after_hits(db, regions):
    """Single-table subclass mapped after the base was hit: the base's plan must still serve; subclass rows load."""
    factory = _factory(db, regions)
    statement = select(Doc).order_by(Doc.id).options(FromCache("memory"))
    with factory() as session:
        session.scalars(statement).all()
    with factory() as session:
        before = [d.title for d in session.scalars(statement).all()]

    Doc.__mapper__.add_property("extra", column_property(Doc.__table__.c.title + "!"))
    try:
        with Session(db) as session:
            expected = [(d.title, d.extra) for d in session.scalars(select(Doc).order_by(Doc.id))]
        with factory() as session:
            sql = SQLCounter(db)
            got = [(d.title, d.extra) for d in session.scalars(statement).all()]
            # the hit is old (no 'extra'): the column must be loaded, never None
        assert got == expected
        assert [t for t, _ in got] == before
        assert sql.count >= 0
    finally:
        pass


# --- 5. owners of a connection ---------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SAWarning")
@pytest.mark.parametrize("mode", ["conditional_savepoint", "create_savepoint", "rollback_only", "control_fully"])
def test_external_transaction_sessions_hear_their_writes(db, regions, mode):
    cache = SessionCache(regions, default_region="memory", secret=SECRET)
    statement = select(Doc.title).order_by(Doc.id).options(FromCache("memory"))
    conn = db.connect()
    outer = conn.begin()
    try:
        first = Session(bind=conn, join_transaction_mode=mode, info=cache.session_info())
        first.execute(statement).all()  # stores (nothing written yet)
        first.close()
        second = Session(bind=conn, join_transaction_mode=mode, info=cache.session_info())
        second.add(Doc(title="mine"))
        second.flush()
        got = second.scalars(statement).all()
        assert "mine" in got
        helper = Session(bind=second.connection(), info=cache.session_info())
        helper.execute(update(Doc).where(Doc.id == 1).values(title="edited"))
        got = second.scalars(statement).all()
        assert "edited" in got
        got_helper = helper.scalars(statement).all()
        assert "mine" in got_helper and "edited" in got_helper
        helper.close()
        second.close()
    finally:
        outer.rollback()
        conn.close()
    # nothing uncommitted reached the shared region
    with _factory(db, regions)() as session:
        fresh = session.scalars(select(Doc.title).order_by(Doc.id)).all()
    factory = sessionmaker(db, info=cache.session_info())
    with factory() as session:
        assert session.scalars(statement).all() == fresh


@pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SAWarning")
def test_session_sharing_a_connection_after_the_first_commits(db, regions):
    """A commits the connection's transaction; B, still in its own, keeps writing on the re-begun connection."""
    cache = SessionCache(regions, default_region="memory", secret=SECRET)
    statement = select(Doc.title).order_by(Doc.id).options(FromCache("memory"))
    conn = db.connect()
    try:
        a = Session(bind=conn, info=cache.session_info())
        a.execute(statement).all()  # begins the connection's transaction; stores
        b = Session(bind=conn, info=cache.session_info())
        b.execute(select(Doc.id)).all()  # joins
        a.commit()  # commits the connection's transaction
        b.add(Doc(title="b's"))
        b.flush()  # the connection begins again: owners cleared
        assert "b's" in b.scalars(statement).all()
        # another process-wide reader must not see b's uncommitted row through the cache
        with sessionmaker(db, info=cache.session_info())() as other:
            assert "b's" not in other.scalars(statement).all()
        b.rollback()
        a.close()
        b.close()
    finally:
        conn.close()
    with sessionmaker(db, info=cache.session_info())() as other:
        assert "b's" not in other.scalars(statement).all()


def test_threads_writing_do_not_leak_uncommitted_rows(db, regions):
    factory = _factory(db, regions)
    statement = select(Doc.title).order_by(Doc.id).options(FromCache("memory"))
    errors = []

    def work(n):
        try:
            with factory() as session:
                session.add(Doc(title=f"t{n}"))
                session.flush()
                assert f"t{n}" in session.scalars(statement).all()
                session.rollback()
                assert f"t{n}" not in session.scalars(statement).all()
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with factory() as session:
        assert not any(t.startswith("t") for t in session.scalars(statement).all())


# --- 6. routing --------------------------------------------------------------------------------------


@pytest.fixture
def two_dbs(tmp_path):
    a = create_engine(f"sqlite:///{tmp_path / 'a.sqlite'}")
    b = create_engine(f"sqlite:///{tmp_path / 'b.sqlite'}")
    _seed(a)
    _seed(b)
    with b.begin() as conn:
        conn.execute(update(Item.__table__).values(name=Item.__table__.c.name + " (b)"))
    yield a, b
    a.dispose()
    b.dispose()


@pytest.mark.parametrize("by", ["mapper", "table"])
@pytest.mark.parametrize("loader", ["selectin", "lazy"])  # joined, subquery: one statement over both databases
def test_binds_per_mapper_read_each_database(two_dbs, regions, by, loader):
    from sqlalchemy.orm import lazyload

    a, b = two_dbs
    option = {"selectin": selectinload, "lazy": lazyload}[loader]
    binds = {Doc: a, Item: b} if by == "mapper" else {Doc.__table__: a, Item.__table__: b}

    def statement(*o):
        return select(Doc).order_by(Doc.id).options(option(Doc.items), *o)

    with Session(binds=binds) as session:
        expected = [(d.title, [i.name for i in d.items]) for d in session.scalars(statement()).all()]
    cache = SessionCache(regions, default_region="memory", secret=SECRET)
    factory = sessionmaker(binds=binds, info=cache.session_info())
    with factory() as session:
        [(d.title, [i.name for i in d.items]) for d in session.scalars(statement(FromCache("memory"))).all()]
    sa, sb = SQLCounter(a), SQLCounter(b)
    with factory() as session:
        got = [(d.title, [i.name for i in d.items]) for d in session.scalars(statement(FromCache("memory"))).all()]
        if loader == "selectin":
            assert sa.count == 0 and sb.count == 0
    assert got == expected
    # a write to b invalidates
    with factory() as session:
        session.execute(update(Item).where(Item.id == 1).values(name="changed"))
        session.commit()
    with Session(binds=binds) as session:
        expected = [(d.title, [i.name for i in d.items]) for d in session.scalars(statement()).all()]
    with factory() as session:
        got = [(d.title, [i.name for i in d.items]) for d in session.scalars(statement(FromCache("memory"))).all()]
    assert got == expected


def test_two_binds_for_the_same_class_do_not_share(two_dbs, regions):
    a, b = two_dbs
    cache = SessionCache(regions, default_region="memory", secret=SECRET)
    statement = select(Item.name).order_by(Item.id).options(FromCache("memory"))
    one = sessionmaker(binds={Doc: a, Item: a}, info=cache.session_info())
    two = sessionmaker(binds={Doc: a, Item: b}, info=cache.session_info())
    with one() as session:
        first = session.scalars(statement).all()
    with two() as session:
        second = session.scalars(statement).all()
    with Session(b) as session:
        assert second == session.scalars(select(Item.name).order_by(Item.id)).all()
    assert first != second


def test_horizontal_get_bind(two_dbs, regions):
    a, b = two_dbs
    cache = SessionCache(regions, default_region="memory", secret=SECRET)

    class Routing(Session):
        def get_bind(self, mapper=None, clause=None, **kw):
            return b if self.info.get("shard") == "b" else a

    statement = select(Item.name).order_by(Item.id).options(FromCache("memory"))
    results = {}
    for shard in ("a", "b", "a", "b"):
        with Routing(info={**cache.session_info(), "shard": shard}) as session:
            results.setdefault(shard, []).append(session.scalars(statement).all())
    with Session(b) as session:
        expected_b = session.scalars(select(Item.name).order_by(Item.id)).all()
    with Session(a) as session:
        expected_a = session.scalars(select(Item.name).order_by(Item.id)).all()
    assert results["a"] == [expected_a, expected_a]
    assert results["b"] == [expected_b, expected_b]


def test_bind_that_is_a_connection_per_mapper(two_dbs, regions):
    a, b = two_dbs
    cache = SessionCache(regions, default_region="memory", secret=SECRET)

    def statement(*o):
        return select(Doc).order_by(Doc.id).options(selectinload(Doc.items), *o)

    with Session(binds={Doc: a, Item: b}) as session:
        expected = [(d.title, [i.name for i in d.items]) for d in session.scalars(statement()).all()]
    with b.connect() as conn:
        outer = conn.begin()
        with Session(binds={Doc: a, Item: conn}, info=cache.session_info()) as session:
            session.execute(update(Item).where(Item.id == 1).values(name="uncommitted"))
            got = [(d.title, [i.name for i in d.items]) for d in session.scalars(statement(FromCache("memory")))]
            assert any("uncommitted" in names for _, names in got)
        outer.rollback()
    with sessionmaker(binds={Doc: a, Item: b}, info=cache.session_info())() as session:
        got = [(d.title, [i.name for i in d.items]) for d in session.scalars(statement(FromCache("memory")))]
    assert got == expected


# --- 7. declared tables --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tables",
    [
        ("s18_doc",),
        (Doc,),
        (Doc.__table__,),
        ("S18_DOC",),
        (Doc.__table__, "s18_item"),
        ("main.s18_doc",),
        (Doc.__mapper__,),
    ],
    ids=["name", "class", "table", "upper", "two", "schema", "mapper"],
)
def test_invalidate_tables_inputs(db, regions, tables):
    factory = _factory(db, regions)
    statement = select(Doc.title).order_by(Doc.id).options(FromCache("memory"))
    with factory() as session:
        session.scalars(statement).all()
    import sqlite3

    raw = sqlite3.connect(db.url.database)  # behind SQLAlchemy's back
    raw.execute("update s18_doc set title = 'behind' where id = 1")
    raw.commit()
    raw.close()
    with factory() as session:
        assert session.scalars(statement).all()[0] == "root"  # still the entry
    with factory() as session:
        invalidate_tables(session, *tables)
        session.commit()
    with factory() as session:
        assert session.scalars(statement).all()[0] == "behind"


@pytest.mark.parametrize(
    "bad",
    ["", " ", "a,,b", "a, b", Doc.title, 5, None],
    ids=["empty", "space", "emptypart", "comma", "column", "int", "none"],
)
def test_invalidate_tables_refuses_bad_inputs(db, regions, bad):
    from pyramid_sessioncache.errors import InvalidOptionError

    factory = _factory(db, regions)
    with factory() as session, pytest.raises(InvalidOptionError):
        invalidate_tables(session, bad)


# --- loader strategies that a hit's objects must keep ---------------------------------------------


@pytest.mark.parametrize("strategy", ["raiseload", "raiseload_star", "defer_raise", "noload"])
def test_strategies_of_the_query_apply_to_a_hits_objects(db, regions, strategy):
    from sqlalchemy import exc as sa_exc
    from sqlalchemy.orm import defer, noload, raiseload

    option = {
        "raiseload": raiseload(Doc.items),
        "raiseload_star": raiseload("*"),
        "defer_raise": defer(Doc.data, raiseload=True),
        "noload": noload(Doc.items),
    }[strategy]

    def touch(doc):
        try:
            return ("ok", repr(doc.data if strategy == "defer_raise" else [i.name for i in doc.items]))
        except sa_exc.InvalidRequestError as error:
            return ("raised", type(error).__name__)

    statement = lambda *o: select(Doc).where(Doc.id == 2).options(option, *o)  # noqa: E731
    with Session(db) as session:
        expected = touch(session.scalars(statement()).one())
    factory = _factory(db, regions)
    with factory() as session:
        session.scalars(statement(FromCache("memory"))).one()
    with factory() as session:
        sql = SQLCounter(db)
        doc = session.scalars(statement(FromCache("memory"))).one()
        assert sql.count == 0
        got = touch(doc)
    assert got == expected


class Employee(Base):
    __tablename__ = "s18_employee"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(30))
    kind: Mapped[str] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "employee"}


class Manager(Employee):
    __tablename__ = "s18_manager"
    id: Mapped[int] = mapped_column(ForeignKey("s18_employee.id"), primary_key=True)
    budget: Mapped[int] = mapped_column()
    __mapper_args__ = {"polymorphic_identity": "manager"}


def test_polymorphic_hits(tmp_path, regions):
    from sqlalchemy.orm import with_polymorphic

    engine = create_engine(f"sqlite:///{tmp_path / 'poly.sqlite'}")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([Employee(name="e"), Manager(name="m", budget=5)])
        session.commit()
    poly = with_polymorphic(Employee, "*")
    statements = [
        lambda *o: select(poly).order_by(poly.id).options(*o),
        lambda *o: select(Employee).order_by(Employee.id).options(*o),
    ]

    def view(objects):
        return [(type(o).__name__, o.name, getattr(o, "budget", None)) for o in objects]

    factory = _factory(engine, regions)
    for statement in statements:
        with Session(engine) as session:
            expected = view(session.scalars(statement()).all())
        with factory() as session:
            session.scalars(statement(FromCache("memory"))).all()
        with factory() as session:
            sql = SQLCounter(engine)
            objects = session.scalars(statement(FromCache("memory"))).all()
            assert sql.count == 0
            got = view(objects)
        assert got == expected
        # then change the subclass column and flush
        with factory() as session:
            objects = session.scalars(statement(FromCache("memory"))).all()
            objects[1].budget += 1
            session.commit()
    with Session(engine) as session:
        assert session.get(Manager, 2).budget == 7
    engine.dispose()


# --- 4. mapping texts: type arguments that change the values, and column order ------------------


class ThingBase(DeclarativeBase):
    pass


S18Thing: type | None = None  # found by name when an entry is unpickled


def _map_thing(*columns):
    ThingBase.registry.dispose()
    ThingBase.metadata.clear()
    namespace = {"__tablename__": "s18_thing", "__module__": __name__, "id": mapped_column(Integer, primary_key=True)}
    for key, column in columns:
        namespace[key] = column
    cls = type("S18Thing", (ThingBase,), namespace)
    return cls


@pytest.mark.parametrize("change", ["asdecimal", "enum_class"])
def test_a_type_argument_that_changes_the_values_refuses_the_entry(tmp_path, regions, change):
    """Numeric(asdecimal=True)->False gives floats where the entry holds Decimals; Enum(A)->Enum(B)."""
    import enum
    from decimal import Decimal  # noqa: F401

    from sqlalchemy import Enum, Numeric

    global S18Thing

    class A(enum.Enum):
        x = "x"

    class B(enum.Enum):
        x = "x"

    globals()["S18A"], globals()["S18B"] = A, B
    A.__qualname__, B.__qualname__ = "S18A", "S18B"
    A.__module__ = B.__module__ = __name__
    before, after = {
        "asdecimal": (Numeric(10, 2), Numeric(10, 2, asdecimal=False)),
        "enum_class": (Enum(A), Enum(B)),
    }[change]
    value = {"asdecimal": 1.5, "enum_class": "x"}[change]
    engine = create_engine(f"sqlite:///{tmp_path / 'thing.sqlite'}")
    try:
        S18Thing = _map_thing(("v", mapped_column(before)))
        ThingBase.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(text("insert into s18_thing (id, v) values (1, :v)"), {"v": value})
        factory = _factory(engine, regions, "file")
        with factory() as session:
            session.scalars(select(S18Thing).options(FromCache("file"))).all()  # stored by this deploy
        S18Thing = _map_thing(("v", mapped_column(after)))  # the next deploy
        with Session(engine) as session:
            expected = [type(t.v).__name__ for t in session.scalars(select(S18Thing))]
        factory = _factory(engine, regions, "file")
        with factory() as session:
            got = [type(t.v).__name__ for t in session.scalars(select(S18Thing).options(FromCache("file")))]
        assert got == expected
    finally:
        engine.dispose()
        ThingBase.registry.dispose()
        ThingBase.metadata.clear()
        S18Thing = None


def test_columns_reordered_keep_the_mapping_text():
    """A deploy that only reorders a class's attributes maps rows to objects the same way: entries should be kept."""
    first = mapping_text(_map_thing(("a", mapped_column(String)), ("b", mapped_column(Integer))).__mapper__)
    second = mapping_text(_map_thing(("b", mapped_column(Integer)), ("a", mapped_column(String))).__mapper__)
    ThingBase.registry.dispose()
    ThingBase.metadata.clear()
    assert first == second


# --- objects already in the Session; write_only / dynamic / one-to-one; association proxies ----------


def test_objects_already_in_the_session_as_uncached(db, regions):
    """Modified (not flushed), deleted (not flushed), pending and expired objects, then a query, then commit."""
    statement = lambda *o: select(Doc).options(selectinload(Doc.items), *o).order_by(Doc.id)  # noqa: E731

    def run(factory, options, engine):
        with factory(autoflush=False) as session:
            modified = session.get(Doc, 2)
            modified.title = "modified"
            modified.mdata["k"] = "v"
            deleted = session.scalars(select(Doc).where(Doc.title == "leaf 1")).one()
            session.delete(deleted)
            expired = session.scalars(select(Doc).where(Doc.title == "child 2")).one()
            assert expired.items is not None  # loads
            session.expire(expired)
            session.add(Doc(title="pending"))
            sql = SQLCounter(engine)
            objects = session.scalars(statement(*options)).all()
            count = sql.count
            assert deleted in objects
            view = [
                (o.id, o.title, dict(o.mdata or {}), [i.name for i in o.items], o in session.deleted) for o in objects
            ]
            objects[0].items.append(Item(name="late"))
            objects[-1].mdata["late"] = 1
            session.commit()
        return view, count

    import shutil

    copy = Path(db.url.database).with_name("copy2.sqlite")
    shutil.copyfile(db.url.database, copy)
    other = create_engine(f"sqlite:///{copy}")
    try:
        expected, _ = run(sessionmaker(db), (), db)
        factory = _factory(other, regions)
        with factory() as session:
            session.scalars(statement(FromCache("memory"))).all()
        got, count = run(factory, (FromCache("memory"),), other)
        assert count == 0
        assert got == expected
        assert dump(other) == dump(db)
    finally:
        other.dispose()


class Folder(Base):
    __tablename__ = "s18_folder"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(30))
    files_wo = relationship("File", lazy="write_only", overlaps="files_dyn,files,folder")
    files_dyn = relationship("File", lazy="dynamic", viewonly=True)
    files: Mapped[list[File]] = relationship(back_populates="folder", overlaps="files_wo")
    main: Mapped[File | None] = relationship(
        primaryjoin="and_(File.folder_id == Folder.id, File.main == True)", uselist=False, viewonly=True
    )


class File(Base):
    __tablename__ = "s18_file"
    id: Mapped[int] = mapped_column(primary_key=True)
    folder_id: Mapped[int] = mapped_column(ForeignKey("s18_folder.id"))
    name: Mapped[str] = mapped_column(String(30))
    main: Mapped[bool] = mapped_column(default=False)
    folder: Mapped[Folder] = relationship(back_populates="files", overlaps="files_wo")


def test_write_only_dynamic_and_one_to_one_on_a_hit(tmp_path, regions):
    from sqlalchemy.ext.associationproxy import association_proxy  # noqa: F401

    engine = create_engine(f"sqlite:///{tmp_path / 'f.sqlite'}")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        for n in range(2):
            session.add(Folder(name=f"f{n}", files=[File(name=f"a{n}", main=True), File(name=f"b{n}")]))
        session.commit()
    statement = lambda *o: (  # noqa: E731
        select(Folder).options(selectinload(Folder.files), selectinload(Folder.main), *o).order_by(Folder.id)
    )

    def view(folders):
        return [
            (f.name, [x.name for x in f.files], f.main.name, [x.name for x in f.files_dyn.order_by(File.id)])
            for f in folders
        ]

    with Session(engine) as session:
        expected = view(session.scalars(statement()).all())
    factory = _factory(engine, regions)
    with factory() as session:
        session.scalars(statement(FromCache("memory"))).all()
    with factory() as session:
        sql = SQLCounter(engine)
        folders = session.scalars(statement(FromCache("memory"))).all()
        assert sql.count == 0
        got = view(folders)
        folders[0].files_wo.add(File(name="wo"))
        folders[1].files.append(File(name="appended"))
        session.commit()
    assert got == expected
    with Session(engine) as session:
        names = session.scalars(select(File.name).order_by(File.id)).all()
    assert names[-2:] == ["wo", "appended"]
    engine.dispose()


Doc.item_names = __import__("sqlalchemy.ext.associationproxy", fromlist=["x"]).association_proxy(
    "items", "name", creator=lambda name: Item(name=name)
)


def _proxy(session, objects):
    objects[0].item_names.append("via proxy")
    objects[1].item_names[0] = "renamed"
    objects[2].item_names.insert(0, "first")


def test_association_proxy_changes_on_a_hit_flush_as_uncached(db, regions):
    _both_ways(db, regions, "file", _proxy)


def test_relationship_cache_with_binds(two_dbs, regions):
    from pyramid_sessioncache import RelationshipCache

    a, b = two_dbs
    binds = {Doc: a, Item: b}
    cache = SessionCache(regions, default_region="memory", secret=SECRET)
    statement = select(Doc).where(Doc.id == 2).options(RelationshipCache(Doc.items, "memory"))
    with Session(binds=binds) as session:
        expected = [i.name for i in session.scalars(select(Doc).where(Doc.id == 2)).one().items]
    factory = sessionmaker(binds=binds, info=cache.session_info())
    with factory() as session:
        [i.name for i in session.scalars(statement).one().items]
    sb = SQLCounter(b)
    with factory() as session:
        got = [i.name for i in session.scalars(statement).one().items]
        assert sb.count == 0
    assert got == expected and all(name.endswith("(b)") for name in got)
    with factory() as session:
        session.execute(update(Item).where(Item.doc_id == 2).values(name="now"))
        session.commit()
    with factory() as session:
        assert [i.name for i in session.scalars(statement).one().items] == ["now"] * len(expected)


def test_backrefs_configured_in_another_order_keep_the_mapping_text(tmp_path):
    """Two processes with the same models, importing the modules that add backrefs in another order, must share."""
    (tmp_path / "s18m_p.py").write_text(
        textwrap.dedent(
            """
        from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
        class Base(DeclarativeBase):
            pass
        class P(Base):
            __tablename__ = "p"
            id: Mapped[int] = mapped_column(primary_key=True)
        """
        )
    )
    for name in ("c1", "c2"):
        (tmp_path / f"s18m_{name}.py").write_text(
            textwrap.dedent(
                f"""
            from sqlalchemy import ForeignKey
            from sqlalchemy.orm import Mapped, mapped_column, relationship
            from s18m_p import Base
            class {name.upper()}(Base):
                __tablename__ = "{name}"
                id: Mapped[int] = mapped_column(primary_key=True)
                p_id: Mapped[int] = mapped_column(ForeignKey("p.id"))
                p = relationship("P", backref="{name}s")
            """
            )
        )
    program = textwrap.dedent(
        """
        import sys, importlib
        sys.path.insert(0, sys.argv[1])
        for name in sys.argv[2:]:
            importlib.import_module(name)
        from sqlalchemy.orm import configure_mappers, class_mapper
        configure_mappers()
        from pyramid_sessioncache.engine.values import mapping_text
        from s18m_p import P
        print(mapping_text(class_mapper(P)))
        """
    )
    texts = [
        subprocess.run(
            [sys.executable, "-c", program, str(tmp_path), *order], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        for order in (("s18m_c1", "s18m_c2"), ("s18m_c2", "s18m_c1"))
    ]
    assert texts[0] == texts[1]


def test_a_value_selected_with_its_entity_is_the_entitys_own_as_uncached(db, regions, shared):
    """select(Doc, Doc.data): uncached, row.data is doc.data (one processed column); a hit copies them apart."""
    statement = lambda *o: select(Doc, Doc.data).where(Doc.id == 1).options(*o)  # noqa: E731
    with Session(db) as session:
        doc, data = session.execute(statement()).one()
        expected = data is doc.data
    factory = _factory(db, regions, shared)
    with factory() as session:
        session.execute(statement(FromCache(shared))).all()
    with factory() as session:
        sql = SQLCounter(db)
        doc, data = session.execute(statement(FromCache(shared))).one()
        assert sql.count == 0
        got = data is doc.data
    assert got == expected


# --- PostgreSQL: ARRAY / JSONB copies, savepoints and Sessions sharing a connection ----------------


class PgBase(DeclarativeBase):
    pass


class PgDoc(PgBase):
    __tablename__ = "s18_pgdoc"
    id: Mapped[int] = mapped_column(primary_key=True)
    nums = mapped_column(__import__("sqlalchemy").ARRAY(Integer))
    mnums = mapped_column(MutableList.as_mutable(__import__("sqlalchemy").ARRAY(Integer)))
    blob = mapped_column(__import__("sqlalchemy.dialects.postgresql", fromlist=["JSONB"]).JSONB)


@pytest.fixture
def pg(pg_database):
    engine = create_engine(pg_database)
    PgBase.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([PgDoc(id=n, nums=[n], mnums=[n], blob={"n": [n]}) for n in range(1, 4)])
        session.commit()
    yield engine
    engine.dispose()


def _pg_view(objects):
    return [(d.id, list(d.nums), list(d.mnums), d.blob) for d in objects]


def test_pg_array_jsonb_changed_in_place_stay_private(pg, regions, shared):
    statement = select(PgDoc).order_by(PgDoc.id).options(FromCache(shared))
    with Session(pg) as session:
        expected = _pg_view(session.scalars(select(PgDoc).order_by(PgDoc.id)).all())
    factory = _factory(pg, regions, shared)
    with factory() as session:
        for doc in session.scalars(statement).all():  # the miss
            doc.nums.append(99)
            doc.blob["n"].append(99)
    with factory() as session:
        sql = SQLCounter(pg)
        objects = session.scalars(statement).all()
        assert sql.count == 0
        objects[0].nums.append(98)
        objects[0].mnums.append(7)  # flagged: flushed
        session.commit()
    expected[0] = (1, [1], [1, 7], {"n": [1]})
    with Session(pg) as session:
        assert _pg_view(session.scalars(select(PgDoc).order_by(PgDoc.id)).all()) == expected
    with factory() as session:
        assert _pg_view(session.scalars(statement).all()) == expected


@pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SAWarning")
def test_pg_sessions_sharing_a_connection_with_savepoints(pg, regions):
    cache = SessionCache(regions, default_region="memory", secret=SECRET)
    statement = select(PgDoc.id).order_by(PgDoc.id).options(FromCache("memory"))
    with sessionmaker(pg, info=cache.session_info())() as session:
        committed = session.scalars(statement).all()  # stored
    with sessionmaker(pg, info=cache.session_info())() as main:
        main.scalars(statement).all()
        helper = Session(bind=main.connection(), info=cache.session_info())
        nested = helper.begin_nested()
        helper.add(PgDoc(id=10, nums=[], mnums=[], blob={}))
        helper.flush()
        assert 10 in main.scalars(statement).all()
        assert 10 in helper.scalars(statement).all()
        nested.rollback()
        assert 10 not in main.scalars(statement).all()
        helper.add(PgDoc(id=11, nums=[], mnums=[], blob={}))
        helper.flush()
        assert 11 in main.scalars(statement).all()
        with sessionmaker(pg, info=cache.session_info())() as other:
            assert other.scalars(statement).all() == committed
        main.rollback()
        helper.close()
    with sessionmaker(pg, info=cache.session_info())() as other:
        assert other.scalars(statement).all() == committed


class Note(Base):
    __tablename__ = "s18_note"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(30))
    body: Mapped[str] = mapped_column(String(30), deferred=True, deferred_raiseload=True)
    lazy_body: Mapped[str] = mapped_column(String(30), deferred=True)
    doc_id: Mapped[int | None] = mapped_column(ForeignKey("s18_doc.id"))
    doc: Mapped[Doc | None] = relationship(lazy="raise")


@pytest.mark.parametrize("attribute", ["body", "lazy_body", "doc"])
def test_mapping_level_deferred_and_raise_on_a_hit(tmp_path, regions, attribute):
    from sqlalchemy import exc as sa_exc

    engine = create_engine(f"sqlite:///{tmp_path / 'n.sqlite'}")
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(Doc.__table__).values(id=1, title="d", px=0, py=0))
        conn.execute(insert(Note.__table__).values(id=1, title="t", body="b", lazy_body="lb", doc_id=1))

    def touch(note, sql):
        sql.reset()
        try:
            value = getattr(note, attribute)
            return ("ok", value.title if attribute == "doc" else value, sql.count)
        except sa_exc.InvalidRequestError as error:
            return ("raised", type(error).__name__, sql.count)

    statement = lambda *o: select(Note).options(*o)  # noqa: E731
    sql = SQLCounter(engine)
    with Session(engine) as session:
        note = session.scalars(statement()).one()
        expected = touch(note, sql)
    factory = _factory(engine, regions, "file")
    with factory() as session:
        session.scalars(statement(FromCache("file"))).one()
    with factory() as session:
        sql.reset()
        note = session.scalars(statement(FromCache("file"))).one()
        assert sql.count == 0
        got = touch(note, sql)
    assert got == expected
    engine.dispose()
