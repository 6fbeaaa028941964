"""What a shared entry holds: how its classes were mapped, in a text every process agrees on.

An entry records, per class, :func:`~pyramid_sessioncache.engine.values.mapping_text`;
unpickled where the class is mapped otherwise, it is refused (a miss).
The text must be the same in every process for the same models, or
processes would never share an entry.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import Integer, String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, mapped_column, sessionmaker

from pyramid_sessioncache.engine.values import CachedRows, StaleMappingError, mapping_text

from .models import Address, Person

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = textwrap.dedent(
    """
    from sqlalchemy import func, select
    from sqlalchemy.orm import class_mapper, column_property
    from pyramid_sessioncache.engine.values import mapping_text
    from tests.models import Address, Person
    Person.s18_count = column_property(
        select(func.count(Address.id)).where(Address.person_id == Person.id).scalar_subquery()
    )
    print(mapping_text(class_mapper(Person)), mapping_text(class_mapper(Address)))
    """
)


def test_the_mapping_text_is_the_same_in_every_process():
    """A column_property's subquery is labelled anonymously per process: the text must not show it."""
    runs = {
        subprocess.run([sys.executable, "-c", PROGRAM], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    }
    assert len(runs) == 1 and len(runs.pop().split()) == 2


class Base(DeclarativeBase):
    pass


def _mapped(**columns):
    namespace = {"__tablename__": "thing", "id": mapped_column(Integer, primary_key=True), **columns}
    return type("Thing", (Base,), namespace)


@pytest.mark.parametrize(
    "change",
    ["a column's type", "an attribute's key", "a column added"],
)
def test_the_mapping_text_changes_with_what_builds_the_objects(change):
    Base.registry.dispose()
    Base.metadata.clear()
    before = mapping_text(_mapped(name=mapped_column(String)).__mapper__)
    Base.registry.dispose()
    Base.metadata.clear()
    changed = {
        "a column's type": {"name": mapped_column(Integer)},
        "an attribute's key": {"label": mapped_column("name", String)},
        "a column added": {"name": mapped_column(String), "more": mapped_column(String)},
    }[change]
    after = mapping_text(_mapped(**changed).__mapper__)
    Base.registry.dispose()
    Base.metadata.clear()
    assert before != after


Thing: type | None = None  # the class an entry is pickled with: found here by name when unpickled


def test_an_entry_is_refused_where_its_class_is_mapped_otherwise(tmp_path):
    global Thing
    Base.registry.dispose()
    Base.metadata.clear()
    Thing = _mapped(name=mapped_column(String))
    engine = create_engine(f"sqlite:///{tmp_path / 'things.sqlite'}")
    try:
        Base.metadata.create_all(engine)
        with sessionmaker(engine)() as session:
            session.add_all([Thing(id=1, name="one"), Thing(id=2, name="two")])
            session.commit()
            value = CachedRows.from_result(session.execute(select(Thing)))
        stored = pickle.dumps(value)
        assert len(pickle.loads(stored).objects) == 2  # unpickled while mapped the same
        Base.registry.dispose()
        Base.metadata.clear()
        Thing = _mapped(name=mapped_column(String), more=mapped_column(String))  # the next deploy
        with pytest.raises(StaleMappingError, match="Thing"):
            pickle.loads(stored)
    finally:
        engine.dispose()
        Base.registry.dispose()
        Base.metadata.clear()
        Thing = None


def test_mapping_text_reads_addresses_too():
    assert mapping_text(Address.__mapper__) != mapping_text(Person.__mapper__)
