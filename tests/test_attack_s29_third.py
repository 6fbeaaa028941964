"""Attack s29 third (review of c531311): a hit follows only the relationships its query may load.

``values.reached()`` walks only the collections the statement's loader
options name and those mapped eager, and every single object.  The claim
it first made, following named and eager relationships alone (c531311),
was wrong: joined rows refresh an object the (partial) collection lacks,
which the Session may hold through another many-to-one.  Each case
warms an entry, changes the Session, then reads cached and uncached in
the same Session state and compares the shapes of what each gives
(``compare()`` of the first s29 review).
"""

from __future__ import annotations

import pytest
from sqlalchemy import ForeignKey, String, create_engine, event, select
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    contains_eager,
    joinedload,
    lazyload,
    mapped_column,
    relationship,
    selectinload,
    subqueryload,
    with_loader_criteria,
)

from pyramid_sessioncache import SessionCache, cached_query

from .conftest import SECRET, SQLCounter
from .test_attack_s29_review import (  # the first review's helpers
    REGIONS,
    compare,
)


class _Base(DeclarativeBase):
    pass


class Parent(_Base):
    __tablename__ = "s29t_parent"
    id: Mapped[int] = mapped_column(primary_key=True)
    children: Mapped[list[Child]] = relationship(
        order_by="Child.id", foreign_keys="Child.parent_id", back_populates="parent", lazy="raise"
    )
    favorite_id: Mapped[int | None] = mapped_column(ForeignKey("s29t_child.id", use_alter=True))
    favorite: Mapped[Child | None] = relationship(foreign_keys=[favorite_id], lazy="raise", post_update=True)


class Child(_Base):
    __tablename__ = "s29t_child"
    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("s29t_parent.id"))
    name: Mapped[str] = mapped_column(String(20))
    parent: Mapped[Parent] = relationship(foreign_keys=[parent_id], back_populates="children", lazy="raise")


@pytest.fixture
def engine(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 's29t.sqlite'}")
    _Base.metadata.create_all(engine)
    with Session(engine) as setup:
        setup.add_all([Parent(id=1), Parent(id=2)])
        setup.flush()
        setup.add_all([Child(id=1, parent_id=1, name="c1"), Child(id=2, parent_id=1, name="c2")])
        setup.flush()
        setup.get(Parent, 1).favorite_id = 2
        setup.commit()
    yield engine
    engine.dispose()


@pytest.fixture
def cache():
    return SessionCache(REGIONS, secret=SECRET)


def _expire_child_2(session, objects):
    session.expire(session.get(Child, 2))


LOADS = {
    "joinedload": lambda: select(Parent).options(joinedload(Parent.children)).order_by(Parent.id),
    "joinedload-innerjoin": lambda: select(Parent).options(joinedload(Parent.children, innerjoin=True)),
    "contains_eager": lambda: select(Parent).join(Parent.children).options(contains_eager(Parent.children)),
    "subqueryload": lambda: select(Parent).options(subqueryload(Parent.children)).order_by(Parent.id),
}


@pytest.mark.parametrize("region", ["local", "memory"])
@pytest.mark.parametrize("load", LOADS)
def test_joined_rows_refresh_an_object_reached_only_through_an_unnamed_relationship(engine, cache, region, load):
    """``joinedload`` refreshes every child its rows give, loaded collection or not; one held by ``favorite``.

    Parent 1's ``children`` were loaded with criteria (child 1 only), its
    ``favorite`` (child 2) by another query.  ``joinedload(children)``
    processes the rows of both children for the loaded Parent: child 2,
    expired, is refreshed by the uncached query.  The walk follows
    ``children`` (child 1) but not ``favorite``, so the hit serves child 2
    expired.
    """
    sql = SQLCounter(engine)
    with Session(engine, info=cache.session_info()) as session:
        held = session.scalars(
            select(Parent).options(selectinload(Parent.children.and_(Child.id == 1)), selectinload(Parent.favorite))
        ).all()
        statement = LOADS[load]()
        cached_shape, uncached_shape, _ = compare(session, cache, sql, statement, region, _expire_child_2)
        assert cached_shape == uncached_shape
        assert held


@pytest.mark.parametrize("region", REGIONS)
def test_joined_rows_refresh_an_object_removed_from_the_collection_without_a_flush(engine, cache, region):
    """Autoflush off: child 2 left Parent 1's children (not flushed), stays its ``favorite``, then expired.

    The joined rows still give child 2 (the database has not seen the
    removal): the uncached query refreshes it.  The collection is the same
    list, so the walk of ``children`` passes; ``favorite`` is not followed.
    """
    sql = SQLCounter(engine)
    with Session(engine, info=cache.session_info(), autoflush=False) as session:
        held = session.scalars(
            select(Parent).options(selectinload(Parent.children), selectinload(Parent.favorite))
        ).all()

        def change(session, objects):
            child = session.get(Child, 2)
            objects[0].children.remove(child)
            session.expire(child)

        statement = select(Parent).options(joinedload(Parent.children)).order_by(Parent.id)
        cached_shape, uncached_shape, _ = compare(session, cache, sql, statement, region, change)
        assert cached_shape == uncached_shape
        assert held


@pytest.mark.parametrize("region", REGIONS)
def test_a_listener_that_adds_a_joined_load_has_its_relationship_followed(engine, cache, region):
    """A ``do_orm_execute`` listener adds ``joinedload(children)``: the hit follows ``children`` as if named.

    Keys read from the statement before the listener ran would leave child
    1 unchecked: the hit would serve it expired, where the joined rows of
    the uncached query refresh it.
    """

    def eager_children(state):
        if state.is_select and not state.is_relationship_load and not state.is_column_load:
            state.statement = state.statement.options(joinedload(Parent.children))

    sql = SQLCounter(engine)
    with Session(engine, info=cache.session_info()) as session:
        event.listen(session, "do_orm_execute", eager_children)
        statement = select(Parent).order_by(Parent.id)
        cached_shape, uncached_shape, hit = compare(
            session, cache, sql, statement, region, lambda s, objs: s.expire(objs[0].children[0])
        )
        assert cached_shape == uncached_shape
        assert not hit


@pytest.mark.parametrize("region", ["local", "memory"])
def test_a_collection_loaded_under_loader_criteria_then_joined(engine, cache, region):
    """The same, the collection made partial by ``with_loader_criteria`` (a soft-delete filter, say).

    Parent 1's ``children`` loaded on access under the criteria (child 1
    only), its ``favorite`` by another query without them.
    """
    sql = SQLCounter(engine)
    with Session(engine, info=cache.session_info()) as session:
        parent = session.scalars(
            select(Parent)
            .where(Parent.id == 1)
            .options(lazyload(Parent.children), with_loader_criteria(Child, Child.id == 1, propagate_to_loaders=True))
        ).one()
        assert [child.id for child in parent.children] == [1]
        session.scalars(select(Parent).options(selectinload(Parent.favorite))).all()
        assert parent.favorite.id == 2
        statement = select(Parent).options(joinedload(Parent.children)).order_by(Parent.id)
        cached_shape, uncached_shape, _ = compare(session, cache, sql, statement, region, _expire_child_2)
        assert cached_shape == uncached_shape


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])
def test_the_favorite_served_expired_fails_once_the_session_closes(engine, cache, cached):
    """What the difference costs: child 2, read through ``favorite`` after the Session closed.

    Uncached, the joined rows refreshed it: its name reads.  From the local
    hit, it is still expired: ``DetachedInstanceError``.
    """
    with Session(engine, info=cache.session_info()) as session:
        held = session.scalars(
            select(Parent).options(selectinload(Parent.children.and_(Child.id == 1)), selectinload(Parent.favorite))
        ).all()
        statement = select(Parent).options(joinedload(Parent.children)).order_by(Parent.id)
        for _ in range(2):
            cached_query(session, statement, "local").unique().scalars().all()
        session.expire(session.get(Child, 2))
        if cached:
            parents = cached_query(session, statement, "local").unique().scalars().all()
        else:
            parents = session.execute(statement).unique().scalars().all()
    assert parents == held
    assert parents[0].favorite.name == "c2"
