"""SQLAlchemy's ``examples/dogpile_caching``, loaded from a folder outside this repository.

The example is not part of this project and none of its code is copied
here: ``run.py --dogpile PATH`` names the folder of a SQLAlchemy checkout's
``examples/dogpile_caching``, and :func:`load` imports its
``caching_query.py`` (``ORMCache``, ``FromCache``) from there.  Its
``environment.py`` is not used (it wants data files and prompts on the
terminal): the regions and the Session factory are built here the way it
builds them, with the ``dogpile.cache`` package, which must be installed
(``pip install dogpile.cache``; it is not a dependency of this project).

Two regions, as the example would configure them: ``memory``
(``dogpile.cache.memory``: the cached ``FrozenResult`` is kept as is, ORM
objects included) and ``redis`` (``dogpile.cache.redis``, pickled, with the
example's md5 key mangler).
"""

from __future__ import annotations

import importlib.util
from hashlib import md5
from pathlib import Path
from types import ModuleType

from sqlalchemy.orm import sessionmaker


class DogpileExample:
    """The example's ``caching_query`` module, its regions, and Sessions that use them."""

    def __init__(self, module: ModuleType, redis_url: str | None) -> None:
        from dogpile.cache import make_region

        self.module = module
        self.regions = {"memory": make_region().configure("dogpile.cache.memory")}
        if redis_url:
            self.regions["redis"] = make_region(key_mangler=_md5_key_mangler).configure(
                "dogpile.cache.redis", arguments={"url": redis_url}
            )
        self.orm_cache = module.ORMCache(self.regions)

    def sessionmaker(self, engine) -> sessionmaker:
        """A Session factory whose Sessions run the example's ``do_orm_execute`` hook."""
        factory = sessionmaker(bind=engine)
        self.orm_cache.listen_on_session(factory)
        return factory

    def from_cache(self, region: str):
        """The example's ``FromCache`` option for ``region``."""
        return self.module.FromCache(region)

    def clear(self) -> None:
        """Empty the regions (so that another database's run starts cold)."""
        for region in self.regions.values():
            region.invalidate(hard=True)


def _md5_key_mangler(key: str) -> str:
    # environment.py's md5_key_mangler: the example's keys are long strings.
    return md5(key.encode("ascii")).hexdigest()


def load(folder: str | Path, redis_url: str | None = None) -> DogpileExample:
    """Import ``caching_query.py`` from ``folder`` and set the example up.

    Raises ``FileNotFoundError`` when the folder has no ``caching_query.py``
    and ``ImportError`` when ``dogpile.cache`` is not installed.
    """
    path = Path(folder).expanduser().resolve() / "caching_query.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: --dogpile wants SQLAlchemy's examples/dogpile_caching folder")
    spec = importlib.util.spec_from_file_location("dogpile_caching_example_caching_query", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return DogpileExample(module, redis_url)
