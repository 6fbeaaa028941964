"""Reading a ``composite()`` in any code, while the add-on's ``refresh`` listeners are installed.

SQLAlchemy (2.0, 2.1) builds a composite whose columns are loaded by sending
the ``refresh`` event with a marker object as its context, on any object,
even one of no Session.  Both of the add-on's ``refresh`` listeners read the
query's Session from the context: they raised ``AttributeError`` there
(``as_loaded``'s on every such read, older; ``eager_rows``' while any
Session of the process loaded a local entry, in any thread).  Found by the
late s30 review.
"""

from __future__ import annotations

import dataclasses
import threading

import pytest
from sqlalchemy import create_engine, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, composite, configure_mappers, mapped_column

from pyramid_sessioncache import FromCache, SessionCache

from .conftest import SECRET


class _Base(DeclarativeBase):
    pass


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Shape(_Base):
    __tablename__ = "composite_shape"
    id: Mapped[int] = mapped_column(primary_key=True)
    x: Mapped[int]
    y: Mapped[int]
    at: Mapped[Point] = composite("x", "y")


@pytest.fixture
def cache() -> SessionCache:
    return SessionCache({"local": {"type": "ext:local_session"}}, secret=SECRET)  # installs the listeners


@pytest.fixture
def engine(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'composite.sqlite'}")
    _Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([Shape(id=1, x=1, y=2), Shape(id=2, x=3, y=4)])
        session.commit()
    yield engine
    engine.dispose()


def test_the_composite_of_a_new_object(cache):
    configure_mappers()
    assert Shape(x=1, y=2).at == Point(1, 2)


def test_the_composite_of_an_object_after_a_flush(engine, cache):
    with Session(engine, info=cache.session_info()) as session:
        shape = session.get(Shape, 1)
        shape.x = 9
        session.flush()
        assert shape.at == Point(9, 2)


def test_a_composite_read_by_a_load_listener_while_a_local_entry_loads(engine, cache):
    seen = []

    def on_load(target, context):
        seen.append(Shape(x=target.x, y=target.y).at)

    event.listen(Shape, "load", on_load)
    try:
        with Session(engine, info=cache.session_info()) as session:
            session.scalars(select(Shape).order_by(Shape.id).options(FromCache("local"))).all()
    finally:
        event.remove(Shape, "load", on_load)
    assert seen == [Point(1, 2), Point(3, 4)]


def test_a_composite_read_in_one_thread_while_another_loads_a_local_entry(engine, cache):
    started, go_on = threading.Event(), threading.Event()
    errors = []

    def hold(conn, cursor, statement, *args):
        if threading.current_thread().name == "loading":
            started.set()
            go_on.wait(5)

    def load():
        try:
            with Session(engine, info=cache.session_info()) as session:
                session.scalars(select(Shape).options(FromCache("local"))).all()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    event.listen(engine, "before_cursor_execute", hold)
    loading = threading.Thread(target=load, name="loading")
    loading.start()
    try:
        assert started.wait(5)
        try:
            value = Shape(id=9, x=3, y=4).at  # this thread: no Session at all
        finally:
            go_on.set()
            loading.join()
    finally:
        event.remove(engine, "before_cursor_execute", hold)
    assert value == Point(3, 4)
    assert not errors
