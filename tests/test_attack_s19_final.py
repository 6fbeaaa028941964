"""Session 19, final review (adversarial): ``always_refresh``, misses handing over their objects, the request's Session.

Each test is a defect found by attacking the changes merged that day,
fixed with it.
"""

from __future__ import annotations

import pytest
from pyramid.config import Configurator
from sqlalchemy import ForeignKey, String, create_engine, event, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, joinedload, mapped_column, relationship, sessionmaker

from pyramid_sessioncache import FromCache, SessionCache
from pyramid_sessioncache.addon.interfaces import IDBSessionFactory

from .conftest import SECRET, SQLCounter
from .models import Person


class Base(DeclarativeBase):
    pass


class FinalOwner(Base):
    __tablename__ = "final_owner"
    id: Mapped[int] = mapped_column(primary_key=True)
    items = relationship("FinalItem", order_by="FinalItem.id")


class FinalItem(Base):
    __tablename__ = "final_item"
    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("final_owner.id"))
    name: Mapped[str] = mapped_column(String(20))
    kind: Mapped[str] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "item"}


class FinalRefreshedItem(FinalItem):
    """A subclass mapped with ``always_refresh``: a query of its base reaches it."""

    __mapper_args__ = {"polymorphic_identity": "refreshed", "always_refresh": True}


@pytest.fixture
def final_engine(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'final.sqlite'}")
    Base.metadata.create_all(engine)
    with sessionmaker(engine)() as session:
        session.add(FinalOwner(id=1, items=[FinalItem(id=1, name="a"), FinalRefreshedItem(id=2, name="b")]))
        session.commit()
    yield engine
    engine.dispose()


@pytest.mark.parametrize(
    "statement",
    [
        pytest.param(select(FinalItem).order_by(FinalItem.id), id="a subclass of the queried class"),
        pytest.param(select(FinalOwner).options(joinedload(FinalOwner.items)), id="an eager load"),
    ],
)
def test_a_query_reaching_always_refresh_objects_runs_once(final_engine, tmp_path, statement):
    """Such a query runs uncached, once, as uncached: its miss's load was thrown away and the query run again, each time."""
    cache = SessionCache({"memory": {"type": "memory"}}, secret=SECRET)
    sql = SQLCounter(final_engine)
    Session = sessionmaker(final_engine, info=cache.session_info())
    counts = []
    for _ in range(3):
        with Session() as session:
            sql.reset()
            session.execute(statement.options(FromCache("memory"))).unique().scalars().all()
            counts.append(sql.count)
    assert counts[1:] == [1, 1]


def _late_reader(request):
    """A view whose finished callback adds another, which reads through ``request.dbsession``."""

    def read(request):
        request.dbsession.scalars(select(Person.name)).all()

    request.dbsession.scalars(select(Person.id)).all()
    request.add_finished_callback(lambda request: request.add_finished_callback(read))
    return {}


def test_a_finished_callback_added_by_another_leaves_no_connection_out(db_url):
    """``request.dbsession`` is closed after it: it was closed before it, which took a connection nobody returned."""
    from webtest import TestApp

    config = Configurator(
        settings={"sqlalchemy.url": db_url, "cache.regions": "local", "cache.local.type": "ext:local_session"}
    )
    config.include("pyramid_sessioncache")
    config.add_route("late", "/late")
    config.add_view(_late_reader, route_name="late", renderer="json")
    app = config.make_wsgi_app()
    engine = app.registry.queryUtility(IDBSessionFactory).kw["bind"]
    try:
        TestApp(app).get("/late")
        assert engine.pool.checkedout() == 0
    finally:
        engine.dispose()


def _reads_when_finished(request):
    """A view whose finished callback reads through ``request.dbsession``, after pyramid_tm committed."""
    request.dbsession.scalars(select(Person.id)).all()
    request.add_finished_callback(lambda request: request.dbsession.scalars(select(Person.name)).all())
    return {}


def test_a_read_in_a_finished_callback_leaves_no_transaction_holding_the_session(db_url):
    """The read begins a transaction of ``request.tm`` (the thread's) that holds the Session until the thread's next request."""
    import gc
    import weakref

    import transaction
    from webtest import TestApp

    config = Configurator(settings={"sqlalchemy.url": db_url})
    config.include("pyramid_sessioncache")
    config.add_route("late", "/late")
    config.add_view(_reads_when_finished, route_name="late", renderer="json")
    app = config.make_wsgi_app()
    engine = app.registry.queryUtility(IDBSessionFactory).kw["bind"]
    made = []
    from sqlalchemy.orm import Session

    def keep(session, transaction_, connection):
        made.append(weakref.ref(session))

    event.listen(Session, "after_begin", keep)
    try:
        TestApp(app).get("/late")
        gc.collect()
        assert engine.pool.checkedout() == 0
        assert [ref() for ref in made] == [None] * len(made)
    finally:
        event.remove(Session, "after_begin", keep)
        transaction.manager.abort()
        engine.dispose()


def _polite(request):
    """A view whose finished callback puts itself back at the end of the queue while others remain, as the closer does."""
    ran = request.registry["ran"]

    def polite(request):
        ran.append(1)
        if request.finished_callbacks:
            request.add_finished_callback(polite)

    request.add_finished_callback(polite)
    request.dbsession.scalars(select(Person.id)).all()
    return {}


def test_a_callback_waiting_for_the_others_as_the_closer_does_lets_it_close(db_url):
    """Neither waits for the other for ever: the closer waits for a callback once only."""
    from webtest import TestApp

    config = Configurator(settings={"sqlalchemy.url": db_url})
    config.include("pyramid_sessioncache")
    config.add_route("polite", "/polite")
    config.add_view(_polite, route_name="polite", renderer="json")
    config.registry["ran"] = ran = []
    app = config.make_wsgi_app()
    engine = app.registry.queryUtility(IDBSessionFactory).kw["bind"]
    try:
        TestApp(app).get("/polite")
        assert engine.pool.checkedout() == 0
        assert len(ran) == 3
    finally:
        engine.dispose()


@pytest.mark.parametrize("region", ["local", "memory"])
@pytest.mark.parametrize(
    "statement",
    [
        pytest.param(select(FinalRefreshedItem.name).order_by(FinalRefreshedItem.id), id="a column"),
        pytest.param(select(func.count()).select_from(FinalRefreshedItem), id="a count"),
    ],
)
def test_a_query_of_columns_of_an_always_refresh_class_is_cached(final_engine, statement, region):
    """It loads no object, so overwrites none: it ran uncached, every time."""
    cache = SessionCache({"local": {"type": "ext:local_session"}, "memory": {"type": "memory"}}, secret=SECRET)
    sql = SQLCounter(final_engine)
    Session = sessionmaker(final_engine, info=cache.session_info())
    with Session() as session:
        first = session.execute(statement.options(FromCache(region))).all()
        sql.reset()
        assert session.execute(statement.options(FromCache(region))).all() == first
        assert sql.count == 0


def _late_app(db_url, view, **settings):
    config = Configurator(
        settings={
            "sqlalchemy.url": db_url,
            "cache.regions": "memory",
            "cache.memory.type": "memory",
            "sessioncache.default_region": "memory",
            **settings,
        }
    )
    config.include("pyramid_sessioncache")
    config.add_route("run", "/run")
    config.add_view(view, route_name="run", renderer="json")
    config.add_route("rename", "/rename")
    config.add_view(_renames, route_name="rename", renderer="json")
    return config.make_wsgi_app()


def _renames(request):
    stmt = select(Person).where(Person.id == 3)
    result = request.dbsession.execute(stmt) if "uncached" in request.params else request.cached_query(stmt)
    person = result.scalars().one()
    person.name = request.params["to"]
    return {}


def _names(db_url):
    engine = create_engine(db_url)
    try:
        with engine.connect() as connection:
            return dict(connection.execute(select(Person.id, Person.name)).all())
    finally:
        engine.dispose()


@pytest.mark.parametrize("cached", [False, True])
def test_a_read_in_a_finished_callback_with_an_explicit_transaction_manager(db_url, cached):
    """pyramid_tm's explicit manager has no transaction then: joining one raised ``NoTransaction`` in the callback."""
    from webtest import TestApp

    read = []

    def view(request):
        request.dbsession.scalars(select(Person.id)).all()

        def late(request):
            stmt = select(Person.name).where(Person.id == 2)
            result = request.cached_query(stmt) if cached else request.dbsession.execute(stmt)
            read.append(result.scalar_one())

        request.add_finished_callback(late)
        return {}

    app = _late_app(db_url, view, **{"tm.manager_hook": "pyramid_tm.explicit_manager"})
    engine = app.registry.queryUtility(IDBSessionFactory).kw["bind"]
    try:
        TestApp(app).get("/run")
        TestApp(app).get("/run")
        assert read == ["person 2", "person 2"]
        assert engine.pool.checkedout() == 0
    finally:
        engine.dispose()


@pytest.mark.parametrize("how", ["", "&uncached"])
def test_a_subrequest_without_tweens_still_joins_the_transaction_of_its_parent(db_url, how):
    """Its Session is made outside pyramid_tm's tween: it joins the transaction in progress, committed with the parent's."""
    from pyramid.request import Request
    from webtest import TestApp

    def view(request):
        request.dbsession.scalars(select(Person.id)).all()
        request.invoke_subrequest(Request.blank("/rename?to=renamed+by+a+subrequest" + how), use_tweens=False)
        return {}

    app = _late_app(db_url, view)
    engine = app.registry.queryUtility(IDBSessionFactory).kw["bind"]
    try:
        TestApp(app).get("/rename?to=warm")  # warms the entry: the subrequest's read is a hit
        TestApp(app).get("/run")
        assert engine.pool.checkedout() == 0
    finally:
        engine.dispose()
    assert _names(db_url)[3] == "renamed by a subrequest"
