"""Shared regions (memory, file, Redis): hits become objects of the caller's Session."""

from __future__ import annotations

import pickle

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import joinedload, selectinload, subqueryload

from pyramid_sessioncache import FromCache, RelationshipCache, SessionCache, cache_parameters
from pyramid_sessioncache.engine import stats
from pyramid_sessioncache.engine.values import CachedRows

from .conftest import SECRET, use_region
from .models import Address, Person, PostalCode


@pytest.fixture(params=["memory", "file", "dbm", "redis"])
def region(request, region_options, tmp_path) -> str:
    """The name of each shared region in turn (``dbm`` too, here); ``redis`` starts the real server."""
    if request.param == "dbm":
        region_options["dbm"] = {"type": "dbm", "data_dir": str(tmp_path / "dbm")}
    return use_region(request, region_options, request.param)


@pytest.fixture
def cache(region_options, region):
    return SessionCache(region_options, default_region="local", secret=SECRET)


def by_name(name, region, *options):
    return select(Person).where(Person.name == name).options(FromCache(region), *options)


def test_hit_in_a_new_session_runs_no_sql(Session, sql, region):
    with Session() as first:
        person = first.scalars(by_name("person 3", region)).one()
        assert person.name == "person 3"
    sql.reset()
    with Session() as second:
        again = second.scalars(by_name("person 3", region)).one()
        assert sql.count == 0
        assert again is not person
        assert again in second
        assert again.id == 3 and again.name == "person 3"
        assert sql.count == 0


def test_hit_reuses_the_object_the_session_holds_and_keeps_pending_changes(Session, sql, region):
    with Session() as first:
        first.scalars(by_name("person 4", region)).one()
    with Session(autoflush=False) as second:
        held = second.get(Person, 4)
        held.name = "renamed, not flushed"
        sql.reset()
        hit = second.scalars(by_name("person 4", region)).one()
        assert sql.count == 0
        assert hit is held
        assert hit.name == "renamed, not flushed"
        second.commit()
    with Session() as third:
        assert third.get(Person, 4).name == "renamed, not flushed"


def test_pending_changes_never_reach_the_shared_region(Session, cache, region):
    with Session(autoflush=False) as first:
        held = first.get(Person, 5)
        held.name = "pending"
        stored = first.scalars(by_name("person 5", region)).one()
        assert stored is held and stored.name == "pending"
        beaker_cache, key = cache_parameters(by_name("person 5", region), session=first)
        value = beaker_cache.get(key)
        first.rollback()
    assert isinstance(value, CachedRows)
    ((cls, columns, _),) = value.classes
    assert [values[columns.index("name")] for _, _, values, *_ in value.objects] == ["person 5"]


def test_eager_loaded_children_come_from_the_cache(Session, sql, region):
    for loader in (selectinload, joinedload):
        stmt = (
            select(Person)
            .where(Person.id <= 3)
            .order_by(Person.id)
            .options(FromCache(region), loader(Person.addresses))
        )
        for _ in range(2):  # the first miss learns that the eager load reads address
            with Session() as first:
                first.scalars(stmt).unique().all()
        sql.reset()
        with Session() as second:
            people = second.scalars(stmt).unique().all()
            streets = [[a.street for a in p.addresses] for p in people]
            assert sql.count == 0
            assert streets == [[f"{i} Main St", f"{i} High St"] for i in (1, 2, 3)]
            assert all(a.person is p for p in people for a in p.addresses)


def test_relationship_cache_serves_lazy_loads(Session, sql, region):
    option = (
        RelationshipCache(Person.addresses, region)
        .and_(RelationshipCache(Address.postal_code, region))
        .and_(RelationshipCache(PostalCode.city, region))
    )
    stmt = select(Person).where(Person.id == 2).options(option)
    with Session() as first:
        person = first.scalars(stmt).one()
        assert [a.city.name for a in person.addresses] == ["City 1", "City 2"]
    sql.reset()
    with Session() as second:
        person = second.scalars(stmt).one()
        assert sql.count == 1  # the person; its addresses, their postal codes and cities are cached
        assert [a.city.name for a in person.addresses] == ["City 1", "City 2"]
        assert sql.count == 1


def test_column_and_aggregate_results(Session, sql, region):
    stmt = (
        select(Person.name, func.count(Address.id)).join(Person.addresses).group_by(Person.name).order_by(Person.name)
    )
    stmt = stmt.options(FromCache(region))
    with Session() as first:
        expected = first.execute(stmt).all()
    sql.reset()
    with Session() as second:
        rows = second.execute(stmt).all()
        assert sql.count == 0
        assert rows == expected
        assert rows[0].name == "person 1"


def test_legacy_query(Session, sql, region):
    with Session() as first:
        first.query(Person).options(FromCache(region)).filter(Person.id < 4).order_by(Person.id).all()
    sql.reset()
    with Session() as second:
        people = second.query(Person).options(FromCache(region)).filter(Person.id < 4).order_by(Person.id).all()
        assert sql.count == 0
        assert [p.name for p in people] == ["person 1", "person 2", "person 3"]


def test_objects_from_a_hit_are_loaded_persistent_and_clean(Session, sql, region):
    with Session() as first:
        first.scalars(by_name("person 6", region)).one()
    with Session() as second:
        person = second.scalars(by_name("person 6", region)).one()
        assert person.loaded_by_orm  # @reconstructor ran
        assert not second.dirty and not second.new
        assert person in second.identity_map.values()
        person.name = "changed"
        assert person in second.dirty
        second.commit()
    with Session() as third:
        assert third.get(Person, 6).name == "changed"


def test_a_hit_sends_the_events_a_query_sends(Session, region):
    from sqlalchemy import event

    statement = select(Person).where(Person.id <= 3).options(FromCache(region), selectinload(Person.addresses))
    with Session() as first:
        first.scalars(statement).all()
    with Session() as first:  # the shape's tables are known now: this one stores
        first.scalars(statement).all()
    with Session() as second:
        persistent, loaded = [], []

        def on_load(target, context):
            loaded.append((target, context))

        event.listen(second, "loaded_as_persistent", lambda session, obj: persistent.append(obj))
        event.listen(Address, "load", on_load)
        try:
            people = second.scalars(statement).all()
        finally:
            event.remove(Address, "load", on_load)
        addresses = [a for p in people for a in p.addresses]
        assert {id(o) for o in persistent} == {id(o) for o in [*people, *addresses]}
        assert [target for target, _ in loaded] == addresses and {c for _, c in loaded} == {None}


def test_stored_values_pickle_small(Session, cache, region):
    with Session() as session:
        stmt = select(Person).options(FromCache(region), selectinload(Person.addresses))
        session.scalars(stmt).all()  # learns that the eager load reads address
        session.scalars(stmt).all()
        beaker_cache, key = cache_parameters(stmt, session=session)
        value = beaker_cache.get(key)
    restored = pickle.loads(pickle.dumps(value))
    assert len(restored.rows) == 20
    assert len(restored.objects) == 60  # 20 people, 40 addresses


def test_expired_objects_are_refilled_without_sql(Session, sql, region):
    with Session() as session:
        people = session.scalars(select(Person).where(Person.id < 3).options(FromCache(region))).all()
        session.commit()  # expires every object
        sql.reset()
        again = session.scalars(select(Person).where(Person.id < 3).options(FromCache(region))).all()
        assert again == people
        assert [p.name for p in again] == ["person 1", "person 2"]
        assert sql.count == 0


def test_two_apps_do_not_share_memory_entries(engine, sql):
    first = SessionCache({"memory": {"type": "memory"}})
    second = SessionCache({"memory": {"type": "memory"}})
    from sqlalchemy.orm import sessionmaker

    for cache in (first, second):
        with sessionmaker(bind=engine, info=cache.session_info())() as session:
            session.scalars(by_name("person 1", "memory")).one()
    assert sql.count == 2


def test_a_transaction_that_wrote_reads_around_shared_regions(Session, sql, region):
    with Session() as first:
        first.scalars(by_name("person 7", region)).one()
    with Session() as second:
        second.get(Person, 7).name = "person 7b"
        sql.reset()
        assert second.scalars(by_name("person 7", region)).all() == []  # sees its own write
        assert sql.count == 2  # the autoflush UPDATE, then the query itself
        assert second.scalars(by_name("person 7b", region)).one().id == 7
        second.rollback()
        sql.reset()
        assert second.scalars(by_name("person 7", region)).one().name == "person 7"
        assert sql.count == 0  # the transaction ended: the shared entry serves again
    with Session() as third:
        assert third.scalars(by_name("person 7b", region)).all() == []  # nothing uncommitted was stored


def test_memory_regions_are_bounded(engine, sql):
    from beaker.container import MemoryNamespaceManager
    from sqlalchemy.orm import sessionmaker

    cache = SessionCache({"small": {"type": "memory", "max_items": 5}})
    Session = sessionmaker(bind=engine, info=cache.session_info())
    with Session() as session:
        for i in range(1, 11):
            session.execute(select(Person.name).where(Person.id == i).options(FromCache("small"))).all()
        namespace = cache.region("small").cache_for().namespace
        assert len(namespace.dictionary) == 5
        sql.reset()
        session.execute(select(Person.name).where(Person.id == 10).options(FromCache("small"))).all()
        session.execute(select(Person.name).where(Person.id == 1).options(FromCache("small"))).all()
        assert sql.count == 1  # the newest entry stayed, the oldest went
    assert not any(str(name).startswith("sessioncache") for name in MemoryNamespaceManager.namespaces.dict)


def test_deferred_and_expired_columns(Session, sql, region):
    from sqlalchemy.orm import defer

    stmt = select(Person).where(Person.id == 8).options(FromCache(region), defer(Person.name))
    with Session() as first:
        first.scalars(stmt).one()
    with Session() as second:
        sql.reset()
        person = second.scalars(stmt).one()
        assert sql.count == 0
        assert person.name == "person 8"  # not in the entry: loaded on access, as a deferred column is
        assert sql.count == 1
    plain = select(Person).where(Person.id == 8).options(FromCache(region))
    with Session() as third:
        third.scalars(plain).one()
        person = third.get(Person, 8)
        third.expire(person, ["name"])
        sql.reset()
        assert third.scalars(plain).one() is person
        assert person.name == "person 8" and sql.count == 0  # filled from the entry, as a query would


def test_many_to_one_relationships_come_back(Session, sql, region):
    from sqlalchemy.orm import joinedload

    stmt = select(Address).where(Address.id.in_([1, 2])).order_by(Address.id)
    stmt = stmt.options(
        FromCache(region), joinedload(Address.person), joinedload(Address.postal_code).joinedload(PostalCode.city)
    )
    for _ in range(2):
        with Session() as session:
            session.scalars(stmt).all()
    with Session() as session:
        sql.reset()
        first, second = session.scalars(stmt).all()
        assert first.person is second.person and first.person.name == "person 1"
        assert first.city.name == "City 1" and second.city.name == "City 2"
        assert sql.count == 0
    assert "FromCache(region=" in repr(FromCache(region))
    assert "Person.addresses" in repr(RelationshipCache(Person.addresses, region))


@pytest.mark.parametrize("loader", [selectinload, subqueryload])
def test_relationship_cache_leaves_eager_loads_to_their_query(Session, sql, region, loader):
    addresses = RelationshipCache(Person.addresses, region)
    statement = select(Person).where(Person.id <= 2).order_by(Person.id).options(loader(Person.addresses), addresses)
    for _ in range(2):
        with Session() as session:
            people = session.scalars(statement).all()
            assert [len(p.addresses) for p in people] == [2, 2]
            assert list(stats.lookups(session)) == []  # neither the query nor its eager load is cached
    assert sql.count == 4
