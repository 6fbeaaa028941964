"""Review of "a mapped class is keyed by its mapping" and "an entry holds its objects as loaded", attacked."""

from __future__ import annotations

import itertools
import sys

import pytest
from sqlalchemy import (
    CHAR,
    JSON,
    Column,
    ForeignKey,
    Integer,
    String,
    Table,
    TypeDecorator,
    bindparam,
    column,
    create_engine,
    event,
    func,
    inspect,
    select,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.declarative import ConcreteBase
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapper,
    backref,
    column_property,
    deferred,
    joinedload,
    registry,
    relationship,
    selectinload,
    sessionmaker,
)

from pyramid_sessioncache import FromCache, NotCacheableError, cache_parameters
from pyramid_sessioncache.engine import as_loaded

from .conftest import SQLCounter
from .hash_seeds import printed_by_processes
from .models import Address, Person, PostalCode


class _Guid(TypeDecorator):
    """A type of the old recipes, written without ``cache_ok``: SQLAlchemy warns, and runs it uncached."""

    impl = CHAR(32)


class _Base(DeclarativeBase):
    pass


class _Owner(_Base):
    __tablename__ = "s20_owner"
    id = Column(_Guid, primary_key=True)
    name = Column(String(20))
    pets = relationship("_Pet")


class _Pet(_Base):
    __tablename__ = "s20_pet"
    id = Column(Integer, primary_key=True)
    owner_id = Column(_Guid, ForeignKey("s20_owner.id"))
    name = Column(String(20))
    owner = relationship(_Owner, backref=backref("pets_by_name", order_by=name.desc(), viewonly=True), viewonly=True)


# An anonymous label (a scalar subquery's), named per process otherwise.
_Owner.shout = column_property(_Owner.name.op("||")("!"))  # a custom operator
_Owner.pet_count = column_property(
    select(func.count(_Pet.id)).where(_Pet.owner_id == _Owner.id).correlate_except(_Pet).scalar_subquery()
)


class _Doc(_Base):
    __tablename__ = "s20_doc"
    id = Column(Integer, primary_key=True)
    data = Column(JSON)


class _Note(_Base):
    __tablename__ = "s20_note"
    id = Column(Integer, primary_key=True)
    body = deferred(Column(String(20)))


class _Shape(ConcreteBase, _Base):
    __tablename__ = "s20_shape"
    id = Column(Integer, primary_key=True)
    name = Column(String(20))
    __mapper_args__ = {"polymorphic_identity": "shape", "concrete": True}


class _Circle(_Shape):
    __tablename__ = "s20_circle"
    id = Column(Integer, primary_key=True)
    name = Column(String(20))
    radius = Column(Integer)
    __mapper_args__ = {"polymorphic_identity": "circle", "concrete": True}


class _Employee(_Base):
    __tablename__ = "s20_employee"
    id = Column(Integer, primary_key=True)
    kind = Column(String(10))
    name = Column(String(20))
    __mapper_args__ = {"polymorphic_on": kind, "polymorphic_identity": "employee"}


class _Engineer(_Employee):
    __tablename__ = "s20_engineer"
    id = Column(ForeignKey("s20_employee.id"), primary_key=True)
    language = Column(String(20))
    __mapper_args__ = {"polymorphic_identity": "engineer", "polymorphic_load": "selectin"}


_staff = Table(
    "s20_staff",
    _Base.metadata,
    Column("id", Integer, primary_key=True),
    Column("kind", String(10)),
    Column("name", String(20)),
)


@pytest.fixture
def own_engine():
    engine = create_engine("sqlite://")
    _Base.metadata.create_all(engine)
    with sessionmaker(engine)() as session:
        session.add(_Doc(id=1, data={"secret": "enc:abc"}))
        session.add(_Note(id=1, body="cba"))
        session.add_all([_Shape(id=1, name="blob"), _Circle(id=2, name="ring", radius=3)])
        session.add_all([_Employee(id=1, name="ann"), _Engineer(id=2, name="bob", language="python")])
        session.execute(
            _staff.insert(),
            [{"id": 1, "kind": "staff", "name": "a"}, {"id": 2, "kind": "engineer", "name": "b"}]
            + [{"id": 3, "kind": "senior", "name": "c"}],
        )
        session.commit()
    yield engine
    engine.dispose()


@pytest.fixture
def OwnSession(own_engine, cache):
    return sessionmaker(own_engine, info=cache.session_info())


def test_a_join_column_of_a_type_without_cache_ok_leaves_its_class_keyable(Session):
    # SQLAlchemy keys select(_Owner) by its mapper: a column type without
    # cache_ok only makes the statements naming that column uncached.  The
    # mapping's text must not make every query of the class unkeyable.
    # (SQLAlchemy warns of such a type when asked for its cache key; the
    # tests make its warnings errors, as an application may.)
    with Session() as session:
        cache_parameters(select(_Owner), session=session)
        cache_parameters(select(_Pet), session=session)


def test_a_load_listener_for_every_mapper_leaves_hits_alone(Session, sql):
    # event.listen(Mapper, "load", ...) listens for every class, ahead of any
    # listener of one class: the add-on's could never run first, and every
    # cached query ran twice (uncached), each time.
    seen = []

    def audit(target, context):
        seen.append(type(target).__name__)

    statement = select(PostalCode).where(PostalCode.id == 1).options(FromCache("memory"))
    event.listen(Mapper, "load", audit)
    try:
        counts = []
        for _ in range(3):
            with Session() as session:
                sql.reset()
                assert session.scalars(statement).one().code == "00001"
                counts.append(sql.count)
    finally:
        event.remove(Mapper, "load", audit)
        for name, listener in (("load", as_loaded._keep), ("refresh", as_loaded._refreshed)):
            if event.contains(Mapper, name, listener):  # the add-on's, for every mapper: not for later tests
                event.remove(Mapper, name, listener)
    assert counts == [2, 1, 0]  # a class given a listener: the miss and its uncached run; a miss that stores; a hit
    assert seen == ["PostalCode"] * 5  # once per load, a hit's included


@pytest.mark.parametrize("region", ["memory", "file"])
def test_a_load_listener_that_changes_a_value_in_place_acts_once(OwnSession, own_engine, region):
    # The add-on's copy of what was loaded shared the JSON dict with the
    # object: a listener decoding a field of it in place changed the copy
    # too, and the entry held the decoded value, decoded again by each hit.
    def decrypt(target, context):
        target.data["secret"] = target.data["secret"].removeprefix("enc:")[::-1]

    event.listen(_Doc, "load", decrypt)
    try:
        with sessionmaker(own_engine)() as session:
            expected = session.get(_Doc, 1).data
        served = []
        for _ in range(3):
            with OwnSession() as session:
                served.append(session.scalars(select(_Doc).options(FromCache(region))).one().data)
    finally:
        event.remove(_Doc, "load", decrypt)
    assert expected == {"secret": "cba"}
    assert served == [expected] * 3


def _release(monkeypatch, **classes):
    """Classes of this module's paths, as the release being deployed maps them (stored entries pickle them by path)."""
    for name, cls in classes.items():
        cls.__module__, cls.__qualname__ = __name__, name
        monkeypatch.setattr(sys.modules[__name__], name, cls, raising=False)


@pytest.mark.parametrize("eager", ["mapped", "option", "wildcard"])
def test_a_release_that_maps_an_eager_loaded_class_otherwise(Session, monkeypatch, eager):
    # A query of S20Person loads its addresses (selectin, from the mapping
    # or an option): the entry holds S20Address objects as their mapping
    # loaded them.  The release that changed S20Address's column_property
    # was served the old release's values: only S20Person's mapping was in
    # the key (the wildcard option names no S20Address at all).
    person, address = Person.__table__, Address.__table__
    for factor in (2, 3, 2):
        release_address = type("S20Address", (), {})
        release_person = type("S20Person", (), {})
        _release(monkeypatch, S20Address=release_address, S20Person=release_person)
        mapper = registry()
        mapper.map_imperatively(release_address, address, properties={"score": column_property(address.c.id * factor)})
        lazy = "selectin" if eager == "mapped" else "select"
        mapper.map_imperatively(
            release_person,
            person,
            properties={"addresses": relationship(release_address, lazy=lazy, order_by=address.c.id, viewonly=True)},
        )
        options = {
            "mapped": (),
            "option": (selectinload(release_person.addresses),),
            "wildcard": (selectinload("*"),),
        }[eager]
        statement = select(release_person).where(release_person.id == 1).options(*options, FromCache("memory"))
        for _ in range(2):  # a miss, then a hit
            with Session() as session:
                people = session.scalars(statement).all()
                assert [[a.score for a in p.__dict__["addresses"]] for p in people] == [[1 * factor, 2 * factor]]


def test_a_release_that_adds_a_subclass(OwnSession, monkeypatch):
    # Single-table inheritance: a query of S20Engineer reads the rows of its
    # identity and of its subclasses'.  The release that added S20Senior
    # was served the old release's rows (S20Engineer's own mapping is the
    # same in both).
    for with_senior in (False, True, False):
        staff = type("S20Staff", (), {})
        engineer = type("S20Engineer", (staff,), {})
        senior = type("S20Senior", (engineer,), {})
        _release(monkeypatch, S20Staff=staff, S20Engineer=engineer, S20Senior=senior)
        mapper = registry()
        mapper.map_imperatively(staff, _staff, polymorphic_on=_staff.c.kind, polymorphic_identity="staff")
        mapper.map_imperatively(engineer, inherits=staff, polymorphic_identity="engineer")
        if with_senior:
            mapper.map_imperatively(senior, inherits=engineer, polymorphic_identity="senior")
        statement = select(engineer).order_by(_staff.c.id).options(FromCache("memory"))
        for _ in range(2):
            with OwnSession() as session:
                names = [e.name for e in session.scalars(statement)]
                assert names == (["b", "c"] if with_senior else ["b"])


def test_a_value_a_row_shares_with_its_object_is_changed_once_too(OwnSession, own_engine):
    # select(_Doc, _Doc.data): the row's value is the object's (one value,
    # which the listener decodes once).  The entry keeps it as loaded, once.
    def decrypt(target, context):
        target.data["secret"] = target.data["secret"].removeprefix("enc:")[::-1]

    statement = select(_Doc, _Doc.data).where(_Doc.id == 1)
    event.listen(_Doc, "load", decrypt)
    try:
        with sessionmaker(own_engine)() as session:
            doc, data = session.execute(statement).one()
            expected = (doc.data, data, data is doc.data)
        served = []
        for _ in range(3):
            with OwnSession() as session:
                doc, data = session.execute(statement.options(FromCache("memory"))).one()
                served.append((doc.data, data, data is doc.data))
    finally:
        event.remove(_Doc, "load", decrypt)
    assert expected == ({"secret": "cba"}, {"secret": "cba"}, True)
    assert served == [expected] * 3


def test_columns_loaded_after_the_load_event_are_kept_too(OwnSession, own_engine):
    # polymorphic_load="selectin": an _Engineer's own columns load in a
    # second query, after its load event (and the add-on's copy).  The
    # entry lacked them: every hit gave an _Engineer whose language was
    # unloaded, one more query on access, where the uncached query had it.
    def titles(target, context):
        target.name = target.name.title()

    statement = select(_Employee).order_by(_Employee.id)
    event.listen(_Employee, "load", titles, propagate=True)
    try:
        with sessionmaker(own_engine)() as session:
            expected = [
                (e.name, e.__dict__.get("language"), set(inspect(e).unloaded)) for e in session.scalars(statement)
            ]
        sql = SQLCounter(own_engine)
        served = []
        for _ in range(3):
            with OwnSession() as session:
                employees = session.scalars(statement.options(FromCache("memory"))).all()
                sql.reset()
                served.append([(e.name, e.__dict__.get("language"), set(inspect(e).unloaded)) for e in employees])
                assert [e.language for e in employees if isinstance(e, _Engineer)] == ["python"]
                assert sql.count == 0
    finally:
        event.remove(_Employee, "load", titles)
    assert expected == [("Ann", None, set()), ("Bob", "python", set())]
    assert served == [expected] * 3


def test_mapping_keys_are_the_same_in_every_process():
    # Subclasses, related classes (backrefs among them, added in import
    # order), a scalar subquery's anonymous label, a type without cache_ok:
    # none may change a key from one process to the next.
    program = (
        "import warnings\n"
        "warnings.simplefilter('ignore')\n"
        "from sqlalchemy import select\n"
        "from pyramid_sessioncache.engine.keys import KeyMaker\n"
        "from tests.test_attack_s20_review import _Employee, _Engineer, _Owner, _Pet\n"
        "maker = KeyMaker()\n"
        "for cls in (_Employee, _Engineer, _Owner, _Pet):\n"
        "    print(maker.structure(select(cls)._generate_cache_key()))\n"
    )
    outputs = printed_by_processes(program, seeds=3)
    assert len(outputs) == 1 and "None" not in outputs.pop()


def _served_as_uncached(session_factory, engine, statement, picture):
    """``picture`` of what ``statement`` gives uncached, then of what it gives cached three times (a miss, hits)."""
    with sessionmaker(engine)() as session:
        expected = picture(session.scalars(statement).all())
    served = []
    for _ in range(3):
        with session_factory() as session:
            served.append(picture(session.scalars(statement.options(FromCache("memory"))).all()))
    return expected, served


def test_a_deferred_column_a_load_listener_reads_and_changes_is_changed_once(OwnSession, own_engine):
    # The listener's read loads the column (a refresh, during the load
    # event), then it changes it: what was loaded then is not as loaded.
    def decode(target, context):
        target.body = target.body[::-1] + "!"

    event.listen(_Note, "load", decode, restore_load_context=True)
    try:
        expected, served = _served_as_uncached(OwnSession, own_engine, select(_Note), lambda ns: [n.body for n in ns])
    finally:
        event.remove(_Note, "load", decode)
    assert expected == ["abc!"]
    assert served == [expected] * 3


def test_a_refresh_listener_of_columns_loaded_after_the_load_event(OwnSession, own_engine):
    # A hit sends new objects no refresh event: a column a refresh listener
    # changed is not kept as the database gave it (it loads on access).
    def titles(target, context):
        target.name = target.name.title()

    def shouts(target, context, keys):
        if "language" in keys:
            target.language = target.language.upper()

    statement = select(_Employee).order_by(_Employee.id)
    event.listen(_Employee, "load", titles, propagate=True)
    event.listen(_Engineer, "refresh", shouts)
    try:
        expected, served = _served_as_uncached(
            OwnSession, own_engine, statement, lambda es: [(e.name, getattr(e, "language", None)) for e in es]
        )
    finally:
        event.remove(_Engineer, "refresh", shouts)
        event.remove(_Employee, "load", titles)
    assert expected == [("Ann", None), ("Bob", "PYTHON")]
    assert served == [expected] * 3


def test_a_mapping_with_a_value_of_each_execution_is_not_cached(Session, monkeypatch):
    # bindparam(callable_=...) in a column_property: each execution binds
    # a new value.  The mapping's text, made once, held the first, and
    # every hit served the value of the execution that stored the entry.
    ticks = itertools.count(1)
    table = Person.__table__
    cls = type("S20Ticking", (), {})
    _release(monkeypatch, S20Ticking=cls)
    tick = bindparam("tick", callable_=lambda: next(ticks), type_=Integer)
    registry().map_imperatively(cls, table, properties={"tick": column_property(table.c.id + tick)})
    statement = select(cls).where(cls.id == 1).options(FromCache("memory"))
    served = []
    for _ in range(2):
        with Session() as session:
            served.append(session.scalars(statement).one().tick)
    assert served[0] != served[1]
    with Session() as session, pytest.raises(NotCacheableError):
        cache_parameters(statement, session=session)


def test_relationships_loaded_by_an_inner_join_are_keyed_apart(Session):
    # lazy="joined", innerjoin=True: a query of the class leaves out the
    # people without a matching address.  Two classes of one path that
    # differ only there shared a key: one was served the other's rows.
    person, address = Person.__table__, Address.__table__
    main_street = (address.c.person_id == person.c.id) & address.c.street.like("1 %")

    def mapped(**loading):
        cls = type("S20Joined", (), {"__module__": __name__})
        relation = relationship(Address, primaryjoin=main_street, viewonly=True, lazy="joined", **loading)
        registry().map_imperatively(cls, person, properties={"main": relation})
        return cls

    with Session() as session:
        counts = [
            len(session.scalars(select(cls).options(FromCache("local"))).unique().all())
            for cls in (mapped(), mapped(innerjoin=True))
        ]
    assert counts == [20, 1]


def test_classes_told_apart_by_their_primary_key_are_keyed_apart(Session):
    # primary_key=...: the same table and columns, other identities (one
    # object per name, not per id).  Two classes of one path that differed
    # only there shared a key, and one was handed the other's objects.
    person = Person.__table__

    def mapped(*primary_key):
        cls = type("S20Identified", (), {"__module__": __name__})
        registry().map_imperatively(cls, person, primary_key=list(primary_key))
        return cls

    with Session() as session:
        for cls in (mapped(person.c.id), mapped(person.c.name)):
            people = session.scalars(select(cls).where(person.c.id < 3).options(FromCache("local"))).all()
            assert {type(p) for p in people} == {cls}


def test_custom_operators_are_keyed(Session):
    # Column.op() and JSONB's ->> (.astext) are custom_op objects in a
    # cache key: a class mapping one (a column_property, a relationship's
    # join) had become unkeyable, every query of it uncached.
    person = Person.__table__
    cls = type("S20Shouting", (), {"__module__": __name__})
    registry().map_imperatively(cls, person, properties={"shout": column_property(person.c.name.op("||")("!"))})
    with Session() as session:
        for _ in range(2):
            shouted = session.scalars(select(cls).where(cls.id == 1).options(FromCache("local"))).one().shout
            assert shouted == "person 1!"
        keys = {
            cache_parameters(select(Person).where(Person.name.op(name)("person 1*")), session=session)[1]
            for name in ("GLOB", "LIKE")
        }
        assert len(keys) == 2
        cache_parameters(select(Person).where(column("data", JSONB)["k"].astext == "v"), session=session)


@pytest.mark.parametrize("region", ["memory", "file"])
def test_concrete_inheritance_from_a_shared_region(OwnSession, own_engine, region):
    # ConcreteBase maps the union's "type" column on the base without
    # instrumenting it: a hit expired it as a column the entry lacked,
    # and raised KeyError.
    statement = select(_Shape).order_by(_Shape.id)

    def picture(shapes):
        return [(type(s).__name__, s.name, getattr(s, "radius", None), sorted(inspect(s).unloaded)) for s in shapes]

    with sessionmaker(own_engine)() as session:
        expected = picture(session.scalars(statement))
    for _ in range(2):
        with OwnSession() as session:
            assert picture(session.scalars(statement.options(FromCache(region)))) == expected
    assert [name for name, *_ in expected] == ["_Shape", "_Circle"]


@pytest.mark.parametrize("region", ["memory", "file"])
def test_an_expired_column_of_the_callers_object_is_filled_as_a_query_fills_it(OwnSession, own_engine, region):
    # A query fills what an object of the Session has not loaded from the
    # row, and sends it no load event: the listener does not decode it.
    def decrypt(target, context):
        target.data["secret"] = target.data["secret"].removeprefix("enc:")[::-1]

    def picture(session_factory, options):
        with session_factory() as session:
            doc = session.get(_Doc, 1)
            session.expire(doc, ["data"])
            session.scalars(select(_Doc).options(*options)).all()
            return doc.__dict__.get("data")

    event.listen(_Doc, "load", decrypt)
    try:
        with OwnSession() as session:  # an entry, stored
            session.scalars(select(_Doc).options(FromCache(region))).all()
        expected = picture(sessionmaker(own_engine), ())
        served = [picture(OwnSession, (FromCache(region),)) for _ in range(2)]
    finally:
        event.remove(_Doc, "load", decrypt)
    assert expected == {"secret": "enc:abc"}
    assert served == [expected] * 2


@pytest.mark.parametrize("city_listened", [False, True])
@pytest.mark.parametrize("region", ["memory", "file"])
def test_a_load_listener_that_changes_another_object_acts_once(Session, engine, region, city_listened):
    # A PostalCode listener renames its City: the entry held the City
    # renamed, and the hit renamed it again.  Uncached, the rename is a
    # pending change of the City, which a hit's load event of the City
    # (a listener of its own) committed: it was never flushed.
    from .models import City

    def notes(target, context):
        pass

    def tags_its_city(target, context):
        if "city" in target.__dict__:
            target.city.name += "+"

    statement = select(PostalCode).order_by(PostalCode.id).options(joinedload(PostalCode.city))

    def picture(session, options):
        codes = session.scalars(statement.options(*options)).unique().all()
        return [c.city.name for c in codes], sorted(c.name for c in session.dirty if isinstance(c, City))

    event.listen(PostalCode, "load", tags_its_city)
    if city_listened:
        event.listen(City, "load", notes)
    try:
        with sessionmaker(engine)() as session:
            expected = picture(session, ())
        served = []
        for _ in range(3):
            with Session() as session:
                served.append(picture(session, (FromCache(region),)))
    finally:
        event.remove(PostalCode, "load", tags_its_city)
        if city_listened:
            event.remove(City, "load", notes)
    assert expected == (["City 1+", "City 2+"], ["City 1+", "City 2+"])
    assert served == [expected] * 3


@pytest.mark.parametrize("region", ["memory", "file"])
def test_a_load_listener_reading_a_joined_object_sees_it_as_its_listeners_left_it(Session, engine, region):
    # The ORM sends a joined eager load's City its load event before its
    # PostalCode's: the PostalCode's listener reads the City's name as the
    # City's listener made it.  A hit sent them in the order of the
    # entry, parents first, and the label held the name as loaded.
    from .models import City

    def shouts(target, context):
        target.name = target.name.upper()

    def labels(target, context):
        target.label = f"{target.code} in {target.city.name}"

    statement = select(PostalCode).order_by(PostalCode.id).options(joinedload(PostalCode.city))
    event.listen(City, "load", shouts)
    event.listen(PostalCode, "load", labels)
    try:
        with sessionmaker(engine)() as session:
            expected = [c.label for c in session.scalars(statement).unique()]
        served = []
        for _ in range(3):
            with Session() as session:
                served.append([c.label for c in session.scalars(statement.options(FromCache(region))).unique()])
    finally:
        event.remove(PostalCode, "load", labels)
        event.remove(City, "load", shouts)
    assert expected == ["00001 in CITY 1", "00002 in CITY 2"]
    assert served == [expected] * 3
