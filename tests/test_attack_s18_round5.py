"""Round 5 (adversarial): every class of failure attacked through the Pyramid side.

Each case runs a view through ``request.cached_query`` (the request's own
``request.dbsession``, pyramid_tm committing), writes through another view,
and compares what the cached app returns with what a fresh plain Session
reads.  Hits are proven by counting SQL statements.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import shutil
import tempfile
import threading
import weakref
from pathlib import Path

import pytest
import zope.sqlalchemy
from pyramid.config import Configurator
from sqlalchemy import (
    Column,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.ext.hybrid import hybrid_property
from sqlalchemy.orm import (
    Session,
    column_property,
    declarative_base,
    deferred,
    query_expression,
    relationship,
    sessionmaker,
    undefer,
    with_expression,
    with_loader_criteria,
)
from sqlalchemy.pool import StaticPool
from webtest import TestApp

from pyramid_sessioncache import RelationshipCache
from pyramid_sessioncache.testing import SQLCounter

from .conftest import ThreadServer, _server_package

SECRET = "a test secret, long enough"
Base = declarative_base()

parent_tag = Table(
    "r5_parent_tag",
    Base.metadata,
    Column("parent_id", ForeignKey("r5_parent.id", ondelete="CASCADE"), primary_key=True),
    Column("tag_id", ForeignKey("r5_tag.id", ondelete="CASCADE"), primary_key=True),
)


class Child(Base):
    __tablename__ = "r5_child"
    id = Column(Integer, primary_key=True)
    parent_id = Column(ForeignKey("r5_parent.id", ondelete="CASCADE"))
    name = Column(String(50))


class Tag(Base):
    __tablename__ = "r5_tag"
    id = Column(Integer, primary_key=True)
    name = Column(String(50))


class Parent(Base):
    __tablename__ = "r5_parent"
    id = Column(Integer, primary_key=True)
    name = Column(String(50))
    note = deferred(Column(Text))
    children = relationship(Child, cascade="all, delete-orphan", passive_deletes=True, order_by=Child.id)
    tags = relationship(Tag, secondary=parent_tag, order_by=Tag.id)
    n_children = column_property(
        select(func.count(Child.id)).where(Child.parent_id == id).correlate_except(Child).scalar_subquery()
    )
    expr = query_expression()

    @hybrid_property
    def child_names(self):
        return ",".join(c.name for c in self.children)

    @child_names.expression
    def child_names(cls):
        return (
            select(func.group_concat(Child.name))
            .where(Child.parent_id == cls.id)
            .correlate_except(Child)
            .scalar_subquery()
        )


class Audit(Base):
    __tablename__ = "r5_audit"
    id = Column(Integer, primary_key=True)
    n = Column(Integer)


class Item(Base):
    __tablename__ = "r5_item"
    id = Column(Integer, primary_key=True)
    tenant = Column(String(10))
    name = Column(String(50))


def seed(session: Session) -> None:
    tags = [Tag(id=1, name="t1"), Tag(id=2, name="t2")]
    for i in (1, 2):
        session.add(
            Parent(
                id=i,
                name=f"p{i}",
                note=f"note{i}",
                children=[Child(id=10 * i + k, name=f"c{i}{k}") for k in (1, 2)],
                tags=tags,
            )
        )
    session.add(Audit(id=1, n=0))
    session.add_all([Item(id=1, tenant="a", name="a-secret"), Item(id=2, tenant="b", name="b-secret")])
    session.commit()


def fk_on(engine):
    @event.listens_for(engine, "connect")
    def _fk(dbapi, record):
        dbapi.execute("PRAGMA foreign_keys=ON")

    return engine


def make_sqlite(path=None):
    if path is None:
        engine = create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        engine = create_engine(f"sqlite:///{path}")
    fk_on(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        seed(s)
    return engine


# --- the reads (one view each) and what they return, plain data -------------------------------------------


def tenant_of(request):
    return request.headers.get("X-Tenant", "a")


READS = {
    "parents": (lambda r: select(Parent).order_by(Parent.id), lambda res: [[p.id, p.name] for p in res.scalars()]),
    "children": (lambda r: select(Child).order_by(Child.id), lambda res: [[c.id, c.parent_id] for c in res.scalars()]),
    "child_count": (lambda r: select(func.count(Child.id)), lambda res: res.scalar()),
    "pt_rows": (
        lambda r: select(parent_tag.c.parent_id, parent_tag.c.tag_id).order_by(
            parent_tag.c.parent_id, parent_tag.c.tag_id
        ),
        lambda res: [list(x) for x in res],
    ),
    "tags_of_p1": (
        lambda r: select(Tag).join(parent_tag).where(parent_tag.c.parent_id == 1).order_by(Tag.id),
        lambda res: [t.name for t in res.scalars()],
    ),
    "n_children": (
        lambda r: select(Parent).order_by(Parent.id),
        lambda res: [[p.id, p.n_children] for p in res.scalars()],
    ),
    "with_expression": (
        lambda r: (
            select(Parent)
            .options(
                with_expression(
                    Parent.expr,
                    select(func.max(Child.name)).where(Child.parent_id == Parent.id).scalar_subquery(),
                )
            )
            .order_by(Parent.id)
        ),
        lambda res: [[p.id, p.expr] for p in res.scalars()],
    ),
    "undefer": (
        lambda r: select(Parent).options(undefer(Parent.note)).order_by(Parent.id),
        lambda res: [[p.id, p.note] for p in res.scalars()],
    ),
    "hybrid": (
        lambda r: select(Parent.id, Parent.child_names).order_by(Parent.id),
        lambda res: [list(x) for x in res],
    ),
    "hybrid_where": (
        lambda r: select(Parent.id).where(Parent.child_names == "c11,c12"),
        lambda res: [x[0] for x in res],
    ),
    "audit": (lambda r: select(Audit.n), lambda res: res.scalar()),
    "view": (
        lambda r: select(text("n")).select_from(text("r5_audit_view")),
        lambda res: [x[0] for x in res],
    ),
    "items": (lambda r: select(Item).order_by(Item.id), lambda res: [i.name for i in res.scalars()]),
    "items_name": (lambda r: select(Item.name).order_by(Item.id), lambda res: [x[0] for x in res]),
}


def plain(engine, name, tenant="a"):
    """What a fresh plain Session reads."""
    stmt_of, out = READS[name]
    with Session(engine) as s:
        stmt = stmt_of(None)
        if name.startswith("items"):
            stmt = stmt.options(with_loader_criteria(Item, Item.tenant == tenant))
        return out(s.execute(stmt))


# --- the writes (one view each); pyramid_tm commits -------------------------------------------------------


def w_delete_parent_orm(s):
    s.delete(s.get(Parent, 1))


def w_orphan(s):
    p = s.get(Parent, 1)
    p.children.remove(p.children[0])


def w_delete_parent_core(s):
    from sqlalchemy import delete

    s.execute(delete(Parent).where(Parent.id == 1))


def w_delete_tag_core(s):
    from sqlalchemy import delete

    s.execute(delete(Tag).where(Tag.id == 1))


def w_bulk_insert(s):
    s.execute(insert(Child), [{"id": 100, "parent_id": 1, "name": "c1z"}, {"id": 101, "parent_id": 2, "name": "c2z"}])


def w_bulk_update_by_pk(s):
    s.execute(update(Child), [{"id": 11, "parent_id": 2, "name": "moved"}])


def w_bulk_save_objects(s):
    s.bulk_save_objects([Child(id=102, parent_id=1, name="c1y")])


def w_bulk_insert_mappings(s):
    s.bulk_insert_mappings(Child, [{"id": 103, "parent_id": 2, "name": "c2y"}])


def w_bulk_update_mappings(s):
    s.bulk_update_mappings(Child, [{"id": 21, "name": "a0"}])


def w_bulk_update_parent_note(s):
    s.bulk_update_mappings(Parent, [{"id": 1, "note": "changed"}])


def w_add_child(s):
    s.add(Child(id=104, parent_id=1, name="c10"))


def w_item_rename(s):
    s.get(Item, 1).name = "a-renamed"


WRITES = {k[2:]: v for k, v in globals().items() if k.startswith("w_")}


def build_app(engine, region: dict, tenants=False, **extra):
    settings = {
        "cache.regions": "local_session, shared",
        "cache.local_session.type": "ext:local_session",
        "sessioncache.secret": SECRET,
        **{f"cache.shared.{k}": v for k, v in region.items()},
        **extra,
    }
    config = Configurator(settings=settings)
    config.include("pyramid_sessioncache")
    factory = sessionmaker(bind=engine)
    config.set_sessioncache_session_factory(factory)
    if tenants:

        @event.listens_for(factory, "do_orm_execute")
        def _tenant(state):
            request = state.session.info.get("request")
            if request is not None and state.is_select:
                state.statement = state.statement.options(with_loader_criteria(Item, Item.tenant == tenant_of(request)))

    def read(request):
        stmt_of, out = READS[request.matchdict["name"]]
        region_name = request.params.get("region", "shared")
        result = request.cached_query(stmt_of(request), region=region_name)
        value = out(result)
        if "keep" in request.params:
            app.kept.append(weakref.ref(request.dbsession))
            app.kept.append(weakref.ref(request))
        return {"value": value}

    def write(request):
        WRITES[request.matchdict["name"]](request.dbsession)
        request.dbsession.flush()
        # what a pyramid_tm app does after the bulk API (zope.sqlalchemy does not see those writes)
        zope.sqlalchemy.mark_changed(request.dbsession)
        if "then_read" in request.params:
            stmt_of, out = READS[request.params["then_read"]]
            out(request.cached_query(stmt_of(request), region="shared"))
        if "fail" in request.params:
            raise RuntimeError("rolled back on purpose")
        return {"ok": True}

    config.add_route("read", "/r/{name}")
    config.add_route("write", "/w/{name}")
    config.add_view(read, route_name="read", renderer="json")
    config.add_view(write, route_name="write", renderer="json", request_method="POST")
    app = config.make_wsgi_app()
    app.kept = []
    return TestApp(app)


def _region(request, tmp_path, kind: str) -> dict:
    if kind == "memory":
        return {"type": "memory", "expire": "60"}
    if kind == "local":
        return {"type": "ext:local_session"}
    if kind in ("file", "dbm"):
        return {"type": kind, "data_dir": str(tmp_path / "data"), "lock_dir": str(tmp_path / "lock")}
    from redis import Redis

    url = request.getfixturevalue("redis_url")
    Redis.from_url(url).flushall()
    return {"type": "ext:redis", "url": url}


# dbm shares file's signed namespace (storage/backends/signed.py); its own cases are in test_file_backend.py.
@pytest.fixture(params=["memory", "file", "redis", "local"])
def region(request, tmp_path):
    return _region(request, tmp_path, request.param)


@pytest.fixture(params=["memory", "file", "redis"])
def shared_region(request, tmp_path):
    """The regions whose entries outlive a request."""
    return _region(request, tmp_path, request.param)


@pytest.fixture(params=["file", "dbm", "redis"])
def persistent_region(request, tmp_path):
    """The regions whose entries outlive the process."""
    return _region(request, tmp_path, request.param)


@pytest.fixture(scope="module")
def seeded_r5(tmp_path_factory) -> Path:
    """A file :func:`make_sqlite` made once: never opened by a test (a copy costs far less than seeding)."""
    path = tmp_path_factory.mktemp("r5") / "seeded.sqlite"
    make_sqlite(path).dispose()
    return path


@pytest.fixture
def sengine(tmp_path, seeded_r5):
    """An engine over a copy of :func:`seeded_r5`, as :func:`make_sqlite` makes it."""
    path = tmp_path / "r5.sqlite"
    shutil.copyfile(seeded_r5, path)
    engine = fk_on(create_engine(f"sqlite:///{path}"))
    yield engine
    engine.dispose()


def read(app, name, **headers):
    return app.get(f"/r/{name}", headers=headers).json["value"]


def cached_then_write_then_compare(app, engine, reads, write, tenant="a"):
    """Read each (miss, then a hit with no SQL), write and commit, read again: must equal a plain Session."""
    for name in reads:
        assert read(app, name) == plain(engine, name), name
    with SQLCounter(engine) as sql:
        for name in reads:
            read(app, name)
    return sql


# ---------------------------------------------------------------------------------------------------------
# cascades
# ---------------------------------------------------------------------------------------------------------

CASCADE_CASES = [
    ("delete_parent_orm", ["children", "child_count", "pt_rows", "n_children", "tags_of_p1"]),
    ("orphan", ["children", "child_count", "n_children", "hybrid"]),
    ("delete_parent_core", ["children", "child_count", "pt_rows", "tags_of_p1"]),
    ("delete_tag_core", ["pt_rows", "tags_of_p1"]),
]


@pytest.mark.parametrize("write,reads", CASCADE_CASES, ids=[c[0] for c in CASCADE_CASES])
def test_pyramid_cascades_invalidate_shared_regions(sengine, region, write, reads):
    app = build_app(sengine, region)
    sql = cached_then_write_then_compare(app, sengine, reads, write)
    if region["type"] != "ext:local_session":
        assert sql.count == 0, sql.statements
    before = [plain(sengine, name) for name in reads]
    app.post(f"/w/{write}")
    assert [plain(sengine, name) for name in reads] != before, "the write changed nothing"
    for name in reads:
        assert read(app, name) == plain(sengine, name), (write, name)


# ---------------------------------------------------------------------------------------------------------
# the bulk API
# ---------------------------------------------------------------------------------------------------------

BULK = [
    ("bulk_insert", ["children", "child_count", "n_children", "hybrid"]),
    ("bulk_update_by_pk", ["children", "n_children", "hybrid", "hybrid_where"]),
    ("bulk_save_objects", ["children", "child_count", "n_children"]),
    ("bulk_insert_mappings", ["children", "child_count", "with_expression"]),
    ("bulk_update_mappings", ["with_expression", "hybrid"]),
    ("bulk_update_parent_note", ["undefer"]),
]


@pytest.mark.parametrize("write,reads", BULK, ids=[c[0] for c in BULK])
def test_pyramid_bulk_api_invalidates(sengine, region, write, reads):
    app = build_app(sengine, region)
    sql = cached_then_write_then_compare(app, sengine, reads, write)
    if region["type"] != "ext:local_session":
        assert sql.count == 0, sql.statements
    before = [plain(sengine, name) for name in reads]
    app.post(f"/w/{write}")
    assert [plain(sengine, name) for name in reads] != before, "the write changed nothing"
    for name in reads:
        assert read(app, name) == plain(sengine, name), (write, name)


# ---------------------------------------------------------------------------------------------------------
# column properties: a child written invalidates a parent query through its column property
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reads", [["n_children"], ["with_expression"], ["hybrid"], ["hybrid_where"], ["undefer"]])
def test_pyramid_column_properties_follow_the_other_table(sengine, region, reads):
    app = build_app(sengine, region)
    sql = cached_then_write_then_compare(app, sengine, reads, "add_child")
    if region["type"] != "ext:local_session":
        assert sql.count == 0, sql.statements
    app.post("/w/add_child")
    app.post("/w/bulk_update_by_pk")
    for name in reads:
        assert read(app, name) == plain(sengine, name), name


# ---------------------------------------------------------------------------------------------------------
# triggers and SQLite views declared with writes_also in the ini
# ---------------------------------------------------------------------------------------------------------


def test_pyramid_trigger_and_view_declared_in_the_ini(sengine, region):
    with sengine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TRIGGER r5_count AFTER INSERT ON r5_child BEGIN UPDATE r5_audit SET n = n + 1; END"
        )
        conn.exec_driver_sql("CREATE VIEW r5_audit_view AS SELECT n FROM r5_audit")
    app = build_app(
        sengine,
        region,
        **{"sessioncache.writes_also": "r5_child: r5_audit\nr5_audit: r5_audit_view"},
    )
    assert read(app, "audit") == 0 and read(app, "view") == [0]
    with SQLCounter(sengine) as sql:
        read(app, "audit")
    if region["type"] != "ext:local_session":
        assert sql.count == 0
    app.post("/w/add_child")
    assert read(app, "audit") == plain(sengine, "audit") == 1
    assert read(app, "view") == plain(sengine, "view") == [1]
    app.post("/w/bulk_insert")
    assert read(app, "audit") == plain(sengine, "audit") == 3
    assert read(app, "view") == plain(sengine, "view") == [3]


# ---------------------------------------------------------------------------------------------------------
# uncommitted / rolled back / foreign rows
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "write,reader", [("add_child", "children"), ("bulk_insert", "child_count"), ("delete_parent_orm", "pt_rows")]
)
def test_pyramid_a_rolled_back_requests_rows_are_never_served(sengine, region, write, reader):
    app = build_app(sengine, region)
    before = plain(sengine, reader)
    with pytest.raises(RuntimeError):
        app.post(f"/w/{write}?then_read={reader}&fail=1")
    assert plain(sengine, reader) == before
    assert read(app, reader) == before
    assert read(app, reader) == before


def test_pyramid_uncommitted_rows_of_a_request_in_flight_never_reach_another(tmp_path, shared_region):
    region = shared_region
    engine = make_sqlite(tmp_path / "wal.sqlite")
    with engine.connect() as c:
        c.exec_driver_sql("PRAGMA journal_mode=WAL")
    app = build_app(engine, region)
    inside, release = threading.Event(), threading.Event()

    def w_slow(s):
        s.add(Child(id=500, parent_id=1, name="uncommitted"))
        s.flush()
        inside.set()
        release.wait(10)

    WRITES["slow"] = w_slow
    try:
        results = {}

        def writer():
            try:
                app.post("/w/slow?then_read=children&fail=1")
            except RuntimeError:
                results["w"] = "rolled back"

        t = threading.Thread(target=writer)
        t.start()
        assert inside.wait(10)
        seen_during = read(app, "children")
        release.set()
        t.join(10)
        assert [500, 1] not in seen_during
        assert read(app, "children") == plain(engine, "children")
        assert [500, 1] not in read(app, "children")
    finally:
        WRITES.pop("slow", None)
        release.set()
        engine.dispose()


def test_pyramid_tenants_never_see_each_others_rows(sengine, region):
    app = build_app(sengine, region, tenants=True)
    for name in ("items", "items_name"):
        a = app.get(f"/r/{name}", headers={"X-Tenant": "a"}).json["value"]
        b = app.get(f"/r/{name}", headers={"X-Tenant": "b"}).json["value"]
        assert a == plain(sengine, name, "a") == (["a-secret"])
        assert b == plain(sengine, name, "b") == (["b-secret"])
        with SQLCounter(sengine) as sql:
            assert app.get(f"/r/{name}", headers={"X-Tenant": "b"}).json["value"] == ["b-secret"]
            assert app.get(f"/r/{name}", headers={"X-Tenant": "a"}).json["value"] == ["a-secret"]
        if region["type"] != "ext:local_session":
            assert sql.count == 0
    app.post("/w/item_rename", headers={"X-Tenant": "a"})
    assert app.get("/r/items", headers={"X-Tenant": "b"}).json["value"] == ["b-secret"]
    assert app.get("/r/items", headers={"X-Tenant": "a"}).json["value"] == ["a-renamed"]


# ---------------------------------------------------------------------------------------------------------
# two databases with one URL
# ---------------------------------------------------------------------------------------------------------


def test_pyramid_two_sqlite_memory_engines_with_one_url(shared_region):
    region = shared_region
    e1, e2 = make_sqlite(), make_sqlite()
    with e2.begin() as c:
        c.execute(update(Parent).values(name="other"))
    a1, a2 = build_app(e1, region), build_app(e2, region)
    assert read(a1, "parents") == plain(e1, "parents") == [[1, "p1"], [2, "p2"]]
    assert read(a2, "parents") == plain(e2, "parents") == [[1, "other"], [2, "other"]]
    a2.post("/w/delete_parent_orm")
    assert read(a1, "children") == plain(e1, "children")
    assert read(a2, "children") == plain(e2, "children")
    a1.post("/w/add_child")
    assert read(a2, "children") == plain(e2, "children")
    assert read(a1, "children") == plain(e1, "children")


def _pg_schemas(url, schemas):

    admin = create_engine(url)
    with admin.begin() as c:
        for s in schemas:
            c.exec_driver_sql(f"CREATE SCHEMA {s}")
    admin.dispose()
    engines = []
    for s in schemas:
        e = create_engine(url, connect_args={"options": f"-csearch_path={s}"})
        Base.metadata.create_all(e)
        with Session(e) as sess:
            seed(sess)
        engines.append(e)
    return engines


def test_pg_two_search_paths_with_one_url(pg_database, shared_region):
    region = shared_region
    e1, e2 = _pg_schemas(pg_database, ["s1", "s2"])
    try:
        with e2.begin() as c:
            c.execute(update(Parent).values(name="other"))
        a1, a2 = build_app(e1, region), build_app(e2, region)
        assert read(a1, "parents") == plain(e1, "parents")
        assert read(a2, "parents") == plain(e2, "parents") == [[1, "other"], [2, "other"]]
        a1.post("/w/bulk_insert")
        assert read(a2, "child_count") == plain(e2, "child_count")
        assert read(a1, "child_count") == plain(e1, "child_count")
        a2.post("/w/delete_parent_core")
        assert read(a1, "pt_rows") == plain(e1, "pt_rows")
        assert read(a2, "pt_rows") == plain(e2, "pt_rows")
    finally:
        e1.dispose()
        e2.dispose()


def test_pg_cascades_and_view_through_pyramid(pg_database, region):
    e = create_engine(pg_database)
    Base.metadata.create_all(e)
    with Session(e) as s:
        seed(s)
    with e.begin() as c:
        c.exec_driver_sql("CREATE VIEW r5_audit_view AS SELECT count(*) AS n FROM r5_child")
    READS["view"] = READS["view"]
    try:
        app = build_app(e, region)
        assert read(app, "view") == plain(e, "view") == [4]
        assert read(app, "pt_rows") == plain(e, "pt_rows")
        app.post("/w/delete_parent_core")
        assert read(app, "view") == plain(e, "view") == [2]
        assert read(app, "pt_rows") == plain(e, "pt_rows")
        app.post("/w/bulk_insert_mappings")
        assert plain(e, "view") == [3]
        assert read(app, "view") == [3]
    finally:
        e.dispose()


# ---------------------------------------------------------------------------------------------------------
# planted pickles in file / dbm regions
# ---------------------------------------------------------------------------------------------------------


class Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["file", "dbm"])
@pytest.mark.parametrize("how", ["overwrite", "symlink", "world_writable_new"])
def test_planted_pickle_in_the_data_dir_never_runs(sengine, tmp_path, kind, how):
    data = tmp_path / "data"
    region = {"type": kind, "data_dir": str(data), "lock_dir": str(tmp_path / "lock")}
    app = build_app(sengine, region)
    assert read(app, "parents") == plain(sengine, "parents")
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(Boom(marker))
    evil = tmp_path / "evil.pickle"
    evil.write_bytes(payload)
    for root, _dirs, files in os.walk(data):
        os.chmod(root, 0o777)
        for f in files:
            p = os.path.join(root, f)
            if kind == "dbm":
                import dbm

                try:
                    with dbm.open(p.rsplit(".", 1)[0] if p.endswith((".db", ".dat", ".dir", ".bak")) else p, "w") as d:
                        for k in list(d.keys()):
                            d[k] = payload
                except Exception:
                    with open(p, "wb") as fh:
                        fh.write(payload)
            elif how == "symlink":
                os.unlink(p)
                os.symlink(evil, p)
            else:
                with open(p, "wb") as fh:
                    fh.write(payload)
    if how == "world_writable_new":
        for i in range(256):
            d = data / f"{i:02x}"
            if d.is_dir():
                (d / "planted").write_bytes(payload)
    for _ in range(2):
        assert read(app, "parents") == plain(sengine, "parents")
        assert read(app, "children") == plain(sengine, "children")
    app.post("/w/add_child")
    assert read(app, "children") == plain(sengine, "children")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------
# a memory region entry keeping its request / Session / connection alive
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "local"])
def test_memory_region_keeps_no_request_or_session_alive(sengine, kind):
    region = {"type": "memory", "expire": "60"} if kind == "memory" else {"type": "ext:local_session"}
    app = build_app(sengine, region)
    for i in range(60):
        for name in ("parents", "n_children", "with_expression", "undefer"):
            app.get(f"/r/{name}?keep=1&v={i}")
        if i % 10 == 0:
            app.post("/w/add_child") if i == 0 else None
    gc.collect()
    alive = [r() for r in app.app.kept if r() is not None]
    assert alive == [], alive[:3]
    assert sengine.pool.checkedout() == 0


# ---------------------------------------------------------------------------------------------------------
# evicted Redis keys under volatile-lru / allkeys-lru while a reader caches and a writer commits
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru"])
def test_pyramid_redis_eviction_never_serves_stale(sengine, redis_url, policy):
    from redis import Redis

    r = Redis.from_url(redis_url)
    r.flushall()
    old = r.config_get("maxmemory"), r.config_get("maxmemory-policy")
    used = int(r.info("memory")["used_memory"])
    r.config_set("maxmemory", used + 300_000)
    r.config_set("maxmemory-policy", policy)
    try:
        app = build_app(sengine, {"type": "ext:redis", "url": redis_url, "expire": "600"})
        filler = Redis.from_url(redis_url)
        for i in range(120):
            assert read(app, "children") == plain(sengine, "children"), i
            assert read(app, "n_children") == plain(sengine, "n_children"), i
            if i % 7 == 0:
                app.post(f"/w/bulk_update_by_pk?i={i}") if i == 0 else None
                with sengine.begin():
                    pass
                app.post("/w/add_child") if i == 7 else None
            if i % 3 == 0:
                with contextlib.suppress(Exception):
                    filler.set(f"fill:{i}", b"x" * 40_000, ex=600 if policy == "volatile-lru" else None)
            if i % 11 == 5:
                # a commit writes the children table
                from pyramid_sessioncache import get_session_cache  # noqa: F401

                with Session(sengine) as s:
                    s.execute(update(Child).where(Child.id == 12).values(parent_id=1 if i % 2 else 2))
                    s.commit()
    finally:
        r.config_set("maxmemory", old[0]["maxmemory"])
        r.config_set("maxmemory-policy", old[1]["maxmemory-policy"])
        r.flushall()


# ---------------------------------------------------------------------------------------------------------
# round 5, deeper: tenants through lambda criteria with closures, relationships, and a global listener
# ---------------------------------------------------------------------------------------------------------


view_md = MetaData()
audit_view = Table("r5_audit_view", view_md, Column("n", Integer))
child_view = Table("r5_child_view", view_md, Column("n", Integer))
READS["view_table"] = (lambda r: select(audit_view.c.n), lambda res: [x[0] for x in res])
READS["child_view_table"] = (lambda r: select(child_view.c.n), lambda res: [x[0] for x in res])


def build_tenant_app(engine, region, how):
    """An app whose tenant criteria come from a listener of the kind ``how``."""
    settings = {
        "cache.regions": "local_session, shared",
        "cache.local_session.type": "ext:local_session",
        "sessioncache.secret": SECRET,
        **{f"cache.shared.{k}": v for k, v in region.items()},
    }
    factory = sessionmaker(bind=engine)
    target = Session if how == "global_before_include" else factory

    def _tenant(state):
        request = state.session.info.get("request")
        if request is None or not state.is_select:
            return
        tenant = tenant_of(request)
        if how == "lambda_closure":
            state.statement = state.statement.options(
                with_loader_criteria(Item, lambda cls: cls.tenant == tenant, track_closure_variables=True)
            )
        else:
            state.statement = state.statement.options(with_loader_criteria(Item, Item.tenant == tenant))

    if how == "global_before_include":
        event.listen(target, "do_orm_execute", _tenant)
    config = Configurator(settings=settings)
    config.include("pyramid_sessioncache")
    config.set_sessioncache_session_factory(factory)
    if how != "global_before_include":
        event.listen(target, "do_orm_execute", _tenant)

    def items(request):
        stmt = select(Item).order_by(Item.id)
        return {"value": [i.name for i in request.cached_query(stmt, region="shared").scalars()]}

    def items_legacy(request):
        q = request.dbsession.query(Item).order_by(Item.id)
        return {"value": [i.name for i in request.cached_query(q, region="shared").all()]}

    def item_get(request):
        stmt = select(Item).where(Item.id == int(request.params["id"]))
        return {"value": [i.name for i in request.cached_query(stmt, region="shared").scalars()]}

    config.add_route("items", "/items")
    config.add_route("items_legacy", "/items_legacy")
    config.add_route("item_get", "/item")
    config.add_view(items, route_name="items", renderer="json")
    config.add_view(items_legacy, route_name="items_legacy", renderer="json")
    config.add_view(item_get, route_name="item_get", renderer="json")
    app = TestApp(config.make_wsgi_app())
    return app, (lambda: event.remove(target, "do_orm_execute", _tenant))


@pytest.mark.parametrize("how", ["lambda_closure", "factory_after_include", "global_before_include"])
@pytest.mark.parametrize("path", ["/items", "/items_legacy", "/item?id=2", "/item?id=1"])
def test_pyramid_tenant_criteria_of_every_kind_never_serve_foreign_rows(sengine, region, how, path):
    app, remove = build_tenant_app(sengine, region, how)
    try:
        expected = {}
        for tenant in ("a", "b"):
            with Session(sengine) as s:
                stmt = select(Item).order_by(Item.id)
                if "id=" in path:
                    stmt = stmt.where(Item.id == int(path.rsplit("=", 1)[1]))
                stmt = stmt.options(with_loader_criteria(Item, Item.tenant == tenant))
                expected[tenant] = [i.name for i in s.execute(stmt).scalars()]
        got = {t: app.get(path, headers={"X-Tenant": t}).json["value"] for t in ("a", "b")}
        assert got == expected
        with SQLCounter(sengine) as sql:
            got = {t: app.get(path, headers={"X-Tenant": t}).json["value"] for t in ("b", "a")}
        assert got == expected
        if region["type"] != "ext:local_session":
            assert sql.count == 0, sql.statements
    finally:
        remove()


def test_pyramid_sqlite_view_as_a_table_declared(sengine, region):
    with sengine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TRIGGER r5_count AFTER INSERT ON r5_child BEGIN UPDATE r5_audit SET n = n + 1; END"
        )
        conn.exec_driver_sql("CREATE VIEW r5_audit_view AS SELECT n FROM r5_audit")
        conn.exec_driver_sql("CREATE VIEW r5_child_view AS SELECT count(*) AS n FROM r5_child")
    app = build_app(
        sengine,
        region,
        **{"sessioncache.writes_also": "r5_child: r5_audit, r5_child_view\nr5_audit: r5_audit_view"},
    )
    for name in ("view_table", "child_view_table"):
        read(app, name)
    with SQLCounter(sengine) as sql:
        assert read(app, "view_table") == [0]
        assert read(app, "child_view_table") == [4]
    if region["type"] != "ext:local_session":
        assert sql.count == 0
    app.post("/w/bulk_save_objects")
    assert read(app, "view_table") == plain(sengine, "view_table") == [1]
    assert read(app, "child_view_table") == plain(sengine, "child_view_table") == [5]
    app.post("/w/delete_parent_core")
    assert read(app, "child_view_table") == plain(sengine, "child_view_table")


def test_pg_view_as_a_table_and_search_path_views(pg_database, region):
    e = create_engine(pg_database)
    Base.metadata.create_all(e)
    with Session(e) as s:
        seed(s)
    with e.begin() as c:
        c.exec_driver_sql("CREATE VIEW r5_child_view AS SELECT count(*) AS n FROM r5_child")
        c.exec_driver_sql("CREATE VIEW r5_audit_view AS SELECT n FROM (SELECT count(*) AS n FROM r5_child_view) x")
    try:
        app = build_app(e, region)
        assert read(app, "child_view_table") == plain(e, "child_view_table") == [4]
        assert read(app, "view_table") == plain(e, "view_table") == [1]
        with e.begin() as c:
            c.exec_driver_sql("DROP VIEW r5_audit_view")
            c.exec_driver_sql("CREATE VIEW r5_audit_view AS SELECT n FROM r5_child_view")
        app.post("/w/bulk_insert")
        assert read(app, "child_view_table") == plain(e, "child_view_table") == [6]
        assert read(app, "view_table") == plain(e, "view_table") == [6]
        app.post("/w/delete_parent_orm")
        assert read(app, "view_table") == plain(e, "view_table")
    finally:
        e.dispose()


# ---------------------------------------------------------------------------------------------------------
# PostgreSQL: databases of one name on two servers; a server swapped behind one URL
# ---------------------------------------------------------------------------------------------------------


def _pg_directory() -> Path:
    """A folder for a pgserver's data, outside pytest's: as conftest's servers, see ``postgres_url``.

    pgserver runs PostgreSQL as another user, who must traverse the folders
    above its data; every pytest session that starts resets pytest's own
    folder to its owner alone (another session on the machine, meanwhile,
    made a later server fail to start).
    """
    return Path(tempfile.mkdtemp(prefix="sessioncache-pg-"))


@pytest.fixture(scope="module")
def two_pg_servers():
    pgserver = _server_package("pgserver")
    servers = [pgserver.get_server(str(_pg_directory() / "data"), cleanup_mode="stop") for _ in (1, 2)]
    urls = []
    for i, server in enumerate(servers):
        base = server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
        admin = create_engine(base, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.exec_driver_sql("CREATE DATABASE r5app")
        admin.dispose()
        from sqlalchemy import make_url

        url = make_url(base).set(database="r5app").render_as_string(hide_password=False)
        e = create_engine(url)
        Base.metadata.create_all(e)
        with Session(e) as s:
            seed(s)
        with e.begin() as c:
            c.execute(update(Parent).values(name=f"server{i + 1}"))
        e.dispose()
        urls.append(url)
    yield urls
    for server in servers:
        server.cleanup()


def test_pg_same_database_name_on_two_servers(two_pg_servers, shared_region):
    region = shared_region
    e1, e2 = (create_engine(u) for u in two_pg_servers)
    try:
        a1, a2 = build_app(e1, region), build_app(e2, region)
        assert read(a1, "parents") == plain(e1, "parents") == [[1, "server1"], [2, "server1"]]
        assert read(a2, "parents") == plain(e2, "parents") == [[1, "server2"], [2, "server2"]]
        for name in ("with_expression", "children"):
            assert read(a1, name) == plain(e1, name)
            assert read(a2, name) == plain(e2, name)
        with e1.begin() as c:  # make the module's servers differ in children, each run anew
            c.execute(update(Child).where(Child.id == 21).values(name="zz"))
        a1.post("/w/bulk_update_mappings")
        for name in ("with_expression", "children"):
            assert read(a2, name) == plain(e2, name)
            assert read(a1, name) == plain(e1, name)
    finally:
        e1.dispose()
        e2.dispose()


# ---------------------------------------------------------------------------------------------------------
# a savepoint rolled back inside a request: its rows are never served later in the request or after it
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reader", ["children", "child_count", "n_children", "hybrid", "pt_rows"])
@pytest.mark.parametrize("write", ["add_child", "bulk_insert", "delete_parent_orm", "bulk_update_by_pk"])
def test_pyramid_savepoint_rolled_back_in_a_view(sengine, region, reader, write):
    settings = {
        "cache.regions": "local_session, shared",
        "cache.local_session.type": "ext:local_session",
        "sessioncache.secret": SECRET,
        **{f"cache.shared.{k}": v for k, v in region.items()},
    }
    config = Configurator(settings=settings)
    config.include("pyramid_sessioncache")
    config.set_sessioncache_session_factory(sessionmaker(bind=sengine))
    stmt_of, out = READS[reader]

    def view(request):
        s = request.dbsession
        seen = {}
        for region_name in ("local_session", "shared"):
            seen[f"{region_name} before"] = out(request.cached_query(stmt_of(request), region=region_name))
        nested = s.begin_nested()
        WRITES[write](s)
        s.flush()
        for region_name in ("local_session", "shared"):
            seen[f"{region_name} inside"] = out(request.cached_query(stmt_of(request), region=region_name))
        nested.rollback()
        for region_name in ("local_session", "shared"):
            seen[f"{region_name} after"] = out(request.cached_query(stmt_of(request), region=region_name))
        seen["uncached after"] = out(s.execute(stmt_of(request)))
        return seen

    config.add_route("v", "/v")
    config.add_view(view, route_name="v", renderer="json")
    app = TestApp(config.make_wsgi_app())
    before = plain(sengine, reader)
    first = app.get("/v").json
    assert first["local_session after"] == first["uncached after"] == before
    assert first["shared after"] == before
    second = app.get("/v").json
    assert second["local_session before"] == second["shared before"] == before
    assert plain(sengine, reader) == before


# ---------------------------------------------------------------------------------------------------------
# a PostgreSQL server replaced behind one URL (a restore, a fail-over to a new primary at the same address)
# ---------------------------------------------------------------------------------------------------------


def test_pg_server_replaced_behind_the_same_url(persistent_region):
    region = persistent_region
    pgserver = _server_package("pgserver")
    tmp_path = _pg_directory()
    path = tmp_path / "pgdata"
    urls = []
    server = pgserver.get_server(str(path), cleanup_mode="stop")
    try:
        url = server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
        e = create_engine(url)
        Base.metadata.create_all(e)
        with Session(e) as s:
            seed(s)
        app = build_app(e, region)
        assert read(app, "parents") == [[1, "p1"], [2, "p2"]]
        e.dispose()
    finally:
        server.cleanup()
    os.rename(path, tmp_path / "pgdata-old")
    server = pgserver.get_server(str(path), cleanup_mode="stop")
    try:
        url2 = server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
        urls.append((url, url2))
        e2 = create_engine(url2)
        Base.metadata.create_all(e2)
        with Session(e2) as s:
            seed(s)
        with e2.begin() as c:
            c.execute(update(Parent).values(name="new server"))
        app2 = build_app(e2, region)
        assert url == url2
        assert read(app2, "parents") == plain(e2, "parents") == [[1, "new server"], [2, "new server"]]
        e2.dispose()
    finally:
        server.cleanup()


# ---------------------------------------------------------------------------------------------------------
# other foreign-key actions; a foreign key the database has but the MetaData does not say; m2m cleared
# ---------------------------------------------------------------------------------------------------------

fk_md = MetaData()
owner = Table("r5_owner", fk_md, Column("id", Integer, primary_key=True), Column("name", String(20)))
pet_cascade = Table(
    "r5_pet_cascade",
    fk_md,
    Column("id", Integer, primary_key=True),
    Column("owner_id", ForeignKey("r5_owner.id", onupdate="CASCADE", ondelete="SET NULL")),
)
# the model omits the foreign key the database holds (migrations added it)
pet_hidden = Table("r5_pet_hidden", fk_md, Column("id", Integer, primary_key=True), Column("owner_id", Integer))

READS["pet_cascade"] = (
    lambda r: select(pet_cascade.c.id, pet_cascade.c.owner_id).order_by(pet_cascade.c.id),
    lambda res: [list(x) for x in res],
)
READS["pet_hidden"] = (
    lambda r: select(pet_hidden.c.id, pet_hidden.c.owner_id).order_by(pet_hidden.c.id),
    lambda res: [list(x) for x in res],
)


def w_owner_pk_update(s):
    s.execute(owner.update().where(owner.c.id == 1).values(id=7))


def w_owner_delete(s):
    s.execute(owner.delete().where(owner.c.id == 2))


def w_clear_tags(s):
    parent = s.get(Parent, 1)
    parent.tags.clear()
    s.flush()


WRITES.update(owner_pk_update=w_owner_pk_update, owner_delete=w_owner_delete, clear_tags=w_clear_tags)


def _fk_schema(engine, pg=False):
    fk_md.create_all(engine)
    with engine.begin() as c:
        if pg:
            c.exec_driver_sql(
                "ALTER TABLE r5_pet_hidden ADD FOREIGN KEY (owner_id) REFERENCES r5_owner(id)"
                " ON DELETE CASCADE ON UPDATE CASCADE"
            )
        c.execute(owner.insert(), [{"id": 1, "name": "o1"}, {"id": 2, "name": "o2"}])
        c.execute(pet_cascade.insert(), [{"id": 1, "owner_id": 1}, {"id": 2, "owner_id": 2}])
        c.execute(pet_hidden.insert(), [{"id": 1, "owner_id": 1}, {"id": 2, "owner_id": 2}])


@pytest.mark.parametrize("write", ["owner_pk_update", "owner_delete"])
@pytest.mark.parametrize("reader", ["pet_cascade", "pet_hidden"])
def test_pg_fk_actions_update_cascade_set_null_and_catalog_only(pg_database, region, write, reader):
    e = create_engine(pg_database)
    Base.metadata.create_all(e)
    _fk_schema(e, pg=True)
    try:
        app = build_app(e, region)
        before = read(app, reader)
        assert before == plain(e, reader)
        app.post(f"/w/{write}")
        assert plain(e, reader) != before
        assert read(app, reader) == plain(e, reader)
    finally:
        e.dispose()


@pytest.mark.parametrize("write", ["owner_pk_update", "owner_delete"])
def test_sqlite_fk_actions_update_cascade_set_null(sengine, region, write):
    _fk_schema(sengine)
    app = build_app(sengine, region)
    before = read(app, "pet_cascade")
    app.post(f"/w/{write}")
    assert plain(sengine, "pet_cascade") != before
    assert read(app, "pet_cascade") == plain(sengine, "pet_cascade")


@pytest.mark.parametrize("reader", ["pt_rows", "tags_of_p1"])
def test_pyramid_many_to_many_cleared_through_the_orm(sengine, region, reader):
    app = build_app(sengine, region)
    before = read(app, reader)
    app.post("/w/clear_tags")
    assert plain(sengine, reader) != before
    assert read(app, reader) == plain(sengine, reader)


# ---------------------------------------------------------------------------------------------------------
# RelationshipCache under per-request loader criteria; lifetimes with lambdas; deferred filled by a hit
# ---------------------------------------------------------------------------------------------------------


def build_children_app(engine, region, lam):
    settings = {
        "cache.regions": "local_session, shared",
        "cache.local_session.type": "ext:local_session",
        "sessioncache.secret": SECRET,
        **{f"cache.shared.{k}": v for k, v in region.items()},
    }
    factory = sessionmaker(bind=engine)
    config = Configurator(settings=settings)
    config.include("pyramid_sessioncache")
    config.set_sessioncache_session_factory(factory)
    kept = []

    @event.listens_for(factory, "do_orm_execute")
    def _only(state):
        request = state.session.info.get("request")
        if request is None or not state.is_select:
            return
        suffix = request.headers.get("X-Suffix", "1")
        if lam:
            crit = with_loader_criteria(Child, lambda cls: cls.name.endswith(suffix), track_closure_variables=True)
        else:
            crit = with_loader_criteria(Child, Child.name.endswith(suffix))
        state.statement = state.statement.options(crit)

    def view(request):
        stmt = select(Parent).order_by(Parent.id).options(RelationshipCache(Parent.children, "shared"))
        parents = request.cached_query(stmt, region="shared").scalars().all()
        kept.append(weakref.ref(request))
        kept.append(weakref.ref(request.dbsession))
        return {"value": [[p.id, [c.name for c in p.children]] for p in parents]}

    config.add_route("v", "/v")
    config.add_view(view, route_name="v", renderer="json")
    return TestApp(config.make_wsgi_app()), kept


def plain_children(engine, suffix):
    with Session(engine) as s:
        stmt = select(Parent).order_by(Parent.id).options(with_loader_criteria(Child, Child.name.endswith(suffix)))
        return [[p.id, [c.name for c in p.children]] for p in s.execute(stmt).scalars()]


@pytest.mark.parametrize("lam", [False, True], ids=["expression", "lambda"])
def test_pyramid_relationship_cache_under_per_request_criteria(sengine, region, lam):
    app, kept = build_children_app(sengine, region, lam)
    for suffix in ("1", "2", "1", "2"):
        assert app.get("/v", headers={"X-Suffix": suffix}).json["value"] == plain_children(sengine, suffix), suffix
    with SQLCounter(sengine):
        for suffix in ("2", "1"):
            assert app.get("/v", headers={"X-Suffix": suffix}).json["value"] == plain_children(sengine, suffix)
    # no write view here: write through a plain session and check invalidation
    with Session(sengine) as s:
        s.add(Child(id=300, parent_id=1, name="c1new1"))
        s.commit()
    for suffix in ("1", "2"):
        assert app.get("/v", headers={"X-Suffix": suffix}).json["value"] == plain_children(sengine, suffix)
    gc.collect()
    assert kept and [r() for r in kept if r() is not None] == []


def test_memory_region_requests_do_not_grow_memory(sengine):
    import tracemalloc

    app = build_app(sengine, {"type": "memory", "expire": "60"})
    for name in ("parents", "n_children", "with_expression", "undefer", "hybrid"):
        read(app, name)
    for _ in range(50):
        for name in ("parents", "n_children", "with_expression", "undefer", "hybrid"):
            read(app, name)
    gc.collect()
    tracemalloc.start()
    first = tracemalloc.take_snapshot()
    for _ in range(300):
        for name in ("parents", "n_children", "with_expression", "undefer", "hybrid"):
            read(app, name)
    gc.collect()
    second = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in second.compare_to(first, "filename"))
    assert grown < 300_000, [str(s) for s in second.compare_to(first, "lineno")[:8]]


def test_pyramid_deferred_filled_by_a_shared_hit_in_a_request(sengine, region):
    settings = {
        "cache.regions": "local_session, shared",
        "cache.local_session.type": "ext:local_session",
        "sessioncache.secret": SECRET,
        **{f"cache.shared.{k}": v for k, v in region.items()},
    }
    config = Configurator(settings=settings)
    config.include("pyramid_sessioncache")
    config.set_sessioncache_session_factory(sessionmaker(bind=sengine))
    counter = SQLCounter(sengine)

    def read(request, cached: bool) -> dict:
        s = request.dbsession
        loaded = s.execute(select(Parent).order_by(Parent.id)).scalars().all()
        loaded[0].name = "pending"
        stmt = (
            select(Parent)
            .options(
                undefer(Parent.note),
                with_expression(
                    Parent.expr, select(func.max(Child.name)).where(Child.parent_id == Parent.id).scalar_subquery()
                ),
            )
            .where(Parent.id > 0)
            .order_by(Parent.id)
        )
        if cached:
            counter.start()
            counter.reset()
        with s.no_autoflush:
            if cached:
                got = request.cached_query(stmt, region=request.params.get("region", "shared")).scalars().all()
            else:
                got = s.execute(stmt).scalars().all()
        found = {"value": [[p.id, p.name, p.note, p.expr, p is q] for p, q in zip(got, loaded, strict=False)]}
        if cached:
            found["sql"] = counter.count
            counter.stop()
        request.tm.doom()
        return found

    def view(request):
        return read(request, cached=True)

    def uncached(request):
        return read(request, cached=False)

    config.add_route("v", "/v")
    config.add_route("u", "/u")
    config.add_view(view, route_name="v", renderer="json")
    config.add_view(uncached, route_name="u", renderer="json")
    app = TestApp(config.make_wsgi_app())
    expected = app.get("/u").json["value"]
    first = app.get("/v").json
    second = app.get("/v").json
    assert first["value"] == expected
    assert second["value"] == expected
    if region["type"] != "ext:local_session":
        assert second["sql"] == 0


# ---------------------------------------------------------------------------------------------------------
# symlinks planted in a dbm / file region's directory: the app never writes through them
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dbm", "file"])
def test_symlink_planted_in_the_data_dir_never_writes_another_file(sengine, tmp_path, kind):
    data = tmp_path / "data"
    region = {"type": kind, "data_dir": str(data), "lock_dir": str(tmp_path / "lock")}
    app = build_app(sengine, region)
    assert read(app, "parents") == plain(sengine, "parents")
    victim = tmp_path / "victim.py"
    victim.write_text("PRECIOUS = 1\n")
    planted = 0
    for root, _dirs, files in os.walk(data):
        os.chmod(root, 0o777)  # made world-writable after start-up (a deploy script, a shared volume)
        for f in files:
            p = os.path.join(root, f)
            if f.endswith((".dat", ".dir", ".bak")) or kind == "file":
                os.unlink(p)
                os.symlink(victim, p)
                planted += 1
    assert planted
    # a user's row holding text that the app then stores
    with Session(sengine) as s:
        s.get(Parent, 1).name = "\nimport os; os.system('touch PWNED')\n"
        s.commit()
    for name in ("parents", "children", "n_children", "parents"):
        try:
            assert read(app, name) == plain(sengine, name)
        except AssertionError:
            raise
        except Exception:
            pass  # a refusal is fine; writing through the link is not
    assert victim.read_text() == "PRECIOUS = 1\n"


@pytest.mark.parametrize("kind", ["dbm", "file"])
def test_a_world_writable_data_dir_at_start_up_is_refused_or_harmless(sengine, tmp_path, kind):
    from pyramid.exceptions import ConfigurationError

    data = tmp_path / "data"
    data.mkdir(mode=0o777)
    os.chmod(data, 0o777)
    region = {"type": kind, "data_dir": str(data), "lock_dir": str(tmp_path / "lock")}
    try:
        app = build_app(sengine, region)
    except (ConfigurationError, Exception) as exc:
        assert "write" in str(exc) or "mode" in str(exc), exc
        return
    assert read(app, "parents") == plain(sengine, "parents")


# ---------------------------------------------------------------------------------------------------------
# dirty reads (SQLite shared cache + read_uncommitted): a rolled-back writer's rows must leave no trace
# ---------------------------------------------------------------------------------------------------------


def _rolled_back_while_read(app, engine, name: str, child_id: int, label: str):
    """A request flushes ``Child(child_id)``, waits while another reads the children, then fails (rolled back).

    Returns what the read saw meanwhile, what a read after the rollback
    gets, and how many SQL statements that read sent.
    """
    inside, release = threading.Event(), threading.Event()

    def w_slow(s):
        s.add(Child(id=child_id, parent_id=1, name=label))
        s.flush()
        inside.set()
        release.wait(10)

    WRITES[name] = w_slow
    try:

        def writer():
            with contextlib.suppress(RuntimeError):
                app.post(f"/w/{name}?fail=1")

        t = threading.Thread(target=writer)
        t.start()
        assert inside.wait(10)
        during = read(app, "children")
        release.set()
        t.join(10)
        with SQLCounter(engine) as sql:
            after = read(app, "children")
        return during, after, sql.count
    finally:
        WRITES.pop(name, None)


def test_sqlite_read_uncommitted_rows_of_a_rolled_back_request_never_stay_cached(tmp_path, shared_region):
    region = shared_region
    path = tmp_path / "shared.sqlite"
    make_sqlite(path).dispose()
    engine = create_engine(f"sqlite:///file:{path}?cache=shared&uri=true", connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _dirty(dbapi, record):
        dbapi.execute("PRAGMA read_uncommitted = 1")
        dbapi.execute("PRAGMA foreign_keys = ON")

    app = build_app(engine, region)
    during, after, count = _rolled_back_while_read(app, engine, "slow_dirty", 600, "dirty")
    # cached: the rolled-back row 600, served with no SQL; uncached (a plain Session): without it
    assert after == plain(engine, "children"), ("during", during, "SQL for the read after", count)
    assert [600, 1] not in after
    engine.dispose()


def w_upsert_sqlite(s):
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    stmt = sqlite_insert(Child).values([{"id": 11, "parent_id": 2, "name": "upserted"}])
    s.execute(stmt.on_conflict_do_update(index_elements=[Child.id], set_={"parent_id": 2, "name": "upserted"}))


def w_upsert_pg(s):
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    stmt = pg_insert(Child).values([{"id": 11, "parent_id": 2, "name": "upserted"}])
    s.execute(stmt.on_conflict_do_update(index_elements=[Child.id], set_={"parent_id": 2, "name": "upserted"}))


WRITES.update(upsert_sqlite=w_upsert_sqlite, upsert_pg=w_upsert_pg)


def test_sqlite_orm_upsert_through_pyramid(sengine, region):
    app = build_app(sengine, region)
    reads = ["children", "n_children", "hybrid"]
    before = [read(app, n) for n in reads]
    app.post("/w/upsert_sqlite")
    assert [plain(sengine, n) for n in reads] != before
    for n in reads:
        assert read(app, n) == plain(sengine, n)


def test_pg_orm_upsert_through_pyramid(pg_database, region):
    e = create_engine(pg_database)
    Base.metadata.create_all(e)
    with Session(e) as s:
        seed(s)
    try:
        app = build_app(e, region)
        reads = ["children", "n_children"]
        before = [read(app, n) for n in reads]
        app.post("/w/upsert_pg")
        assert [plain(e, n) for n in reads] != before
        for n in reads:
            assert read(app, n) == plain(e, n)
    finally:
        e.dispose()


# ---------------------------------------------------------------------------------------------------------
# Redis evicting keys while reader threads cache and writer requests commit (waitress, real HTTP)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("near", ["false", "true"])
@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru"])
def test_waitress_redis_eviction_reader_and_writer_never_stale(tmp_path, redis_url, policy, near):
    import json
    import time
    import urllib.request

    from redis import Redis

    engine = make_sqlite(tmp_path / "ev.sqlite")
    r = Redis.from_url(redis_url)
    r.flushall()
    old = r.config_get("maxmemory")["maxmemory"], r.config_get("maxmemory-policy")["maxmemory-policy"]
    evicted0 = int(r.info("stats")["evicted_keys"])
    r.config_set("maxmemory", int(r.info("memory")["used_memory"]) + 400_000)
    r.config_set("maxmemory-policy", policy)

    def w_move(s):
        # move child 12 to the other parent: n_children of both change
        c = s.get(Child, 12)
        c.parent_id = 2 if c.parent_id == 1 else 1

    WRITES["move"] = w_move
    app = build_app(engine, {"type": "ext:redis", "url": redis_url, "expire": "600", "near": near}).app
    server = ThreadServer(app, threads=6)
    port = server.port
    stale, errors, stop = [], [], threading.Event()
    states = [plain(engine, "n_children")]
    lock = threading.Lock()

    def get(path, data=None):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", data=data, timeout=60) as resp:
            return json.loads(resp.read())

    def reader():
        while not stop.is_set():
            try:
                with lock:
                    start = len(states)
                value = get("/r/n_children")["value"]
                with lock:
                    allowed = states[start - 1 :]
                # what any commit between the request's start and its end made is fine; older is stale
                if value not in allowed:
                    stale.append((allowed, value))
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))

    def filler():
        f = Redis.from_url(redis_url)
        i = 0
        while not stop.is_set():
            i += 1
            with contextlib.suppress(Exception):  # full: the point
                f.set(f"fill:{i}", b"x" * 20_000, ex=600 if policy == "volatile-lru" else None)
            time.sleep(0.002)

    threads = [threading.Thread(target=reader) for _ in range(3)] + [threading.Thread(target=filler)]
    try:
        for t in threads:
            t.start()
        # Full before the writes begin, however the machine shares its time between the threads.
        deadline = time.monotonic() + 60
        while int(r.info("stats")["evicted_keys"]) == evicted0 and time.monotonic() < deadline:
            time.sleep(0.01)
        for _ in range(40):
            with lock:
                get("/w/move", data=b"")
                states.append(plain(engine, "n_children"))
            time.sleep(0.01)
        stop.set()
        for t in threads:
            t.join(20)
        evicted = int(r.info("stats")["evicted_keys"]) - evicted0
        assert not errors, errors[:3]
        assert stale == [], stale[:5]
        assert read(TestApp(app), "n_children") == plain(engine, "n_children")
        assert evicted > 0, "nothing was evicted: the test proved nothing"
    finally:
        stop.set()
        server.stop()
        r.config_set("maxmemory", old[0])
        r.config_set("maxmemory-policy", old[1])
        r.flushall()
        WRITES.pop("move", None)
        engine.dispose()


def test_pyramid_static_pool_memory_database_uncommitted_rows_of_a_request_in_flight(shared_region):
    """SQLite in memory with StaticPool (one connection for every request): another request sees the flush."""
    region = shared_region
    engine = make_sqlite()
    app = build_app(engine, region)
    during, after, count = _rolled_back_while_read(app, engine, "slow_static", 700, "uncommitted")
    assert after == plain(engine, "children"), ("during", during, "SQL for the read after", count)
    engine.dispose()


def test_pg_trigger_declared_in_the_ini_through_pyramid(pg_database, region):
    e = create_engine(pg_database)
    Base.metadata.create_all(e)
    with Session(e) as s:
        seed(s)
    with e.begin() as c:
        c.exec_driver_sql(
            "CREATE FUNCTION r5_bump() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN UPDATE r5_audit SET n = n + 1; RETURN NULL; END $$"
        )
        c.exec_driver_sql(
            "CREATE TRIGGER r5_t AFTER INSERT OR DELETE ON r5_child FOR EACH ROW EXECUTE FUNCTION r5_bump()"
        )
    try:
        app = build_app(e, region, **{"sessioncache.writes_also": "r5_child: r5_audit"})
        assert read(app, "audit") == 0
        with SQLCounter(e) as sql:
            read(app, "audit")
        if region["type"] != "ext:local_session":
            assert sql.count == 0
        app.post("/w/bulk_insert")
        assert read(app, "audit") == plain(e, "audit") == 2
        app.post("/w/delete_parent_core")  # the FK cascade deletes children: the trigger fires again
        assert read(app, "audit") == plain(e, "audit")
    finally:
        e.dispose()


# ---------------------------------------------------------------------------------------------------------
# PostgreSQL row-level security by a per-request setting (the usual multi-tenant recipe)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["set_config", "role"])
def test_pg_row_level_security_by_request_setting_never_serves_foreign_rows(pg_database, region, how):
    from sqlalchemy import make_url

    owner_engine = create_engine(pg_database)
    Base.metadata.create_all(owner_engine)
    with Session(owner_engine) as s:
        seed(s)
    role = f"r5_app_{os.getpid()}"
    with owner_engine.begin() as c:
        c.exec_driver_sql(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN "
            f"CREATE ROLE {role} LOGIN; END IF; END $$"
        )
        for t in ("a", "b"):
            c.exec_driver_sql(
                f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'r5_tenant_{t}') THEN "
                f"CREATE ROLE r5_tenant_{t}; END IF; END $$"
            )
            c.exec_driver_sql(f"GRANT r5_tenant_{t} TO {role}")
            c.exec_driver_sql(f"GRANT SELECT, UPDATE ON r5_item TO r5_tenant_{t}")
        c.exec_driver_sql(f"GRANT SELECT, UPDATE ON r5_item TO {role}")
        c.exec_driver_sql("ALTER TABLE r5_item ENABLE ROW LEVEL SECURITY")
        if how == "set_config":
            c.exec_driver_sql("CREATE POLICY r5_tenant ON r5_item USING (tenant = current_setting('app.tenant', true))")
        else:
            c.exec_driver_sql("CREATE POLICY r5_tenant ON r5_item USING ('r5_tenant_' || tenant = current_user)")
    engine = create_engine(make_url(pg_database).set(username=role, password=None))
    settings = {
        "cache.regions": "local_session, shared",
        "cache.local_session.type": "ext:local_session",
        "sessioncache.secret": SECRET,
        **{f"cache.shared.{k}": v for k, v in region.items()},
    }
    factory = sessionmaker(bind=engine)

    @event.listens_for(factory, "after_begin")
    def _tenant(session, transaction, connection):
        request = session.info.get("request")
        tenant = tenant_of(request) if request is not None else "none"
        if how == "set_config":
            connection.exec_driver_sql(f"SELECT set_config('app.tenant', '{tenant}', true)")
        else:
            connection.exec_driver_sql(f"SET LOCAL ROLE r5_tenant_{tenant}")

    config = Configurator(settings=settings)
    config.include("pyramid_sessioncache")
    config.set_sessioncache_session_factory(factory)

    def items(request):
        stmt = select(Item).order_by(Item.id)
        return {"value": [i.name for i in request.cached_query(stmt, region="shared").scalars()]}

    config.add_route("items", "/items")
    config.add_view(items, route_name="items", renderer="json")
    app = TestApp(config.make_wsgi_app())
    try:
        truth = {}
        for t in ("a", "b"):  # uncached: a plain Session of the same factory's engine, the tenant set the same way
            with Session(engine) as s:
                conn = s.connection()
                if how == "set_config":
                    conn.exec_driver_sql(f"SELECT set_config('app.tenant', '{t}', true)")
                else:
                    conn.exec_driver_sql(f"SET LOCAL ROLE r5_tenant_{t}")
                truth[t] = [i.name for i in s.execute(select(Item).order_by(Item.id)).scalars()]
        assert truth == {"a": ["a-secret"], "b": ["b-secret"]}
        got = {"a": app.get("/items", headers={"X-Tenant": "a"}).json["value"]}
        with SQLCounter(engine) as sql:
            got["b"] = app.get("/items", headers={"X-Tenant": "b"}).json["value"]
        assert got == truth, ("SQL sent for tenant b", sql.statements)
    finally:
        engine.dispose()
        owner_engine.dispose()


@pytest.mark.parametrize("how", ["after_begin SET LOCAL search_path", "schema_translate_map"])
def test_pg_schema_per_tenant_by_request_never_serves_foreign_rows(pg_database, region, how):
    e1, e2 = _pg_schemas(pg_database, ["tenant_a", "tenant_b"])
    with e2.begin() as c:
        c.execute(update(Item).values(name="b-only"))
    e1.dispose()
    e2.dispose()
    engine = create_engine(pg_database)
    factory = sessionmaker(bind=engine)
    if how.startswith("after_begin"):

        @event.listens_for(factory, "after_begin")
        def _schema(session, transaction, connection):
            request = session.info.get("request")
            if request is not None:
                connection.exec_driver_sql(f"SET LOCAL search_path TO tenant_{tenant_of(request)}")

    settings = {
        "cache.regions": "local_session, shared",
        "cache.local_session.type": "ext:local_session",
        "sessioncache.secret": SECRET,
        **{f"cache.shared.{k}": v for k, v in region.items()},
    }
    config = Configurator(settings=settings)
    config.include("pyramid_sessioncache")
    config.set_sessioncache_session_factory(factory)

    def items(request):
        stmt = select(Item).order_by(Item.id)
        if how == "schema_translate_map":
            stmt = stmt.execution_options(schema_translate_map={None: f"tenant_{tenant_of(request)}"})
        return {"value": [i.name for i in request.cached_query(stmt, region="shared").scalars()]}

    config.add_route("items", "/items")
    config.add_view(items, route_name="items", renderer="json")
    app = TestApp(config.make_wsgi_app())
    try:
        truth = {}
        for t in ("a", "b"):
            with Session(engine) as s:
                s.connection().exec_driver_sql(f"SET LOCAL search_path TO tenant_{t}")
                truth[t] = [i.name for i in s.execute(select(Item).order_by(Item.id)).scalars()]
        assert truth == {"a": ["a-secret", "b-secret"], "b": ["b-only", "b-only"]}
        got = {"a": app.get("/items", headers={"X-Tenant": "a"}).json["value"]}
        with SQLCounter(engine) as sql:
            got["b"] = app.get("/items", headers={"X-Tenant": "b"}).json["value"]
        assert got == truth, ("SQL sent for tenant b", sql.statements)
    finally:
        engine.dispose()
