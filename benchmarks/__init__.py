"""Benchmarks of pyramid_sessioncache: scripts that print tables of figures.

Run them all with ``.venv/bin/python benchmarks/run.py`` (see that module).
Nothing in this package is imported by the add-on or its tests, and this
file imports nothing, so that ``wsgi_overhead.py`` can time an application
in a process where ``pyramid_sessioncache`` was never imported.
"""
