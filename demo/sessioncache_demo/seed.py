"""Creating the demo's tables and filling them with deterministic data.

The application calls :func:`initialize` when it starts, so ``pserve
development.ini`` works on an empty SQLite file.  From a shell::

    sessioncache-demo-seed development.ini          # create and seed if empty
    sessioncache-demo-seed development.ini --reset  # drop everything, seed again
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from collections.abc import Sequence

from sqlalchemy import Engine, engine_from_config, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .models import Address, Base, City, Country, Person, PostalCode

log = logging.getLogger(__name__)

#: How many people :func:`seed` creates by default.
PEOPLE = 300

#: Country -> its cities.
PLACES: dict[str, tuple[str, ...]] = {
    "United States": ("New York", "Chicago", "Seattle", "Austin"),
    "Canada": ("Toronto", "Montreal", "Vancouver", "Calgary"),
    "France": ("Paris", "Lyon", "Marseille", "Toulouse"),
    "Germany": ("Berlin", "Hamburg", "Munich", "Cologne"),
    "Japan": ("Tokyo", "Osaka", "Kyoto", "Sapporo"),
}
POSTAL_CODES_PER_CITY = 5

FIRST_NAMES = (
    "Ada", "Alan", "Barbara", "Brian", "Claude", "Dennis", "Donald", "Edsger", "Frances", "Grace",
    "Guido", "Hedy", "Ivan", "Jean", "John", "Ken", "Leslie", "Linus", "Margaret", "Niklaus",
)  # fmt: skip
LAST_NAMES = (
    "Allen", "Backus", "Cerf", "Dijkstra", "Engelbart", "Floyd", "Goldberg", "Hopper", "Iverson",
    "Knuth", "Lamport", "Liskov", "McCarthy", "Naur", "Ritchie", "Stroustrup", "Thompson", "Wirth",
)  # fmt: skip
STREETS = ("Main St", "Oak Ave", "Elm St", "Park Rd", "Lake Dr", "Hill St", "Mill Ln", "River Rd")


def seed(session: Session, people: int = PEOPLE, seed_value: int = 42) -> None:
    """Add the demo's rows to ``session`` (without committing).

    The same ``people`` and ``seed_value`` always give the same rows, with
    the same primary keys: person ``n`` has id ``n``, 1 to 3 addresses.
    """
    rng = random.Random(seed_value)
    postal_codes: list[PostalCode] = []
    city_id = postal_code_id = 0
    for country_id, (country_name, cities) in enumerate(PLACES.items(), start=1):
        country = Country(id=country_id, name=country_name)
        for city_name in cities:
            city_id += 1
            city = City(id=city_id, name=city_name, country=country)
            for n in range(POSTAL_CODES_PER_CITY):
                postal_code_id += 1
                postal_codes.append(PostalCode(id=postal_code_id, code=f"{city_id:02d}{n:03d}", city=city))
    session.add_all(postal_codes)
    address_id = 0
    for person_id in range(1, people + 1):
        first = FIRST_NAMES[(person_id - 1) % len(FIRST_NAMES)]
        last = LAST_NAMES[(person_id - 1) // len(FIRST_NAMES) % len(LAST_NAMES)]
        person = Person(id=person_id, name=f"{first} {last}")
        for _ in range(rng.randint(1, 3)):
            address_id += 1
            street = f"{rng.randint(1, 999)} {rng.choice(STREETS)}"
            person.addresses.append(Address(id=address_id, street=street, postal_code=rng.choice(postal_codes)))
        session.add(person)


def is_seeded(session: Session) -> bool:
    """Return True when the database already holds people."""
    return session.scalar(select(func.count()).select_from(Person)) > 0


def initialize(engine: Engine, people: int = PEOPLE) -> bool:
    """Create the tables if missing and seed them if empty.

    Idempotent: returns True when it seeded, False when the data was there
    already (also when another process seeded it at the same moment).
    """
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        if is_seeded(session):
            return False
        seed(session, people)
        try:
            session.commit()
        except IntegrityError:  # another process seeded first: same ids
            session.rollback()
            return False
    log.info("seeded the demo database with %d people", people)
    return True


def reset(engine: Engine, people: int = PEOPLE) -> None:
    """Drop the demo's tables, then create and seed them again."""
    Base.metadata.drop_all(engine)
    initialize(engine, people)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``sessioncache-demo-seed`` command: create and seed the demo database."""
    from pyramid.paster import get_appsettings, setup_logging

    parser = argparse.ArgumentParser(prog="sessioncache-demo-seed", description=__doc__.splitlines()[0])
    parser.add_argument("config_uri", help="the ini file, e.g. development.ini")
    parser.add_argument("--reset", action="store_true", help="drop the tables first, then seed again")
    parser.add_argument("--people", type=int, default=PEOPLE, help=f"how many people (default {PEOPLE})")
    args = parser.parse_args(argv)
    if args.people < 0:
        parser.error("--people must not be negative")
    setup_logging(args.config_uri)
    settings = get_appsettings(args.config_uri)
    engine = engine_from_config(settings, "sqlalchemy.")
    try:
        if args.reset:
            reset(engine, args.people)
            print(f"reset and seeded {args.people} people")
        elif initialize(engine, args.people):
            print(f"seeded {args.people} people")
        else:
            print("the database already holds people; nothing to do (use --reset to start again)")
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
