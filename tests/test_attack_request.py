"""Attacks on request.dbsession's connectionless shared hits (addon/transaction.py, lookup.begin).

Each scenario runs a real Pyramid application (WebTest, a SQLite file,
``config.include("pyramid_sessioncache")``) in three modes, and compares:

- ``addon``: the add-on's own ``request.dbsession``: listeners registered
  once on its factory, a shared hit joins the request's transaction
  without a connection (the change under attack);
- ``plain``: the application's own ``request.dbsession`` made with
  ``zope.sqlalchemy.register()`` (as pyramid-cookiecutter-starter does):
  a shared hit begins the Session's transaction, which joins pyramid_tm;
- ``uncached``: the add-on's ``request.dbsession``, the same view, the
  query run without a cache (what the application did before caching).

A first version, whose hit registered a flush before pyramid_tm's commit
instead of joining, lost or kept changes here in three ways (savepoints,
``abort()`` carried into the next transaction, a later before-commit hook):
those scenarios are the ones a user would see, and stay as tests.
"""

from __future__ import annotations

import threading

import pytest
import transaction
import zope.sqlalchemy
from pyramid.config import Configurator
from pyramid.response import Response
from pyramid.scripting import prepare
from sqlalchemy import create_engine, event, select, text, update
from sqlalchemy.orm import sessionmaker
from webtest import TestApp

from pyramid_sessioncache.addon.interfaces import IDBSessionFactory

from .conftest import ThreadServer
from .models import Address, Person

SETTINGS = {
    "cache.regions": "local_session, short_term",
    "cache.type": "memory",
    "cache.local_session.type": "ext:local_session",
    "cache.short_term.expire": "60",
    "sessioncache.default_region": "local_session",
}

MODES = ("addon", "plain", "uncached")

#: The view each test runs at /run/{name}: set by the test itself.
SCENARIO: dict = {}


class Boom(Exception):
    """Raised by a view to make pyramid_tm abort."""


def by_name(name):
    return select(Person).where(Person.name == name)


def get(request, name):
    """The person named ``name``: a shared-region hit (after warm-up), or uncached."""
    if request.registry.settings.get("attack.mode") == "uncached":
        return request.dbsession.scalars(by_name(name)).one()
    return request.cached_query(by_name(name), region="short_term").scalars().one()


def warm(request):
    if request.registry.settings.get("attack.mode") != "uncached":
        request.cached_query(by_name(request.matchdict["name"]), region="short_term").scalars().all()
    return {}


def run(request):
    result = SCENARIO["view"](request, request.matchdict["name"])
    return result if result is not None else {}


def boom_view(exc, request):
    return Response("aborted", status=500)


def plain_dbsession(config):
    """request.dbsession as pyramid-cookiecutter-starter makes it: zope.sqlalchemy.register() per Session."""
    from sqlalchemy import engine_from_config

    factory = sessionmaker(bind=engine_from_config(config.get_settings(), "sqlalchemy."))
    config.registry["dbsession_factory"] = factory

    def dbsession(request):
        session = factory(info={"request": request})
        zope.sqlalchemy.register(session, transaction_manager=request.tm)
        return session

    config.add_request_method(dbsession, "dbsession", reify=True)


def make_app(db_url, mode, **settings):
    config = Configurator(settings={"sqlalchemy.url": db_url, **SETTINGS, "attack.mode": mode, **settings})
    if settings.get("retry.attempts"):
        config.include("pyramid_retry")
    config.include("pyramid_sessioncache")
    if mode == "plain":
        config.include(plain_dbsession)
    config.add_route("warm", "/warm/{name}")
    config.add_view(warm, route_name="warm", renderer="json")
    config.add_route("run", "/run/{name}")
    config.add_view(run, route_name="run", renderer="json")
    config.add_view(boom_view, context=Boom)
    app = config.make_wsgi_app()
    factory = app.registry.queryUtility(IDBSessionFactory) if mode != "plain" else app.registry["dbsession_factory"]
    app.engine = factory.kw["bind"]
    app.checkouts = []
    event.listen(app.engine, "checkout", lambda *args: app.checkouts.append(1))
    return app


@pytest.fixture(params=MODES)
def mode(request):
    return request.param


@pytest.fixture
def make(db_url, mode):
    """Make the application of ``mode`` with more settings: ``make(**settings)``; disposed of after the test."""
    made = []

    def make(**settings):
        app = make_app(db_url, mode, **settings)
        made.append(app)
        return app

    SCENARIO.clear()
    yield make
    SCENARIO.clear()
    for app in made:
        app.engine.dispose()


@pytest.fixture
def app(make):
    return make()


def in_database(db_url, key, value):
    """``{key: value}`` of every row, read on a connection of its own (what was committed)."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return {row[0]: row[1] for row in conn.execute(select(key, value))}
    finally:
        engine.dispose()


def names(db_url):
    return in_database(db_url, Person.id, Person.name)


def streets(db_url):
    return in_database(db_url, Address.id, Address.street)


def assert_clean(app):
    """No connection left checked out, no transaction left open in this thread."""
    assert app.engine.pool.checkedout() == 0
    # pyramid_tm's default manager is the thread's: nothing may be left joined to it.
    current = transaction.manager.manager._txn
    assert current is None or current._resources == []


def scenario(view):
    SCENARIO["view"] = view


def warmed(app, *names):
    """A WebTest client of ``app``, the shared entry of each of ``names`` warmed (a miss, stored): /run/{name} hits."""
    web = TestApp(app)
    for name in names:
        web.get(f"/warm/{name}")
    return web


def run_view(app, name, view, **kwargs):
    """Warm the shared entry of ``name``, then request /run/{name}, which runs ``view``: WebTest's response."""
    web = warmed(app, name)
    scenario(view)
    return web.get(f"/run/{name}", **kwargs)


# --- commit and abort ----------------------------------------------------------------------------------------


def test_a_change_to_a_hit_is_committed_and_invalidates(app, db_url, mode):
    web = warmed(app, "person 1")

    def view(request, name):
        get(request, name).name = "renamed 1"

    scenario(view)
    before = len(app.checkouts)
    web.get("/run/person 1")
    assert names(db_url)[1] == "renamed 1"
    assert len(app.checkouts) - before == 1  # the flush (the hit itself, in addon mode, took none)
    SCENARIO["view"] = lambda request, name: {"n": len(request.cached_query(by_name(name), region="short_term").all())}
    assert web.get("/run/person 1").json == {"n": 0}  # the old entry is not served
    assert web.get("/run/renamed 1").json == {"n": 1}
    assert_clean(app)


@pytest.mark.parametrize("mode", ["addon"])  # the add-on's promise only
def test_a_pure_hit_request_checks_out_nothing_and_commits_nothing(app, db_url, mode):
    web = warmed(app, "person 2")
    scenario(lambda request, name: {"name": get(request, name).name})
    before = len(app.checkouts)
    for _ in range(3):
        assert web.get("/run/person 2").json == {"name": "person 2"}
    assert len(app.checkouts) == before
    assert_clean(app)


def test_an_exception_aborts_changes_to_a_hit(app, db_url, mode):
    web = warmed(app, "person 3")

    def view(request, name):
        get(request, name).name = "aborted"
        raise Boom()

    scenario(view)
    web.get("/run/person 3", status=500)
    assert names(db_url)[3] == "person 3"
    assert_clean(app)
    # the next request in the same thread is not affected
    scenario(lambda request, name: {"name": get(request, name).name})
    assert web.get("/run/person 3").json == {"name": "person 3"}
    assert_clean(app)


def test_an_exception_after_a_flushed_change_aborts_it(app, db_url, mode):
    def view(request, name):
        get(request, name).name = "flushed then aborted"
        request.dbsession.flush()
        raise Boom()

    run_view(app, "person 4", view, status=500)
    assert names(db_url)[4] == "person 4"
    assert_clean(app)


@pytest.mark.parametrize("when", ["before the hit", "after the hit"])
def test_doom_discards_changes_to_a_hit(app, db_url, mode, when):
    def view(request, name):
        if when == "before the hit":
            request.tm.doom()
        person = get(request, name)
        person.name = "doomed"
        if when == "after the hit":
            request.tm.doom()
        return {"name": person.name}

    assert run_view(app, "person 5", view).json == {"name": "doomed"}
    assert names(db_url)[5] == "person 5"
    assert_clean(app)


def test_commit_veto_discards_changes_to_a_hit(make, db_url, mode):
    app = make(**{"tm.commit_veto": "pyramid_tm.default_commit_veto"})

    def view(request, name):
        get(request, name).name = "vetoed"
        request.response.status = 400
        return {}

    run_view(app, "person 6", view, status=400)
    assert names(db_url)[6] == "person 6"
    assert_clean(app)


def test_explicit_manager_commits_changes_to_a_hit(make, db_url, mode):
    app = make(**{"tm.manager_hook": "pyramid_tm.explicit_manager"})

    def view(request, name):
        get(request, name).name = "explicit"

    run_view(app, "person 7", view)
    assert names(db_url)[7] == "explicit"
    assert app.engine.pool.checkedout() == 0


# --- savepoints ----------------------------------------------------------------------------------------------


def test_rolling_back_to_a_savepoint_taken_before_a_hit_discards_the_change(app, db_url, mode):
    def view(request, name):
        savepoint = request.tm.savepoint()
        get(request, name).name = "rolled back"
        savepoint.rollback()

    run_view(app, "person 8", view)
    assert names(db_url)[8] == "person 8"
    assert_clean(app)


def test_rolling_back_to_a_savepoint_taken_after_a_hit_discards_the_later_change(app, db_url, mode):
    web = warmed(app, "person 9")

    def view(request, name):
        person = get(request, name)
        try:
            savepoint = request.tm.savepoint()
        except TypeError:  # zope.sqlalchemy: "Savepoints unsupported" on SQLite, once the Session joined
            return {"savepoint": "refused"}
        person.name = "rolled back"
        savepoint.rollback()

    scenario(view)
    try:
        web.get("/run/person 9")
    except transaction.interfaces.TransactionFailedError:
        assert mode != "addon"  # the refused savepoint failed the transaction: nothing committed
    assert names(db_url)[9] == "person 9"
    assert_clean(app)


# --- several queries, ORM writes --------------------------------------------------------------------------


def test_two_hits_and_a_miss_between_them_all_commit(app, db_url, mode):
    web = warmed(app, "person 10", "person 11")

    def view(request, name):
        first = get(request, "person 10")
        first.name = "ten"
        other = request.dbsession.scalars(select(Person).where(Person.id == 12)).one()  # a miss: autoflush
        other.name = "twelve"
        second = get(request, "person 11")
        second.name = "eleven"

    scenario(view)
    web.get("/run/x")
    found = names(db_url)
    assert (found[10], found[11], found[12]) == ("ten", "eleven", "twelve")
    assert_clean(app)


def test_a_hit_then_an_orm_bulk_update(app, db_url, mode):
    def view(request, name):
        get(request, name).name = "thirteen"
        request.dbsession.execute(update(Person).where(Person.id == 14).values(name="fourteen"))

    run_view(app, "person 13", view)
    found = names(db_url)
    assert (found[13], found[14]) == ("thirteen", "fourteen")
    assert_clean(app)


def test_a_hit_then_delete_and_add(app, db_url, mode):
    def view(request, name):
        person = get(request, name)
        for address in person.addresses:  # a lazy load: joins the transaction
            request.dbsession.delete(address)
        request.dbsession.delete(person)
        request.dbsession.add(Person(id=500, name="new"))

    run_view(app, "person 15", view)
    found = names(db_url)
    assert 15 not in found and found[500] == "new"
    assert_clean(app)


def test_a_hit_then_delete_alone(app, db_url, mode):
    with app.engine.begin() as conn:  # no addresses: person.addresses has no delete cascade
        conn.execute(Address.__table__.delete().where(Address.person_id == 16))
    web = warmed(app, "person 16")
    scenario(lambda request, name: request.dbsession.delete(get(request, name)))
    web.get("/run/person 16")
    assert 16 not in names(db_url)
    assert_clean(app)


def test_a_hit_then_add_alone(app, db_url, mode):
    def view(request, name):
        get(request, name)
        request.dbsession.add(Person(id=501, name="added"))

    run_view(app, "person 17", view)
    assert names(db_url)[501] == "added"
    assert_clean(app)


def test_a_lazy_load_from_a_hit_then_a_change_to_the_loaded_object(app, db_url, mode):
    def view(request, name):
        person = get(request, name)
        person.addresses[0].street = "lazy street"
        return {"street": str(person.addresses[0])}

    assert run_view(app, "person 18", view).json["street"].startswith("lazy street")
    assert streets(db_url)[35] == "lazy street"
    assert_clean(app)


def test_a_hit_then_raw_sql_marked_changed_with_zope_sqlalchemy(app, db_url, mode):
    def view(request, name):
        get(request, name).name = "orm twelve"
        request.dbsession.connection().execute(text("UPDATE person SET name = 'raw thirteen' WHERE id = 13"))
        zope.sqlalchemy.mark_changed(request.dbsession, transaction_manager=request.tm)

    run_view(app, "person 12", view)
    found = names(db_url)
    assert (found[12], found[13]) == ("orm twelve", "raw thirteen")
    assert_clean(app)


def test_a_pure_hit_then_mark_changed_alone_commits_nothing_and_breaks_nothing(app, db_url, mode):
    def view(request, name):
        get(request, name)
        zope.sqlalchemy.mark_changed(request.dbsession, transaction_manager=request.tm)

    run_view(app, "person 14", view)
    assert names(db_url)[14] == "person 14"
    assert_clean(app)


def test_a_pure_hit_then_sessioncache_mark_changed_invalidates(app, db_url, mode):
    web = warmed(app, "person 15")

    def view(request, name):
        get(request, name)
        request.sessioncache.mark_changed("person")

    scenario(view)
    web.get("/run/person 15")
    before = len(app.checkouts)
    web.get("/warm/person 15")  # invalidated: a miss, which runs the query
    if mode != "uncached":
        assert len(app.checkouts) - before == 1
    assert_clean(app)


def test_a_hit_in_a_response_callback_after_pyramid_tm_ended(make, db_url, mode):
    """After pyramid_tm committed (explicit manager): a hit has no transaction to join."""
    app = make(**{"tm.manager_hook": "pyramid_tm.explicit_manager"})
    web = warmed(app, "person 16")
    outcome = []

    def late(request, response):
        try:
            outcome.append(get(request, request.matchdict["name"]).name)
        except Exception as exc:
            outcome.append(type(exc).__name__)

    scenario(lambda request, name: request.add_response_callback(late))
    web.get("/run/person 16")
    # zope.sqlalchemy's join asks the explicit manager for a transaction: NoTransaction for the starter-style
    # Session; the add-on's, made after pyramid_tm ended, joins none and reads outside any.
    assert outcome == (["NoTransaction"] if mode == "plain" else ["person 16"])
    # The add-on's request.dbsession is closed when the request finishes; the starter-style one of
    # "plain" is not, and its hit checked a connection out before the join failed: it stays out.
    assert app.engine.pool.checkedout() == (1 if mode == "plain" else 0)


def test_a_hit_then_an_orm_savepoint_rolled_back(app, db_url, mode):
    def view(request, name):
        person = get(request, name)
        person.name = "kept"
        with request.dbsession.begin_nested() as nested:
            person.addresses[0].street = "rolled back street"
            request.dbsession.flush()
            nested.rollback()

    run_view(app, "person 17", view)
    assert names(db_url)[17] == "kept"
    assert streets(db_url)[33] == "17 Main St"
    assert_clean(app)


# --- the view's own commit / rollback / abort -------------------------------------------------------------


def test_the_views_own_session_commit_is_refused_and_pyramid_tm_commits(app, db_url, mode):
    def view(request, name):
        get(request, name).name = "self-committed"
        try:
            request.dbsession.commit()
        except AssertionError as exc:
            return {"refused": "transaction manager" in str(exc)}
        return {"refused": False}

    assert run_view(app, "person 19", view).json == {"refused": True}
    assert names(db_url)[19] == "self-committed"  # the view caught the refusal: pyramid_tm commits the change
    assert_clean(app)


def test_the_views_own_session_rollback_discards_the_change(app, db_url, mode):
    def view(request, name):
        get(request, name).name = "rolled back by the view"
        request.dbsession.rollback()

    run_view(app, "person 20", view, expect_errors=True)
    assert names(db_url)[20] == "person 20"
    assert_clean(app)


@pytest.mark.parametrize("manager_hook", ["pyramid_tm.explicit_manager", None])
@pytest.mark.parametrize("then", ["add", "another hit"])
def test_an_aborted_transaction_does_not_carry_changes_into_the_next(make, db_url, mode, manager_hook, then):
    settings = {"tm.manager_hook": manager_hook} if manager_hook else {}
    app = make(**settings)
    web = warmed(app, "person 1", "person 2")

    def view(request, name):
        get(request, name).name = "aborted by the view"
        request.tm.abort()
        if request.tm.explicit:
            request.tm.begin()
        # what the view does next, in the transaction pyramid_tm commits
        if then == "add":
            request.dbsession.add(Person(id=502, name="after the abort"))
        else:
            get(request, "person 2").name = "after the abort"

    scenario(view)
    web.get("/run/person 1")
    found = names(db_url)
    assert found[502 if then == "add" else 2] == "after the abort"
    assert found[1] == "person 1"
    assert_clean(app)


def test_a_change_made_by_a_later_before_commit_hook_is_committed(app, db_url, mode):
    def view(request, name):
        person = get(request, name)

        def touch():
            person.name = "touched at commit"

        request.tm.get().addBeforeCommitHook(touch)

    run_view(app, "person 2", view)
    assert names(db_url)[2] == "touched at commit"
    assert_clean(app)


def test_a_change_made_by_an_earlier_before_commit_hook_is_committed(app, db_url, mode):
    def view(request, name):
        holder = {}
        request.tm.get().addBeforeCommitHook(lambda: setattr(holder["person"], "name", "touched early"))
        holder["person"] = get(request, name)

    run_view(app, "person 3", view)
    assert names(db_url)[3] == "touched early"
    assert_clean(app)


# --- errors at commit -------------------------------------------------------------------------------------


def test_a_flush_error_at_commit_is_the_requests_error_and_leaves_the_db_clean(app, db_url, mode):
    web = warmed(app, "person 4")

    def view(request, name):
        person = get(request, name)
        person.name = None  # NOT NULL: the flush at commit fails
        request.dbsession.add(Person(id=503, name="same transaction"))

    scenario(view)
    with pytest.raises(Exception, match="NOT NULL|IntegrityError"):
        web.get("/run/person 4")
    found = names(db_url)
    assert found[4] == "person 4" and 503 not in found
    assert_clean(app)
    scenario(lambda request, name: {"name": get(request, name).name})
    assert web.get("/run/person 4").json == {"name": "person 4"}  # the next request works
    assert_clean(app)


def test_a_flush_error_at_commit_of_a_pure_hit_change(app, db_url, mode):
    web = warmed(app, "person 5")
    scenario(lambda request, name: setattr(get(request, name), "name", None))
    with pytest.raises(Exception, match="NOT NULL|IntegrityError"):
        web.get("/run/person 5")
    assert names(db_url)[5] == "person 5"
    assert_clean(app)


# --- retries (pyramid_retry) ------------------------------------------------------------------------------


def test_a_retried_request_commits_only_the_last_attempt(make, db_url, mode):
    app = make(**{"retry.attempts": "3"})
    web = warmed(app, "person 6")
    attempts = []

    def view(request, name):
        attempts.append(request)
        person = get(request, name)
        person.name = f"attempt {len(attempts)}"
        request.dbsession.add(Person(id=600 + len(attempts), name="row"))
        if len(attempts) == 1:
            raise transaction.interfaces.TransientError("try again")

    scenario(view)
    web.get("/run/person 6")
    found = names(db_url)
    assert len(attempts) == 2 and attempts[0] is not attempts[1]
    assert found[6] == "attempt 2" and 601 not in found and found[602] == "row"
    assert_clean(app)


@pytest.mark.parametrize("mode", ["addon", "plain"])
def test_a_stale_hit_changed_at_commit_is_retried_like_zope_sqlalchemys(make, db_url, mode):
    """Another program deletes the row of a hit: the UPDATE at commit matches no row (StaleDataError)."""
    app = make(**{"retry.attempts": "3"})
    web = warmed(app, "person 18")
    attempts = []

    def view(request, name):
        attempts.append(1)
        person = get(request, name)
        if len(attempts) == 1:
            other = create_engine(db_url)
            with other.begin() as conn:
                conn.execute(Address.__table__.delete().where(Address.person_id == 18))
                conn.execute(Person.__table__.delete().where(Person.id == 18))
            other.dispose()
        person.name = "stale"

    scenario(view)
    with pytest.raises(Exception, match="No row was found|expected to update 1 row"):
        web.get("/run/person 18")
    assert len(attempts) >= 2  # zope.sqlalchemy says a StaleDataError may be retried: it was
    assert 18 not in names(db_url)
    assert_clean(app)


# --- outside requests -------------------------------------------------------------------------------------


def test_a_script_with_the_request_of_prepare_commits_through_its_tm(app, db_url, mode):
    warmed(app, "person 7")
    env = prepare(registry=app.registry)
    try:
        request = env["request"]
        with request.tm:
            person = get(request, "person 7")
            person.name = "scripted"
        assert names(db_url)[7] == "scripted"
        with request.tm:
            request.dbsession.add(Person(id=504, name="scripted too"))
        assert names(db_url)[504] == "scripted too"
    finally:
        env["closer"]()
    assert_clean(app)


@pytest.mark.parametrize("mode", ["addon", "uncached"])  # "plain": the application's factory has no add-on listeners
def test_a_session_of_the_factory_outside_a_request_joins_nothing_and_commits_itself(app, db_url, mode):
    warmed(app, "person 8")
    factory = app.registry.getUtility(IDBSessionFactory)
    with transaction.manager, factory() as session:
        person = session.execute(by_name("person 8").options(_from_cache("short_term"))).scalars().one()
        person.name = "script"
        assert transaction.get()._resources == []
        assert list(transaction.get().getBeforeCommitHooks()) == []
        session.commit()
    assert names(db_url)[8] == "script"
    assert_clean(app)


def _from_cache(region):
    from pyramid_sessioncache import FromCache

    return FromCache(region)


def test_the_request_session_used_after_the_request(app, db_url, mode):
    web = warmed(app, "person 9")
    kept = []

    def view(request, name):
        kept.append(request.dbsession)
        kept.append(request)
        return {"name": get(request, name).name}

    scenario(view)
    web.get("/run/person 9")
    session, request = kept
    # A hit (or a query) after the request: joins the thread's manager in both modes, breaks nothing.
    with transaction.manager:
        if mode == "uncached":
            person = session.scalars(by_name("person 9")).one()
        else:
            person = session.execute(by_name("person 9").options(_from_cache("short_term"))).scalars().one()
        person.name = "late"
    assert names(db_url)[9] == "late"
    session.close()
    assert_clean(app)


# --- the starter's session factory handed over --------------------------------------------------------------


def starter_models(config, own_dbsession):
    """pyramid-cookiecutter-starter's models/__init__.py, handing its factory to the add-on."""
    from sqlalchemy import engine_from_config

    factory = sessionmaker(bind=engine_from_config(config.get_settings(), "sqlalchemy."))
    config.registry["dbsession_factory"] = factory
    config.set_sessioncache_session_factory(factory)

    if own_dbsession:

        def dbsession(request):
            return get_tm_session(factory, request.tm, request=request)

        config.add_request_method(dbsession, "dbsession", reify=True)
    return factory


def get_tm_session(session_factory, transaction_manager, request=None):
    dbsession = session_factory(info={"request": request})
    zope.sqlalchemy.register(dbsession, transaction_manager=transaction_manager)
    return dbsession


@pytest.mark.parametrize("own_dbsession", [True, False])
def test_the_starters_factory_handed_over(db_url, own_dbsession):
    config = Configurator(settings={"sqlalchemy.url": db_url, **SETTINGS, "attack.mode": "addon"})
    config.include("pyramid_sessioncache")
    factory = starter_models(config, own_dbsession)
    config.add_route("warm", "/warm/{name}")
    config.add_view(warm, route_name="warm", renderer="json")
    config.add_route("run", "/run/{name}")
    config.add_view(run, route_name="run", renderer="json")
    app = config.make_wsgi_app()
    app.engine = factory.kw["bind"]
    web = warmed(app, "person 10")
    scenario(lambda request, name: setattr(get(request, name), "name", "handed over"))
    web.get("/run/person 10")
    assert names(db_url)[10] == "handed over"
    # The starter's initialize_db script: get_tm_session() on the same factory, transaction.manager.
    with transaction.manager:
        session = get_tm_session(factory, transaction.manager)
        person = session.execute(by_name("person 11").options(_from_cache("short_term"))).scalars().one()
        person.name = "script"
    assert names(db_url)[11] == "script"
    assert_clean(app)
    SCENARIO.clear()
    app.engine.dispose()


# --- threads ------------------------------------------------------------------------------------------------


def test_concurrent_requests_each_hitting_and_changing(app, db_url, mode):
    warmed(app, *(f"person {i}" for i in range(1, 9)))

    def view(request, name):
        person = get(request, name)
        person.name = f"{name} by {threading.get_ident()}"
        return {"id": person.id}

    scenario(view)
    errors = []

    def client(i):
        try:
            TestApp(app).get(f"/run/person {i}")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(1, 9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    found = names(db_url)
    assert all(found[i].startswith(f"person {i} by ") for i in range(1, 9))
    assert app.engine.pool.checkedout() == 0


# --- every shared backend, every way to ask for a hit -------------------------------------------------------


@pytest.fixture(params=["memory", "file", "redis"])
def backend_settings(request, tmp_path):
    if request.param == "memory":
        return {}
    if request.param == "file":
        return {
            "cache.short_term.type": "file",
            "cache.short_term.data_dir": str(tmp_path / "cache"),
            "cache.short_term.lock_dir": str(tmp_path / "locks"),
            "sessioncache.secret": "a test secret, long enough",
        }
    return {
        "cache.short_term.type": "ext:redis",
        "cache.short_term.url": request.getfixturevalue("redis_url"),
        "sessioncache.secret": "a test secret, long enough",
    }


@pytest.mark.parametrize("how", ["cached_query", "FromCache", "scoped Session", "RelationshipCache"])
def test_every_backend_and_api_a_pure_hit_takes_no_connection_and_a_change_commits(db_url, backend_settings, how):
    import pyramid_sessioncache
    from pyramid_sessioncache import FromCache, RelationshipCache

    app = make_app(db_url, "addon", **backend_settings)
    web = TestApp(app)
    key = f"person {len(how)}"  # one row per way, so that redis entries of other cases do not matter

    def fetch(request, name):
        if how == "cached_query":
            return request.cached_query(by_name(name), region="short_term").scalars().one()
        stmt = by_name(name).options(FromCache("short_term"))
        if how == "RelationshipCache":
            stmt = stmt.options(RelationshipCache(Person.addresses, "short_term"))
        session = pyramid_sessioncache.Session() if how == "scoped Session" else request.dbsession
        return session.scalars(stmt).one()

    def warm_view(request, name):
        person = fetch(request, name)
        return {"street": person.addresses[0].street}

    scenario(warm_view)
    web.get(f"/run/{key}")
    web.get(f"/run/{key}")  # the relationship's entry too
    before = len(app.checkouts)
    assert web.get(f"/run/{key}").json == {"street": f"{len(how)} Main St"}
    if how == "RelationshipCache":
        assert len(app.checkouts) == before  # both hits: no connection
    else:
        assert len(app.checkouts) == before + 1  # the lazy load of addresses only

    def change(request, name):
        person = fetch(request, name)
        person.name = f"{how} changed"
        person.addresses[0].street = f"{how} street"

    scenario(change)
    web.get(f"/run/{key}")
    person_id = len(how)
    assert names(db_url)[person_id] == f"{how} changed"
    assert streets(db_url)[2 * person_id - 1] == f"{how} street"
    scenario(lambda request, name: {"n": len(fetch_all(request, name))})
    assert web.get(f"/run/{key}").json == {"n": 0}  # invalidated
    assert_clean(app)
    app.engine.dispose()


def fetch_all(request, name):
    return request.cached_query(by_name(name), region="short_term").scalars().all()


@pytest.mark.parametrize("mode", ["addon", "plain"])
def test_a_real_threaded_server_with_a_small_pool(db_url, mode):
    """waitress, 8 threads, a pool of 2 connections, no overflow: hits and changes at once."""
    import json
    import urllib.request

    app = make_app(
        db_url,
        mode,
        **{"sqlalchemy.pool_size": "2", "sqlalchemy.max_overflow": "0", "sqlalchemy.pool_timeout": "20"},
    )
    assert app.engine.pool.size() == 2
    warmed(app, *(f"person {i}" for i in range(1, 9)))

    def view(request, name):
        person = get(request, name)
        if request.params.get("change"):
            person.name = f"{name} {request.params['change']}"
        return {"name": person.name}

    scenario(view)
    server = ThreadServer(app, threads=8)
    errors = []

    def client(i):
        try:
            for round_ in range(3):
                change = "" if (i + round_) % 2 else f"?change={round_}"
                name = f"person%20{i}"
                with urllib.request.urlopen(f"{server.url}/run/{name}{change}", timeout=60) as response:
                    json.loads(response.read())
                if change:
                    # renamed: put it back, through a request too, for the next round's hit
                    scenario_name = f"person%20{i}%20{round_}"
                    url = f"{server.url}/run/{scenario_name}?restore=1"
                    with urllib.request.urlopen(url, timeout=60) as response:
                        json.loads(response.read())
        except Exception as exc:  # reported below
            errors.append(exc)

    def restoring_view(request, name):
        if request.params.get("restore"):
            person = request.dbsession.scalars(by_name(name)).one()
            person.name = name.rsplit(" ", 1)[0]
            return {"name": person.name}
        return view(request, name)

    scenario(restoring_view)
    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(1, 9)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        server.stop()
    assert errors == []
    assert all(names(db_url)[i] == f"person {i}" for i in range(1, 9))
    assert app.engine.pool.checkedout() == 0
    app.engine.dispose()


def never(request):
    return False


def test_a_hit_where_pyramid_tm_is_not_active_leaves_nothing_behind(db_url):
    """tm.activate_hook says no (static files, health checks): a pure hit must not hold a connection."""
    app = make_app(db_url, "addon", **{"tm.activate_hook": f"{__name__}.never"})
    web = warmed(app, "person 3")
    scenario(lambda request, name: {"name": get(request, name).name})
    before = len(app.checkouts)
    assert web.get("/run/person 3").json == {"name": "person 3"}
    assert len(app.checkouts) == before
    assert app.engine.pool.checkedout() == 0
    transaction.manager.abort()  # what the thread's next pyramid_tm begin() would do
    app.engine.dispose()
