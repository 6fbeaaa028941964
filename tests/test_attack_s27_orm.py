"""Attack s27 (ORM): mapping features earlier rounds barely touched, cached and uncached side by side.

Joined-table, single-table and concrete inheritance, write-only
collections, synonyms, association proxies, ``column_property`` and
``query_expression`` over a subclass table, ``Session.get()``,
``refresh()``, ``merge()``, ``populate_existing`` and
``RelationshipCache`` over a polymorphic relationship.  Each case warms an
entry (a second read sends no SQL), writes (in another Session, or in the
same one for ``ext:local_session``), then compares the cached read with an
uncached read of the same query.  Real SQLite files, real Redis.
"""

from __future__ import annotations

import gc

import pytest
from sqlalchemy import ForeignKey, String, create_engine, event, func, inspect, select, text, update
from sqlalchemy.ext.associationproxy import AssociationProxy, association_proxy
from sqlalchemy.ext.declarative import ConcreteBase
from sqlalchemy.orm import (
    DeclarativeBase,
    DynamicMapped,
    Mapped,
    Session,
    WriteOnlyMapped,
    column_property,
    joinedload,
    mapped_column,
    query_expression,
    relationship,
    selectin_polymorphic,
    selectinload,
    sessionmaker,
    synonym,
    with_expression,
    with_polymorphic,
)

from pyramid_sessioncache import FromCache, RelationshipCache, SessionCache, cached_query

from .conftest import SECRET, SQLCounter, use_region


class _Base(DeclarativeBase):
    pass


class Company(_Base):
    __tablename__ = "s27o_company"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(20))
    employees: Mapped[list[Employee]] = relationship(back_populates="company", order_by="Employee.id")
    notes: WriteOnlyMapped[Note] = relationship(order_by="Note.id")
    dynamic_notes: DynamicMapped[Note] = relationship(order_by="Note.id", viewonly=True)
    employee_names: AssociationProxy[list[str]] = association_proxy("employees", "name")


class Note(_Base):
    __tablename__ = "s27o_note"
    id: Mapped[int] = mapped_column(primary_key=True)
    company_id: Mapped[int | None] = mapped_column(ForeignKey("s27o_company.id"))
    text: Mapped[str] = mapped_column(String(20))


class Employee(_Base):
    __tablename__ = "s27o_employee"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(20))
    company_id: Mapped[int] = mapped_column(ForeignKey("s27o_company.id"))
    company: Mapped[Company] = relationship(back_populates="employees")
    title = synonym("name")
    expr: Mapped[int | None] = query_expression()
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "employee"}


class Engineer(Employee):
    __tablename__ = "s27o_engineer"
    id: Mapped[int] = mapped_column(ForeignKey("s27o_employee.id"), primary_key=True)
    lang: Mapped[str] = mapped_column(String(20))
    mentor_id: Mapped[int | None] = mapped_column(ForeignKey("s27o_employee.id"))
    mentor: Mapped[Employee | None] = relationship(foreign_keys=[mentor_id], remote_side="Employee.id")
    __mapper_args__ = {
        "polymorphic_identity": "engineer",
        "polymorphic_load": "selectin",
        "inherit_condition": id == Employee.id,
    }


class Manager(Employee):
    __tablename__ = "s27o_manager"
    id: Mapped[int] = mapped_column(ForeignKey("s27o_employee.id"), primary_key=True)
    level: Mapped[int]
    __mapper_args__ = {"polymorphic_identity": "manager", "polymorphic_load": "inline"}


#: A company's count of Python engineers: a correlated subquery over the subclass table.
Company.pythonistas = column_property(
    select(func.count(Engineer.__table__.c.id))
    .select_from(Engineer.__table__.join(Employee.__table__, Engineer.__table__.c.id == Employee.__table__.c.id))
    .where(Employee.__table__.c.company_id == Company.__table__.c.id, Engineer.__table__.c.lang == "py")
    .correlate_except(Engineer.__table__, Employee.__table__)
    .scalar_subquery()
)


# Single-table inheritance


class Staff(_Base):
    __tablename__ = "s27o_staff"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "staff"}


class Dev(Staff):
    __mapper_args__ = {"polymorphic_identity": "dev"}


class Ops(Staff):
    __mapper_args__ = {"polymorphic_identity": "ops"}


# Concrete inheritance


class Shape(ConcreteBase, _Base):
    __tablename__ = "s27o_shape"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_identity": "shape", "concrete": True}


class Circle(Shape):
    __tablename__ = "s27o_circle"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(20))
    radius: Mapped[int]
    __mapper_args__ = {"polymorphic_identity": "circle", "concrete": True}


class Square(Shape):
    __tablename__ = "s27o_square"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(20))
    side: Mapped[int]
    __mapper_args__ = {"polymorphic_identity": "square", "concrete": True}


# Fixtures and helpers


def _database(path):
    engine = create_engine(f"sqlite:///{path}")
    event.listen(engine, "connect", lambda dbapi, record: dbapi.execute("PRAGMA foreign_keys=ON"))
    _Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([Company(id=1, name="acme"), Company(id=2, name="initech")])
        session.add_all(
            [
                Engineer(id=1, name="ada", company_id=1, lang="py"),
                Engineer(id=2, name="bob", company_id=1, lang="c"),
                Manager(id=3, name="cy", company_id=1, level=1),
                Employee(id=4, name="di", company_id=2),
                Note(id=1, company_id=1, text="n1"),
                Dev(id=1, name="dev1"),
                Dev(id=2, name="dev2"),
                Ops(id=3, name="ops1"),
                Shape(id=1, name="blob"),
                Circle(id=2, name="ring", radius=3),
                Square(id=3, name="box", side=4),
            ]
        )
        session.commit()
    return engine


@pytest.fixture
def engine(tmp_path):
    engine = _database(tmp_path / "orm.sqlite")
    yield engine
    engine.dispose()


@pytest.fixture(params=["local", "memory", "redis"])
def any_region(request, region_options) -> str:
    return use_region(request, region_options, request.param)


@pytest.fixture(params=["memory", "redis"])
def shared(request, region_options) -> str:
    return use_region(request, region_options, request.param)


@pytest.fixture
def Sess(engine, region_options):
    cache = SessionCache(region_options, default_region="memory", secret=SECRET)
    return sessionmaker(engine, info=cache.session_info())


def _shape(value):
    """A result's rows as plain values: an entity becomes its class and its loaded columns."""
    if hasattr(value, "__mapper__"):
        state = inspect(value)
        attrs = {key: state.dict[key] for key in state.mapper.column_attrs.keys() if key in state.dict}  # noqa: SIM118
        return (type(value).__name__, tuple(sorted(attrs.items())))
    return value


def _rows(session, stmt, region=None):
    if region is not None:
        stmt = stmt.options(FromCache(region))
    return [tuple(_shape(v) for v in row) for row in session.execute(stmt).all()]


def _fresh_after(engine, Sess, stmt, region, write, *, changes=True):
    """Warm ``stmt`` in ``region`` (a hit sends no SQL), apply ``write``, then cached == uncached.

    ``write(session)`` runs in another Session that commits; for the
    ``local`` region it runs in the reading Session itself, flushed, not committed.
    """
    counter = SQLCounter(engine)
    if region == "local":
        with Sess() as session:
            before = _rows(session, stmt, region)
            counter.reset()
            assert _rows(session, stmt, region) == before
            assert counter.count == 0
            write(session)
            session.flush()
            cached = _rows(session, stmt, region)
            truth = _rows(session, stmt)
            if changes:
                assert truth != before
            assert cached == truth
            session.rollback()
        return
    with Sess() as session:
        before = _rows(session, stmt, region)
    counter.reset()
    with Sess() as session:
        assert _rows(session, stmt, region) == before
    assert counter.count == 0
    with Sess() as session:
        write(session)
        session.commit()
    with Session(engine) as session:
        truth = _rows(session, stmt)
    if changes:
        assert truth != before
    with Sess() as session:
        assert _rows(session, stmt, region) == truth


def _orm_lang(session):
    session.get(Engineer, 2).lang = "py"


def _core_lang(session):
    session.execute(update(Engineer.__table__).where(Engineer.__table__.c.id == 2).values(lang="py"))


def _orm_update_lang(session):
    session.execute(update(Engineer).where(Engineer.id == 2).values(lang="py"))


def _text_lang(session):
    session.execute(text("UPDATE s27o_engineer SET lang = 'py' WHERE id = 2"))


def _text_level(session):
    session.execute(text("UPDATE s27o_manager SET level = 9 WHERE id = 3"))


SUBCLASS_WRITES = {"ORM": _orm_lang, "Core update(Table)": _core_lang, "update(Engineer)": _orm_update_lang}
SUBCLASS_WRITES["text()"] = _text_lang


# Joined-table inheritance ------------------------------------------------------------------------


JOINED_READS = {
    "with_polymorphic *": lambda: select(with_polymorphic(Employee, "*")).order_by(Employee.id),
    "selectin_polymorphic": lambda: (
        select(Employee).options(selectin_polymorphic(Employee, [Engineer])).order_by(Employee.id)
    ),
    "base, selectin subclass load": lambda: select(Employee).order_by(Employee.id),
    "subclass": lambda: select(Engineer).order_by(Engineer.id),
    "subclass columns": lambda: select(Engineer.id, Engineer.lang).order_by(Engineer.id),
    "base filtered on subclass": lambda: (
        select(Employee.id)
        .join(Engineer.__table__, Engineer.__table__.c.id == Employee.id)
        .where(Engineer.lang == "py")
    ),
    "column_property over subclass": lambda: select(Company.id, Company.pythonistas).order_by(Company.id),
    "entity with column_property": lambda: select(Company).order_by(Company.id),
    "with_expression over subclass": lambda: (
        select(Employee)
        .options(
            with_expression(
                Employee.expr,
                select(func.count(Engineer.__table__.c.id)).where(Engineer.__table__.c.lang == "py").scalar_subquery(),
            )
        )
        .where(Employee.id == 4)
    ),
}


#: Each read with the ORM write and one of the others, in turn (the whole matrix costs seconds, finds no more).
READ_WRITE = [
    (read, how) for index, read in enumerate(JOINED_READS) for how in ("ORM", list(SUBCLASS_WRITES)[1 + index % 3])
]


@pytest.mark.parametrize(("read", "how"), READ_WRITE)
def test_joined_inheritance_a_subclass_table_write_invalidates(engine, any_region, Sess, read, how):
    _fresh_after(engine, Sess, JOINED_READS[read](), any_region, SUBCLASS_WRITES[how])


@pytest.mark.parametrize("read", ["with_polymorphic *", "base, selectin subclass load"])
def test_joined_inheritance_an_inline_subclass_table_write_invalidates(engine, any_region, Sess, read):
    """``polymorphic_load="inline"``: a base query LEFT JOINs the manager table; a text() write to it alone."""
    _fresh_after(engine, Sess, JOINED_READS[read](), any_region, _text_level)


def test_joined_inheritance_a_new_subclass_row_shows_in_the_base_query(engine, any_region, Sess):
    def hire(session):
        session.add(Engineer(id=5, name="eve", company_id=2, lang="go"))

    _fresh_after(engine, Sess, select(Employee).order_by(Employee.id), any_region, hire)


def test_joined_inheritance_a_deleted_subclass_object_leaves_the_base_query(engine, any_region, Sess):
    def fire(session):
        session.delete(session.get(Engineer, 2))

    _fresh_after(engine, Sess, select(Employee).order_by(Employee.id), any_region, fire)


# Single-table inheritance ------------------------------------------------------------------------


def _discriminator_core(session):
    session.execute(update(Staff).where(Staff.id == 1).values(kind="ops"))


def _discriminator_text(session):
    session.execute(text("UPDATE s27o_staff SET kind = 'ops' WHERE id = 2"))


def _rename_ops(session):
    session.get(Ops, 3).name = "ops9"


@pytest.mark.parametrize("how", [_discriminator_core, _discriminator_text, _rename_ops])
@pytest.mark.parametrize("cls", [Dev, Ops, Staff])
def test_single_table_inheritance_discriminator_moves(engine, any_region, Sess, cls, how):
    stmt = select(cls.id, cls.kind, cls.name).order_by(cls.id)
    changes = not (cls is Dev and how is _rename_ops)
    _fresh_after(engine, Sess, stmt, any_region, how, changes=changes)


@pytest.mark.parametrize("cls", [Dev, Ops])
def test_single_table_inheritance_entities_after_a_discriminator_move(engine, shared, Sess, cls):
    """Entities: a shared hit builds objects of the class the row's discriminator names, now."""
    _fresh_after(engine, Sess, select(cls).order_by(cls.id), shared, _discriminator_core)


# Concrete inheritance ----------------------------------------------------------------------------


def _text_square(session):
    session.execute(text("UPDATE s27o_square SET side = 7, name = 'big' WHERE id = 3"))


def _orm_circle(session):
    session.add(Circle(id=4, name="dot", radius=1))


@pytest.mark.parametrize("how", [_text_square, _orm_circle])
@pytest.mark.parametrize("cls", [Shape, Square, Circle])
def test_concrete_inheritance_polymorphic_union(engine, any_region, Sess, cls, how):
    changes = not ((cls is Square and how is _orm_circle) or (cls is Circle and how is _text_square))
    _fresh_after(engine, Sess, select(cls).order_by(cls.id), any_region, how, changes=changes)


# Write-only collections, synonyms, association proxies ------------------------------------------------


def test_write_only_collection_select_after_add_and_remove(engine, any_region, Sess):
    def add(session):
        session.get(Company, 1).notes.add(Note(id=2, text="n2"))

    def remove(session):
        company = session.get(Company, 1)
        company.notes.remove(session.get(Note, 1))

    with Session(engine) as session:
        stmt = session.get(Company, 1).notes.select()
    _fresh_after(engine, Sess, stmt, any_region, add)
    if any_region != "local":
        _fresh_after(engine, Sess, stmt, any_region, remove)


def test_write_only_collection_remove_in_the_same_local_session(engine, Sess):
    with Sess() as session:
        company = session.get(Company, 1)
        stmt = company.notes.select().options(FromCache("local"))
        assert [n.text for n in session.scalars(stmt)] == ["n1"]
        company.notes.remove(session.get(Note, 1))
        session.flush()
        assert session.scalars(stmt).all() == []


def test_synonym_criterion(engine, any_region, Sess):
    def rename(session):
        session.get(Employee, 4).name = "ada"

    stmt = select(Employee.id).where(Employee.title == "ada").order_by(Employee.id)
    _fresh_after(engine, Sess, stmt, any_region, rename)


@pytest.mark.parametrize("how", ["ORM", "text()"])
def test_association_proxy_through_relationship_cache(engine, shared, Sess, how):
    """``Company.employee_names`` reads ``employees``, loaded through a ``RelationshipCache``."""

    def rename(session):
        if how == "ORM":
            session.get(Engineer, 2).name = "bobby"
        else:
            session.execute(text("UPDATE s27o_employee SET name = 'bobby' WHERE id = 2"))

    stmt = select(Company).where(Company.id == 1)
    opts = (FromCache(shared), RelationshipCache(Company.employees, shared))
    with Sess() as session:
        assert list(session.scalars(stmt.options(*opts)).one().employee_names) == ["ada", "bob", "cy"]
    counter = SQLCounter(engine)
    with Sess() as session:
        assert list(session.scalars(stmt.options(*opts)).one().employee_names) == ["ada", "bob", "cy"]
    assert counter.count == 0
    with Sess() as session:
        rename(session)
        session.commit()
    with Sess() as session:
        assert list(session.scalars(stmt.options(*opts)).one().employee_names) == ["ada", "bobby", "cy"]


# RelationshipCache over a polymorphic relationship --------------------------------------------------


@pytest.mark.parametrize("how", list(SUBCLASS_WRITES))
def test_relationship_cache_over_a_polymorphic_relationship(engine, shared, Sess, how):
    """The lazy load of ``employees`` loads the engineers' own table in a selectin load: it is part of the entry."""
    stmt = select(Company).where(Company.id == 1)
    opts = (FromCache(shared), RelationshipCache(Company.employees, shared))

    def langs(session):
        company = session.scalars(stmt.options(*opts)).one()
        return [(type(e).__name__, getattr(e, "lang", None), getattr(e, "level", None)) for e in company.employees]

    with Sess() as session:
        before = langs(session)
    counter = SQLCounter(engine)
    with Sess() as session:
        assert langs(session) == before
    assert counter.count == 0
    with Sess() as session:
        SUBCLASS_WRITES[how](session)
        session.commit()
    with Sess() as session:
        after = langs(session)
    assert after != before
    assert after == [("Engineer", "py", None), ("Engineer", "py", None), ("Manager", None, 1)]


# Session.get(), refresh(), merge(), populate_existing ------------------------------------------------


@pytest.mark.parametrize("cls", [Employee, Engineer])
def test_session_get_with_from_cache(engine, shared, Sess, cls):
    def get(session):
        obj = session.get(cls, 2, options=[FromCache(shared)])
        return (type(obj).__name__, obj.name, obj.lang)

    with Sess() as session:
        assert get(session) == ("Engineer", "bob", "c")
    counter = SQLCounter(engine)
    with Sess() as session:
        get(session)
    assert counter.count == 0
    with Sess() as session:
        _text_lang(session)
        session.commit()
    with Sess() as session:
        assert get(session) == ("Engineer", "bob", "py")


@pytest.mark.parametrize("region", ["local", "memory", "redis"])
@pytest.mark.parametrize("populate", [True, False])
def test_populate_existing_on_a_hit_over_a_held_object(engine, region_options, request, region, populate):
    """A Session holds an engineer loaded before another commit; a valid entry stored after it is read.

    Uncached, ``populate_existing`` overwrites the held object with the
    row; without it the held object stays as loaded.  A hit must do the same.
    """
    use_region(request, region_options, region)
    Sess = request.getfixturevalue("Sess")
    stmt = select(Engineer).where(Engineer.id == 2).execution_options(populate_existing=populate)

    def run(cached):
        with Sess() as session:
            held = session.get(Engineer, 2)
            assert held.lang == "c"
            if region == "local":
                session.scalars(stmt.options(FromCache(region))).one()  # stored
            with Sess() as other:
                _text_lang(other)
                other.commit()
            if region != "local":
                with Sess() as other:
                    other.scalars(stmt.options(FromCache(region))).one()  # stored, fresh
            got = session.scalars(stmt.options(FromCache(region)) if cached else stmt).one()
            assert got is held
            result = held.lang
        with Sess() as other:
            _core_back(other)
            other.commit()
        return result

    assert run(True) == run(False)


def _core_back(session):
    session.execute(update(Engineer.__table__).where(Engineer.__table__.c.id == 2).values(lang="c"))


def test_refresh_after_a_hit_reads_the_database(engine, shared, Sess):
    stmt = select(Engineer).where(Engineer.id == 2).options(FromCache(shared))
    with Sess() as session:
        session.scalars(stmt).one()
    with Sess() as session:
        obj = session.scalars(stmt).one()
        with Session(engine) as other:  # a plain Session: its write is still captured
            _text_lang(other)
            other.commit()
        session.refresh(obj)
        assert obj.lang == "py"
    with Sess() as session:
        assert session.scalars(stmt).one().lang == "py"


def test_merge_of_an_object_from_a_hit(engine, shared, Sess):
    stmt = select(Engineer).where(Engineer.id == 2).options(FromCache(shared))
    with Sess() as session:
        session.scalars(stmt).one()
    with Sess() as session:
        obj = session.scalars(stmt).one()
        session.expunge(obj)
    obj.lang = "rust"
    with Sess() as session:
        session.merge(obj)
        session.commit()
    with Session(engine) as session:
        truth = _rows(session, select(Engineer).where(Engineer.id == 2))
    assert ("lang", "rust") in truth[0][0][1]
    with Sess() as session:
        assert _rows(session, select(Engineer).where(Engineer.id == 2), shared) == truth
        assert _rows(session, select(Employee).order_by(Employee.id), shared) == _rows(
            Session(engine), select(Employee).order_by(Employee.id)
        )


@pytest.mark.parametrize("read", ["base, selectin subclass load", "subclass", "with_polymorphic *"])
def test_objects_from_a_hit_modified_and_flushed(engine, shared, Sess, read):
    """An engineer a shared hit built, changed and committed: the entries over both tables are fresh."""
    stmt = JOINED_READS[read]()
    with Sess() as session:
        session.execute(stmt.options(FromCache(shared))).scalars().all()
    with Sess() as session:
        counter = SQLCounter(engine)
        objs = session.execute(stmt.options(FromCache(shared))).scalars().all()
        assert counter.count == 0
        bob = next(o for o in objs if o.id == 2)
        bob.lang = "zig"
        bob.name = "bobby"
        session.commit()
    with Session(engine) as session:
        truth = _rows(session, stmt)
    with Sess() as session:
        assert _rows(session, stmt, shared) == truth
    assert any("zig" in repr(row) for row in truth)


# Reads inside the transaction that wrote ----------------------------------------------------------


@pytest.mark.parametrize(
    ("read", "how"), [(read, list(SUBCLASS_WRITES)[index % 4]) for index, read in enumerate(JOINED_READS)]
)
def test_a_shared_entry_is_not_served_to_the_transaction_that_wrote_a_subclass_table(engine, shared, Sess, read, how):
    """The Session wrote the engineers' own table, uncommitted: its cached read of the base query sees its write."""
    stmt = JOINED_READS[read]()
    with Sess() as session:
        before = _rows(session, stmt, shared)
    with Sess() as session:
        SUBCLASS_WRITES[how](session)
        session.flush()
        truth = _rows(session, stmt)
        session.expunge_all()  # what objects the Session held before is not the question
        cached = _rows(session, stmt, shared)
        assert truth != before
        assert cached == truth
        session.rollback()
    with Sess() as session:
        assert _rows(session, stmt, shared) == before


# Eager loads of a polymorphic relationship -----------------------------------------------------------


def _company_shape(company):
    # What the load loaded: a lazy load of an unloaded column (a manager's level) is no hit's business.
    return [(type(e).__name__, e.name, e.__dict__.get("lang"), e.__dict__.get("level")) for e in company.employees]


EAGER = {
    "selectinload": lambda: selectinload(Company.employees),
    "joinedload": lambda: joinedload(Company.employees),
    "joinedload of_type *": lambda: joinedload(Company.employees.of_type(with_polymorphic(Employee, "*", flat=True))),
    "selectinload of_type Engineer": lambda: selectinload(Company.employees.of_type(Engineer)),
}


@pytest.mark.parametrize("how", ["Core update(Table)", "text()"])
@pytest.mark.parametrize("loader", list(EAGER))
def test_eager_load_of_a_polymorphic_relationship(engine, shared, Sess, loader, how):
    stmt = select(Company).where(Company.id == 1).options(EAGER[loader]())

    def read(session, cached):
        result = session.execute(stmt.options(FromCache(shared)) if cached else stmt)
        return _company_shape(result.unique().scalars().one())

    with Sess() as session:
        before = read(session, True)
    counter = SQLCounter(engine)
    with Sess() as session:
        assert read(session, True) == before
    assert counter.count == 0
    with Sess() as session:
        SUBCLASS_WRITES[how](session)
        session.commit()
    with Session(engine) as session:
        truth = read(session, False)
    assert truth != before
    with Sess() as session:
        assert read(session, True) == truth


# populate_existing over unflushed changes -------------------------------------------------------------


@pytest.mark.parametrize("region", ["local", "memory", "redis"])
def test_populate_existing_hit_over_unflushed_changes(engine, region_options, request, region):
    """Uncached, ``populate_existing`` discards a held object's unflushed changes for the row's values."""
    use_region(request, region_options, region)
    cache = SessionCache(region_options, default_region="memory", secret=SECRET)
    Sess = sessionmaker(engine, info=cache.session_info(), autoflush=False)
    stmt = select(Engineer).where(Engineer.id == 2).execution_options(populate_existing=True)

    def run(cached):
        with Sess() as session:
            held = session.scalars(stmt.options(FromCache(region))).one()  # stored
            held.lang = "unsaved"
            got = session.scalars(stmt.options(FromCache(region)) if cached else stmt).one()
            assert got is held
            return held.lang, held in session.dirty

    assert run(True) == run(False)


# Objects a Session holds, against a shared hit -------------------------------------------------------


def _holding(tmp_path, region_options, region, stmt, hold, observe, between, cached):
    """What ``observe(held, objects)`` says after a Session holding ``hold(session)`` reads ``stmt``.

    ``between(session)`` commits in another Session after ``hold`` ran; a
    third Session then stores ``stmt``'s entry (fresh, after the write).
    Each run has a database of its own.
    """
    engine = _database(tmp_path / f"held-{cached}.sqlite")
    cache = SessionCache(region_options, default_region="memory", secret=SECRET)
    Sess = sessionmaker(engine, info=cache.session_info(), autoflush=False)
    try:
        with Sess() as session:
            held = hold(session)
            if between is not None:
                with Sess() as other:
                    between(other)
                    other.commit()
            with Sess() as other:
                other.execute(stmt.options(FromCache(region))).unique().all()  # stored
            objects = session.execute(stmt.options(FromCache(region)) if cached else stmt).unique().scalars().all()
            return observe(held, objects)
    finally:
        engine.dispose()


def _same_held(tmp_path, region_options, region, stmt, hold, observe, between=None):
    cached = _holding(tmp_path, region_options, region, stmt, hold, observe, between, True)
    uncached = _holding(tmp_path, region_options, region, stmt, hold, observe, between, False)
    assert cached == uncached
    return cached


def _describe(objects):
    return [
        (type(o).__name__, o.id, dict(sorted((k, v) for k, v in o.__dict__.items() if k[0] != "_"))) for o in objects
    ]


def test_held_dev_moved_to_ops_by_another_commit(tmp_path, region_options, shared):
    """The Session holds Dev 1; another Session makes it an Ops; ``select(Ops)`` is read."""
    _same_held(
        tmp_path,
        region_options,
        shared,
        select(Ops).order_by(Ops.id),
        lambda s: s.get(Dev, 1),
        lambda held, objects: (_describe(objects), held in objects, held.kind),
        lambda s: s.execute(update(Staff).where(Staff.id == 1).values(kind="ops")),
    )


def test_held_engineer_with_an_expired_subclass_column(tmp_path, region_options, shared):
    def hold(session):
        bob = session.get(Engineer, 2)
        session.expire(bob, ["lang"])
        return bob

    _same_held(
        tmp_path,
        region_options,
        shared,
        select(Employee).order_by(Employee.id),
        hold,
        lambda held, objects: ("lang" in held.__dict__, held.__dict__.get("lang"), _describe(objects)),
        _text_lang,
    )


def test_held_engineer_loaded_before_a_subclass_write(tmp_path, region_options, shared):
    _same_held(
        tmp_path,
        region_options,
        shared,
        select(with_polymorphic(Employee, "*")).order_by(Employee.id),
        lambda s: s.get(Engineer, 2),
        lambda held, objects: (held.lang, _describe(objects)),
        _text_lang,
    )


def test_held_base_loaded_engineer_without_its_subclass_columns(tmp_path, region_options, shared):
    """The Session loaded the engineers without their own table (a plain base load with selectin off)."""

    def hold(session):
        objs = session.scalars(select(Employee).execution_options(populate_existing=True).where(Employee.id == 2)).all()
        session.expire(objs[0], ["lang"])
        return objs[0]

    _same_held(
        tmp_path,
        region_options,
        shared,
        select(Engineer).order_by(Engineer.id),
        hold,
        lambda held, objects: (held.__dict__.get("lang"), _describe(objects)),
        _text_lang,
    )


@pytest.mark.parametrize("populate", [False, True])
def test_held_object_and_with_expression(tmp_path, region_options, shared, populate):
    stmt = (
        select(Employee)
        .options(with_expression(Employee.expr, Employee.id * 10))
        .where(Employee.id == 4)
        .execution_options(populate_existing=populate)
    )
    _same_held(
        tmp_path,
        region_options,
        shared,
        stmt,
        lambda s: s.get(Employee, 4),
        lambda held, objects: (held.__dict__.get("expr"), _describe(objects)),
        None,
    )


def test_held_square_in_a_polymorphic_union(tmp_path, region_options, shared):
    _same_held(
        tmp_path,
        region_options,
        shared,
        select(Shape).order_by(Shape.id),
        lambda s: s.get(Square, 3),
        lambda held, objects: (held.side, _describe(objects)),
        _text_square,
    )


def test_held_company_and_its_column_property(tmp_path, region_options, shared):
    _same_held(
        tmp_path,
        region_options,
        shared,
        select(Company).order_by(Company.id),
        lambda s: s.get(Company, 1),
        lambda held, objects: (held.pythonistas, _describe(objects)),
        _text_lang,
    )


# Classes mapped to a join, to a subquery; abstract concrete bases -------------------------------------


class EngineerRow(_Base):
    """A read model mapped to the join of the employees and the engineers' own table."""

    __table__ = Employee.__table__.join(Engineer.__table__, Employee.__table__.c.id == Engineer.__table__.c.id)
    id = column_property(Employee.__table__.c.id, Engineer.__table__.c.id)
    name = Employee.__table__.c.name
    lang = Engineer.__table__.c.lang


class Headcount(_Base):
    """A read model mapped to a subquery: the employees of each company."""

    __table__ = (
        select(Employee.__table__.c.company_id.label("id"), func.count().label("total"))
        .group_by(Employee.__table__.c.company_id)
        .subquery("s27o_headcount")
    )
    __mapper_args__ = {"primary_key": [__table__.c.id]}


def _hire_text(session):
    session.execute(text("INSERT INTO s27o_employee (id, kind, name, company_id) VALUES (9, 'employee', 'zed', 1)"))


@pytest.mark.parametrize(
    ("stmt", "write"),
    [
        (select(EngineerRow).order_by(EngineerRow.id), _text_lang),
        (select(EngineerRow.id, EngineerRow.lang).order_by(EngineerRow.id), _core_lang),
        (select(Headcount).order_by(Headcount.id), _hire_text),
        (select(Headcount.id, Headcount.total).order_by(Headcount.id), _hire_text),
    ],
    ids=["join entity", "join columns", "subquery entity", "subquery columns"],
)
def test_a_class_mapped_to_a_join_or_a_subquery(engine, any_region, Sess, stmt, write):
    _fresh_after(engine, Sess, stmt, any_region, write)


# Autoflush of pending subclass changes before a look-up ----------------------------------------------


PENDING = {
    "subclass column changed": lambda s: setattr(s.get(Engineer, 2), "lang", "py"),
    "subclass object added": lambda s: s.add(Engineer(id=8, name="new", company_id=1, lang="py")),
    "write-only add": lambda s: s.get(Company, 1).notes.add(Note(id=7, text="pending")),
    "single-table subclass renamed": lambda s: setattr(s.get(Ops, 3), "name", "ops9"),
}
PENDING_READS = {
    "subclass column changed": select(Company.id, Company.pythonistas).order_by(Company.id),
    "subclass object added": select(Employee.id, Employee.kind).order_by(Employee.id),
    "write-only add": select(Note.id, Note.text).where(Note.company_id == 1).order_by(Note.id),
    "single-table subclass renamed": select(Ops.id, Ops.name).order_by(Ops.id),
}


@pytest.mark.parametrize("entrance", ["FromCache option", "cached_query()"])
@pytest.mark.parametrize("pending", list(PENDING))
def test_a_pending_change_autoflushes_before_a_hit(engine, any_region, Sess, pending, entrance):
    """Autoflush runs before a look-up, the early ``cached_query()`` path included: the read sees the change."""
    stmt = PENDING_READS[pending]

    def read(session, region):
        if region is None:
            return [tuple(r) for r in session.execute(stmt)]
        if entrance == "cached_query()":
            return [tuple(r) for r in cached_query(session, stmt, region)]
        return [tuple(r) for r in session.execute(stmt.options(FromCache(region)))]

    with Sess() as session:
        before = read(session, any_region)
        counter = SQLCounter(engine)
        assert read(session, any_region) == before
        assert counter.count == 0 or any_region != "local"
        PENDING[pending](session)
        cached = read(session, any_region)
        truth = read(session, None)
        assert cached == truth != before


# A dynamic relationship; a relationship of the subclass table ------------------------------------------


@pytest.mark.parametrize("entrance", ["FromCache option", "cached_query()"])
def test_dynamic_relationship_query(engine, any_region, Sess, entrance):
    def texts(session):
        query = session.get(Company, 1).dynamic_notes
        if entrance == "cached_query()":
            return [n.text for n in cached_query(session, query, any_region)]
        return [n.text for n in query.options(FromCache(any_region))]

    def add(session):
        session.get(Company, 1).notes.add(Note(id=2, text="n2"))

    if any_region == "local":
        with Sess() as session:
            assert texts(session) == texts(session) == ["n1"]
            add(session)
            assert texts(session) == ["n1", "n2"]
        return
    with Sess() as session:
        assert texts(session) == ["n1"]
    counter = SQLCounter(engine)
    with Sess() as session:
        assert texts(session) == ["n1"]
        assert counter.count == 1  # the get() of the company; the notes are a hit
    with Sess() as session:
        add(session)
        session.commit()
    with Sess() as session:
        assert texts(session) == ["n1", "n2"]


@pytest.mark.parametrize("how", ["ORM", "text()"])
def test_relationship_cache_of_a_subclass_relationship(engine, shared, Sess, how):
    """``Engineer.mentor`` is a column of the engineers' own table: a new mentor shows on the next lazy load."""

    def assign(session):
        if how == "ORM":
            session.get(Engineer, 2).mentor = session.get(Employee, 3)
        else:
            session.execute(text("UPDATE s27o_engineer SET mentor_id = 4 WHERE id = 2"))

    stmt = select(Engineer).where(Engineer.id == 2)
    opts = (FromCache(shared), RelationshipCache(Engineer.mentor, shared))

    def mentor(session):
        engineer = session.scalars(stmt.options(*opts)).one()
        return None if engineer.mentor is None else engineer.mentor.name

    with Sess() as session:
        session.execute(update(Engineer).where(Engineer.id == 2).values(mentor_id=1))
        session.commit()
    with Sess() as session:
        assert mentor(session) == "ada"
    counter = SQLCounter(engine)
    with Sess() as session:
        assert mentor(session) == "ada"
    assert counter.count == 0
    with Sess() as session:
        assign(session)
        session.commit()
    with Sess() as session:
        assert mentor(session) == ("cy" if how == "ORM" else "di")


# Objects only the cache keeps alive ------------------------------------------------------------------


def _stale_after_drop(engine, Sess, first, second):
    """``first`` read cached twice in one Session, its objects dropped; another Session commits; ``second`` read cached.

    Returns ``(cached, truth)``: the language the cached read gives, and
    what a plain Session reads at that moment.
    """
    with Sess() as session:
        session.scalars(first).all()
        session.scalars(first).all()  # a shared hit: the Session remembers the objects it built
        gc.collect()
        with Session(engine) as other:
            _text_lang(other)
            other.commit()
        cached = session.scalars(second).one().lang
    with Session(engine) as plain:
        truth = plain.scalars(select(Engineer).where(Engineer.id == 2)).one().lang
    return cached, truth


# A Session that read an entity cached kept its objects alive after the
# application dropped them (shared regions: the objects a hit built,
# remembered per key in the Session; ext:local_session: the entry's objects,
# kept after the entry was void).  After another Session committed a change
# to the row, the next read (cached or not) ran its SQL, and the ORM
# returned the still-alive object without refreshing it: the old value,
# where a plain Session reads the new one.  The objects of shared hits are
# now remembered weakly, and void local entries dropped at the commit.


def test_a_miss_after_another_commit_returns_fresh_values_not_a_kept_object(engine, any_region, Sess):
    stmt = select(Engineer).where(Engineer.id == 2).options(FromCache(any_region))
    if any_region != "local":
        with Sess() as other:
            other.scalars(stmt).all()  # stored: the Session below hits it twice
    cached, truth = _stale_after_drop(engine, Sess, stmt, stmt)
    assert truth == "py"
    assert cached == truth  # was "c", the value of the object the cache kept alive


def test_a_miss_of_another_query_after_a_commit_returns_fresh_values(engine, shared, Sess):
    first = select(Employee).order_by(Employee.id).options(FromCache(shared))
    second = select(Engineer).where(Engineer.id == 2).options(FromCache(shared))
    with Sess() as other:
        other.scalars(first).all()
    cached, truth = _stale_after_drop(engine, Sess, first, second)
    assert (cached, truth) == ("py", "py")  # was ("c", "py")


def test_an_uncached_read_after_a_hit_and_a_commit_returns_fresh_values(engine, shared, Sess):
    first = select(Engineer).where(Engineer.id == 2).options(FromCache(shared))
    with Sess() as other:
        other.scalars(first).all()
    cached, truth = _stale_after_drop(engine, Sess, first, select(Engineer).where(Engineer.id == 2))
    assert (cached, truth) == ("py", "py")  # was ("c", "py")


def test_without_the_cache_the_dropped_object_is_collected_and_read_fresh(engine, Sess):
    """The reference for the two above: the same steps, uncached, in a Session that carries the cache."""
    stmt = select(Engineer).where(Engineer.id == 2)
    assert _stale_after_drop(engine, Sess, stmt, stmt) == ("py", "py")


def test_with_expression_hits_after_dropped_objects(engine, shared, Sess):
    def expr(session, factor, cached):
        stmt = select(Employee).options(with_expression(Employee.expr, Employee.id * factor)).where(Employee.id == 4)
        value = session.scalars(stmt.options(FromCache(shared)) if cached else stmt).one().expr
        gc.collect()  # the application keeps nothing
        return value

    with Sess() as session:
        uncached = [expr(session, factor, False) for factor in (2, 3, 2, 3)]
    with Sess() as session:
        cached = [expr(session, factor, True) for factor in (2, 3, 2, 3)]
    assert uncached == [8, 12, 8, 12]
    assert cached == uncached  # was [8, 12, 8, 8]: the object kept from the entry of id * 2
