"""A pyramid-cookiecutter-starter project (sqlalchemy, jinja2) that includes the add-on, and its tests.

``myproject/`` is the starter's layout and code, trimmed to what runs here
(no alembic, no static files); its home view reads through
``request.cached_query``.  ``conftest.py`` is the starter's
``tests/conftest.py`` with the fixtures the README's *Testing your app*
adds, and the starter's own tests are in ``test_views.py`` and
``test_functional.py``.
"""
