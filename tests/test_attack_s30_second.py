"""Attack s30, second review (of baf10a2): objects eager rows refresh outside a local hit's result.

baf10a2 serves an entry whose joined or subquery eager rows may hold
objects its result does not reach (a stale loaded relationship) only while
no object of the Session has an attribute *expired* since it was stored
(``values.holds_as_snapshot()``).  The ORM's partial population loads
every *unloaded* attribute of such an object, expired or not: an attribute
can be unloaded without being marked expired (``session.expire(obj,
["rel"])`` of a relationship, of a ``query_expression()``; an object loaded
again, after the Session let it go, with ``defer()``).

All three made a local hit serve the attribute unloaded where the query
loads it again, older than baf10a2; now fixed: a partial expiry drops the
Session's local entries (``hook._expired_partly``), and such an entry
requires the Session to hold the very objects it held when stored.

Each scenario runs uncached (region None) and cached (``local``,
``memory``) with the same assertions.
"""

from __future__ import annotations

import gc

import pytest
from sqlalchemy import ForeignKey, String, create_engine, inspect, literal, select, update
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    contains_eager,
    defer,
    joinedload,
    mapped_column,
    query_expression,
    relationship,
    subqueryload,
    undefer,
    with_expression,
)

from pyramid_sessioncache import FromCache, SessionCache
from pyramid_sessioncache.testing import SQLCounter

from .conftest import SECRET


class _Base(DeclarativeBase):
    pass


class P(_Base):
    __tablename__ = "s30s_p"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(20))
    kids: Mapped[list[K]] = relationship(order_by="K.id", back_populates="p")


class T(_Base):
    __tablename__ = "s30s_t"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(20))


class K(_Base):
    __tablename__ = "s30s_k"
    id: Mapped[int] = mapped_column(primary_key=True)
    p_id: Mapped[int] = mapped_column(ForeignKey("s30s_p.id"))
    t_id: Mapped[int] = mapped_column(ForeignKey("s30s_t.id"))
    label: Mapped[str] = mapped_column(String(20))
    note: Mapped[str] = mapped_column(String(20), deferred=True)
    p: Mapped[P] = relationship(back_populates="kids")
    t: Mapped[T] = relationship()
    expr: Mapped[int | None] = query_expression()


REGIONS = {"local": {"type": "ext:local_session"}, "memory": {"type": "memory"}}


@pytest.fixture
def engine(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 's30s.sqlite'}")
    _Base.metadata.create_all(engine)
    with Session(engine) as setup:
        setup.add_all(
            [
                P(id=1, name="p1"),
                P(id=2, name="p2"),
                T(id=1, name="t1"),
                T(id=2, name="t2"),
                K(id=1, p_id=1, t_id=1, label="k1", note="n1"),
                K(id=2, p_id=1, t_id=1, label="k2", note="n2"),
                K(id=3, p_id=2, t_id=2, label="k3", note="n3"),
            ]
        )
        setup.commit()
    yield engine
    engine.dispose()


@pytest.fixture
def cache():
    return SessionCache(REGIONS, secret=SECRET)


def _cached(statement, region):
    return statement if region is None else statement.options(FromCache(region))


def _read(session, statement):
    return session.execute(statement).unique().scalars().all()


def _move_k3_to_p1(engine) -> None:
    """Another program moves K 3 to P 1 after P 1's kids were loaded: the collection is stale."""
    with engine.begin() as conn:
        conn.execute(update(K).where(K.id == 3).values(p_id=1))


def _stale(session, engine):
    """P 1 with its kids loaded ([1, 2]), then K 3 moved to it: P 1, held."""
    p1 = session.get(P, 1)
    assert [k.id for k in p1.kids] == [1, 2]
    _move_k3_to_p1(engine)
    return p1


def _state(obj) -> tuple:
    state = inspect(obj)
    return (tuple(sorted(k for k in state.dict if not k.startswith("_"))), tuple(sorted(state.expired_attributes)))


# --- Found (fixed): an attribute unloaded without being expired, of an object the stale collection lacks.

JOINED_T = select(P).where(P.id == 1).options(joinedload(P.kids).joinedload(K.t))
SUBQUERY_T = select(P).where(P.id == 1).options(subqueryload(P.kids).joinedload(K.t))
CONTAINS_T = (
    select(P).join(P.kids).join(K.t).where(P.id == 1).options(contains_eager(P.kids).contains_eager(K.t)).order_by(K.id)
)


@pytest.mark.parametrize(
    "statement",
    [
        pytest.param(JOINED_T, id="joined"),
        pytest.param(SUBQUERY_T, id="subquery"),
        pytest.param(CONTAINS_T, id="contains_eager"),
    ],
)
@pytest.mark.parametrize(
    "region",
    [None, "local", "memory"],
)
def test_a_relationship_unloaded_on_an_object_the_rows_hold_outside_a_stale_collection(
    engine, cache, region, statement
):
    """K 3's ``t`` is unloaded by ``expire(k3, ["t"])``: not marked expired, yet the joined rows load it again."""
    stmt = _cached(statement, region)
    with Session(engine, info=cache.session_info()) as session:
        k3 = session.get(K, 3)
        assert k3.t.id == 2
        p1 = _stale(session, engine)
        _read(session, stmt)
        session.expire(k3, ["t"])
        assert "t" not in k3.__dict__
        assert "t" not in inspect(k3).expired_attributes  # the ORM does not mark it
        _read(session, stmt)
        assert "t" in k3.__dict__
        assert [k.id for k in p1.kids] == [1, 2]
        with SQLCounter(engine, transactions=True) as counter:
            assert k3.t.id == 2
        assert counter.count == 0


@pytest.mark.parametrize(
    "region",
    [None, "local", "memory"],
)
def test_an_expression_unloaded_on_an_object_the_rows_hold_outside_a_stale_collection(engine, cache, region):
    statement = select(P).where(P.id == 1).options(joinedload(P.kids).with_expression(K.expr, literal(7)))
    stmt = _cached(statement, region)
    with Session(engine, info=cache.session_info()) as session:
        k3 = session.get(K, 3)
        p1 = _stale(session, engine)
        _read(session, stmt)
        session.expire(k3, ["expr"])
        assert "expr" not in k3.__dict__
        _read(session, stmt)
        assert k3.__dict__.get("expr") == 7
        assert [k.id for k in p1.kids] == [1, 2]


def _let_go_and_load_deferred(session, how):
    """K 3 leaves the Session (expunged, or let go and collected), then another query loads it with ``label`` deferred."""
    if how == "expunge":
        session.expunge(session.get(K, 3))
    gc.collect()
    assert session.identity_map.get(inspect(K).identity_key_from_primary_key([3])) is None
    return session.execute(select(K).where(K.id == 3).options(defer(K.label))).scalar_one()


@pytest.mark.parametrize("how", ["expunge", "collected"])
@pytest.mark.parametrize(
    "statement",
    [
        pytest.param(select(P).where(P.id == 1).options(joinedload(P.kids)), id="joined"),
        pytest.param(select(P).where(P.id == 1).options(subqueryload(P.kids)), id="subquery"),
    ],
)
@pytest.mark.parametrize(
    "region",
    [None, "local", "memory"],
)
def test_an_object_the_rows_hold_loaded_again_with_a_deferred_column(engine, cache, region, statement, how):
    stmt = _cached(statement, region)
    with Session(engine, info=cache.session_info()) as session:
        if how == "expunge":
            session.get(K, 3)
        p1 = _stale(session, engine)
        _read(session, stmt)  # stored: the rows hold K 3
        k3 = _let_go_and_load_deferred(session, how)
        assert "label" not in k3.__dict__
        assert "label" not in inspect(k3).expired_attributes
        _read(session, stmt)
        assert [k.id for k in p1.kids] == [1, 2]
        with SQLCounter(engine, transactions=True) as counter:
            assert k3.label == "k3"
        assert counter.count == 0  # uncached: the joined rows loaded it


# --- Held: an object the rows hold outside a stale relationship, expired (marked) since the entry was stored.


class J(_Base):
    """P's table again, its kids mapped to load joined (no option names them)."""

    __table__ = P.__table__
    kids: Mapped[list[K]] = relationship(
        K, primaryjoin="J.id == foreign(K.p_id)", lazy="joined", viewonly=True, order_by="K.id"
    )


class N(_Base):
    """A tree whose children load joined, two levels deep."""

    __tablename__ = "s30s_n"
    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("s30s_n.id"))
    name: Mapped[str] = mapped_column(String(20))
    children: Mapped[list[N]] = relationship(lazy="joined", join_depth=2, order_by="N.id")


def _k3_outside(session, engine):
    k3 = session.get(K, 3)
    return _stale(session, engine), k3


def _k3_outside_mapped_joined(session, engine):
    j1 = session.get(J, 1)  # its kids loaded with it
    assert [k.id for k in j1.kids] == [1, 2]
    k3 = session.get(K, 3)
    _move_k3_to_p1(engine)
    return j1, k3


HELD = {
    "joined": (select(P).where(P.id == 1).options(joinedload(P.kids)), _k3_outside),
    "subquery": (select(P).where(P.id == 1).options(subqueryload(P.kids)), _k3_outside),
    "contains_eager": (
        select(P).join(P.kids).where(P.id == 1).options(contains_eager(P.kids)).order_by(K.id),
        _k3_outside,
    ),
    "joined-star": (select(P).where(P.id == 1).options(joinedload("*")), _k3_outside),
    "joined-and-criteria": (select(P).where(P.id == 1).options(joinedload(P.kids.and_(K.id > 1))), _k3_outside),
    "joined-undefer-deeper": (
        select(P).where(P.id == 1).options(joinedload(P.kids).undefer(K.note)),
        _k3_outside,
    ),
    "mapped-joined": (select(J).where(J.id == 1), _k3_outside_mapped_joined),
}


@pytest.mark.parametrize("region", [None, "local", "memory"])
@pytest.mark.parametrize("case", HELD.values(), ids=HELD)
@pytest.mark.parametrize("key", ["label", None])
def test_an_object_the_rows_hold_expired_since(engine, cache, region, case, key):
    statement, prepare = case
    stmt = _cached(statement, region)
    with Session(engine, info=cache.session_info()) as session:
        parent, k3 = prepare(session, engine)
        _read(session, stmt)
        session.expire(k3, None if key is None else [key])
        _read(session, stmt)
        state = _state(k3)
        assert [k.id for k in parent.kids] == [1, 2]
    assert "label" in state[0]


def test_a_tree_whose_stale_children_are_a_level_down(engine, cache):
    """N 2's children were loaded before N 4 moved under it; the tree read of N 1 joins two levels."""
    with Session(engine) as setup:
        setup.add_all([N(id=i, parent_id={1: None, 2: 1, 3: 2, 4: None}[i], name=f"n{i}") for i in (1, 2, 3, 4)])
        setup.commit()
    seen = {}
    for region in (None, "local", "memory"):
        with engine.begin() as conn:  # each run starts from the same rows
            conn.execute(update(N).where(N.id == 4).values(parent_id=None))
        stmt = _cached(select(N).where(N.id == 1), region)
        with Session(engine, info=cache.session_info()) as session:
            n2 = session.get(N, 2)
            assert [n.id for n in n2.children] == [3]
            n4 = session.get(N, 4)
            with engine.begin() as conn:
                conn.execute(update(N).where(N.id == 4).values(parent_id=2))
            _read(session, stmt)
            session.expire(n4, ["name"])
            _read(session, stmt)
            seen[region] = ([n.id for n in n2.children], _state(n4))
    assert seen[None][0] == [3]
    assert "name" in seen[None][1][0]
    assert seen["local"] == seen["memory"] == seen[None]


@pytest.mark.parametrize("grow", [0, 1])
@pytest.mark.parametrize("region", [None, "local"])
def test_a_session_at_the_scan_limit(engine, cache, region, grow, monkeypatch):
    """Stored with exactly MAX_SCANNED objects in the Session; it then holds ``grow`` more, and K 3 is expired."""
    from pyramid_sessioncache.engine import values

    stmt = _cached(select(P).where(P.id == 1).options(joinedload(P.kids)), region)
    with Session(engine, info=cache.session_info()) as session:
        p1, k3 = _k3_outside(session, engine)
        _read(session, stmt)  # K 3 refreshed: no new object
        monkeypatch.setattr(values, "MAX_SCANNED", len(session.identity_map))
        session.expire(k3, ["label"])
        _read(session, stmt)  # stored again, at the limit
        others = [session.get(T, 1)] if grow else []
        session.expire(k3, ["label"])
        with SQLCounter(engine, transactions=True) as counter:
            _read(session, stmt)
        assert "label" in k3.__dict__
        assert counter.count == 1
        assert others is not None


def _refresh(session, k1):
    session.refresh(k1)


def _get_populate_existing(session, k1):
    session.get(K, 1, populate_existing=True)


def _merge(session, k1):
    with Session(session.get_bind()) as other:
        copy = other.get(K, 1)
    session.merge(copy)


def _select_populate_existing(session, k1):
    session.execute(select(K).where(K.id == 1).execution_options(populate_existing=True)).scalars().all()


@pytest.mark.parametrize("how", [_refresh, _get_populate_existing, _merge, _select_populate_existing])
@pytest.mark.parametrize("region", [None, "local", "memory"])
@pytest.mark.parametrize(
    "option", [undefer(K.note), with_expression(K.expr, literal(7))], ids=["undefer", "with_expression"]
)
def test_a_column_another_read_may_unload(engine, cache, region, how, option):
    """K 1 loaded plainly first (so its load options lack ``option``), then by the statement; then refreshed another way."""
    stmt = _cached(select(K).where(K.id == 1).options(option), region)
    key = "note" if "note" in str(select(K).options(option).compile()) else "expr"
    with Session(engine, info=cache.session_info()) as session:
        k1 = session.get(K, 1)
        _read(session, stmt)
        _read(session, stmt)
        how(session, k1)
        _read(session, stmt)
        state = _state(k1)
        value = k1.__dict__.get(key)
    # what the uncached run leaves, for comparison
    uncached = _column_after(engine, cache, option, how, key)
    assert (state, value) == uncached


def _column_after(engine, cache, option, how, key):
    stmt = select(K).where(K.id == 1).options(option)
    with Session(engine, info=cache.session_info()) as session:
        k1 = session.get(K, 1)
        _read(session, stmt)
        _read(session, stmt)
        how(session, k1)
        _read(session, stmt)
        return _state(k1), k1.__dict__.get(key)
