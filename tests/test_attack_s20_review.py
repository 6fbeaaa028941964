"""Review of "a mapped class is keyed by its mapping" and "an entry holds its objects as loaded", attacked."""

from __future__ import annotations

import warnings

import pytest
from sqlalchemy import CHAR, JSON, Column, ForeignKey, Integer, String, TypeDecorator, create_engine, event, select
from sqlalchemy.orm import DeclarativeBase, Mapper, relationship, sessionmaker

from pyramid_sessioncache import FromCache, cache_parameters
from pyramid_sessioncache.engine import as_loaded

from .models import PostalCode


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


class _Doc(_Base):
    __tablename__ = "s20_doc"
    id = Column(Integer, primary_key=True)
    data = Column(JSON)


@pytest.fixture
def own_engine():
    engine = create_engine("sqlite://")
    _Base.metadata.create_all(engine)
    with sessionmaker(engine)() as session:
        session.add(_Doc(id=1, data={"secret": "enc:abc"}))
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
    with Session() as session, warnings.catch_warnings():
        warnings.simplefilter("ignore")
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
        if event.contains(Mapper, "load", as_loaded._keep):  # the add-on's, for every mapper: not for later tests
            event.remove(Mapper, "load", as_loaded._keep)
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
