"""The demo's pages, through WebTest: what they show and the SQL they cost."""

from __future__ import annotations

import re

import pytest
from sessioncache_demo.views import PAGE_SIZE

#: The statement of the person page's cached query (SQLite's paramstyle).
PERSON_BY_ID = re.compile(r"FROM person\s+WHERE person\.id = \?", re.IGNORECASE)


def panel_sql_count(page) -> int:
    return int(page.html.select_one("#sql-count").text)


def panel_lookups(page) -> dict[str, tuple[int, int]]:
    """The panel's table: region -> (hits, misses)."""
    rows = page.html.select("table.lookups-by-region tbody tr")
    return {
        row["data-region"]: (int(row.select_one(".hits").text), int(row.select_one(".misses").text)) for row in rows
    }


def listed_ids(page) -> list[int]:
    return [int(row["id"].removeprefix("person-")) for row in page.html.select("table.people tbody tr[id]")]


def test_home_explains_and_links(testapp):
    page = testapp.get("/")
    assert page.content_type == "text/html"
    assert "ext:local_session" in page.text
    links = {a["href"] for a in page.html.select("main a")}
    assert {"http://localhost/people", "http://localhost/people/1", "http://localhost/stats"} <= links
    regions = [row.td.text for row in page.html.select("main table tbody tr")]
    assert regions == ["local_session", "short_term", "long_term"]
    assert panel_sql_count(page) == 0


def test_static_style_sheet(testapp):
    assert "font" in testapp.get("/static/style.css").text


def test_person_page_runs_its_query_twice_for_one_statement(testapp, sql):
    page = testapp.get("/people/7")
    # Counted outside the app: the person's query reached the database once.
    assert len([s for s in sql.statements if PERSON_BY_ID.search(s)]) == 1
    assert page.html.select_one("#two-runs-sql").text == "1"
    assert page.html.select_one("#same-object").text == "True"
    assert panel_lookups(page) == {"local_session": (1, 1)}
    # The panel counts what the engine listener saw (query, addresses, list page).
    assert panel_sql_count(page) == sql.count == 3
    # The page says so: the pair is one of its three.
    assert page.html.select_one("#page-sql").text == "3"
    assert "this pair's one, then two uncached queries" in page.html.select_one("#page-sql-note").text


def test_person_page_local_cache_ends_with_the_request(testapp, sql):
    testapp.get("/people/8")
    page = testapp.get("/people/8")
    assert len([s for s in sql.statements if PERSON_BY_ID.search(s)]) == 2
    assert panel_lookups(page) == {"local_session": (1, 1)}


def test_person_page_shows_addresses_and_links(testapp, name_in_db):
    page = testapp.get("/people/21")
    assert page.html.select_one("#person-name").text == name_in_db(21)
    addresses = [li.text for li in page.html.select("main ul.addresses li")]
    assert 1 <= len(addresses) <= 3
    assert all(re.fullmatch(r"\d+ .+, \d{5} .+, .+", address) for address in addresses)
    assert page.html.select_one("#edit-link")["href"] == "http://localhost/people/21/edit"
    assert 'href="http://localhost/people?page=2#person-21"' in page.text


@pytest.mark.parametrize("path", ["/people/0", "/people/301", "/people/99999999999999999999999"])
def test_unknown_person_is_404(testapp, path):
    page = testapp.get(path, status=404)
    assert "There is no person with id" in page.html.select_one("#not-found-message").text


@pytest.mark.parametrize(
    "path", ["/people/abc", "/people/-1", "/people/1.5", "/people/%D9%A3", "/nowhere", "/static/nope.css"]
)
def test_unknown_address_is_404(testapp, path):
    page = testapp.get(path, status=404)
    assert page.html.select_one("#not-found-message").text == "There is no page at this address."


def test_list_first_page_and_pager(testapp):
    page = testapp.get("/people")
    assert listed_ids(page) == list(range(1, PAGE_SIZE + 1))
    assert "page 1 of 15" in page.text
    assert page.html.select_one('a[rel="next"]')["href"] == "http://localhost/people?page=2"
    assert page.html.select_one('a[rel="prev"]') is None
    assert all(row.select("ul.addresses li") for row in page.html.select("table.people tbody tr"))


def test_list_middle_and_last_pages(testapp):
    middle = testapp.get("/people", {"page": "2"})
    assert listed_ids(middle) == list(range(21, 41))
    assert middle.html.select_one('a[rel="prev"]')["href"] == "http://localhost/people?page=1"
    last = testapp.get("/people", {"page": "15"})
    assert listed_ids(last) == list(range(281, 301))
    assert last.html.select_one('a[rel="next"]') is None


def test_list_reload_is_served_from_the_cache(testapp, sql):
    first = testapp.get("/people", {"page": "3"})
    assert sql.count == panel_sql_count(first) > PAGE_SIZE  # the page, then each person's addresses...
    hits, misses = panel_lookups(first)["short_term"]
    assert misses >= 1 + 1 + PAGE_SIZE  # the count, the page, each person's addresses
    sql.reset()
    again = testapp.get("/people", {"page": "3"})
    assert sql.count == panel_sql_count(again) == 0
    assert listed_ids(again) == listed_ids(first)
    assert again.html.select("ul.addresses")[0].text == first.html.select("ul.addresses")[0].text
    lookups = panel_lookups(again)
    assert set(lookups) == {"short_term", "long_term"}
    assert all(misses == 0 for hits, misses in lookups.values())
    assert lookups["short_term"][0] == hits + misses


def test_list_pages_do_not_share_entries(testapp):
    assert listed_ids(testapp.get("/people", {"page": "4"})) == list(range(61, 81))
    assert listed_ids(testapp.get("/people", {"page": "5"})) == list(range(81, 101))
    assert listed_ids(testapp.get("/people", {"page": "4"})) == list(range(61, 81))


@pytest.mark.parametrize(
    "page", ["abc", "0", "-1", "", "1.5", "+1", " 1", "²", "16", "1000000", "99999999999999999999999999"]
)
def test_malformed_or_past_the_end_page_is_404(testapp, page):
    response = testapp.get("/people", {"page": page}, status=404)
    assert response.html.select_one("#not-found-message").text


def test_stats_page_counts_per_region(testapp):
    testapp.get("/people", {"page": "6"})
    testapp.get("/people", {"page": "6"})
    page = testapp.get("/stats")
    rows = {row["data-region"]: row for row in page.html.select("table.stats tbody tr")}
    assert list(rows) == ["local_session", "short_term", "long_term"]
    assert int(rows["short_term"].select_one(".hits").text) >= 1 + 1 + PAGE_SIZE
    assert int(rows["short_term"].select_one(".misses").text) >= 1
    assert "ext:local_session" in rows["local_session"].text
    assert "60 s" in rows["short_term"].text
    # The stats page itself looks nothing up.
    assert panel_sql_count(page) == 0
    assert page.html.select_one("#lookup-count").text == "0"


def test_panel_lists_every_lookup_and_statement(testapp):
    page = testapp.get("/people/9")
    lookups = [(li["class"], li.text.split(":")[0]) for li in page.html.select("ol.lookups li")]
    assert lookups == [(["miss"], "local_session"), (["hit"], "local_session")]
    statements = [li.text for li in page.html.select("ol.statements li")]
    assert len(statements) == panel_sql_count(page)
    assert PERSON_BY_ID.search(statements[0])
