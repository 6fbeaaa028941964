"""Console scripts: ``sessioncache-invalidate``, for writes made by other programs.

Run it after a migration, a cron job or anything that writes the database
without going through a process that includes the add-on::

    sessioncache-invalidate production.ini person address
    sessioncache-invalidate production.ini          # every entry

It builds the application's regions from the ini file's settings, as the
application does, and bumps the versions of the named tables in every
shared region; every process sharing those regions (``file``,
``ext:redis``...) stops serving what read them.  ``memory`` and
``ext:local_session`` regions live inside each application process: no
script can reach them, so they are listed as skipped.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pyramid.paster import get_appsettings, setup_logging

from ..engine.cache import SessionCache
from .settings import parse_settings


def invalidate(argv: Sequence[str] | None = None) -> int:
    """The ``sessioncache-invalidate`` command; returns its exit status."""
    parser = argparse.ArgumentParser(
        prog="sessioncache-invalidate",
        description="Invalidate the cached entries that read the named tables (every entry if none is named), "
        "in every process that shares the application's cache regions.",
    )
    parser.add_argument("config_uri", help="the application's ini file, e.g. production.ini")
    parser.add_argument("tables", nargs="*", help="table names; none: every entry")
    parser.add_argument("--app", default="main", help="the app section's name (default: main)")
    args = parser.parse_args(argv)
    setup_logging(args.config_uri)
    settings = parse_settings(get_appsettings(args.config_uri, name=args.app))
    cache = SessionCache(
        settings.regions,
        settings.default_region,
        settings.invalidation,
        settings.retry_after,
        settings.secret,
        writes_also=settings.writes_also,
    )
    cache.invalidate_tables(*args.tables)
    what = ", ".join(args.tables) or "every table"
    if settings.invalidation != "auto":  # the entries record no tables: every entry was forgotten
        what = f"every entry (sessioncache.invalidation = {settings.invalidation})"
    failed = False
    for name, region in cache.regions.items():
        if region.out_of_process:
            if region.unpublished:
                print(f"{name}: FAILED, the backend did not answer ({what})", file=sys.stderr)
                failed = True
            else:
                print(f"{name}: invalidated {what}")
        else:
            print(f"{name}: skipped ({region.type} lives inside each application process)")
    return 1 if failed else 0


def notify(argv: Sequence[str] | None = None) -> int:
    """The ``sessioncache-notify`` command: install or remove PostgreSQL's notification triggers."""
    from sqlalchemy import engine_from_config

    from ..engine.invalidation import notify as postgresql

    parser = argparse.ArgumentParser(
        prog="sessioncache-notify",
        description="Install (or remove) the statement triggers that tell every process with "
        "sessioncache.postgresql_notify = true of each committed write, whoever makes it.",
    )
    parser.add_argument("action", choices=["install", "remove"])
    parser.add_argument("config_uri", help="the application's ini file (its sqlalchemy.url)")
    parser.add_argument("--schema", default="public", help="the schema whose tables get triggers (default: public)")
    parser.add_argument("--app", default="main", help="the app section's name (default: main)")
    args = parser.parse_args(argv)
    setup_logging(args.config_uri)
    engine = engine_from_config(get_appsettings(args.config_uri, name=args.app), "sqlalchemy.")
    try:
        with engine.begin() as connection:
            change = postgresql.install_triggers if args.action == "install" else postgresql.remove_triggers
            tables = change(connection, args.schema)
    except ValueError as exc:
        print(f"sessioncache-notify: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    done = "installed on" if args.action == "install" else "removed from"
    print(f"triggers {done} {len(tables)} table(s) of schema {args.schema}: {', '.join(tables)}")
    return 0
