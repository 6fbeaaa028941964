"""Bad input: named errors at the call site, nothing lost, nothing stored."""

from __future__ import annotations

import pytest
from sqlalchemy import PickleType, create_engine, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from pyramid_sessioncache import (
    FromCache,
    NoRegionsError,
    NotCacheableError,
    SessionCache,
    UnknownRegionError,
    UnpicklableResultError,
)

from .conftest import SECRET
from .models import Person


class Base(DeclarativeBase):
    pass


class Gadget(Base):
    __tablename__ = "gadget"
    id: Mapped[int] = mapped_column(primary_key=True)
    payload = mapped_column(PickleType(pickler=None))


class Unpicklable:
    def __reduce__(self):
        raise TypeError("Unpicklable objects cannot be pickled")


def test_unknown_region_leaves_the_transaction_alone(Session, sql):
    with Session() as session:
        session.add(Person(id=99, name="pending"))
        with pytest.raises(
            UnknownRegionError, match="unknown cache region 'nowhere'; configured regions: file, local, memory"
        ):
            session.scalars(select(Person).options(FromCache("nowhere"))).all()
        assert sql.count == 0
        session.commit()
    with Session() as session:
        assert session.get(Person, 99).name == "pending"


def test_non_select_with_a_caching_option(Session):
    with Session() as session, pytest.raises(NotCacheableError, match="only SELECT"):
        session.execute(update(Person).values(name="x").options(FromCache("memory")))
    with Session() as session:
        assert session.get(Person, 1).name == "person 1"


def test_session_without_regions(engine):
    with sessionmaker(bind=engine)() as session, pytest.raises(NoRegionsError, match="no cache regions"):
        session.scalars(select(Person).options(FromCache("memory"))).all()


def test_unpicklable_result_for_an_out_of_process_region(tmp_path, region_options):
    engine = create_engine(f"sqlite:///{tmp_path / 'g.sqlite'}")
    Base.metadata.create_all(engine)

    class Codec:
        @staticmethod
        def dumps(value, protocol=None):
            return b"x"

        @staticmethod
        def loads(value):
            return Unpicklable()

    Gadget.__table__.c.payload.type.pickler = Codec
    with sessionmaker(bind=engine)() as session:
        session.add(Gadget(id=1, payload="anything"))
        session.commit()
    cache = SessionCache(region_options, secret=SECRET)
    cache.region("file").put("neighbour", "kept")
    with sessionmaker(bind=engine, info=cache.session_info())() as session:
        with pytest.raises(UnpicklableResultError, match="region 'file'.*cannot be pickled"):
            session.scalars(select(Gadget).options(FromCache("file"))).all()
        # A memory region keeps values in the process: nothing to pickle.
        assert isinstance(session.scalars(select(Gadget).options(FromCache("memory"))).one().payload, Unpicklable)
    assert cache.region("file").get("neighbour") == "kept"
    engine.dispose()


def test_disabled_region_runs_every_query(engine, sql):
    cache = SessionCache({"off": {"type": "memory", "enabled": False}})
    with sessionmaker(bind=engine, info=cache.session_info())() as session:
        for _ in range(2):
            session.scalars(select(Person).options(FromCache("off"))).all()
    assert sql.count == 2
