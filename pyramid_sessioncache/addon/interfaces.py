"""Marker interfaces for what the add-on registers on the Pyramid registry."""

from zope.interface import Interface


class ISessionCache(Interface):
    """The application's :class:`~pyramid_sessioncache.SessionCache`."""


class IDBSessionFactory(Interface):
    """The application's ``sessionmaker``: handed over, or built for the add-on's ``request.dbsession``."""
