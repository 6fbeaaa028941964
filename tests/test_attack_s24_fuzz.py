"""The differential fuzzer (``test_differential.py``) with a larger vocabulary.

Reviews of the fuzzer's books, in a ``MetaData`` of their own: their
``column_property`` reads other tables (a book's title, its genres through
the association table), the database sets a review's book to NULL when the
book goes and deletes it with its author (``ON DELETE SET NULL`` /
``CASCADE`` across two ``MetaData``), triggers log every change of a review
into another table, and a view joining reviews, books and authors is mapped
as a class.  Reads load relationships by every loader with
``RelationshipCache`` (a legacy ``Query`` too); writes use the ORM bulk API
(``insert().returning()`` of entities, upserts with ``populate_existing``,
bulk by primary key, ``update().returning()`` with each
``synchronize_session``, legacy ``Query.update()``/``delete()``) and SQL
text, in the cached world's Sessions or, with a ``file`` or Redis region,
in another process with a cache of its own over the same storage (its
commits reach the cached world through the backend alone).  The fuzzer's
own vocabulary is drawn too.

Swept: 570 seeds on SQLite (``local``, ``memory``, ``file``, ``redis``,
``near``; 200 or 400 steps) and 135 on PostgreSQL (``memory``, ``file``,
``redis``; 200 or 300 steps).  One disagreement, left out of the vocabulary:
``immediateload()`` onto an object the Session holds expired (see
``reviews_of_book_loader``), bookkeeping rather than a value.
"""

from __future__ import annotations

import functools
import multiprocessing
import random
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    delete,
    func,
    insert,
    make_url,
    select,
    text,
    update,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    column_property,
    joinedload,
    lazyload,
    mapped_column,
    relationship,
    selectinload,
    subqueryload,
    undefer,
)

from pyramid_sessioncache import FromCache, RelationshipCache, cached_query

from .test_differential import (
    AUTHORS,
    BOOKS,
    READS,
    WRITES,
    WRITES_ALSO,
    Author,
    Book,
    Genre,
    PlainProcess,
    Step,
    book_genre,
    cached_world,
    draw_steps,
    plain,
    run_scenario,
    seed_db,
    snapshot,
    sqlite_engine,
)


class S24Base(DeclarativeBase):
    """The reviews' models, on a MetaData of their own."""


class Review(S24Base):
    """A review of a book (NULL once the book is deleted) by an author (deleted with them)."""

    __tablename__ = "fz24_review"

    id: Mapped[int] = mapped_column(primary_key=True)
    book_id: Mapped[int | None] = mapped_column(ForeignKey(Book.__table__.c.id, ondelete="SET NULL"))
    author_id: Mapped[int] = mapped_column(ForeignKey(Author.__table__.c.id, ondelete="CASCADE"))
    stars: Mapped[int] = mapped_column(Integer)
    book: Mapped[Book | None] = relationship(Book)
    author: Mapped[Author] = relationship(Author)


# Loaded with every review: values of other tables.
Review.book_title = column_property(select(Book.title).where(Book.id == Review.book_id).scalar_subquery())
Review.first_genre = column_property(
    select(func.min(Genre.name))
    .where(Genre.id == book_genre.c.genre_id, book_genre.c.book_id == Review.book_id)
    .scalar_subquery()
)


# Deferred: loaded on access, by a statement of its own, or undeferred.
Review.author_name = column_property(
    select(Author.name).where(Author.id == Review.author_id).scalar_subquery(), deferred=True
)


class ReviewLog(S24Base):
    """What the triggers write: a line per review changed or deleted."""

    __tablename__ = "fz24_review_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    review_id: Mapped[int] = mapped_column(Integer)
    what: Mapped[str] = mapped_column(String(50))


review_view = Table(
    "fz24_review_view",
    MetaData(),
    Column("id", Integer, primary_key=True),
    Column("stars", Integer),
    Column("title", String(50)),
    Column("author_name", String(50)),
)


class ReviewRow(S24Base):
    """A class mapped to the view of reviews with their book's title and author's name."""

    __table__ = review_view


REVIEWS = 12

#: The triggers' writes, and on SQLite the view (PostgreSQL's catalog names it).
S24_WRITES_ALSO = {
    "sqlite": {
        **WRITES_ALSO["sqlite"],
        "fz_book": [*WRITES_ALSO["sqlite"]["fz_book"], "fz24_review_view"],
        "fz_author": ["fz24_review_view"],
        "fz24_review": ["fz24_review_log", "fz24_review_view"],
    },
    "postgresql": {**WRITES_ALSO["postgresql"], "fz24_review": ["fz24_review_log"]},
}

_VIEW = (
    "CREATE VIEW fz24_review_view AS SELECT r.id AS id, r.stars AS stars, b.title AS title, a.name AS author_name "
    "FROM fz24_review r LEFT JOIN fz_book b ON b.id = r.book_id JOIN fz_author a ON a.id = r.author_id"
)


def seed_reviews(engine) -> None:
    """The fuzzer's database (:func:`seed_db`), with the reviews, their log's triggers and their view."""
    seed_db(engine)
    S24Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(text(_VIEW))
        if conn.dialect.name == "sqlite":
            for event_name, row, what in (("UPDATE", "NEW", "'update ' || NEW.stars"), ("DELETE", "OLD", "'delete'")):
                conn.execute(
                    text(
                        f"CREATE TRIGGER fz24_log_{event_name.lower()} AFTER {event_name} ON fz24_review BEGIN "
                        f"INSERT INTO fz24_review_log (review_id, what) VALUES ({row}.id, {what}); END"
                    )
                )
        else:
            conn.execute(
                text(
                    "CREATE FUNCTION fz24_log() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                    "IF TG_OP = 'DELETE' THEN INSERT INTO fz24_review_log (review_id, what) VALUES (OLD.id, 'delete'); "
                    "RETURN OLD; END IF; "
                    "INSERT INTO fz24_review_log (review_id, what) VALUES (NEW.id, 'update ' || NEW.stars); "
                    "RETURN NEW; END $$"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER fz24_log AFTER UPDATE OR DELETE ON fz24_review "
                    "FOR EACH ROW EXECUTE FUNCTION fz24_log()"
                )
            )
        conn.execute(
            insert(Review),
            [
                {"id": i, "book_id": None if i % 5 == 0 else i, "author_id": i % AUTHORS + 1, "stars": i % 5}
                for i in range(1, REVIEWS + 1)
            ],
        )


# -- the reads ---------------------------------------------------------------------------------------------------


def _loaded(rows: list, held: list, related: list) -> tuple:
    """A ``call`` read's outcome: its rows, and the objects it returned and reached, as the fuzzer compares them."""
    held.extend(v for row in rows for v in row if hasattr(v, "_sa_instance_state"))
    held.extend(r for r in related if r is not None)
    objects = [snapshot(v) for row in rows for v in row if hasattr(v, "_sa_instance_state")]
    return ("rows", plain(rows), objects, plain(related), [snapshot(r) for r in related if r is not None])


def _with_relationship_cache(world, stmt, region, *attributes):
    """``stmt``, in the cached world with ``RelationshipCache`` of ``attributes``."""
    if not world.cached:
        return stmt
    option = RelationshipCache(attributes[0], region)
    for attribute in attributes[1:]:
        option = option.and_(RelationshipCache(attribute, region))
    return stmt.options(option)


def _s24_reads() -> list[tuple[str, Any]]:
    def reviews(rng):
        return select(Review).where(Review.stars >= rng.choice([0, 3])).order_by(Review.id), False

    def review_columns(rng):
        stmt = select(Review.id, Review.book_title, Review.first_genre, Review.stars)
        return stmt.where(Review.author_id <= rng.choice([3, 8])).order_by(Review.id), False

    def reviews_of_book_loader(rng):
        # Not immediateload(): onto an object the Session holds expired, the
        # query refreshes it whole, a hit fills its columns and leaves its
        # unloaded relationships listed as expired (they load on access, by
        # the same SQL, to the same values): bookkeeping the fuzzer compares.
        loader = rng.choice([selectinload, joinedload, subqueryload, lazyload])
        low = rng.choice([0, 6])
        with_from_cache = rng.random() < 0.5

        def call(world, session, region, held):
            stmt = select(Review).options(loader(Review.book)).where(Review.id > low).order_by(Review.id)
            stmt = _with_relationship_cache(world, stmt, region, Review.book, Book.genres)
            if world.cached and with_from_cache:
                stmt = stmt.options(FromCache(region))
            found = session.scalars(stmt).all()
            related = [review.book for review in found]
            genres = [genre for book in related if book is not None for genre in book.genres]
            return _loaded([(r,) for r in found], held, related + genres)

        return ("call", call), False

    def authors_books_loader(rng):
        loader = rng.choice([selectinload, joinedload, subqueryload, lazyload])
        top = rng.choice([2, 5])
        through_query = rng.random() < 0.5

        def call(world, session, region, held):
            stmt = select(Author).options(loader(Author.books)).where(Author.id <= top).order_by(Author.id)
            stmt = _with_relationship_cache(world, stmt, region, Author.books, Book.genres, Book.author)
            if world.cached and through_query:
                result = cached_query(session, stmt, region=region)
            else:
                result = session.execute(stmt)
            found = result.unique().scalars().all()
            books = [book for author in found for book in author.books]
            genres = [genre for book in books for genre in book.genres]
            return _loaded([(a,) for a in found], held, books + genres)

        return ("call", call), False

    def legacy_query_with_relationships(rng):
        low = rng.choice([1, 7])
        with_from_cache = rng.random() < 0.5

        def call(world, session, region, held):
            query = session.query(Review).filter(Review.id >= low).order_by(Review.id)
            if world.cached:
                option = RelationshipCache(Review.author, region).and_(RelationshipCache(Author.books, region))
                query = query.options(option, *([FromCache(region)] if with_from_cache else []))
            found = query.all()
            authors = [review.author for review in found]
            books = [book for author in authors for book in author.books]
            return _loaded([(r,) for r in found], held, authors + books)

        return ("call", call), False

    def view_rows(rng):
        return select(ReviewRow).where(ReviewRow.stars >= rng.choice([0, 2])).order_by(ReviewRow.id), False

    def view_columns(rng):
        stmt = select(review_view.c.author_name, func.count(), func.sum(review_view.c.stars))
        return stmt.group_by(review_view.c.author_name).order_by(review_view.c.author_name), False

    def review_log(rng):
        return select(ReviewLog.review_id, ReviewLog.what).order_by(ReviewLog.id), False

    def text_join(rng):
        sql = text(
            "SELECT r.id, b.title FROM fz24_review r LEFT JOIN fz_book b ON b.id = r.book_id "
            "WHERE r.stars >= :s ORDER BY r.id"
        ).bindparams(s=rng.choice([0, 2]))
        return sql, False

    def review_get(rng):
        return ("get", Review, rng.choice([1, 5, 10, 12])), False

    def reviewed_authors(rng):
        stmt = select(Author.id, Author.name).where(Author.id.in_(select(Review.author_id).where(Review.stars >= 2)))
        return stmt.order_by(Author.id), False

    return [(f.__name__, f) for f in list(locals().values()) if callable(f)]


S24_READS = _s24_reads()


def _s24_more_reads() -> list[tuple[str, Any]]:
    def by_column_property(rng):
        stmt = select(Review).where(Review.book_title == rng.choice(["book 3", "retitled", "book 12"]))
        return stmt.options(undefer(Review.author_name)).order_by(Review.first_genre, Review.id), False

    def reviews_refreshed(rng):
        stmt = select(Review).where(Review.id <= rng.choice([3, 12])).order_by(Review.id)
        return stmt.execution_options(populate_existing=True), False

    def books_reviewed(rng):
        reviewed = select(Review.book_id).where(Review.stars >= rng.choice([1, 4]))
        return select(Book).where(Book.id.in_(reviewed)).order_by(Book.id), False

    def review_author_names(rng):
        stmt = select(Review.id, Review.author_name).where(Review.id >= rng.choice([1, 8]))
        return stmt.order_by(Review.id), False

    return [(f.__name__, f) for f in list(locals().values()) if callable(f)]


S24_MORE_READS = _s24_more_reads()


# -- the writes --------------------------------------------------------------------------------------------------


def review_rate(session, rng):
    review = session.get(Review, rng.randint(1, REVIEWS + 2))
    if review is not None:
        review.stars = rng.randint(0, 5)


def review_delete(session, rng):
    review = session.get(Review, rng.randint(1, REVIEWS))
    if review is not None:
        session.delete(review)


def review_add(session, rng):
    session.add(Review(id=rng.randint(100, 300), book_id=rng.randint(1, BOOKS), author_id=rng.randint(1, 4), stars=5))


def review_insert_returning(session, rng):
    base = rng.randint(400, 900)
    rows = [{"id": base + i, "book_id": rng.randint(1, BOOKS), "author_id": 2, "stars": i} for i in range(2)]
    session.scalars(insert(Review).returning(Review), rows).all()


def review_upsert_returning(session, rng):
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    stmt = dialect_insert(Review).values(id=rng.choice([1, 2, 77]), author_id=1, stars=rng.randint(0, 5))
    stmt = stmt.on_conflict_do_update(index_elements=["id"], set_={"stars": stmt.excluded.stars}).returning(Review)
    session.scalars(stmt, execution_options={"populate_existing": rng.random() < 0.5}).all()


def review_update_returning(session, rng):
    stmt = update(Review).where(Review.author_id == rng.randint(1, 4)).values(stars=Review.stars + 1)
    sync = rng.choice(["auto", "fetch", "evaluate", False])
    session.execute(stmt.returning(Review.id), execution_options={"synchronize_session": sync}).all()


def review_bulk_by_primary_key(session, rng):
    ids = rng.sample(range(1, REVIEWS + 1), 3)
    session.execute(
        update(Review), [{"id": i, "stars": rng.randint(0, 5), "book_id": rng.randint(1, BOOKS)} for i in ids]
    )


def review_bulk_delete(session, rng):
    session.execute(
        delete(Review).where(Review.stars <= rng.randint(0, 2)),
        execution_options={"synchronize_session": rng.choice(["auto", "fetch", "evaluate", False])},
    )


def review_text(session, rng):
    sql = rng.choice(
        [
            "UPDATE fz24_review SET book_id = NULL WHERE id = :x",
            "DELETE FROM fz24_review WHERE id = :x",
            "UPDATE fz_book SET title = 'retitled' WHERE id = :x",
        ]
    )
    session.execute(text(sql), {"x": rng.randint(1, REVIEWS)})


def book_delete_sets_null(session, rng):
    book = session.get(Book, rng.randint(1, BOOKS))
    if book is not None:
        session.delete(book)


def author_delete_cascades(session, rng):
    session.execute(text("DELETE FROM fz_author WHERE id = :x"), {"x": rng.randint(4, AUTHORS)})


def review_query_update(session, rng):
    query = session.query(Review).filter(Review.book_id == rng.randint(1, BOOKS))
    query.update({"stars": rng.randint(0, 5)}, synchronize_session=rng.choice(["auto", "fetch", "evaluate", False]))


def review_query_delete(session, rng):
    query = session.query(Review).filter(Review.author_id == rng.randint(1, AUTHORS))
    query.delete(synchronize_session=rng.choice(["auto", "fetch", False]))


def review_insert_or_ignore(session, rng):
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    rows = [{"id": rng.choice([3, 60, 61]), "author_id": 3, "stars": 4, "book_id": None}]
    session.execute(dialect_insert(Review).on_conflict_do_nothing(), rows)


S24_WRITES = [
    review_query_update,
    review_query_delete,
    review_insert_or_ignore,
    review_rate,
    review_delete,
    review_add,
    review_insert_returning,
    review_upsert_returning,
    review_update_returning,
    review_bulk_by_primary_key,
    review_bulk_delete,
    review_text,
    book_delete_sets_null,
    author_delete_cascades,
]


class S24Step(Step):
    """A step drawn from the fuzzer's vocabulary and the reviews' (twice as often)."""

    def __init__(self, rng: random.Random, number: int, profile: int = 0):
        super().__init__(rng, number, profile)
        self.read = rng.choice(READS + (S24_READS + S24_MORE_READS) * 2)
        self.write = rng.choice(WRITES + S24_WRITES * 2)
        self.writes = [rng.choice(WRITES + S24_WRITES * 2) for _ in range(rng.randint(1, 3))]
        draw = rng.random()
        if (self.outsider == "session" and draw < 0.5) or (self.outsider is None and draw < 0.1):
            self.outsider = "process"  # another process over the same storage (file, Redis), else a Session


draw_s24_steps = functools.partial(draw_steps, step_class=S24Step)


class OutsiderProcess:
    """Another process with a :class:`~pyramid_sessioncache.SessionCache` over the cached world's storage.

    It writes and commits what a step asks for: its commits reach the
    cached world through the backend alone (every cache of one process
    hears the process's writes; another process hears nothing).
    """

    def __init__(self, seed: int, url: str, regions: dict, writes_also: dict) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=serve_outsider, args=(child,), daemon=True)
        self.process.start()
        child.close()
        self._ask("start", seed, url, regions, writes_also)

    def _ask(self, *message) -> Any:
        self.conn.send(message)
        if not self.conn.poll(60):
            raise TimeoutError("the outsider process did not answer")
        answer = self.conn.recv()
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def write(self, step: Step) -> Any:
        return self._ask("write", step.number)

    def close(self) -> None:
        self.conn.send(("exit",))
        self.process.join(10)
        self.conn.close()


def serve_outsider(conn) -> None:
    """The outsider process: run the writes of the steps it is asked for, each committed in a Session of its own."""
    from sqlalchemy.orm import sessionmaker

    from pyramid_sessioncache import SessionCache

    from .conftest import SECRET
    from .test_differential import engine_for, guarded, session_settings

    makers = steps = None
    while True:
        message = conn.recv()
        try:
            if message[0] == "exit":
                return
            if message[0] == "start":
                _, seed, url, regions, writes_also = message
                cache = SessionCache(regions, default_region="local", secret=SECRET, writes_also=writes_also)
                engine = engine_for(url)
                maker = sessionmaker(engine, info=cache.session_info(), **session_settings(seed))
                steps, makers = {}, (seed, maker)
                answer = None
            else:
                seed, maker = makers
                number = message[1]
                if number not in steps:
                    steps.update(enumerate(draw_s24_steps(seed, number + 50)))
                step = steps[number]
                writer = maker()

                def outside(writer=writer, step=step):
                    with writer:
                        step.write(writer, random.Random(step.seed))
                        writer.commit()
                    return ("wrote",)

                answer = guarded(writer, outside)
        except Exception as error:  # reported to the test
            answer = error
        conn.send(answer)


# -- the scenarios -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_process() -> Iterator[PlainProcess]:
    """The process of the plain world, for the module's scenarios."""
    process = PlainProcess()
    try:
        yield process
    finally:
        process.close()


STEPS = 140


def outsider_for(world, seed: int, kind: str, url: str, tmp_path, request) -> OutsiderProcess | None:
    """For a region shared between processes (``file``, ``redis``): another process writing, set as ``world``'s outsider."""
    regions: dict[str, dict] = {"local": {"type": "ext:local_session"}}
    if kind == "file":  # as cached_world() has it
        regions["shared"] = {"type": "file", "data_dir": str(tmp_path / "cache"), "lock_dir": str(tmp_path / "locks")}
    elif kind == "redis":
        regions["shared"] = {"type": "ext:redis", "url": request.getfixturevalue("redis_url")}
    else:
        return None
    outsider = OutsiderProcess(seed, url, regions, S24_WRITES_ALSO[world.engine.dialect.name])
    world.outsider = outsider.write
    return outsider


def run_world(seed: int, kind: str, engine, url: str, plain_url: str, tmp_path, request, plain_process, steps: int):
    world = cached_world(seed, kind, engine, tmp_path, request, writes_also=S24_WRITES_ALSO)
    outsider = outsider_for(world, seed, kind, url, tmp_path, request)
    try:
        run_scenario(seed, draw_s24_steps(seed, steps), world, plain_process, plain_url, draw=draw_s24_steps)
    finally:
        if outsider is not None:
            outsider.close()


def run_sqlite(seed: int, kind: str, tmp_path, request, plain_process, steps: int = STEPS) -> None:
    template = tmp_path / "template.sqlite"
    engine = sqlite_engine(template)
    seed_reviews(engine)
    engine.dispose()
    shutil.copyfile(template, tmp_path / "cached.sqlite")
    shutil.copyfile(template, tmp_path / "plain.sqlite")
    cached_engine = sqlite_engine(tmp_path / "cached.sqlite")
    try:
        url, plain_url = (f"sqlite:///{tmp_path / name}" for name in ("cached.sqlite", "plain.sqlite"))
        run_world(seed, kind, cached_engine, url, plain_url, tmp_path, request, plain_process, steps)
    finally:
        cached_engine.dispose()


def run_postgresql(seed: int, kind: str, postgres_url, tmp_path, request, plain_process, steps: int = STEPS) -> None:
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    names = [f"fz24_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    with admin.connect() as conn:
        for name in names:
            conn.execute(text(f"CREATE DATABASE {name}"))
    urls = [make_url(postgres_url).set(database=name).render_as_string(hide_password=False) for name in names]
    engine = create_engine(urls[0])
    try:
        seed_reviews(engine)
        plain_seeding = create_engine(urls[1])
        seed_reviews(plain_seeding)
        plain_seeding.dispose()
        run_world(seed, kind, engine, urls[0], urls[1], tmp_path, request, plain_process, steps)
    finally:
        engine.dispose()
        with admin.connect() as conn:
            for name in names:
                conn.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
        admin.dispose()


SEEDS = [(0, "local"), (1, "memory"), (2, "file"), (3, "redis"), (6, "near")]


@pytest.mark.parametrize(("seed", "kind"), SEEDS, ids=[f"{kind}-{seed}" for seed, kind in SEEDS])
def test_cached_reads_equal_uncached_reads_with_reviews_sqlite(seed, kind, tmp_path, request, plain_process):
    run_sqlite(seed, kind, tmp_path, request, plain_process)


PG_SEEDS = [(4, "memory"), (5, "redis")]


@pytest.mark.parametrize(("seed", "kind"), PG_SEEDS, ids=[f"pg-{kind}-{seed}" for seed, kind in PG_SEEDS])
def test_cached_reads_equal_uncached_reads_with_reviews_postgresql(
    seed, kind, postgres_url, tmp_path, request, plain_process
):
    run_postgresql(seed, kind, postgres_url, tmp_path, request, plain_process)
