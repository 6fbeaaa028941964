"""The demo's pages.

Each page uses one cache region, and every page ends with a panel listing
the request's cache look-ups and SQL statements (``templates/layout.jinja2``).
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any

from pyramid.httpexceptions import HTTPNotFound, HTTPSeeOther
from pyramid.view import notfound_view_config, view_config
from sqlalchemy import func, select
from sqlalchemy.orm import joinedload

from pyramid_sessioncache import RelationshipCache

from .models import NAME_MAX_LENGTH, Address, City, Person, PostalCode

#: People per page of the list.
PAGE_SIZE = 20
#: The largest id a database integer column can hold; larger ids in URLs
#: cannot exist (and binding them would fail).
MAX_ID = 2**63 - 1
_PAGE = re.compile(r"[0-9]{1,9}")

#: The lazy loads behind a list page: addresses change with people, the
#: places they point to never do.
ADDRESS_CACHE = (
    RelationshipCache(Person.addresses, "short_term")
    .and_(RelationshipCache(Address.postal_code, "long_term"))
    .and_(RelationshipCache(PostalCode.city, "long_term"))
    .and_(RelationshipCache(City.country, "long_term"))
)


class NotFound(HTTPNotFound):
    """A 404 raised by a view, whose detail tells the visitor what is missing."""


@view_config(route_name="home", renderer="home.jinja2")
def home(request: Any) -> dict:
    """What the demo shows, with links to its pages."""
    return {"regions": request.sessioncache.cache.regions}


@view_config(route_name="person", renderer="person.jinja2")
def person(request: Any) -> dict:
    """One person, loaded twice in this request through ``local_session``.

    The second load is served from the request's Session: one SQL statement
    for the two, and both give the very same object.  The page sends two
    more, uncached: the person's addresses and their place in the list.
    """
    person_id = _person_id(request)
    query = select(Person).where(Person.id == person_id)
    mark = len(request.sql_log)
    first = request.cached_query(query, region="local_session").scalar_one_or_none()
    second = request.cached_query(query, region="local_session").scalar_one_or_none()
    statements = request.sql_log.since(mark)
    if first is None:
        raise NotFound(f"There is no person with id {person_id}.")
    addresses = request.dbsession.scalars(
        select(Address)
        .where(Address.person_id == person_id)
        .order_by(Address.id)
        .options(joinedload(Address.postal_code).joinedload(PostalCode.city).joinedload(City.country))
    ).all()
    return {
        "person": first,
        "same_object": first is second,
        "statements": statements,
        "addresses": addresses,
        "list_page": _page_of(request, person_id),
    }


@view_config(route_name="people", renderer="people.jinja2")
def people(request: Any) -> dict:
    """A page of people, from the shared ``short_term`` region.

    ``?page=N`` counts from 1; a malformed page number or one past the last
    page is a 404.  The addresses are lazy loads cached by
    :data:`ADDRESS_CACHE`: a page seen before costs no SQL at all.
    """
    page = _page_number(request)
    total = request.cached_query(select(func.count()).select_from(Person), region="short_term").scalar_one()
    pages = max(1, math.ceil(total / PAGE_SIZE))
    if page > pages:
        raise NotFound(f"There is no page {page}: the list has {pages} page(s).")
    query = select(Person).order_by(Person.id).limit(PAGE_SIZE).offset((page - 1) * PAGE_SIZE).options(ADDRESS_CACHE)
    return {
        "people": request.cached_query(query, region="short_term").scalars().all(),
        "page": page,
        "pages": pages,
        "total": total,
    }


@view_config(route_name="person_edit", renderer="edit.jinja2", request_method="GET")
def edit_form(request: Any) -> dict:
    """The form that renames a person."""
    found = _get_person(request)
    return {"person": found, "name": found.name, "error": None, "max_length": NAME_MAX_LENGTH}


@view_config(route_name="person_edit", renderer="edit.jinja2", request_method="POST")
def edit(request: Any) -> Any:
    """Rename a person, then redirect to the list page that shows them.

    An invalid name re-renders the form with a message (status 400) and
    changes nothing.
    """
    found = _get_person(request)
    raw = request.POST.get("name", "")
    name, error = _clean_name(raw)
    if error is not None:
        request.response.status_int = 400
        return {
            "person": found,
            "name": raw if isinstance(raw, str) else "",
            "error": error,
            "max_length": NAME_MAX_LENGTH,
        }
    # No invalidation here: when the transaction commits, pyramid_sessioncache
    # invalidates every cached entry that read the person table, in every process.
    found.name = name
    return HTTPSeeOther(
        request.route_url("people", _query={"page": _page_of(request, found.id)}, _anchor=f"person-{found.id}")
    )


@view_config(route_name="stats", renderer="stats.jinja2")
def stats(request: Any) -> dict:
    """This process's hit, miss and invalidation counters, per region."""
    cache = request.sessioncache.cache
    rows = []
    for name, region in cache.regions.items():
        counters = cache.stats.region(name)
        lookups = counters.hits + counters.misses
        rows.append(
            {
                "region": region,
                "counters": counters,
                "ratio": f"{counters.hits / lookups:.0%}" if lookups else "–",
            }
        )
    return {"rows": rows}


@notfound_view_config(renderer="notfound.jinja2")
def not_found(request: Any) -> dict:
    """The 404 page."""
    request.response.status_int = 404
    # Other 404s (no route, no static file) carry the URL or debug text as detail.
    if isinstance(request.exception, NotFound):
        return {"message": request.exception.detail}
    return {"message": "There is no page at this address."}


def _person_id(request: Any) -> int:
    person_id = int(request.matchdict["id"])  # the route allows digits only
    if person_id > MAX_ID:
        raise NotFound(f"There is no person with id {person_id}.")
    return person_id


def _get_person(request: Any) -> Person:
    person_id = _person_id(request)
    found = request.dbsession.get(Person, person_id)
    if found is None:
        raise NotFound(f"There is no person with id {person_id}.")
    return found


def _page_number(request: Any) -> int:
    raw = request.GET.get("page", "1")
    if not _PAGE.fullmatch(raw) or int(raw) < 1:
        raise NotFound(f"{raw!r} is not a page number: use 1, 2, 3…")
    return int(raw)


def _page_of(request: Any, person_id: int) -> int:
    """Return the number of the list page that shows person ``person_id``."""
    before = request.dbsession.scalar(select(func.count()).select_from(Person).where(Person.id < person_id))
    return before // PAGE_SIZE + 1


def _clean_name(raw: Any) -> tuple[str, str | None]:
    """Return ``(name, error)``: the stripped name, or why it is refused."""
    if not isinstance(raw, str):
        return "", "The name must be text."
    name = raw.strip()
    if not name:
        return name, "Please enter a name."
    if len(name) > NAME_MAX_LENGTH:
        return name, f"A name has at most {NAME_MAX_LENGTH} characters; this one has {len(name)}."
    if any(unicodedata.category(char) == "Cc" for char in name):
        return name, "A name cannot contain control characters (line breaks, tabs…)."
    return name, None
