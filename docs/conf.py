"""Sphinx configuration of pyramid_sessioncache's documentation.

Build it (warnings are errors, as in CI)::

    pip install -e '.[docs]'
    sphinx-build -W -b html docs docs/_build/html
"""

from importlib.metadata import version as distribution_version

import pylons_sphinx_themes

project = "pyramid_sessioncache"
copyright = "2026, The pyramid_sessioncache authors"
release = distribution_version("pyramid_sessioncache")
version = ".".join(release.split(".")[:2])

extensions = ["sphinx.ext.autodoc", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Narrative pages are Markdown (MyST): ```{eval-rst}``` blocks hold autodoc.
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# Overridden methods of Beaker's and the toolbar's classes keep their own docs there.
autodoc_inherit_docstrings = False
# Optional dependencies the docs build does not need installed.
autodoc_mock_imports = ["pyramid_debugtoolbar", "redis"]

# Every cross-reference must resolve.  No network here: the projects we
# refer to (SQLAlchemy, Pyramid, Beaker...) have no inventory to resolve
# against, so references to them are left as text.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(sqlalchemy|pyramid|beaker|zope|transaction|redis|webob|pyramid_debugtoolbar)(\..*)?"),
    # The standard library, as annotations show it.
    (r"py:.*", r"(collections|typing|datetime|weakref|threading|re|types|logging)\..*"),
    (r"py:class", r"(dict|list|tuple|set|frozenset|type)\[.*"),
]

html_theme = "pyramid"
html_theme_path = pylons_sphinx_themes.get_html_themes_path()
html_theme_options = {"github_url": ""}
html_title = f"pyramid_sessioncache {release}"
