"""The demo's seed data and the ``sessioncache-demo-seed`` command."""

from __future__ import annotations

import pytest
from sessioncache_demo import seed
from sessioncache_demo.models import Address, City, Country, Person, PostalCode
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session, selectinload


@pytest.fixture
def engine(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'seed.sqlite'}")
    yield engine
    engine.dispose()


def snapshot(engine) -> list[tuple]:
    with Session(engine) as session:
        people = session.scalars(select(Person).options(selectinload(Person.addresses)).order_by(Person.id))
        return [(p.id, p.name, [(a.id, a.street, a.postal_code_id) for a in p.addresses]) for p in people]


def count(engine, model) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(model))


def test_seed_is_deterministic(tmp_path, engine):
    assert seed.initialize(engine) is True
    other = create_engine(f"sqlite:///{tmp_path / 'other.sqlite'}")
    seed.initialize(other)
    assert snapshot(engine) == snapshot(other)
    other.dispose()


def test_seed_shape(engine):
    seed.initialize(engine)
    people = snapshot(engine)
    assert [p[0] for p in people] == list(range(1, seed.PEOPLE + 1))
    assert all(1 <= len(addresses) <= 3 for _, _, addresses in people)
    assert len({len(addresses) for _, _, addresses in people}) == 3
    assert count(engine, Country) == len(seed.PLACES)
    assert count(engine, City) == 20
    assert count(engine, PostalCode) == 20 * seed.POSTAL_CODES_PER_CITY
    with Session(engine) as session:
        address = session.get(Address, 1)
        assert address.country is address.postal_code.city.country


def test_initialize_is_idempotent(engine):
    assert seed.initialize(engine, people=5) is True
    assert seed.initialize(engine, people=5) is False
    assert count(engine, Person) == 5


def test_initialize_with_no_people_creates_the_tables(engine):
    assert seed.initialize(engine, people=0) is True
    assert count(engine, Person) == 0
    assert count(engine, Country) == len(seed.PLACES)


def test_a_concurrent_seed_is_not_an_error(engine, monkeypatch):
    seed.initialize(engine, people=3)
    # Another process seeded between our check and our commit.
    monkeypatch.setattr(seed, "is_seeded", lambda session: False)
    assert seed.initialize(engine, people=3) is False
    assert count(engine, Person) == 3


def test_reset_starts_again(engine):
    seed.initialize(engine, people=4)
    with Session(engine) as session, session.begin():
        session.get(Person, 1).name = "Changed"
    seed.reset(engine, people=4)
    assert snapshot(engine)[0][1] != "Changed"
    assert count(engine, Person) == 4


@pytest.fixture
def ini(tmp_path):
    path = tmp_path / "seed.ini"
    path.write_text(f"[app:main]\nuse = egg:sessioncache_demo\nsqlalchemy.url = sqlite:///{tmp_path}/cli.sqlite\n")
    return path


def test_command_seeds_then_leaves_alone_then_resets(ini, tmp_path, capsys):
    engine = create_engine(f"sqlite:///{tmp_path}/cli.sqlite")
    assert seed.main([str(ini), "--people", "7"]) == 0
    assert "seeded 7 people" in capsys.readouterr().out
    assert seed.main([str(ini)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert count(engine, Person) == 7
    assert seed.main([str(ini), "--reset", "--people", "2"]) == 0
    assert "reset and seeded 2 people" in capsys.readouterr().out
    assert count(engine, Person) == 2
    engine.dispose()


def test_command_refuses_negative_people(ini, capsys):
    with pytest.raises(SystemExit) as exc:
        seed.main([str(ini), "--people", "-1"])
    assert exc.value.code == 2
    assert "--people must not be negative" in capsys.readouterr().err
