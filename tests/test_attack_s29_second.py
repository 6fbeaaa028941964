"""Attack s29, second review (09a06c5, f51b043): hits and misses of ``reached()``/``current()`` in a real request.

Each case runs real SQLite and counts SQL (``before_cursor_execute``): a
local read that sends none is a hit.  Cached results are compared with the
same query run uncached in the same Session state.
"""

from __future__ import annotations

import gc
import time

import pytest
from sqlalchemy import ForeignKey, String, create_engine, inspect, select
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    immediateload,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
    subqueryload,
)
from sqlalchemy.orm.attributes import set_committed_value

from pyramid_sessioncache import SessionCache, cached_query
from pyramid_sessioncache.engine import values

from .conftest import SECRET, SQLCounter
from .test_attack_s29_review import (  # the first review's helpers
    REGIONS,
    shape,
)


class _Base(DeclarativeBase):
    pass


class Author(_Base):
    __tablename__ = "s29s_author"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(20))
    posts: Mapped[list[Post]] = relationship(back_populates="author", order_by="Post.id", foreign_keys="Post.author_id")
    muted: Mapped[list[Post]] = relationship(
        lazy="noload", viewonly=True, primaryjoin="Author.id == foreign(Post.editor_id)"
    )


class Post(_Base):
    __tablename__ = "s29s_post"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("s29s_author.id"))
    editor_id: Mapped[int | None] = mapped_column(ForeignKey("s29s_author.id"))
    author: Mapped[Author] = relationship(back_populates="posts", foreign_keys=[author_id])
    editor: Mapped[Author | None] = relationship(foreign_keys=[editor_id], lazy="raise")
    comments: Mapped[list[Comment]] = relationship(order_by="Comment.id", lazy="raise")


class Comment(_Base):
    __tablename__ = "s29s_comment"
    id: Mapped[int] = mapped_column(primary_key=True)
    post_id: Mapped[int] = mapped_column(ForeignKey("s29s_post.id"))


class Node(_Base):
    __tablename__ = "s29s_node"
    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("s29s_node.id"))
    children: Mapped[list[Node]] = relationship(order_by="Node.id", back_populates="parent")
    parent: Mapped[Node | None] = relationship(remote_side=[id], back_populates="children")


@pytest.fixture
def engine(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 's29s.sqlite'}")
    _Base.metadata.create_all(engine)
    with Session(engine) as setup:
        setup.add_all([Author(id=i, name=f"a{i}") for i in (1, 2, 3)])
        setup.flush()
        setup.add_all([Post(id=i, author_id=1 + i % 3, editor_id=None if i % 2 else 1) for i in range(1, 10)])
        setup.add_all([Comment(id=i, post_id=1 + i % 9) for i in range(1, 20)])
        setup.add_all([Node(id=1)] + [Node(id=i, parent_id=i // 2) for i in range(2, 64)])
        setup.commit()
    yield engine
    engine.dispose()


@pytest.fixture
def cache():
    return SessionCache(REGIONS, secret=SECRET)


def reads(session, sql, region, statements) -> list[int]:
    """The SQL count of each cached read of ``statements``, in order."""
    counts = []
    for statement in statements:
        sql.reset()
        cached_query(session, statement, region).unique().scalars().all()
        counts.append(sql.count)
    return counts


LOADERS = {"selectin": selectinload, "joined": joinedload, "subquery": subqueryload, "immediate": immediateload}


@pytest.mark.parametrize("loader", LOADERS)
def test_list_then_detail_then_list_again_all_hit(engine, cache, loader):
    """A detail read of one object of a list, eager-loading the same relationship, replaces no collection.

    A loader that loaded the collection again over objects already holding
    it would turn every later read of the list (and of the detail) into a miss.
    """
    option = LOADERS[loader]
    listing = select(Author).options(option(Author.posts)).order_by(Author.id)
    detail = select(Author).where(Author.id == 1).options(option(Author.posts))
    sql = SQLCounter(engine)
    with Session(engine, info=cache.session_info()) as session:
        counts = reads(session, sql, "local", [listing, listing, detail, detail, listing, detail, listing])
        assert counts[0] > 0 and counts[2] > 0
        assert counts[1] == counts[3] == counts[4] == counts[5] == counts[6] == 0, counts
        cached = cached_query(session, listing, "local").unique().scalars().all()
        cached_shape = shape(cached)
        assert shape(session.execute(listing).unique().scalars().all()) == cached_shape


def test_both_sides_of_back_populates_loaded_keep_hitting(engine, cache):
    """Posts with their author, whose posts are loaded too (the other side): a cycle the walk must close."""
    statement = select(Post).options(joinedload(Post.author).selectinload(Author.posts)).order_by(Post.id)
    other = select(Author).options(selectinload(Author.posts).joinedload(Post.author)).order_by(Author.id)
    sql = SQLCounter(engine)
    with Session(engine, info=cache.session_info()) as session:
        counts = reads(session, sql, "local", [statement, statement, other, other, statement, other])
        assert counts[1] == counts[3] == counts[4] == counts[5] == 0, counts
        posts = cached_query(session, statement, "local").unique().scalars().all()
        assert shape(posts) == shape(session.execute(statement).unique().scalars().all())


def test_noload_none_and_empty_collections_hit_and_match(engine, cache):
    """``lazy="noload"`` (an empty collection on load), a None many-to-one, an empty collection: all hit."""
    statement = (
        select(Post)
        .where(Post.id.in_([1, 3]))
        .options(selectinload(Post.editor), selectinload(Post.comments), joinedload(Post.author))
        .order_by(Post.id)
    )
    sql = SQLCounter(engine)
    with Session(engine, info=cache.session_info()) as session:
        first = cached_query(session, statement, "local").unique().scalars().all()
        assert first[0].editor is None
        assert [a.muted for a in {p.author for p in first}] == [[]] * len({p.author for p in first})
        assert reads(session, sql, "local", [statement, statement]) == [0, 0]
        got = cached_query(session, statement, "local").unique().scalars().all()
        assert shape(got) == shape(session.execute(statement).unique().scalars().all())


def test_a_scalar_set_to_none_and_back_is_still_a_hit(engine, cache):
    statement = select(Post).where(Post.id == 2).options(selectinload(Post.editor))
    sql = SQLCounter(engine)
    with Session(engine, info=cache.session_info(), autoflush=False) as session:
        (post,) = cached_query(session, statement, "local").scalars().all()
        editor = post.editor
        assert editor is not None
        post.editor = None
        post.editor = editor
        assert reads(session, sql, "local", [statement]) == [0]


def test_a_replaced_collection_is_a_miss_and_matches(engine, cache):
    """``set_committed_value`` puts a new collection (the same objects): a miss, served as uncached."""
    statement = select(Author).options(selectinload(Author.posts)).order_by(Author.id)
    sql = SQLCounter(engine)
    with Session(engine, info=cache.session_info()) as session:
        authors = cached_query(session, statement, "local").unique().scalars().all()
        set_committed_value(authors[0], "posts", list(authors[0].posts[:1]))
        assert reads(session, sql, "local", [statement]) != [0]
        got = cached_query(session, statement, "local").unique().scalars().all()
        assert shape(got) == shape(session.execute(statement).unique().scalars().all())


def test_a_deep_tree_with_parents_loaded_terminates_and_hits(engine, cache):
    """63 nodes, children to any depth with the parent side set too: the walk closes its cycles."""
    statement = select(Node).where(Node.id == 1).options(selectinload(Node.children, recursion_depth=-1))
    sql = SQLCounter(engine)
    with Session(engine, info=cache.session_info()) as session:
        (root,) = cached_query(session, statement, "local").scalars().all()
        for node in session.scalars(select(Node)).all():
            _ = node.parent  # every many-to-one set: the graph has cycles both ways
        assert reads(session, sql, "local", [statement, statement]) == [0, 0]
        reached = values.reached([inspect(root)])
        assert reached.complete and len(reached.states) == 63
        session.expire(session.get(Node, 63))
        assert reads(session, sql, "local", [statement]) != [0]


def test_held_objects_let_go_are_collected(engine, cache):
    """A shared entry hit twice holds its objects and their collections weakly: dropped, they are collected."""
    statement = select(Author).options(selectinload(Author.posts).selectinload(Post.comments)).order_by(Author.id)
    with Session(engine, info=cache.session_info()) as session:
        for _ in range(3):
            got = cached_query(session, statement, "memory").unique().scalars().all()
        states = [inspect(obj) for obj in shape_objects(got)]
        assert len(states) > 20
        del got
        gc.collect()
        assert [state for state in states if state.obj() is not None] == []
        assert len(session.identity_map) == 0


def shape_objects(objs) -> list:
    found: dict[int, object] = {}
    pending = list(objs)
    while pending:
        obj = pending.pop()
        if obj is None or id(obj) in found:
            continue
        found[id(obj)] = obj
        state = inspect(obj)
        for prop in state.mapper.relationships:
            value = state.dict.get(prop.key)
            if value is not None:
                pending.extend(value if prop.uselist else (value,))
    return list(found.values())


def test_a_point_lookup_beside_a_large_loaded_collection_hits(engine, cache):
    """The check follows only what the query may load: not, through the author, the author's other posts."""
    with Session(engine) as setup:
        setup.add_all([Post(id=i, author_id=3) for i in range(100, 100 + values.MAX_REACHED + 10)])
        setup.commit()
    statement = select(Post).where(Post.id == 100).options(joinedload(Post.author))
    sql = SQLCounter(engine)
    with Session(engine, info=cache.session_info()) as session:
        author = session.scalars(select(Author).where(Author.id == 3).options(selectinload(Author.posts))).one()
        assert len(author.posts) > values.MAX_REACHED
        first = reads(session, sql, "local", [statement])
        start = time.perf_counter()
        counts = reads(session, sql, "local", [statement, statement, statement])
        elapsed = time.perf_counter() - start
        assert first == [1]
        assert counts == [0, 0, 0], (counts, f"{elapsed * 1e3:.1f} ms for three reads")
