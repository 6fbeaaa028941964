"""Attack s34 (ORM): mapping and Session features meeting the cache, cached and uncached side by side.

Optimistic concurrency (``version_id_col``), server-generated values,
savepoints, ``make_transient``, database-only ``ON DELETE`` actions with
``passive_deletes``, triggers made by another process, per-request loader
criteria, many-to-many through the association table, adjacency lists,
``lazy="raise"``, ``refresh()`` of objects a ``RelationshipCache`` loaded.
Each case warms an entry (a hit is proven by counting SQL), writes (in
another process, another engine, Core, bulk or SQL text), then compares
what the cached read returns with what the same query returns uncached.
Real SQLite files, a real PostgreSQL, a real Redis.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import (
    Column,
    Computed,
    FetchedValue,
    ForeignKey,
    Identity,
    String,
    Table,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.ext.associationproxy import AssociationProxy, association_proxy
from sqlalchemy.ext.hybrid import hybrid_property
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    column_property,
    make_transient,
    mapped_column,
    query_expression,
    relationship,
    selectinload,
    sessionmaker,
    with_expression,
    with_loader_criteria,
)
from sqlalchemy.orm.exc import StaleDataError

from pyramid_sessioncache import FromCache, RelationshipCache, SessionCache

from .conftest import SECRET, SQLCounter

ROOT = Path(__file__).resolve().parent.parent


class Base(DeclarativeBase):
    pass


class Doc(Base):
    """A row under optimistic concurrency, with a generated column and a server default."""

    __tablename__ = "s34_doc"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(40))
    price: Mapped[int] = mapped_column(default=1)
    qty: Mapped[int] = mapped_column(default=1)
    total: Mapped[int | None] = mapped_column(Computed("price * qty", persisted=True))
    status: Mapped[str | None] = mapped_column(String(20), server_default="new")
    version: Mapped[int] = mapped_column(nullable=False)
    expr: Mapped[int | None] = query_expression()
    __mapper_args__ = {"version_id_col": version}

    @hybrid_property
    def value(self) -> int:
        return self.price * 10 + self.qty


class Tag(Base):
    __tablename__ = "s34_tag"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(20))


post_tag = Table(
    "s34_post_tag",
    Base.metadata,
    Column("post_id", ForeignKey("s34_post.id"), primary_key=True),
    Column("tag_id", ForeignKey("s34_tag.id"), primary_key=True),
)


class Post(Base):
    __tablename__ = "s34_post"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant: Mapped[int]
    title: Mapped[str] = mapped_column(String(20))
    body: Mapped[str | None] = mapped_column(String(20), deferred=True, deferred_group="text")
    summary: Mapped[str | None] = mapped_column(String(20), deferred=True, deferred_group="text")
    tags: Mapped[list[Tag]] = relationship(secondary=post_tag, order_by=Tag.id)
    tag_names: AssociationProxy[list[str]] = association_proxy("tags", "name", creator=lambda name: Tag(name=name))
    comments: Mapped[list[Comment]] = relationship(order_by="Comment.id", lazy="raise", passive_deletes=True)


class Comment(Base):
    """Its foreign key is declared without an action: the database's schema has one (see :func:`make_schema`)."""

    __tablename__ = "s34_comment"
    id: Mapped[int] = mapped_column(primary_key=True)
    post_id: Mapped[int | None] = mapped_column(ForeignKey("s34_post.id"))
    body: Mapped[str] = mapped_column(String(20))


class Node(Base):
    __tablename__ = "s34_node"
    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("s34_node.id"))
    name: Mapped[str] = mapped_column(String(20))
    children: Mapped[list[Node]] = relationship(lazy="joined", join_depth=2, order_by="Node.id")


class Stat(Base):
    """Kept by a trigger (made outside the models) on every update of a doc."""

    __tablename__ = "s34_stat"
    id: Mapped[int] = mapped_column(primary_key=True)
    updates: Mapped[int] = mapped_column(default=0)


class ItemBase(DeclarativeBase):
    pass


class Item(ItemBase):
    """``touched`` is kept by a trigger: ``server_onupdate``, fetched at once (``eager_defaults``)."""

    __tablename__ = "s34_item"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(20))
    touched: Mapped[int] = mapped_column(server_default="0", server_onupdate=FetchedValue())
    __mapper_args__ = {"eager_defaults": True}


class Employee(Base):
    """Joined-table inheritance under optimistic concurrency: the version lives on the base table."""

    __tablename__ = "s34_employee"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(20))
    version: Mapped[int] = mapped_column(nullable=False)
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "employee", "version_id_col": version}


class Engineer(Employee):
    __tablename__ = "s34_engineer"
    id: Mapped[int] = mapped_column(ForeignKey("s34_employee.id"), primary_key=True)
    lang: Mapped[str] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_identity": "engineer", "polymorphic_load": "selectin"}


class Manager(Employee):
    __tablename__ = "s34_manager"
    id: Mapped[int] = mapped_column(ForeignKey("s34_employee.id"), primary_key=True)
    level: Mapped[int]
    __mapper_args__ = {"polymorphic_identity": "manager", "polymorphic_load": "inline"}


class PgBase(DeclarativeBase):
    pass


class PgDoc(PgBase):
    """PostgreSQL: an ``Identity()`` key, a generated column, a trigger's counter, ``xmin`` as the version."""

    __tablename__ = "s34_pgdoc"
    id: Mapped[int] = mapped_column(Identity(), primary_key=True)
    title: Mapped[str] = mapped_column(String(40))
    price: Mapped[int] = mapped_column(default=1)
    total: Mapped[int | None] = mapped_column(Computed("price * 2", persisted=True))
    touched: Mapped[int] = mapped_column(server_default="0", server_onupdate=FetchedValue())
    xmin: Mapped[int] = mapped_column(system=True, server_default=FetchedValue())
    __mapper_args__ = {"version_id_col": xmin, "version_id_generator": False, "eager_defaults": True}


#: The comments of a post whose body starts with "c": a view-only relationship with a custom join.
Post.c_comments = relationship(
    Comment,
    primaryjoin=lambda: (Comment.post_id == Post.id) & Comment.body.like("c%"),
    viewonly=True,
    order_by=lambda: Comment.id.desc(),
    lazy="selectin",
)

#: Posts count their comments: a correlated subquery over another table.
Post.comment_count = column_property(
    select(func.count(Comment.id)).where(Comment.post_id == Post.id).correlate_except(Comment).scalar_subquery()
)

#: The comment table as the database holds it: ON DELETE SET NULL, which the models do not say.
COMMENT_DDL = (
    "CREATE TABLE s34_comment (id INTEGER PRIMARY KEY, "
    "post_id INTEGER REFERENCES s34_post(id) ON DELETE {action} ON UPDATE CASCADE, body VARCHAR(20) NOT NULL)"
)


def make_schema(engine, action: str = "SET NULL") -> None:
    """Every table of the models, the comment table with a database-only ``ON DELETE`` action, and rows."""
    tables = [t for t in Base.metadata.sorted_tables if t.name != "s34_comment"]
    Base.metadata.create_all(engine, tables=tables)
    with engine.begin() as conn:
        conn.exec_driver_sql(COMMENT_DDL.format(action=action))
    with Session(engine) as s:
        s.add_all([Doc(id=i, title=f"doc{i}", price=i, qty=2) for i in (1, 2, 3)])
        tags = [Tag(id=i, name=f"tag{i}") for i in (1, 2, 3)]
        s.add_all(
            [
                Post(id=1, tenant=1, title="p1", body="b1", summary="s1", tags=tags[:2]),
                Post(id=2, tenant=2, title="p2", tags=tags[2:]),
            ]
        )
        s.add_all([Comment(id=1, post_id=1, body="c1"), Comment(id=2, post_id=1, body="c2")])
        s.add_all([Comment(id=3, post_id=2, body="c3")])
        s.add_all(
            [Node(id=1, name="root"), Node(id=2, parent_id=1, name="kid"), Node(id=3, parent_id=2, name="grandkid")]
        )
        s.add(Stat(id=1, updates=0))
        s.add_all([Engineer(id=1, name="e1", lang="py"), Manager(id=2, name="m2", level=1), Employee(id=3, name="x3")])
        s.commit()


def sqlite_fks_on(engine) -> None:
    """Foreign keys enforced (and their actions run) on every SQLite connection of ``engine``."""

    @event.listens_for(engine, "connect")
    def _on(dbapi_connection, record):
        dbapi_connection.execute("PRAGMA foreign_keys = ON")


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 's34.sqlite'}"
    engine = create_engine(url)
    sqlite_fks_on(engine)
    make_schema(engine)
    engine.dispose()
    return url


@pytest.fixture
def s34_engine(sqlite_url):
    engine = create_engine(sqlite_url)
    sqlite_fks_on(engine)
    yield engine
    engine.dispose()


@pytest.fixture(params=["file", "redis"])
def shared(request, tmp_path) -> dict:
    """The options of a region several processes share: ``file``, then ``ext:redis``."""
    if request.param == "redis":
        return {"type": "ext:redis", "url": request.getfixturevalue("redis_url")}
    return {"type": "file", "data_dir": str(tmp_path / "cache"), "lock_dir": str(tmp_path / "locks")}


@pytest.fixture
def cache(request, tmp_path) -> SessionCache:
    """Regions ``local``, ``memory`` and ``shared``: the test's ``shared`` fixture if it asks for one, else a file."""
    if "shared" in request.fixturenames:
        shared = request.getfixturevalue("shared")
    else:
        shared = {"type": "file", "data_dir": str(tmp_path / "cache"), "lock_dir": str(tmp_path / "locks")}
    return SessionCache(
        {"local": {"type": "ext:local_session"}, "memory": {"type": "memory"}, "shared": shared}, secret=SECRET
    )


@pytest.fixture
def Sess(s34_engine, cache):
    return sessionmaker(s34_engine, info=cache.session_info())


#: Run in another process: ``argv`` = url, the shared region's options, then Python run with ``s`` (a Session,
#: committed after) and the models in scope.
OTHER = """
import json, sys
from sqlalchemy import create_engine, event, text, update, delete, insert
from sqlalchemy.orm import sessionmaker
from pyramid_sessioncache import SessionCache
from tests.test_attack_s34_orm import *
from tests.conftest import SECRET
cache = SessionCache({"shared": json.loads(sys.argv[2])}, secret=SECRET)
engine = create_engine(sys.argv[1])
sqlite_fks_on(engine) if engine.dialect.name == "sqlite" else None
with sessionmaker(engine, info=cache.session_info())() as s:
    exec(sys.argv[3])
    s.commit()
engine.dispose()
"""


def in_another_process(url: str, shared: dict, code: str) -> None:
    """Run ``code`` in a Session of another process (a cache on ``shared`` in it), and commit."""
    subprocess.run([sys.executable, "-c", OTHER, url, json.dumps(shared), code], cwd=ROOT, check=True, timeout=120)


def plain(objects, *attributes) -> list[tuple]:
    return [tuple(getattr(o, a) for a in attributes) for o in objects]


def truth(engine, statement, *attributes) -> list[tuple]:
    with Session(engine) as s:
        return plain(s.execute(statement).unique().scalars().all(), *attributes)


def cached(session, statement, region: str, *attributes) -> list[tuple]:
    return plain(session.execute(statement.options(FromCache(region))).unique().scalars().all(), *attributes)


def warm(Sess, engine, statement, region: str, *attributes) -> list[tuple]:
    """Store ``statement``'s entry and prove the next read of a new Session is a hit; return its rows."""
    with Sess() as s:
        first = cached(s, statement, region, *attributes)
    counter = SQLCounter(engine)
    with Sess() as s:
        assert cached(s, statement, region, *attributes) == first
    assert counter.count == 0, counter
    return first


DOCS = select(Doc).order_by(Doc.id)
DOC_COLUMNS = ("id", "title", "price", "qty", "total", "status", "version")


# 1. Optimistic concurrency --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "write",
    [
        "s.get(Doc, 1).title = 'orm'",
        "s.execute(update(Doc).where(Doc.id == 1).values(title='core', version=Doc.version + 1))",
        "s.execute(text('UPDATE s34_doc SET title = :t, version = version + 1 WHERE id = 1'), {'t': 'text'})",
    ],
)
def test_a_version_bump_in_another_process_is_never_served_stale_and_the_next_flush_succeeds(
    sqlite_url, s34_engine, Sess, shared, write
):
    """A shared entry of version 1; another process bumps the version: served version 2, and a flush succeeds."""
    warm(Sess, s34_engine, DOCS, "shared", *DOC_COLUMNS)
    in_another_process(sqlite_url, shared, write)
    expected = truth(s34_engine, DOCS, *DOC_COLUMNS)
    assert expected[0][-1] == 2
    with Sess() as s:
        assert cached(s, DOCS, "shared", *DOC_COLUMNS) == expected
        doc = s.execute(DOCS.options(FromCache("shared"))).scalars().first()
        doc.title = "mine"
        s.commit()  # uncached, version 2 is what the row holds: no StaleDataError
    assert truth(s34_engine, DOCS, "title", "version")[0] == ("mine", 3)


@pytest.mark.parametrize("region", ["local", "memory", "shared"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_a_held_object_with_a_stale_version_raises_at_flush_as_uncached(s34_engine, Sess, region, use_cache):
    """A Session holds doc 1 (version 1); another engine bumps it; a read, then a flush: StaleDataError either way."""
    other = create_engine(s34_engine.url)
    try:
        with Sess() as s:
            doc = s.execute(DOCS.options(FromCache(region))).scalars().first()
            with Session(other) as writer:
                writer.get(Doc, 1).title = "theirs"
                writer.commit()
            statement = DOCS.options(FromCache(region)) if use_cache else DOCS
            again = s.execute(statement).scalars().first()
            assert again is doc and doc.version == 1  # the identity map is not overwritten
            doc.title = "mine"
            with pytest.raises(StaleDataError):
                s.flush()
    finally:
        other.dispose()


def test_a_version_bump_of_an_expired_held_object_refilled_by_a_hit_is_current(sqlite_url, s34_engine, Sess, shared):
    """Doc 1 held and expired; another process bumps it; a shared read refills it with version 2, a flush works."""
    warm(Sess, s34_engine, DOCS, "shared", *DOC_COLUMNS)
    with Sess() as s:
        doc = s.get(Doc, 1)
        s.commit()  # expires doc
        in_another_process(sqlite_url, shared, "s.get(Doc, 1).price = 7")
        assert cached(s, DOCS, "shared", *DOC_COLUMNS) == truth(s34_engine, DOCS, *DOC_COLUMNS)
        assert (doc.version, doc.total) == (2, 14)
        doc.title = "mine"
        s.commit()


# 2. Server-generated values ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("region", ["local", "memory", "shared"])
def test_a_flush_that_changes_a_generated_column_then_a_cached_read_in_the_same_session(Sess, s34_engine, region):
    """Price changed and flushed: ``total`` (generated) and ``status`` are read anew, cached or not."""
    with Sess() as s:
        doc = cached(s, DOCS, region, *DOC_COLUMNS)
        s.get(Doc, 1).price = 5
        s.execute(update(Doc).where(Doc.id == 2).values(qty=10))  # Core: doc 2 is stale in the identity map...
        got = cached(s, DOCS.execution_options(populate_existing=True), region, *DOC_COLUMNS)
        with Session(s.connection()) as same_transaction:
            expected = plain(same_transaction.execute(DOCS).scalars().all(), *DOC_COLUMNS)
        assert got == expected
        assert got[0][4] == 10 and got[1][4] == 20
        del doc


def test_eager_defaults_server_onupdate_and_a_shared_hit_after_a_commit(tmp_path, shared):
    """``server_onupdate`` kept by a trigger, ``eager_defaults``: another Session's update is served fresh."""

    engine = create_engine(f"sqlite:///{tmp_path / 'item.sqlite'}")
    try:
        ItemBase.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE TRIGGER s34_touch AFTER UPDATE OF name ON s34_item BEGIN "
                "UPDATE s34_item SET touched = touched + 1 WHERE id = NEW.id; END"
            )
            conn.execute(insert(Item.__table__), [{"id": 1, "name": "a"}])
        cache = SessionCache({"shared": shared}, secret=SECRET)
        Sessions = sessionmaker(engine, info=cache.session_info())
        items = select(Item).order_by(Item.id)
        warm(Sessions, engine, items, "shared", "id", "name", "touched")
        with Sessions() as s:
            item = s.execute(items.options(FromCache("shared"))).scalars().one()
            item.name = "b"
            s.flush()
            # what eager_defaults fetched (SQLite's RETURNING: before the AFTER trigger), as uncached
            assert cached(s, items, "shared", "touched") == plain(s.execute(items).scalars(), "touched")
            s.commit()
        with Sessions() as s:
            assert cached(s, items, "shared", "id", "name", "touched") == truth(engine, items, "id", "name", "touched")
    finally:
        engine.dispose()


# 3. Savepoints -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("region", ["local", "memory", "shared"])
def test_a_delete_rolled_back_with_its_savepoint_is_not_hidden_by_an_entry_read_inside_it(Sess, region):
    """Inside a savepoint doc 3 is deleted and the docs read (cached); the savepoint rolls back: doc 3 is back."""
    with Sess() as s:
        assert len(cached(s, DOCS, region, "id")) == 3
        nested = s.begin_nested()
        s.delete(s.get(Doc, 3))
        s.flush()
        assert cached(s, DOCS, region, "id") == [(1,), (2,)]
        nested.rollback()
        assert cached(s, DOCS, region, "id") == plain(s.execute(DOCS).scalars().all(), "id") == [(1,), (2,), (3,)]


@pytest.mark.parametrize("region", ["local", "memory", "shared"])
def test_an_insert_rolled_back_with_its_savepoint_is_not_served(Sess, region):
    """Inside a savepoint doc 4 is added and the docs read (cached); the savepoint rolls back: no doc 4."""
    with Sess() as s:
        nested = s.begin_nested()
        s.add(Doc(id=4, title="doc4"))
        s.flush()
        assert cached(s, DOCS, region, "id") == [(1,), (2,), (3,), (4,)]
        nested.rollback()
        assert cached(s, DOCS, region, "id") == plain(s.execute(DOCS).scalars().all(), "id") == [(1,), (2,), (3,)]
    with Sess() as s:
        assert cached(s, DOCS, region, "id") == [(1,), (2,), (3,)]


@pytest.mark.parametrize("region", ["local", "memory", "shared"])
def test_an_update_rolled_back_with_its_savepoint_by_core_is_not_served(Sess, s34_engine, region):
    """A Core UPDATE inside a savepoint, read cached there, rolled back: the title is the committed one again."""
    with Sess() as s:
        cached(s, DOCS, region, "id", "title")
        nested = s.begin_nested()
        s.execute(
            update(Doc).where(Doc.id == 1).values(title="inner"), execution_options={"synchronize_session": False}
        )
        inner = cached(s, DOCS.execution_options(populate_existing=True), region, "id", "title")
        assert inner[0] == (1, "inner")
        nested.rollback()
        got = cached(s, DOCS, region, "id", "title")
        expected = plain(s.execute(DOCS).scalars().all(), "id", "title")
        assert got == expected
    with Sess() as s:
        assert cached(s, DOCS, region, "id", "title") == truth(s34_engine, DOCS, "id", "title")


# 4. make_transient, expunge ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("region", ["local", "memory", "shared"])
def test_an_object_made_transient_and_added_again_is_not_served_as_persistent(Sess, region):
    """Doc 1 read cached, made transient and added again (pending): a read under no_autoflush loads a new object."""
    results = {}
    for use_cache in (False, True):
        with Sess() as s:
            doc = s.execute(DOCS.options(FromCache(region))).scalars().first()
            make_transient(doc)
            s.add(doc)
            with s.no_autoflush:
                statement = DOCS.options(FromCache(region)) if use_cache else DOCS
                first = s.execute(statement).scalars().first()
                results[use_cache] = (first is doc, first in s.new, first.id)
    assert results[True] == results[False] == (False, False, 1)


@pytest.mark.parametrize("region", ["local", "memory", "shared"])
@pytest.mark.parametrize("use_cache", [False, True])
def test_the_copy_recipe_under_autoflush_off_leaves_the_original_row_to_the_query(s34_engine, cache, region, use_cache):
    """``make_transient(doc); doc.id = None; session.add(doc)`` (a copy, pending): the query still gives row 1.

    SQLAlchemy's recipe for copying a row, in a Session with
    ``autoflush=False``: the read of the docs loads row 1 as a new
    persistent object; the pending copy (no id yet) is no row of the query.
    """
    Sessions = sessionmaker(s34_engine, info=cache.session_info(), autoflush=False)
    with Sessions() as s:
        doc = s.execute(DOCS.options(FromCache(region))).scalars().first()
        make_transient(doc)
        doc.id = None
        doc.title = "the copy"
        s.add(doc)
        statement = DOCS.options(FromCache(region)) if use_cache else DOCS
        docs = s.execute(statement).scalars().all()
        assert [(d.id, d.title) for d in docs] == [(1, "doc1"), (2, "doc2"), (3, "doc3")]
        assert all(d is not doc and d not in s.new for d in docs)


@pytest.mark.parametrize("region", ["local", "memory", "shared"])
@pytest.mark.parametrize("use_cache", [False, True])
def test_session_get_of_an_identity_whose_object_was_made_transient_and_added_again(Sess, region, use_cache):
    """``Session.get(Doc, 1)`` after ``make_transient(doc); add(doc)``: the identity map lacks it, the row is loaded.

    Uncached, the row becomes a new persistent object (in the identity
    map); the pending object stays pending.
    """
    with Sess() as s:
        doc = s.get(Doc, 1, options=[FromCache(region)])
        make_transient(doc)
        s.add(doc)
        with s.no_autoflush:
            again = s.get(Doc, 1, options=[FromCache(region)] if use_cache else [])
        assert (again is doc, again in s.new, again in s.identity_map.values()) == (False, False, True)


# 5. Database-only ON DELETE actions, passive_deletes -----------------------------------------------------------------


COMMENTS = select(Comment).order_by(Comment.id)


@pytest.mark.parametrize(
    "region, how",
    [("memory", "orm"), ("memory", "core"), ("shared", "orm"), ("shared", "core"), ("shared", "other process")],
)  # a memory region lives in one process: another's write reaches shared regions only
def test_a_database_only_on_delete_set_null_is_seen_on_sqlite(sqlite_url, s34_engine, Sess, shared, region, how):
    """The schema says ON DELETE SET NULL, the models do not; deleting post 1 nulls its comments."""
    warm(Sess, s34_engine, COMMENTS, region, "id", "post_id")
    if how == "other process":
        in_another_process(sqlite_url, shared, "s.execute(delete(post_tag)); s.delete(s.get(Post, 1))")
    else:
        with Sess() as s:
            s.execute(delete(post_tag))
            if how == "orm":
                s.delete(s.get(Post, 1))  # passive_deletes: the comments are not loaded
            else:
                s.execute(delete(Post).where(Post.id == 1))
            s.commit()
    expected = truth(s34_engine, COMMENTS, "id", "post_id")
    assert expected == [(1, None), (2, None), (3, 2)]
    with Sess() as s:
        assert cached(s, COMMENTS, region, "id", "post_id") == expected


def test_a_database_only_on_delete_cascade_is_seen_on_postgresql(pg_database, shared):
    """On PostgreSQL, ON DELETE CASCADE only in the database: a post deleted takes its comments' entries with it."""
    engine = create_engine(pg_database)
    try:
        make_schema(engine, action="CASCADE")
        cache = SessionCache({"shared": shared}, secret=SECRET)
        Sessions = sessionmaker(engine, info=cache.session_info())
        warm(Sessions, engine, COMMENTS, "shared", "id", "post_id")
        in_another_process(pg_database, shared, "s.execute(delete(post_tag)); s.delete(s.get(Post, 1))")
        expected = truth(engine, COMMENTS, "id", "post_id")
        assert expected == [(3, 2)]
        with Sessions() as s:
            assert cached(s, COMMENTS, "shared", "id", "post_id") == expected
    finally:
        engine.dispose()


# 6. A trigger made by another process --------------------------------------------------------------------------------


def test_a_trigger_made_by_another_process_is_seen_by_a_writer_of_this_one(sqlite_url, s34_engine, Sess, shared):
    """Another process creates a trigger doc -> stat after this one read its schema; this one updates a doc."""
    stats = select(Stat)
    warm(Sess, s34_engine, stats, "shared", "id", "updates")
    with Sess() as s:  # this process writes once (it knows the schema now)
        s.get(Doc, 2).title = "x"
        s.commit()
    in_another_process(
        sqlite_url,
        shared,
        "s.execute(text('CREATE TRIGGER s34_count AFTER UPDATE ON s34_doc BEGIN "
        "UPDATE s34_stat SET updates = updates + 1; END'))",
    )
    warm(Sess, s34_engine, stats, "shared", "id", "updates")
    with Sess() as s:
        s.get(Doc, 1).title = "y"
        s.commit()
    expected = truth(s34_engine, stats, "id", "updates")
    assert expected == [(1, 1)]
    with Sess() as s:
        assert cached(s, stats, "shared", "id", "updates") == expected


# 7. Loader criteria per request -------------------------------------------------------------------------------------


POSTS = select(Post).order_by(Post.id)


@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("region", ["local", "memory", "shared"])
def test_a_tenant_criteria_lambda_in_a_listener_keys_each_tenant_apart(s34_engine, cache, region, track):
    """A ``do_orm_execute`` listener adds ``with_loader_criteria(Post, lambda: tenant)``: each tenant its own rows."""
    Sessions = sessionmaker(s34_engine, info=cache.session_info())

    @event.listens_for(Sessions, "do_orm_execute")
    def _tenant(state):
        if state.is_select:
            tenant = state.session.info["tenant"]
            state.statement = state.statement.options(
                with_loader_criteria(Post, lambda cls: cls.tenant == tenant, track_closure_variables=track)
            )

    for tenant in (1, 2, 1, 2):
        with Sessions(info={"tenant": tenant}) as s:
            expected = [(p.id, p.tenant) for p in s.execute(POSTS).scalars()]
        with Sessions(info={"tenant": tenant}) as s:
            assert cached(s, POSTS, region, "id", "tenant") == expected == [(tenant, tenant)]


# 8. Relationships ---------------------------------------------------------------------------------------------------


TAGGED = select(Post).order_by(Post.id).options(selectinload(Post.tags))


@pytest.mark.parametrize("region", ["memory", "shared"])
@pytest.mark.parametrize(
    "write",
    [
        lambda s: s.execute(insert(post_tag).values(post_id=1, tag_id=3)),
        lambda s: s.execute(text("DELETE FROM s34_post_tag WHERE post_id = 1 AND tag_id = 1")),
        lambda s: s.execute(update(Tag).where(Tag.id == 2).values(name="renamed")),
    ],
)
def test_many_to_many_written_through_the_association_table(s34_engine, Sess, region, write):
    """Tags of posts (selectinload, association proxy) after Core writes to the association table."""

    def names(session, statement):
        return [(p.id, list(p.tag_names)) for p in session.execute(statement).scalars()]

    with Sess() as s:
        names(s, TAGGED.options(FromCache(region)))
    with Sess() as s:
        write(s)
        s.commit()
    with Sess() as s:
        expected = names(s, TAGGED)
    with Sess() as s:
        assert names(s, TAGGED.options(FromCache(region))) == expected


@pytest.mark.parametrize("region", ["local", "memory", "shared"])
def test_an_adjacency_list_joined_to_depth_two_after_a_grandchild_is_renamed(s34_engine, Sess, region):
    """``lazy="joined", join_depth=2``: the grandchild renamed by Core is served renamed."""
    roots = select(Node).where(Node.parent_id.is_(None))

    def tree(session, statement):
        root = session.execute(statement).unique().scalars().one()
        return [(root.name, [(k.name, [g.name for g in k.children]) for k in root.children])]

    with Sess() as s:
        tree(s, roots.options(FromCache(region)))
        with Session(create_engine(s34_engine.url)) as other:
            other.execute(update(Node).where(Node.id == 3).values(name="renamed"))
            other.commit()
            other.get_bind().dispose()
        if region == "local":
            s.expire_all()  # the held objects are not overwritten by an uncached read either
        assert tree(s, roots.options(FromCache(region))) == tree(Session(s34_engine), roots)
    with Sess() as s:
        assert tree(s, roots.options(FromCache(region))) == [("root", [("kid", ["renamed"])])]


@pytest.mark.parametrize("region", ["memory", "shared"])
def test_lazy_raise_still_raises_on_objects_of_a_hit(s34_engine, Sess, region):
    """``Post.comments`` is ``lazy="raise"``: an object from a hit raises on access, as one loaded uncached."""
    warm(Sess, s34_engine, POSTS, region, "id")
    with Sess() as s:
        post = s.execute(POSTS.options(FromCache(region))).scalars().first()
        with pytest.raises(Exception) as raised:
            _ = post.comments
        assert "lazy='raise'" in str(raised.value)


@pytest.mark.parametrize("region", ["memory", "shared"])
def test_a_column_property_over_another_table_after_a_bulk_update(s34_engine, Sess, region):
    """``Post.comment_count`` counts comments: moving a comment with the bulk API is served at once."""
    warm(Sess, s34_engine, POSTS, region, "id", "comment_count")
    with Sess() as s:
        s.bulk_update_mappings(Comment, [{"id": 1, "post_id": 2}])
        s.commit()
    with Sess() as s:
        assert cached(s, POSTS, region, "id", "comment_count") == truth(s34_engine, POSTS, "id", "comment_count")
        assert cached(s, POSTS, region, "id", "comment_count") == [(1, 1), (2, 2)]


@pytest.mark.parametrize("region", ["memory", "shared"])
def test_with_expression_over_another_table_and_a_hybrid_in_order_by(s34_engine, Sess, region):
    """``with_expression`` counting tags (association table) and a hybrid ordering: after a tag moves."""
    count = select(func.count()).select_from(post_tag).where(post_tag.c.post_id == Doc.id).scalar_subquery()
    statement = select(Doc).options(with_expression(Doc.expr, count)).where(Doc.value > 0).order_by(Doc.value.desc())
    warm(Sess, s34_engine, statement, region, "id", "expr")
    with Sess() as s:
        s.execute(update(post_tag).where(post_tag.c.tag_id == 3).values(post_id=1))
        s.commit()
    with Sess() as s:
        expected = truth(s34_engine, statement, "id", "expr")
        assert expected == [(3, 0), (2, 0), (1, 3)]
        assert cached(s, statement, region, "id", "expr") == expected


# 9. Session APIs around hits -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("region", ["local", "memory", "shared"])
def test_refresh_of_a_post_loaded_with_a_relationship_cache_reads_the_database(s34_engine, Sess, region):
    """A post read with ``RelationshipCache`` (its objects carry it); renamed elsewhere; ``refresh()`` reads it."""
    statement = POSTS.options(FromCache(region), RelationshipCache(Post.tags, region))
    with Sess() as s:
        post = s.execute(statement).scalars().first()
        [t.name for t in post.tags]
        with Session(create_engine(s34_engine.url)) as other:
            other.execute(update(Post).where(Post.id == 1).values(title="renamed"))
            other.commit()
            other.get_bind().dispose()
        s.refresh(post)
        assert post.title == "renamed"
        s.expire(post)
        assert post.title == "renamed"


@pytest.mark.parametrize("region", ["local", "memory", "shared"])
def test_autoflush_off_a_pending_object_is_not_served_by_a_hit(s34_engine, cache, region):
    """``autoflush=False``: a pending doc is not in what the query returns, cached or not."""
    Sessions = sessionmaker(s34_engine, info=cache.session_info(), autoflush=False)
    with Sessions() as s:
        cached(s, DOCS, region, "id")
        s.add(Doc(id=9, title="pending"))
        s.get(Doc, 2).title = "changed, not flushed"
        assert cached(s, DOCS, region, "id", "title") == plain(s.execute(DOCS).scalars().all(), "id", "title")


@pytest.mark.parametrize("region", ["local", "memory", "shared"])
def test_get_with_populate_existing_after_a_commit_elsewhere(s34_engine, Sess, region):
    """``Session.get(..., populate_existing=True)`` with the caching option, after another engine's commit."""
    with Sess() as s:
        doc = s.get(Doc, 1, options=[FromCache(region)])
        with Session(create_engine(s34_engine.url)) as other:
            other.get(Doc, 1).price = 4
            other.commit()
            other.get_bind().dispose()
        again = s.get(Doc, 1, options=[FromCache(region)], populate_existing=True)
        assert again is doc
        assert (doc.price, doc.total, doc.version) == (4, 8, 2)


@pytest.mark.parametrize("region", ["memory", "shared"])
def test_a_database_only_on_update_cascade_is_seen_on_sqlite(sqlite_url, s34_engine, Sess, region):
    """The schema says ON UPDATE CASCADE, the models do not: a post's new id reaches its comments."""
    warm(Sess, s34_engine, COMMENTS, region, "id", "post_id")
    with Sess() as s:
        s.execute(delete(post_tag).where(post_tag.c.post_id == 2))
        s.execute(update(Post).where(Post.id == 2).values(id=20))
        s.commit()
    expected = truth(s34_engine, COMMENTS, "id", "post_id")
    assert expected == [(1, 1), (2, 1), (3, 20)]
    with Sess() as s:
        assert cached(s, COMMENTS, region, "id", "post_id") == expected


# 10. A temporary trigger of one SQLite connection ------------------------------------------------------------------


@pytest.mark.parametrize("region", ["memory", "shared"])
@pytest.mark.parametrize("later", [False, True])
def test_a_temporary_trigger_of_the_writing_connection_is_seen(s34_engine, Sess, region, later):
    """``CREATE TEMP TRIGGER`` on one connection (doc -> stat); a write to docs there updates stat: seen."""
    stats = select(Stat)
    warm(Sess, s34_engine, stats, region, "id", "updates")
    with s34_engine.connect() as conn:
        conn.exec_driver_sql(
            "CREATE TEMP TRIGGER s34_temp_count AFTER UPDATE ON main.s34_doc BEGIN "
            "UPDATE s34_stat SET updates = updates + 1; END"
        )
        conn.commit()
        if later:  # the connection goes back to the pool, and is taken again by a Session
            conn.close()
            with Sess() as s:
                s.get(Doc, 1).title = "y"
                s.commit()
        else:
            conn.execute(update(Doc).where(Doc.id == 1).values(title="y", version=Doc.version + 1))
            conn.commit()
    expected = truth(s34_engine, stats, "id", "updates")
    assert expected == [(1, 1)]
    with Sess() as s:
        assert cached(s, stats, region, "id", "updates") == expected


# 11. merge() and RelationshipCache ------------------------------------------------------------------------------------


@pytest.mark.parametrize("region", ["memory", "shared"])
def test_merge_of_a_detached_doc_with_an_old_version_raises_as_uncached(s34_engine, Sess, region):
    """A detached doc of version 1; another engine bumps it; ``merge(options=[FromCache])`` raises StaleDataError."""
    warm(Sess, s34_engine, select(Doc).where(Doc.id == 1), region, "id")
    with Sess() as s:
        detached = s.get(Doc, 1, options=[FromCache(region)])
    other = create_engine(s34_engine.url)
    try:
        with Session(other) as writer:
            writer.get(Doc, 1).price = 9
            writer.commit()
    finally:
        other.dispose()
    with Sess() as s, pytest.raises(StaleDataError):
        s.merge(detached, options=[FromCache(region)])


@pytest.mark.parametrize("region", ["local", "memory", "shared"])
def test_a_relationship_cache_under_per_request_criteria_keys_each_tenant_apart(s34_engine, cache, region):
    """A listener hides tags per request (also in lazy loads); ``RelationshipCache(Post.tags)`` per request."""
    Sessions = sessionmaker(s34_engine, info=cache.session_info())

    @event.listens_for(Sessions, "do_orm_execute")
    def _hide(state):
        if state.is_select:
            hidden = state.session.info["hidden"]
            state.statement = state.statement.options(
                with_loader_criteria(Tag, lambda cls: cls.name != hidden, include_aliases=True)
            )

    for hidden in ("tag1", "tag2", "tag1", "tag2"):
        with Sessions(info={"hidden": hidden}) as s:
            expected = [t.name for t in s.get(Post, 1).tags]
        with Sessions(info={"hidden": hidden}) as s:
            post = s.execute(POSTS.options(RelationshipCache(Post.tags, region))).scalars().first()
            assert [t.name for t in post.tags] == expected
            assert hidden not in expected


def test_a_relationship_cache_lazy_load_after_another_process_writes_the_association_table(
    sqlite_url, s34_engine, Sess, shared
):
    """``RelationshipCache(Post.tags, shared)``: another process tags post 1 through the association table."""

    def tag_ids(session):
        posts = session.execute(POSTS.options(RelationshipCache(Post.tags, "shared"))).scalars().all()
        return [(p.id, [t.id for t in p.tags]) for p in posts]

    with Sess() as s:
        tag_ids(s)
    counter = SQLCounter(s34_engine)
    with Sess() as s:
        assert tag_ids(s) == [(1, [1, 2]), (2, [3])]
    lazy_loads = counter.count
    in_another_process(sqlite_url, shared, "s.execute(insert(post_tag).values(post_id=1, tag_id=3))")
    with Sess() as s:
        assert tag_ids(s) == [(1, [1, 2, 3]), (2, [3])]
    assert lazy_loads <= 4  # the posts, transaction control: the lazy loads were hits


# 12. Held objects refilled by a hit -----------------------------------------------------------------------------------


def docs_and_flush(Sessions, region, writer, expire=None, pending=False) -> list:
    """What a Session holding doc 1 sees after another engine's commit, and how its next flush ends.

    Another Session stores the docs' entry (current: after the commit) so
    that the Session's read through ``region`` is a hit.
    """
    seen = []
    with Sessions() as s:
        doc = s.execute(DOCS.options(FromCache(region)) if region else DOCS).scalars().first()
        if expire is not None:
            s.expire(doc, expire)
        if pending:
            doc.title = "pending"
        with Session(writer) as w:
            w.get(Doc, 1).qty = 3
            w.commit()
        if region and region != "local":
            with Sessions() as other:
                other.execute(DOCS.options(FromCache(region))).all()
        with s.no_autoflush:
            docs = s.execute(DOCS.options(FromCache(region)) if region else DOCS).scalars().all()
        seen.append([(d.id, d.title, d.qty, d.total, d.version) for d in docs])
        doc.title = "mine"
        try:
            s.commit()
            seen.append("committed")
        except StaleDataError:
            seen.append("stale")
    return seen


@pytest.mark.parametrize("region", ["local", "memory", "shared"])
@pytest.mark.parametrize(
    "expire, pending",
    [(["version", "total"], False), (["version"], True), (None, False)],
    ids=["expired", "pending", "held"],
)
def test_a_held_doc_with_an_expired_version_is_refilled_as_uncached(sqlite_url, cache, region, expire, pending):
    """Doc 1 held, its version (and generated total) expired or not, a pending change or not; another commit; read; flush."""
    outcomes = []
    for use in (None, region):
        path = Path(sqlite_url.removeprefix("sqlite:///"))
        copy = path.with_name(f"copy-{use}.sqlite")
        copy.write_bytes(path.read_bytes())
        engine, writer = create_engine(f"sqlite:///{copy}"), create_engine(f"sqlite:///{copy}")
        try:
            outcomes.append(
                docs_and_flush(sessionmaker(engine, info=cache.session_info()), use, writer, expire, pending)
            )
        finally:
            engine.dispose()
            writer.dispose()
    assert outcomes[1] == outcomes[0]


@pytest.mark.parametrize("region", ["local", "memory", "shared"])
def test_expire_on_commit_off_a_generated_column_left_expired_by_a_flush(s34_engine, cache, region):
    """``expire_on_commit=False``: a flush leaves ``total`` expired; after another commit, the read fills it as uncached."""
    Sessions = sessionmaker(s34_engine, info=cache.session_info(), expire_on_commit=False)
    with Sessions() as s:
        doc = s.get(Doc, 1)
        doc.price = 5
        s.commit()
        other = create_engine(s34_engine.url)
        try:
            with Session(other) as w:
                w.get(Doc, 1).qty = 3
                w.commit()
        finally:
            other.dispose()
        with Sessions() as warmer:
            warmer.execute(DOCS.options(FromCache(region))).all()
        s.execute(DOCS.options(FromCache(region))).all()
        assert (doc.price, doc.qty, doc.total, doc.version) == (5, 2, 15, 2)  # total refilled; the rest as held
        doc.title = "mine"
        with pytest.raises(StaleDataError):
            s.commit()


# 13. PostgreSQL: Identity(), a generated column, a BEFORE trigger, xmin as the version -------------------------------


PGDOCS = select(PgDoc).order_by(PgDoc.id)


@pytest.fixture
def pg_docs(pg_database):
    engine = create_engine(pg_database)
    PgBase.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE FUNCTION s34_touch() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN NEW.touched := OLD.touched + 1; RETURN NEW; END $$"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER s34_touch BEFORE UPDATE ON s34_pgdoc FOR EACH ROW EXECUTE FUNCTION s34_touch()"
        )
    with Session(engine) as s:
        s.add_all([PgDoc(title=f"d{i}", price=i) for i in (1, 2, 3)])
        s.commit()
    yield engine
    engine.dispose()


PG_COLUMNS = ("id", "title", "price", "total", "touched", "xmin")


def test_xmin_versions_identity_and_a_trigger_after_another_process_writes(pg_database, pg_docs, shared):
    """Another process updates doc 1 and inserts one (Identity): served as uncached; a flush with xmin succeeds."""
    cache = SessionCache({"shared": shared}, secret=SECRET)
    Sessions = sessionmaker(pg_docs, info=cache.session_info())
    warm(Sessions, pg_docs, PGDOCS, "shared", *PG_COLUMNS)
    in_another_process(pg_database, shared, "s.get(PgDoc, 1).price = 7; s.add(PgDoc(title='new', price=5))")
    expected = truth(pg_docs, PGDOCS, *PG_COLUMNS)
    assert [row[:5] for row in expected] == [
        (1, "d1", 7, 14, 1),
        (2, "d2", 2, 4, 0),
        (3, "d3", 3, 6, 0),
        (4, "new", 5, 10, 0),
    ]
    with Sessions() as s:
        assert cached(s, PGDOCS, "shared", *PG_COLUMNS) == expected
        doc = s.execute(PGDOCS.options(FromCache("shared"))).scalars().first()
        doc.title = "mine"
        s.flush()  # eager_defaults: the trigger's counter and the new xmin come back
        assert (doc.touched, doc.total) == (2, 14)
        s.commit()


@pytest.mark.parametrize("region", ["local", "memory", "shared"])
def test_a_held_pg_doc_whose_xmin_moved_raises_at_flush_as_uncached(pg_docs, cache, region):
    """A Session holds doc 1; another engine updates it (xmin moves); a cached read, a flush: StaleDataError."""
    Sessions = sessionmaker(pg_docs, info=cache.session_info())
    other = create_engine(pg_docs.url)
    try:
        with Sessions() as s:
            doc = s.execute(PGDOCS.options(FromCache(region))).scalars().first()
            with Session(other) as w:
                w.get(PgDoc, 1).price = 7
                w.commit()
            assert s.execute(PGDOCS.options(FromCache(region))).scalars().first() is doc
            doc.title = "mine"
            with pytest.raises(StaleDataError):
                s.flush()
    finally:
        other.dispose()


# 14. What a local entry keeps alive ------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["detached from another Session", "make_transient_to_detached"])
@pytest.mark.parametrize("use_cache", [False, True])
def test_attaching_an_object_of_an_identity_the_application_let_go(Sess, use_cache, how):
    """Posts read (cached in ``ext:local_session`` or not) and let go; then a Post of id 2 is attached.

    SQLAlchemy's identity map is weak: once the application lets the
    objects go, ``session.add(post)`` of a post of id 2 (detached from an
    earlier Session, or made with ``make_transient_to_detached()``) works.
    A local entry holding them must not turn that into "Can't attach
    instance ...; another instance with key ... is already present".
    """
    from sqlalchemy.orm import make_transient_to_detached

    if how == "make_transient_to_detached":
        post = Post(id=2, tenant=2, title="mine")
        make_transient_to_detached(post)
    else:
        with Session(Sess.kw["bind"]) as earlier:
            post = earlier.get(Post, 2)
    with Sess() as s:
        statement = POSTS.options(FromCache("local")) if use_cache else POSTS
        assert [p.id for p in s.execute(statement).scalars()] == [1, 2]
        s.add(post)
        assert s.get(Post, 2) is post


@pytest.mark.parametrize(
    "use_cache",
    [
        False,
        pytest.param(
            True,
            marks=pytest.mark.xfail(
                strict=True,
                reason="by design (docs/hits.md): a local entry holds its objects until the transaction ends, "
                "and a commit of another process reaches it then; until then a read of their rows, cached or not, "
                "returns the objects the Session holds, as when the application holds them",
            ),
        ),
    ],
)
def test_an_uncached_read_after_a_commit_in_another_process_sees_it(sqlite_url, s34_engine, Sess, shared, use_cache):
    """Docs read once (through ``ext:local_session`` or not) and let go; another process commits; an uncached read.

    Without the cache the Session holds no doc any more, and the uncached
    read shows the committed title; a local entry keeping the objects alive
    makes even that uncached read return the old title from the identity map.
    """
    with Sess() as s:
        statement = DOCS.options(FromCache("local")) if use_cache else DOCS
        assert [d.title for d in s.execute(statement).scalars()] == ["doc1", "doc2", "doc3"]
        in_another_process(sqlite_url, shared, "s.get(Doc, 1).title = 'theirs'")
        assert [d.title for d in s.execute(DOCS).scalars()] == ["theirs", "doc2", "doc3"]


# 15. Deferred groups, a view-only join, inheritance under versions ----------------------------------------------------


@pytest.mark.parametrize("region", ["local", "memory", "shared"])
def test_undefer_group_over_posts_held_with_load_only(s34_engine, Sess, region):
    """Posts held with ``load_only(title)``; another commit; a hit of ``undefer_group("text")`` fills them as uncached."""
    from sqlalchemy.orm import load_only, undefer_group

    grouped = POSTS.options(undefer_group("text"))
    results = []
    for use in (None, region):
        with Sess() as s:
            held = s.execute(POSTS.options(load_only(Post.title))).scalars().all()
            with Session(create_engine(s34_engine.url)) as w:
                w.execute(update(Post).where(Post.id == 1).values(title="T", body="B"))
                w.commit()
                w.get_bind().dispose()
            if use is not None and use != "local":
                with Sess() as warmer:
                    warmer.execute(grouped.options(FromCache(use))).all()
            got = s.execute(grouped.options(FromCache(use)) if use else grouped).scalars().all()
            results.append([(p.id, p.title, p.body, p.summary) for p in got])
            assert got[0] is held[0]
            with Session(create_engine(s34_engine.url)) as w:  # back as it was, for the next round
                w.execute(update(Post).where(Post.id == 1).values(title="p1", body="b1"))
                w.commit()
                w.get_bind().dispose()
    assert results[1] == results[0] == [(1, "p1", "B", "s1"), (2, "p2", None, None)]


@pytest.mark.parametrize("region", ["memory", "shared"])
def test_a_view_only_relationship_with_a_custom_join_after_core_writes(s34_engine, Sess, region):
    """``Post.c_comments`` (comments whose body starts with "c", newest first): a comment renamed, one added."""
    warm(Sess, s34_engine, POSTS, region, "id")
    with Sess() as s:
        s.execute(update(Comment).where(Comment.id == 2).values(body="x2"))
        s.execute(text("INSERT INTO s34_comment (id, post_id, body) VALUES (4, 1, 'c4')"))
        s.commit()

    def comments(session, statement):
        return [(p.id, [c.id for c in p.c_comments]) for p in session.execute(statement).scalars()]

    with Sess() as s:
        expected = comments(s, POSTS)
    with Sess() as s:
        assert comments(s, POSTS.options(FromCache(region))) == expected == [(1, [4, 1]), (2, [3])]


EMPLOYEES = select(Employee).order_by(Employee.id)


def employees(session, region: str | None) -> list[tuple]:
    statement = EMPLOYEES.options(FromCache(region)) if region else EMPLOYEES
    return [
        (type(e).__name__, e.id, e.name, e.version, getattr(e, "lang", None), getattr(e, "level", None))
        for e in session.execute(statement).scalars()
    ]


@pytest.mark.parametrize("region", ["memory", "shared"])
def test_a_subclass_only_change_in_another_process_bumps_the_base_version(sqlite_url, s34_engine, Sess, shared, region):
    """Another process changes an engineer's ``lang`` (the ORM bumps the base table's version): served fresh."""
    if region == "memory":
        other = create_engine(sqlite_url)
        try:
            with Session(other) as w:
                w.get(Employee, 1).lang = "go"
                w.commit()
        finally:
            other.dispose()
    else:
        warm(Sess, s34_engine, EMPLOYEES, region, "id")
        in_another_process(sqlite_url, shared, "s.get(Employee, 1).lang = 'go'")
    with Session(s34_engine) as s:
        expected = employees(s, None)
    assert expected[0] == ("Engineer", 1, "e1", 2, "go", None)
    with Sess() as s:
        assert employees(s, region) == expected
        s.get(Employee, 1).lang = "rust"
        s.commit()


@pytest.mark.parametrize("region", ["local", "memory", "shared"])
def test_an_employee_whose_class_changes_in_another_engine_while_held(s34_engine, Sess, region):
    """Engineer 1 becomes a manager (rows moved, ``kind`` changed) by another engine while a Session holds it."""

    def move(w):
        w.execute(delete(Engineer.__table__).where(Engineer.__table__.c.id == 1))
        w.execute(insert(Manager.__table__).values(id=1, level=5))
        table = Employee.__table__
        w.execute(update(table).where(table.c.id == 1).values(kind="manager", version=table.c.version + 1))

    results = []
    for use in (None, region):
        with Sess() as s:
            employees(s, use)
            s.commit()
            other = create_engine(s34_engine.url)
            try:
                with Session(other) as w:
                    move(w)
                    w.commit()
                if use not in (None, "local"):
                    with Sess() as warmer:
                        employees(warmer, use)
                results.append(employees(s, use))
                with Session(other) as w:  # back as it was
                    w.execute(delete(Manager.__table__).where(Manager.__table__.c.id == 1))
                    w.execute(insert(Engineer.__table__).values(id=1, lang="py"))
                    w.execute(
                        update(Employee.__table__)
                        .where(Employee.__table__.c.id == 1)
                        .values(kind="engineer", version=1)
                    )
                    w.commit()
            finally:
                other.dispose()
    assert results[1] == results[0]
