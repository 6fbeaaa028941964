"""Attack s29 (review of 09a06c5): a hit's check of the objects it reached, cached and uncached side by side.

``values.reached()`` now records, per object, the relationship keys it
had loaded, and ``values.current()`` checks only those objects'
dictionaries (through ``attributes.instance_dict``).  Each case warms an
entry (a second read sends no SQL), changes the Session (expires a
relationship, expunges, refreshes, lets objects go), then reads cached and
uncached in the same Session state and compares the objects each gives:
which relationships they hold loaded, which are expired.  Relationships
are mapped ``lazy="raise"``, so an unloaded one a hit serves as it is
fails on access where the uncached read loaded it.
"""

from __future__ import annotations

import gc
import sqlite3
import textwrap

import pytest
from sqlalchemy import ForeignKey, String, create_engine, inspect, select
from sqlalchemy.ext.horizontal_shard import set_shard_id
from sqlalchemy.orm import (
    DeclarativeBase,
    DynamicMapped,
    Mapped,
    Session,
    WriteOnlyMapped,
    aliased,
    attribute_keyed_dict,
    defaultload,
    joinedload,
    load_only,
    mapped_column,
    raiseload,
    relationship,
    selectinload,
    with_loader_criteria,
)
from sqlalchemy.orm.collections import collection

from pyramid_sessioncache import FromCache, SessionCache, _sqlalchemy, cached_query
from pyramid_sessioncache.engine import values
from pyramid_sessioncache.storage.backends import local_session

from .conftest import SECRET, SQLCounter
from .test_instrumentation import run_child


class _Base(DeclarativeBase):
    pass


class A(_Base):
    __tablename__ = "s29r_a"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(20))
    bs: Mapped[list[B]] = relationship(order_by="B.id", back_populates="a", foreign_keys="B.a_id")
    tags: Mapped[dict[str, Tag]] = relationship(collection_class=attribute_keyed_dict("label"), lazy="raise")
    best_id: Mapped[int | None] = mapped_column(ForeignKey("s29r_b.id", use_alter=True))
    best: Mapped[B | None] = relationship(foreign_keys=[best_id], lazy="raise", post_update=True)


class Tag(_Base):
    __tablename__ = "s29r_tag"
    id: Mapped[int] = mapped_column(primary_key=True)
    a_id: Mapped[int] = mapped_column(ForeignKey("s29r_a.id"))
    label: Mapped[str] = mapped_column(String(20))
    notes: Mapped[list[E]] = relationship(
        order_by="E.id", lazy="raise", primaryjoin="Tag.id == foreign(E.d_id)", viewonly=True
    )


class B(_Base):
    __tablename__ = "s29r_b"
    id: Mapped[int] = mapped_column(primary_key=True)
    a_id: Mapped[int] = mapped_column(ForeignKey("s29r_a.id"))
    a: Mapped[A] = relationship(foreign_keys=[a_id], back_populates="bs", lazy="raise")
    cs: Mapped[list[C]] = relationship(order_by="C.id", lazy="raise")


class C(_Base):
    __tablename__ = "s29r_c"
    id: Mapped[int] = mapped_column(primary_key=True)
    b_id: Mapped[int] = mapped_column(ForeignKey("s29r_b.id"))
    ds: Mapped[list[D]] = relationship(order_by="D.id", lazy="raise")


class D(_Base):
    __tablename__ = "s29r_d"
    id: Mapped[int] = mapped_column(primary_key=True)
    c_id: Mapped[int] = mapped_column(ForeignKey("s29r_c.id"))
    es: Mapped[list[E]] = relationship(order_by="E.id", lazy="raise")


class E(_Base):
    __tablename__ = "s29r_e"
    id: Mapped[int] = mapped_column(primary_key=True)
    d_id: Mapped[int] = mapped_column(ForeignKey("s29r_d.id"))
    name: Mapped[str] = mapped_column(String(20))


class ByLabel:
    """A collection of Tags by label that emulates a dict (not a subclass): its ``__iter__`` gives the labels."""

    __emulates__ = dict

    def __init__(self) -> None:
        self.data: dict = {}

    @collection.appender
    def _append(self, item) -> None:
        self.data[item.label] = item

    @collection.remover
    def _remove(self, item) -> None:
        del self.data[item.label]

    @collection.iterator
    def _members(self):
        return iter(list(self.data.values()))

    def __iter__(self):
        return iter(self.data)

    def __getitem__(self, label):
        return self.data[label]

    def __len__(self) -> int:
        return len(self.data)


class Shelf(_Base):
    __tablename__ = "s29r_shelf"
    id: Mapped[int] = mapped_column(primary_key=True)
    tags: Mapped[ByLabel] = relationship(
        Tag, collection_class=ByLabel, primaryjoin="Shelf.id == foreign(Tag.a_id)", viewonly=True
    )


class Node(_Base):
    __tablename__ = "s29r_node"
    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("s29r_node.id"))
    children: Mapped[list[Node]] = relationship(order_by="Node.id", lazy="raise", back_populates="parent")
    parent: Mapped[Node | None] = relationship(remote_side=[id], lazy="raise", back_populates="children")


class Animal(_Base):
    __tablename__ = "s29r_animal"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("s29r_a.id"))
    owner: Mapped[A | None] = relationship(lazy="raise")
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "animal"}


class Dog(Animal):
    __tablename__ = "s29r_dog"
    id: Mapped[int] = mapped_column(ForeignKey("s29r_animal.id"), primary_key=True)
    toy_id: Mapped[int | None] = mapped_column(ForeignKey("s29r_b.id"))
    toy: Mapped[B | None] = relationship(lazy="raise")
    __mapper_args__ = {"polymorphic_identity": "dog", "polymorphic_load": "inline"}


class Holder(_Base):
    """Collections no load fills: a write-only one and a dynamic one, over the same rows."""

    __tablename__ = "s29r_holder"
    id: Mapped[int] = mapped_column(primary_key=True)
    items: WriteOnlyMapped[Item] = relationship(overlaps="log")
    log: DynamicMapped[Item] = relationship(lazy="dynamic", overlaps="items")


class Item(_Base):
    __tablename__ = "s29r_item"
    id: Mapped[int] = mapped_column(primary_key=True)
    holder_id: Mapped[int] = mapped_column(ForeignKey("s29r_holder.id"))


class Box(_Base):
    """A relationship mapped to load eagerly: every query of Box loads it, no option named."""

    __tablename__ = "s29r_box"
    id: Mapped[int] = mapped_column(primary_key=True)
    lids: Mapped[list[Lid]] = relationship(lazy="selectin", order_by="Lid.id")


class Lid(_Base):
    __tablename__ = "s29r_lid"
    id: Mapped[int] = mapped_column(primary_key=True)
    box_id: Mapped[int] = mapped_column(ForeignKey("s29r_box.id"))
    name: Mapped[str] = mapped_column(String(20))


REGIONS = {"local": {"type": "ext:local_session"}, "memory": {"type": "memory"}}


@pytest.fixture
def engine(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 's29r.sqlite'}")
    _Base.metadata.create_all(engine)
    with Session(engine) as setup:
        setup.add_all(
            [
                A(id=1, name="a1"),
                A(id=2, name="a2"),
                B(id=1, a_id=1),
                B(id=2, a_id=1),
                B(id=3, a_id=2),
                C(id=1, b_id=1),
                C(id=2, b_id=1),
                C(id=3, b_id=3),
                D(id=1, c_id=1),
                D(id=2, c_id=3),
                E(id=1, d_id=1, name="e1"),
                E(id=2, d_id=1, name="e2"),
                E(id=3, d_id=2, name="e3"),
                Tag(id=1, a_id=1, label="x"),
                Tag(id=2, a_id=1, label="y"),
                Shelf(id=1),
                Box(id=1),
                Lid(id=1, box_id=1, name="lid 1"),
                Lid(id=2, box_id=1, name="lid 2"),
                Node(id=1),
                Node(id=2, parent_id=1),
                Node(id=3, parent_id=2),
                Node(id=4, parent_id=3),
                Node(id=5, parent_id=4),
                Animal(id=1, kind="animal", owner_id=1),
                Dog(id=2, kind="dog", owner_id=2, toy_id=3),
            ]
        )
        setup.commit()
    yield engine
    engine.dispose()


@pytest.fixture
def cache():
    return SessionCache(REGIONS, secret=SECRET)


def shape(values) -> list:
    """Each object the values reach through loaded relationships: its identity, loaded keys, expired ones."""
    seen: dict[int, tuple] = {}
    pending = list(values)
    while pending:
        obj = pending.pop()
        if obj is None or id(obj) in seen:
            continue
        state = inspect(obj)
        loaded = frozenset(key for key in state.dict if not key.startswith("_"))
        seen[id(obj)] = (
            type(obj).__name__,
            state.identity,
            tuple(sorted(loaded)),
            tuple(sorted(state.expired_attributes)),
        )
        for prop in state.mapper.relationships:
            if prop.key in state.dict:
                value = state.dict[prop.key]
                if value is None:
                    continue
                if not prop.uselist:
                    pending.append(value)
                elif isinstance(value, dict):
                    pending.extend(value.values())
                else:
                    pending.extend(value)
    return sorted(seen.values(), key=repr)


def flat(rows) -> list:
    return [value for row in rows for value in (row if isinstance(row, tuple) else (row,))]


def compare(session, cache, sql, statement, region, change, *, scalars=True, expect_hit=None):
    """Warm ``statement``'s entry, apply ``change(session, objects)``, then read cached, then uncached: both shapes."""

    def cached():
        result = cached_query(session, statement, region)
        return result.unique().scalars().all() if scalars else [tuple(row) for row in result.unique().all()]

    first = cached()
    sql.reset()
    assert cached() == first  # warm: the second read is a hit
    assert sql.count == 0, sql.statements
    change(session, first)
    sql.reset()
    got = cached()
    hit = sql.count == 0
    cached_shape = shape(flat(got))
    uncached = session.execute(statement).unique()
    uncached = uncached.scalars().all() if scalars else [tuple(row) for row in uncached.all()]
    assert [id(v) for v in flat(got)] == [id(v) for v in flat(uncached)]
    if region == "memory":
        hit = False  # a shared hit builds what is missing from the entry: only the objects' shapes tell
    return cached_shape, shape(flat(uncached)), hit


def assert_a_miss_as_uncached(engine, cache, statement, region, change) -> None:
    """:func:`compare` in a new Session: after ``change``, the cached read gives what the uncached one gives, by a miss."""
    with Session(engine, info=cache.session_info()) as session:
        cached_shape, uncached_shape, hit = compare(session, cache, SQLCounter(engine), statement, region, change)
    assert cached_shape == uncached_shape
    assert not hit


CHAIN4 = select(A).options(selectinload(A.bs).selectinload(B.cs).selectinload(C.ds).selectinload(D.es)).order_by(A.id)
CHAIN3 = select(A).options(selectinload(A.bs).selectinload(B.cs).selectinload(C.ds)).order_by(A.id)


def _obj(session, cls, ident):
    obj = session.identity_map.get((cls, (ident,), None))
    assert obj is not None
    return obj


@pytest.mark.parametrize("region", REGIONS)
def test_expiring_a_relationship_three_deep_makes_a_miss(engine, cache, region):
    """The depth-3 objects (C) are the last whose keys ``reached()`` records: unloading C.ds is seen."""
    assert_a_miss_as_uncached(engine, cache, CHAIN3, region, lambda s, objs: s.expire(_obj(s, C, 1), ["ds"]))


@pytest.mark.parametrize(
    ("statement", "change"),
    [
        (CHAIN4, lambda s, objs: s.expire(_obj(s, D, 1), ["es"])),
        (
            select(A).options(joinedload(A.bs).joinedload(B.cs).joinedload(C.ds).joinedload(D.es)).order_by(A.id),
            lambda s, objs: s.expire(_obj(s, E, 2)),
        ),
        (
            select(Node).where(Node.id == 1).options(selectinload(Node.children, recursion_depth=-1)),
            lambda s, objs: s.expire(_obj(s, Node, 4), ["children"]),
        ),
    ],
    ids=["selectin-unloaded", "joined-expired", "tree-recursion"],
)
def test_a_change_four_relationships_deep_is_served_as_it_is(engine, cache, statement, change):
    sql = SQLCounter(engine)
    with Session(engine, info=cache.session_info()) as session:
        cached_shape, uncached_shape, hit = compare(session, cache, sql, statement, "local", change)
        assert cached_shape == uncached_shape, (cached_shape, uncached_shape)


def test_four_deep_in_a_shared_region_is_checked(engine, cache):
    """A shared entry hit again checks every object it built, however deep (HeldObjects reaches from all of them)."""
    sql = SQLCounter(engine)
    with Session(engine, info=cache.session_info()) as session:
        cached_shape, uncached_shape, hit = compare(
            session, cache, sql, CHAIN4, "memory", lambda s, objs: s.expire(_obj(s, D, 1), ["es"])
        )
        assert cached_shape == uncached_shape


def test_an_object_that_joined_a_loaded_collection_since_is_checked(engine, cache, tmp_path):
    """A collection loaded again since the entry was stored holds other objects: the local hit is a miss.

    Another program inserts B 4; an uncached read loads ``a.bs`` again, B 4
    in it with ``cs`` unloaded, which the joined read would fill.  (A shared
    region does not see another program's writes at all, by contract: they
    are invalidated by hand, see docs/invalidation.md.)
    """
    region = "local"
    statement = select(A).where(A.id == 1).options(joinedload(A.bs).joinedload(B.cs))
    sql = SQLCounter(engine)
    kept: list = []
    with Session(engine, info=cache.session_info()) as session:

        def change(s, objs):
            other = sqlite3.connect(tmp_path / "s29r.sqlite")  # another program
            other.execute("INSERT INTO s29r_b (id, a_id) VALUES (4, 1)")
            other.execute("INSERT INTO s29r_c (id, b_id) VALUES (4, 4)")
            other.commit()
            other.close()
            kept.extend(objs[0].bs)  # B 1 and 2 stay the Session's (and reached) objects
            s.expire(objs[0], ["bs"])
            # Another read, uncached, loads a.bs again (without B.cs): B 4 joins it, its cs unloaded.
            s.execute(select(A).where(A.id == 1).options(selectinload(A.bs))).all()
            assert [b.id for b in objs[0].bs] == [1, 2, 4]
            assert "cs" not in vars(objs[0].bs[2])

        cached_shape, uncached_shape, hit = compare(session, cache, sql, statement, region, change)
        assert cached_shape == uncached_shape, (cached_shape, uncached_shape)


@pytest.mark.parametrize("region", REGIONS)
def test_only_the_second_of_two_loaded_relationships_expired_makes_a_miss(engine, cache, region):
    """A has bs, tags and best loaded; only the last one is expired: every key must be checked, not the first."""
    statement = select(A).options(selectinload(A.bs), selectinload(A.tags), selectinload(A.best)).order_by(A.id)
    sql = SQLCounter(engine)
    with Session(engine, info=cache.session_info()) as session:
        for key in ("tags", "best"):
            cached_shape, uncached_shape, hit = compare(
                session, cache, sql, statement, region, lambda s, objs, key=key: s.expire(objs[1], [key])
            )
            assert cached_shape == uncached_shape
            assert not hit


@pytest.mark.parametrize("region", REGIONS)
def test_keyed_dict_member_expired_or_its_relationship_unloaded_makes_a_miss(engine, cache, region):
    statement = select(A).where(A.id == 1).options(selectinload(A.tags).selectinload(Tag.notes))
    sql = SQLCounter(engine)
    with Session(engine, info=cache.session_info()) as session:
        for change in (
            lambda s, objs: s.expire(objs[0].tags["y"]),
            lambda s, objs: s.expire(objs[0].tags["x"], ["notes"]),
            lambda s, objs: s.expunge(objs[0].tags["x"].notes[0]),
        ):
            cached_shape, uncached_shape, hit = compare(session, cache, sql, statement, region, change)
            assert cached_shape == uncached_shape
            assert not hit


@pytest.mark.parametrize("region", REGIONS)
def test_self_referential_object_reached_twice(engine, cache, region):
    """Node 2 is a row and node 1's child: expiring its children (it is a row) or its parent is seen."""
    statement = (
        select(Node)
        .options(selectinload(Node.children).selectinload(Node.children), selectinload(Node.parent))
        .order_by(Node.id)
    )
    sql = SQLCounter(engine)
    with Session(engine, info=cache.session_info()) as session:
        for key in ("children", "parent"):
            cached_shape, uncached_shape, hit = compare(
                session, cache, sql, statement, region, lambda s, objs, key=key: s.expire(objs[1], [key])
            )
            assert cached_shape == uncached_shape
            assert not hit


@pytest.mark.parametrize("region", REGIONS)
def test_refresh_of_a_reached_object_unloads_its_relationships(engine, cache, region):
    assert_a_miss_as_uncached(engine, cache, CHAIN3, region, lambda s, objs: s.refresh(_obj(s, B, 1)))


@pytest.mark.parametrize("region", REGIONS)
def test_expunged_leaf_three_deep_makes_a_miss(engine, cache, region):
    assert_a_miss_as_uncached(engine, cache, CHAIN3, region, lambda s, objs: s.expunge(_obj(s, D, 2)))


@pytest.mark.parametrize("region", REGIONS)
def test_two_entities_per_row_the_second_ones_relationship_expired(engine, cache, region):
    statement = (
        select(A, B)
        .join(A.bs)
        .options(selectinload(A.tags), selectinload(B.cs).selectinload(C.ds))
        .order_by(A.id, B.id)
    )
    sql = SQLCounter(engine)
    with Session(engine, info=cache.session_info()) as session:
        for change in (
            lambda s, objs: s.expire(objs[1][1], ["cs"]),
            lambda s, objs: s.expire(_obj(s, C, 1), ["ds"]),
            lambda s, objs: s.expire(objs[0][0], ["tags"]),
        ):
            cached_shape, uncached_shape, hit = compare(session, cache, sql, statement, region, change, scalars=False)
            assert cached_shape == uncached_shape
            assert not hit


@pytest.mark.parametrize("region", REGIONS)
def test_subclass_relationship_expired_among_base_rows(engine, cache, region):
    """Animal rows: the Dog has ``toy`` (and its cs) loaded, the plain Animal has not; unloading Dog.toy is seen."""
    statement = (
        select(Animal).options(selectinload(Animal.owner), selectinload(Dog.toy).selectinload(B.cs)).order_by(Animal.id)
    )
    sql = SQLCounter(engine)
    with Session(engine, info=cache.session_info()) as session:
        for change in (
            lambda s, objs: s.expire(objs[1], ["toy"]),
            lambda s, objs: s.expire(objs[1].toy, ["cs"]),
            lambda s, objs: s.expire(objs[0], ["owner"]),
        ):
            cached_shape, uncached_shape, hit = compare(session, cache, sql, statement, region, change)
            assert cached_shape == uncached_shape
            assert not hit


@pytest.mark.parametrize("region", REGIONS)
def test_joinedload_aliased_entity_relationship_expired(engine, cache, region):
    a = aliased(A)
    statement = select(a).options(joinedload(a.bs).joinedload(B.cs)).order_by(a.id)
    assert_a_miss_as_uncached(engine, cache, statement, region, lambda s, objs: s.expire(_obj(s, B, 3), ["cs"]))


def test_shared_hit_again_after_the_related_objects_went_keeps_them_loaded(engine, cache):
    """A shared entry hit twice in a Session: between the hits the application replaced a.bs (objects gone)."""
    statement = select(A).where(A.id == 1).options(selectinload(A.bs).selectinload(B.cs))
    sql = SQLCounter(engine)
    with Session(engine, info=cache.session_info(), autoflush=False) as session:
        (a,) = cached_query(session, statement, "memory").scalars().all()
        sql.reset()
        assert cached_query(session, statement, "memory").scalars().all() == [a]
        assert sql.count == 0
        c_state = inspect(a.bs[0].cs[0])
        # Drop every other reference to the Bs and Cs: only the entry's weak states remain.
        session.expire(a, ["bs"])
        gc.collect()
        assert c_state.obj() is None
        got = cached_query(session, statement, "memory").scalars().all()
        cached_shape = shape(got)
        uncached_shape = shape(session.execute(statement).scalars().all())
        assert cached_shape == uncached_shape
        assert [b.id for b in got[0].bs] == [1, 2]


@pytest.mark.parametrize("region", REGIONS)
def test_a_custom_dict_like_collection_class(engine, cache, region):
    statement = select(Shelf).options(selectinload(Shelf.tags))
    with Session(engine, info=cache.session_info()) as session:
        (uncached,) = session.execute(statement).scalars().all()
        assert sorted(uncached.tags.data) == ["x", "y"]
    for _ in range(2):  # a miss, then (a shared region) a hit in a new Session
        with Session(engine, info=cache.session_info()) as session:
            (shelf,) = cached_query(session, statement, region).scalars().all()
            assert sorted(shelf.tags.data) == ["x", "y"]
            assert sorted(tag.label for tag in shelf.tags.data.values()) == ["x", "y"]
            assert cached_query(session, statement, region).scalars().all() == [shelf]


INSTRUMENTED = textwrap.dedent(
    """
    from sqlalchemy import ForeignKey, create_engine, event, select
    from sqlalchemy.ext.instrumentation import InstrumentationManager
    from sqlalchemy.orm import (
        ClassManager, Mapped, Session, aliased, declarative_base, joinedload, mapped_column, relationship,
        selectinload, with_polymorphic,
    )

    from pyramid_sessioncache import FromCache, RelationshipCache, SessionCache, cached_query


    class Managed(ClassManager):  # a ClassManager subclass, set directly
        pass


    class ElsewhereDict(InstrumentationManager):
        def get_instance_dict(self, class_, instance):
            return instance.__dict__.setdefault("_attributes", {})

        def dict_getter(self, class_):
            return lambda instance: self.get_instance_dict(class_, instance)


    Plain = declarative_base()
    Alt = declarative_base(metadata=Plain.metadata)


    class Owner(Plain):  # default instrumentation, related to a class of another
        __tablename__ = "owner"
        id: Mapped[int] = mapped_column(primary_key=True)
        pets = relationship(lambda: Pet, order_by=lambda: Pet.id)


    class Pet(Alt):
        __tablename__ = "pet"
        __sa_instrumentation_manager__ = ElsewhereDict
        id: Mapped[int] = mapped_column(primary_key=True)
        owner_id: Mapped[int] = mapped_column(ForeignKey("owner.id"))
        kind: Mapped[str] = mapped_column(default="pet")
        __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "pet"}


    class Cat(Pet):
        __mapper_args__ = {"polymorphic_identity": "cat"}


    class Box(declarative_base(metadata=Plain.metadata)):
        __tablename__ = "box"
        __sa_instrumentation_manager__ = Managed
        id: Mapped[int] = mapped_column(primary_key=True)
        owner_id: Mapped[int] = mapped_column(ForeignKey("owner.id"))
        owner = relationship(Owner)


    engine = create_engine("sqlite://")
    Plain.metadata.create_all(engine)
    with Session(engine) as setup:
        setup.add_all([Owner(id=1, pets=[Pet(id=1), Cat(id=2)]), Box(id=1, owner_id=1)])
        setup.commit()
    statements = []
    event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    regions = {"local": {"type": "ext:local_session"}, "memory": {"type": "memory"}}
    cache = SessionCache(regions, secret="a test secret, not for production")
    pet = aliased(Pet)
    queries = {
        "owner-pets": select(Owner).options(selectinload(Owner.pets)),
        "owner-joined-pets": select(Owner).options(joinedload(Owner.pets)),
        "owner-lazy": select(Owner),
        "aliased": select(pet).order_by(pet.id),
        "polymorphic": select(with_polymorphic(Pet, "*")),
        "subclass": select(Cat),
        "box": select(Box).options(joinedload(Box.owner)),
        "owner-and-pet": select(Owner, Pet).join(Owner.pets),
    }
    for region in regions:
        for name, query in queries.items():
            with Session(engine, info=cache.session_info()) as session:
                first = cached_query(session, query, region).unique().all()
                statements.clear()
                again = cached_query(session, query, region).unique().all()
                assert again == first, (region, name)
                assert statements, f"{region} {name}: runs uncached"
        # The ORM hook: FromCache on a query, RelationshipCache on the lazy load of a relationship to such a class.
        options = (FromCache(region), RelationshipCache(Owner.pets, region))
        for _ in range(2):
            with Session(engine, info=cache.session_info()) as session:
                (owner,) = session.scalars(select(Owner).options(*options)).all()
                statements.clear()
                assert [pet.id for pet in owner.pets] == [1, 2]
                assert statements, f"{region}: the lazy load runs uncached"
    print("ok")
    """
)


def test_alternative_instrumentation_anywhere_a_statement_reaches_runs_uncached():
    """A ClassManager subclass, a related class, an aliased(), with_polymorphic() or subclass of one: never cached."""
    run_child(INSTRUMENTED)


def test_a_deep_tree_is_still_a_local_hit_while_nothing_changed(engine, cache):
    """Following every level does not make a hit of a deep read a miss: the tree read twice sends SQL once."""
    statement = select(Node).where(Node.id == 1).options(selectinload(Node.children, recursion_depth=-1))
    sql = SQLCounter(engine)
    with Session(engine, info=cache.session_info()) as session:
        (root,) = cached_query(session, statement, "local").scalars().all()
        sql.reset()
        assert cached_query(session, statement, "local").scalars().all() == [root]
        assert sql.count == 0


def test_past_the_most_objects_a_local_entry_is_never_a_hit(engine, cache, monkeypatch):
    """Past ``MAX_REACHED`` objects the check stops: the entry is never current, each read runs its query."""
    statement = select(Node).where(Node.id == 1).options(selectinload(Node.children, recursion_depth=-1))
    sql = SQLCounter(engine)
    for most, hit in ((4, False), (5, True)):  # the tree has five nodes
        monkeypatch.setattr(values, "MAX_REACHED", most)
        with Session(engine, info=cache.session_info()) as session:
            (root,) = cached_query(session, statement, "local").scalars().all()
            kept = [
                entry
                for namespace in local_session.entries(session).values()
                for entry in namespace.values()
                if isinstance(entry[-1], values.LocalResult)
            ]
            assert len(kept) == hit  # one it cannot check is not kept: it would hold its objects for nothing
            sql.reset()
            assert cached_query(session, statement, "local").scalars().all() == [root]
            assert (sql.count == 0) is hit


@pytest.mark.parametrize("region", REGIONS)
def test_write_only_and_dynamic_collections_changed_and_flushed(engine, cache, region):
    """What such a collection keeps under its key once its changes are flushed is no collection: not followed.

    A shared region is read in the next transaction (a transaction that
    wrote reads around it), the Session keeping its objects as they were
    (``expire_on_commit=False``).
    """
    with Session(engine, info=cache.session_info(), expire_on_commit=False) as session:
        holder = Holder(id=1)
        session.add(holder)
        session.flush()
        holder.items.add(Item(id=1))
        holder.log.append(Item(id=2))
        session.flush()
        if region == "memory":
            session.commit()
        for _ in range(2):
            assert cached_query(session, select(Holder), region).scalars().all() == [holder]
        assert sorted(item.id for item in holder.log) == [1, 2]


@pytest.mark.parametrize(
    ("options", "keys"),
    [
        ((joinedload(A.bs).joinedload(B.cs),), {"bs", "cs"}),
        ((defaultload(A.bs).selectinload(B.cs), selectinload(A.tags)), {"bs", "cs", "tags"}),
        ((raiseload("*"), load_only(A.name)), set()),
        ((FromCache("local"), with_loader_criteria(B, B.id > 1)), set()),
        ((selectinload("*"),), None),
        ((joinedload(A.bs).selectinload("*"),), None),
        ((set_shard_id("x"),), None),
    ],
    ids=["chain", "default-path", "loads-nothing", "not-loaders", "wildcard", "wildcard-below", "unknown-option"],
)
def test_the_relationships_a_statement_may_load(options, keys):
    """Every relationship a loader option names, on any path; None (all) for an eager wildcard or an unknown option."""
    found = _sqlalchemy.eager_relationship_keys(select(A).options(*options))
    assert found == (None if keys is None else frozenset(keys))


@pytest.mark.parametrize("region", REGIONS)
def test_a_relationship_mapped_eager_is_checked_though_no_option_names_it(engine, cache, region):
    """``Box.lids`` loads with every query of Box: a lid expired since makes a miss, refreshed as uncached."""
    assert_a_miss_as_uncached(engine, cache, select(Box), region, lambda s, objs: s.expire(objs[0].lids[1]))


@pytest.mark.parametrize("region", REGIONS)
def test_a_relationship_the_query_does_not_load_is_not_checked(engine, cache, region):
    """B 1's ``cs``, loaded by another query: the point lookup of B 1 leaves them alone, cached or not."""
    sql = SQLCounter(engine)
    with Session(engine, info=cache.session_info()) as session:
        held = session.scalars(select(B).options(selectinload(B.cs))).all()  # the Session holds objects weakly
        cached_shape, uncached_shape, hit = compare(
            session, cache, sql, select(B).where(B.id == 1), region, lambda s, objs: s.expire(objs[0].cs[0])
        )
        assert cached_shape == uncached_shape
        assert hit or region == "memory"  # compare() cannot tell a memory hit by its SQL
        assert held[0].cs[0] in session
