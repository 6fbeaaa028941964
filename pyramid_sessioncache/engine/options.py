"""The ORM options that ask for caching: ``FromCache`` and ``RelationshipCache``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import QueryableAttribute, RelationshipProperty
from sqlalchemy.orm.interfaces import UserDefinedOption

from .. import _sqlalchemy
from ..errors import InvalidOptionError
from ..storage.options import MAX_EXPIRE, check_expire
from .cache_options import MAX_LABEL, check_label, check_region_argument

if TYPE_CHECKING:
    from .cache import SessionCache


class FromCache(UserDefinedOption):
    """Load a query's result from a cache region, storing it there on a miss.

    :param region: the name of a configured region; ``None`` means the
        application's default region (``sessioncache.default_region``).
    :param cache_key: an optional readable prefix for the entry's key: a
        printable string of at most 200 characters.  The statement and its
        parameters are always part of the key as well.
    :param expire: seconds to keep a new entry, instead of the region's
        ``expire``: an ``int`` from 1 to ten years, or None.
    :param cache: the :class:`~pyramid_sessioncache.SessionCache` to cache
        into, instead of the one the Session carries (see
        :func:`~pyramid_sessioncache.cache_of`).  ``request.cached_query()``
        passes the application's, so that any Session used as
        ``request.dbsession`` caches.  It is not part of the key.

    A bad ``region``, ``cache_key`` or ``expire`` raises
    :class:`~pyramid_sessioncache.InvalidOptionError` here, before any
    query runs.

    Works on a 2.0 ``select()`` and on a legacy ``Query``::

        stmt = select(Person).where(Person.name == name).options(FromCache("short_term"))
        people = session.execute(stmt).scalars().all()
    """

    propagate_to_loaders = False
    _listening = False
    #: Whether the option caches relationship loads only (not the statement it is given to).
    relationships_only = False

    def __init__(
        self,
        region: str | None = None,
        cache_key: str | None = None,
        expire: int | None = None,
        *,
        cache: SessionCache | None = None,
    ):
        # Made per call by cached_query(): a good value costs a type test, no call.
        if region is not None and type(region) is not str:
            check_region_argument(region)
        if cache_key is not None and not (
            type(cache_key) is str and len(cache_key) <= MAX_LABEL and cache_key.isprintable()
        ):
            check_label(cache_key)
        if expire is not None and not (type(expire) is int and 0 < expire <= MAX_EXPIRE):
            check_expire(expire)
        self.region = region
        self.cache_key = cache_key
        self.expire = expire
        self.cache = cache
        if not FromCache._listening:  # a caching option means nothing without the ORM hook
            _listen()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(region={self.region!r}, cache_key={self.cache_key!r}, expire={self.expire!r})"

    def _applies(self, loader_path: Any) -> FromCache | None:
        # The option caches the statement it was given, not the relationship
        # loads its objects run later (``loader_path``: see caching_option).
        return None if loader_path is not None else self


class RelationshipCache(FromCache):
    """Load the lazy loads of a relationship from a cache region.

    :param attribute: the relationship, e.g. ``Person.addresses``; anything
        else raises :class:`~pyramid_sessioncache.InvalidOptionError`.
    :param region: as for :class:`FromCache`; so are ``cache_key`` and
        ``expire``, checked as there.

    Chain several with :meth:`and_`; put the option on the query that loads
    the parents::

        opts = RelationshipCache(Person.addresses, "short_term").and_(
            RelationshipCache(Address.postal_code, "short_term"))
        session.scalars(select(Person).options(opts))

    Eager loads (``selectinload``, ``subqueryload``) of those relationships
    are not cached on their own: the entry of the query that asked for them
    holds them.
    """

    propagate_to_loaders = True
    relationships_only = True

    def __init__(
        self, attribute: Any, region: str | None = None, cache_key: str | None = None, expire: int | None = None
    ):
        prop = getattr(attribute, "property", None)
        if not isinstance(prop, RelationshipProperty):
            given = str(attribute) if isinstance(attribute, QueryableAttribute) else attribute  # Person.name
            raise InvalidOptionError(
                "attribute", given, "must be a relationship of a mapped class, such as Person.addresses"
            )
        super().__init__(region, cache_key, expire)
        self._relationships = {(prop.parent.class_, prop.key): self}

    def __repr__(self) -> str:
        names = ", ".join(f"{cls.__name__}.{key}" for cls, key in self._relationships)
        return f"RelationshipCache({names})"

    def and_(self, option: RelationshipCache) -> RelationshipCache:
        """Return a copy of this option that also caches ``option``'s relationships.

        ``option`` must be a :class:`RelationshipCache`; anything else raises
        :class:`~pyramid_sessioncache.InvalidOptionError`.
        """
        if not isinstance(option, RelationshipCache):
            raise InvalidOptionError("option", option, "and_() chains RelationshipCache options only")
        chained = RelationshipCache.__new__(RelationshipCache)
        chained.__dict__.update(self.__dict__)
        chained._relationships = {**self._relationships, **option._relationships}
        return chained

    def _applies(self, loader_path: Any) -> FromCache | None:
        if loader_path is None or len(loader_path) < 2:
            return None
        mapper, prop = loader_path[-2], loader_path[-1]
        for cls in mapper.class_.__mro__:
            option = self._relationships.get((cls, prop.key))
            if option is not None:
                return option
        return None


def _listen() -> None:
    from .hook import install  # not at the top: the hook reads these options

    install()
    FromCache._listening = True


def caching_option(statement: Any) -> FromCache | None:
    """Return the caching option that applies to executing ``statement``, or None.

    ``statement`` is what an ORM execution runs (``ORMExecuteState.statement``):
    ``FromCache`` applies to the statement it was given, a
    ``RelationshipCache`` to the relationship loads it names.
    """
    loader_path = False  # not looked up yet: most statements have no caching option
    for option in _sqlalchemy.statement_options(statement):
        if isinstance(option, FromCache):
            if loader_path is False:
                loader_path = _sqlalchemy.relationship_load_path(statement)
            applies = option._applies(loader_path)
            if applies is not None:
                return applies
    return None


def statement_option(statement: Any, relationships: bool = False) -> FromCache | None:
    """Return the first ``FromCache`` given to ``statement`` (the one naming its region), or None.

    With ``relationships=True``, a ``RelationshipCache`` counts too.
    """
    for option in _sqlalchemy.statement_options(statement):
        if isinstance(option, FromCache) and (relationships or not option.relationships_only):
            return option
    return None
