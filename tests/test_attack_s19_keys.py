"""Cache keys attacked: executions that return different rows never share a key."""

from __future__ import annotations

import datetime
import enum
import gc
import os
import sys

import pytest
import sqlalchemy
from sqlalchemy import Boolean, Column, Integer, MetaData, String, Table, TypeDecorator, create_engine, func, select
from sqlalchemy.orm import aliased, column_property, registry, relationship

from pyramid_sessioncache import FromCache, NotCacheableError, cache_parameters
from pyramid_sessioncache.engine.keys import KeyMaker, _code_text, value_text

from .hash_seeds import printed_by_processes
from .models import Person


class Bits(enum.IntFlag):
    A = 1
    B = 2


def ids(session, stmt, parameters=None):
    return [p.id for p in session.execute(stmt.options(FromCache("memory")), parameters).scalars()]


def test_execute_parameters_named_as_compiled_anonymous_binds(Session):
    # ``Person.id == 1`` compiles to ``:id_1``; execute() parameters named
    # ``id_1`` replace the statement's value.
    stmt = select(Person).where(Person.id == 1)
    with Session() as s:
        assert ids(s, stmt) == [1]
        assert ids(s, stmt, {"id_1": 2}) == [2]
    with Session() as s:
        assert ids(s, stmt, {"id_1": 3}) == [3]
        assert ids(s, stmt) == [1]


def test_flag_pseudo_members_are_told_apart(Session):
    # Bits(0) and Bits(4) are both nameless (``name`` is None).
    with Session() as s:
        assert ids(s, select(Person).where(Person.id == Bits(0))) == []
        assert ids(s, select(Person).where(Person.id == Bits(4))) == [4]
        assert ids(s, select(Person).where(Person.id == Bits.A | Bits.B)) == [3]


def test_types_with_several_arguments_key_alike_in_every_process():
    # A type's arguments come in the order of a set of names: hash
    # randomization changes it between processes.
    program = (
        "from sqlalchemy import Column, MetaData, Numeric, String, Table, select\n"
        "from pyramid_sessioncache.engine.keys import KeyMaker\n"
        "t = Table('priced', MetaData(), Column('amount', Numeric(10, 2)), Column('s', String(5, collation='x')))\n"
        "print(KeyMaker().structure(select(t.c.amount, t.c.s).where(t.c.amount > 1)._generate_cache_key()))\n"
    )
    keys = printed_by_processes(program, seeds=5)
    assert len(keys) == 1, keys


def test_tables_of_one_name_with_other_columns(Session):
    # SQLAlchemy keys a Table by the object: a second Table of the same
    # name (another MetaData, a partial reflection) selects other columns.
    narrow = Table("person", MetaData(), Column("id", Integer, primary_key=True))
    retyped = Table("person", MetaData(), Column("id", Boolean, primary_key=True), Column("name", String))
    stmt = select(Person.__table__).where(Person.__table__.c.id == 1)
    with Session() as s:
        wide = s.execute(stmt.options(FromCache("memory"))).all()
        assert s.execute(select(narrow).where(narrow.c.id == 1).options(FromCache("memory"))).all() == [(1,)]
        assert s.execute(select(retyped).where(retyped.c.id == 1).options(FromCache("memory"))).first()[0] is True
        assert s.execute(stmt.options(FromCache("memory"))).all() == wide


def test_quoting_of_a_name_is_part_of_the_key(Session):
    # On PostgreSQL "Person" and Person (folded to person) are two tables.
    quoted = Table("Person", MetaData(), Column("id", Integer), quote=True)
    folded = Table("Person", MetaData(), Column("id", Integer), quote=False)
    with Session() as s:
        assert cache_parameters(select(quoted), session=s)[1] != cache_parameters(select(folded), session=s)[1]


class Shifted(TypeDecorator):
    impl = Integer
    cache_ok = False  # SQLAlchemy cannot tell Shifted(0) from Shifted(1), nor can a key

    def __init__(self, by):
        super().__init__()
        self.by = by

    def process_bind_param(self, value, dialect):
        return value + self.by


def test_table_with_a_column_of_an_uncacheable_type_is_still_cached(Session):
    legacy = Table("person", MetaData(), Column("id", Shifted(0), primary_key=True))
    with Session() as s:
        assert cache_parameters(select(legacy), session=s)[1]


class Offset(datetime.tzinfo):
    """A time zone with no ``__repr__``: its repr is its memory address, which the next one may reuse."""

    def __init__(self, hours):
        self.hours = hours

    def utcoffset(self, dt):
        return datetime.timedelta(hours=self.hours)

    def tzname(self, dt):
        return None

    def dst(self, dt):
        return datetime.timedelta(0)


def test_aware_datetimes_with_a_tzinfo_without_repr():
    texts = set()
    for hours in range(5):
        texts.add(value_text(datetime.datetime(2020, 1, 1, tzinfo=Offset(hours))))  # freed: its address is reused
    assert len(texts) == 5
    assert value_text(datetime.time(1, tzinfo=Offset(1))) != value_text(datetime.time(1, tzinfo=Offset(2)))


class Code(str):
    __repr__ = object.__repr__  # a memory address


def test_value_whose_repr_is_an_address_is_unkeyable(Session):
    with Session() as s, pytest.raises(NotCacheableError):
        cache_parameters(select(Person).where(Person.name == Code("a")), session=s)


def test_query_and_select_of_columns_name_their_fields_apart(Session):
    # Two columns "id": a Query's row fields are ("id", "id"), a select()'s
    # ("id", "id_1"); a hit hands back those of whichever stored the entry.
    other = aliased(Person)
    with Session() as s:
        query = s.query(Person.id, other.id).join(other, other.id == Person.id).filter(Person.id == 1)
        assert query.options(FromCache("memory")).all()[0]._fields == ("id", "id")
        stmt = select(Person.id, other.id).join(other, other.id == Person.id).where(Person.id == 1)
        assert s.execute(stmt.options(FromCache("memory"))).one().id_1 == 1
        assert s.execute(select(func.count(Person.id)).options(FromCache("memory"))).one().count > 0
        assert s.query(func.count(Person.id)).options(FromCache("memory")).one()._fields == ()


class Tenant:
    """An execution option's value with no stable text, read by a listener of the application's."""

    def __init__(self, number):
        self.number = number


def test_binds_with_unkeyable_options_never_share_a_text(engine):
    maker = KeyMaker()
    texts = set()
    for number in range(20):
        with engine.connect() as connection:
            texts.add(maker.bind(connection.execution_options(tenant=Tenant(number))))
        create_engine("sqlite://").dispose()  # any engine disposed: the texts are forgotten
        gc.collect()  # the connection's address may be the next one's
    assert len(texts) == 20


def test_code_is_keyed_by_its_import_path_not_its_installation():
    # The ORM's lazy loads are lambda statements keyed by their code: two
    # virtualenvs (or two releases of an app) at other paths share keys.
    text = _code_text(select.__code__)
    assert ":sqlalchemy/sql/_selectable_constructors.py:" in text
    assert sys.prefix not in text and os.path.dirname(sqlalchemy.__file__) not in text


def _mapped_person(**properties):
    """A class of one path every time (a class factory), mapped to ``person`` with ``properties``."""
    cls = type("FactoryPerson", (), {"__module__": __name__})
    registry().map_imperatively(cls, Person.__table__, properties=properties)
    return cls


def test_classes_of_one_path_mapped_otherwise(Session):
    # A statement's cache key names the mapper by its class; what it
    # loads (a column_property's SQL, its bound values, the tables) comes
    # from the mapper: two classes of one path are keyed by their mapping.
    # (Such classes cannot be pickled: only ext:local_session holds them.)
    table = Person.__table__
    doubled = _mapped_person(score=column_property(table.c.id * 2))
    tripled = _mapped_person(score=column_property(table.c.id * 3))
    named = _mapped_person(score=column_property(table.c.name + "!"))
    with Session() as s:
        for _ in range(2):  # misses, then hits
            for cls, expected in ((doubled, 4), (tripled, 6), (named, "person 2!")):
                person = s.execute(select(cls).where(cls.id == 2).options(FromCache("local"))).scalar_one()
                assert (type(person), person.score) == (cls, expected)


@pytest.mark.parametrize("region", ["memory", "file"])
def test_a_release_that_maps_a_class_otherwise(Session, region, monkeypatch):
    # A rolling deploy: the old release stored entries of a class whose
    # column_property the new one computes otherwise, under one path.
    for factor in (2, 3, 2):
        release = _mapped_person(score=column_property(Person.__table__.c.id * factor))
        monkeypatch.setattr(sys.modules[__name__], "FactoryPerson", release, raising=False)
        for _ in range(2):
            with Session() as s:
                stmt = select(release).where(release.id == 2).options(FromCache(region))
                assert s.execute(stmt).scalar_one().score == 2 * factor


def test_relationships_joined_otherwise_are_keyed_apart(Session):
    from .models import Address

    def streets_like(pattern):
        return relationship(
            Address,
            primaryjoin=lambda: (Address.person_id == Person.__table__.c.id) & Address.street.like(pattern),
            lazy="selectin",
            viewonly=True,
        )

    main = _mapped_person(streets=streets_like("%Main%"))
    high = _mapped_person(streets=streets_like("%High%"))
    with Session() as s:
        for _ in range(2):
            for cls, expected in ((main, ["3 Main St"]), (high, ["3 High St"])):
                person = s.execute(select(cls).where(cls.id == 3).options(FromCache("local"))).scalar_one()
                assert [a.street for a in person.streets] == expected


def test_a_mapping_key_is_the_same_in_every_process():
    # Relationships (backrefs among them) are listed in import order, and
    # hash randomization changes set orders: neither may change the key.
    program = (
        "from sqlalchemy import select\n"
        "from pyramid_sessioncache.engine.keys import KeyMaker\n"
        "from tests.models import Person\n"
        "print(KeyMaker().structure(select(Person)._generate_cache_key()))\n"
    )
    keys = printed_by_processes(program, seeds=3)
    assert len(keys) == 1 and "None" not in keys, keys
