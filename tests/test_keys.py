"""Cache keys: different rows never share a key; the same query keys the same everywhere."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from sqlalchemy import bindparam, create_engine, literal_column, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import selectinload, sessionmaker
from sqlalchemy.sql.expression import ColumnElement

from pyramid_sessioncache import FromCache, NotCacheableError, cache_parameters
from pyramid_sessioncache.engine.keys import KeyMaker

from .models import Person


def key(session, stmt, **kw):
    return cache_parameters(stmt, session=session, **kw)[1]


def test_every_bound_value_is_part_of_the_key(Session):
    with Session() as s:
        keys = {
            key(s, select(Person).where(Person.name == "a")),
            key(s, select(Person).where(Person.name == "b")),
            key(s, select(Person).where(Person.id == 1)),
            key(s, select(Person).where(Person.id == "1")),
            key(s, select(Person).where(Person.id.in_([1, 2]))),
            key(s, select(Person).where(Person.id.in_([1, 2, 3]))),
            key(s, select(Person).limit(5)),
            key(s, select(Person).limit(6)),
            key(s, select(Person).limit(5).offset(5)),
            key(s, select(Person).options(selectinload(Person.addresses))),
            key(s, select(Person)),
            key(s, select(Person.name)),
            key(s, select(Person).where(Person.name == bindparam("n")), parameters={"n": "a"}),
            key(s, select(Person).where(Person.name == bindparam("n")), parameters={"n": "b"}),
        }
        assert len(keys) == 14
        assert key(s, select(Person).where(Person.name == "a")) == key(s, select(Person).where(Person.name == "a"))


def test_query_and_select_share_a_key(Session):
    with Session() as s:
        query = s.query(Person).filter(Person.name == "x").limit(3)
        assert key(s, query) == key(s, select(Person).where(Person.name == "x").limit(3))


def test_cache_key_option_is_a_prefix_not_a_replacement(Session):
    with Session() as s:
        a = key(s, select(Person).where(Person.name == "a").options(FromCache("memory", "by_name")))
        b = key(s, select(Person).where(Person.name == "b").options(FromCache("memory", "by_name")))
        assert a.startswith("by_name:") and b.startswith("by_name:") and a != b


def test_execution_options_and_bind_are_part_of_the_key(Session, engine, cache, tmp_path):
    with Session() as s:
        plain = key(s, select(Person))
        translated = key(s, select(Person).execution_options(schema_translate_map={None: "other"}))
        assert plain != translated
        assert key(s, select(Person).execution_options(logging_token="x")) == plain
    other_engine = create_engine(f"sqlite:///{tmp_path / 'other.sqlite'}")  # a look at its pool opens it
    with sessionmaker(bind=other_engine, info=cache.session_info())() as s:
        assert key(s, select(Person)) != plain
    other_engine.dispose()
    with sessionmaker(
        bind=engine.execution_options(schema_translate_map={None: "x"}), info=cache.session_info()
    )() as s:
        assert key(s, select(Person)) != plain


class Opaque:
    """A value with no stable text: its repr holds a memory address."""


class NoCacheKey(ColumnElement):
    inherit_cache = False  # SQLAlchemy cannot key it, so neither can we


@compiles(NoCacheKey)
def _compile_no_cache_key(element, compiler, **kw):
    return "1"


def test_statements_that_cannot_be_keyed_run_uncached(Session, sql):
    unkeyable = [
        select(Person).where(Person.name == bindparam("n", value=Opaque(), literal_execute=False)).limit(0),
        select(Person, NoCacheKey()).where(Person.id == 1),
    ]
    with Session() as s:
        for stmt in unkeyable:
            with pytest.raises(NotCacheableError):
                key(s, stmt)
        sql.reset()
        people = s.execute(unkeyable[1].options(FromCache("memory"))).all()
        s.execute(unkeyable[1].options(FromCache("memory"))).all()
        assert len(people) == 1 and sql.count == 2
        s.execute(select(literal_column("1")).options(FromCache("memory"))).all()


def test_keys_are_the_same_in_another_process(Session, db_url):
    script = textwrap.dedent(
        f"""
        from sqlalchemy import create_engine, select
        from sqlalchemy.orm import selectinload, sessionmaker
        from pyramid_sessioncache import SessionCache, cache_parameters
        from tests.models import Person, Address
        cache = SessionCache({{"memory": {{"type": "memory"}}}})
        with sessionmaker(bind=create_engine({db_url!r}), info=cache.session_info())() as s:
            stmt = select(Person).where(Person.id.in_([1, 2])).options(selectinload(Person.addresses)).limit(2)
            print(cache_parameters(stmt, session=s)[1])
            print(cache_parameters(s.query(Address).filter(Address.street == "x"))[1])
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    with Session() as s:
        from .models import Address

        stmt = select(Person).where(Person.id.in_([1, 2])).options(selectinload(Person.addresses)).limit(2)
        assert out.stdout.split() == [key(s, stmt), key(s, s.query(Address).filter(Address.street == "x"))]


def test_key_maker_memory_is_bounded(engine):
    maker = KeyMaker()
    for i in range(2100):
        maker.key(select(Person).where(literal_column(f"{i}") == 1), None, {}, engine)
    assert len(maker._structures) <= 2000
