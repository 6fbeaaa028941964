"""The edit form: renaming shows in the list at once; bad input changes nothing."""

from __future__ import annotations

import pytest
from sessioncache_demo.models import NAME_MAX_LENGTH


def row_name(page, person_id: int) -> str:
    return page.html.select_one(f"#person-{person_id} a.name").text


def test_form_shows_the_current_name(testapp, name_in_db):
    form = testapp.get("/people/3/edit").forms["edit-form"]
    assert form["name"].value == name_in_db(3)
    assert form["csrf_token"].value
    assert form.action == "http://localhost/people/3/edit"


def test_rename_shows_in_the_cached_list_at_once(testapp, sql, name_in_db):
    before = name_in_db(45)
    testapp.get("/people", {"page": "3"})
    sql.reset()
    cached = testapp.get("/people", {"page": "3"})
    assert sql.count == 0 and row_name(cached, 45) == before

    form = testapp.get("/people/45/edit").forms["edit-form"]
    form["name"] = "  Katherine Johnson  "
    response = form.submit(status=303)
    assert response.location == "http://localhost/people?page=3#person-45"

    page = response.follow()
    assert row_name(page, 45) == "Katherine Johnson"
    assert name_in_db(45) == "Katherine Johnson"
    # The rest of the page is read again too, and cached again.
    assert row_name(page, 44) == name_in_db(44)
    sql.reset()
    assert row_name(testapp.get("/people", {"page": "3"}), 45) == "Katherine Johnson"
    assert sql.count == 0


def test_rename_shows_on_the_person_page(testapp, name_in_db):
    form = testapp.get("/people/46/edit").forms["edit-form"]
    form["name"] = "Mary Jackson"
    form.submit(status=303)
    assert testapp.get("/people/46").html.select_one("#person-name").text == "Mary Jackson"


def test_longest_name_is_accepted(testapp, name_in_db):
    form = testapp.get("/people/47/edit").forms["edit-form"]
    form["name"] = "x" * NAME_MAX_LENGTH
    form.submit(status=303)
    assert name_in_db(47) == "x" * NAME_MAX_LENGTH


def test_same_name_writes_nothing(testapp, sql, name_in_db):
    form = testapp.get("/people/48/edit").forms["edit-form"]
    sql.reset()
    form.submit(status=303)
    assert not [s for s in sql.statements if s.lstrip().upper().startswith("UPDATE")]
    assert name_in_db(48) == form["name"].value


def test_names_are_escaped(testapp):
    form = testapp.get("/people/49/edit").forms["edit-form"]
    form["name"] = "<script>alert(1)</script>"
    page = form.submit(status=303).follow()
    assert "<script>alert(1)</script>" not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert row_name(page, 49) == "<script>alert(1)</script>"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "Please enter a name."),
        ("   ", "Please enter a name."),
        ("y" * (NAME_MAX_LENGTH + 1), f"A name has at most {NAME_MAX_LENGTH} characters; this one has 101."),
        ("z" * 10_000, f"A name has at most {NAME_MAX_LENGTH} characters; this one has 10000."),
        ("two\nlines", "A name cannot contain control characters"),
        ("nul\x00byte", "A name cannot contain control characters"),
    ],
)
def test_bad_name_rerenders_the_form_and_changes_nothing(testapp, sql, name_in_db, name, message):
    before = name_in_db(50)
    form = testapp.get("/people/50/edit").forms["edit-form"]
    form["name"] = name
    sql.reset()
    page = form.submit(status=400)
    assert message in page.html.select_one("#name-error").text
    assert page.html.select_one("#name")["aria-invalid"] == "true"
    assert page.forms["edit-form"]["name"].value == name  # kept, to be corrected
    assert not [s for s in sql.statements if s.lstrip().upper().startswith("UPDATE")]
    assert name_in_db(50) == before


def test_missing_name_field_is_refused(testapp, name_in_db):
    before = name_in_db(51)
    token = testapp.get("/people/51/edit").forms["edit-form"]["csrf_token"].value
    page = testapp.post("/people/51/edit", {"csrf_token": token}, status=400)
    assert "Please enter a name." in page.text
    assert name_in_db(51) == before


def test_uploaded_file_as_name_is_refused(testapp, name_in_db):
    before = name_in_db(51)
    token = testapp.get("/people/51/edit").forms["edit-form"]["csrf_token"].value
    page = testapp.post(
        "/people/51/edit", {"csrf_token": token}, upload_files=[("name", "name.txt", b"Eve")], status=400
    )
    assert "The name must be text." in page.text
    assert name_in_db(51) == before


@pytest.mark.parametrize("token", [None, "forged"])
def test_post_without_the_csrf_token_is_refused(testapp, name_in_db, token):
    before = name_in_db(52)
    testapp.get("/people/52/edit")  # sets the token cookie
    data = {"name": "Mallory"} if token is None else {"name": "Mallory", "csrf_token": token}
    testapp.post("/people/52/edit", data, status=400)
    assert name_in_db(52) == before


@pytest.mark.parametrize("method", ["get", "post"])
@pytest.mark.parametrize("path", ["/people/0/edit", "/people/301/edit", "/people/99999999999999999999999/edit"])
def test_editing_an_unknown_person_is_404(testapp, method, path):
    token = testapp.get("/people/1/edit").forms["edit-form"]["csrf_token"].value
    if method == "get":
        testapp.get(path, status=404)
    else:
        testapp.post(path, {"name": "Nobody", "csrf_token": token}, status=404)


def test_rename_counts_an_invalidation_on_the_stats_page(testapp):
    def invalidations() -> int:
        page = testapp.get("/stats")
        return int(page.html.select_one('tr[data-region="short_term"] .invalidations').text)

    before = invalidations()
    form = testapp.get("/people/53/edit").forms["edit-form"]
    form["name"] = "Dorothy Vaughan"
    form.submit(status=303)
    assert invalidations() == before + 1
