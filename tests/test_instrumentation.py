"""Classes with alternative instrumentation (``sqlalchemy.ext.instrumentation``) are never cached.

Such a class keeps each object's attributes where its instrumentation
manager says, not in the object's ``__dict__``, and its class manager where
a hit's checks do not look: a local hit served its objects unchecked (one
whose relationship was expired since, as it was).  Its statements now run
uncached; other classes of the process are cached as before.

Using the extension installs SQLAlchemy's extended lookups for the whole
process, for good: the test runs in a process of its own.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent(
    """
    from sqlalchemy import ForeignKey, create_engine, event, select
    from sqlalchemy.ext.instrumentation import InstrumentationManager
    from sqlalchemy.orm import Mapped, Session, declarative_base, mapped_column, relationship, selectinload

    from pyramid_sessioncache import SessionCache, cached_query


    class ElsewhereDict(InstrumentationManager):
        # Each object's attributes in a dictionary of their own, not its __dict__.
        def install_state(self, class_, instance, state):
            instance.__dict__["_state"] = state

        def remove_state(self, class_, instance):
            del instance.__dict__["_state"]

        def state_getter(self, class_):
            return lambda instance: instance.__dict__["_state"]

        def get_instance_dict(self, class_, instance):
            return instance.__dict__.setdefault("_attributes", {})

        def dict_getter(self, class_):
            return lambda instance: self.get_instance_dict(class_, instance)


    Base = declarative_base()


    class Parent(Base):
        __tablename__ = "parent"
        __sa_instrumentation_manager__ = ElsewhereDict
        id: Mapped[int] = mapped_column(primary_key=True)
        children = relationship("Child")


    class Child(Base):
        __tablename__ = "child"
        __sa_instrumentation_manager__ = ElsewhereDict
        id: Mapped[int] = mapped_column(primary_key=True)
        parent_id: Mapped[int] = mapped_column(ForeignKey("parent.id"))


    class Plain(declarative_base(metadata=Base.metadata)):  # one instrumentation per hierarchy
        __tablename__ = "plain"
        id: Mapped[int] = mapped_column(primary_key=True)


    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as setup:
        setup.add_all([Parent(id=1, children=[Child(id=1), Child(id=2)]), Plain(id=1)])
        setup.commit()
    statements = []
    event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    regions = {"local": {"type": "ext:local_session"}, "memory": {"type": "memory"}}
    cache = SessionCache(regions, secret="a test secret, not for production")

    for region in regions:
        with Session(engine, info=cache.session_info()) as session:

            def parents():
                query = select(Parent).options(selectinload(Parent.children))
                return cached_query(session, query, region).scalars().all()

            (parent,) = parents()
            assert "children" in parent._attributes and "children" not in vars(parent)
            statements.clear()
            assert parents() == [parent] and statements, f"{region}: runs uncached, every time"
            session.expire(parent, ["children"])
            statements.clear()
            assert parents() == [parent] and statements, f"{region}: runs uncached, every time"
            assert sorted(child.id for child in parent._attributes["children"]) == [1, 2]

            (plain,) = cached_query(session, select(Plain), region).scalars().all()
            statements.clear()
            assert cached_query(session, select(Plain), region).scalars().all() == [plain]
            assert not statements, f"{region}: a class of default instrumentation is cached as before"
    print("ok")
    """
)


def run_child(script: str) -> None:
    """Run ``script`` in a Python process of its own, from the checkout; it must print ``ok`` alone."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_a_class_of_alternative_instrumentation_runs_uncached_and_others_stay_cached():
    run_child(CHILD)
