"""The package's layers: the engine stands alone, importing installs nothing, imports go one way."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pyramid_sessioncache"
ROOT = PACKAGE.parent

#: What each layer must never import (absolute module prefixes).
FORBIDDEN = {
    "testing.py": ("pyramid", "pyramid_tm", "zope", "transaction", "pyramid_sessioncache.addon"),
    "engine": ("pyramid", "pyramid_tm", "zope", "transaction", "pyramid_sessioncache.addon"),
    "storage": (
        "pyramid",
        "pyramid_tm",
        "zope",
        "transaction",
        "sqlalchemy",
        "pyramid_sessioncache.engine",
        "pyramid_sessioncache.addon",
    ),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The absolute names of the modules ``path`` imports, relative imports resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            found.update(f"{prefix}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_one_way(layer):
    files = [PACKAGE / layer] if layer.endswith(".py") else sorted((PACKAGE / layer).rglob("*.py"))
    assert files
    broken = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in sorted(_imports(path))
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[layer])
    ]
    assert not broken


def test_the_contract_check_sees_a_forbidden_import(tmp_path):
    # The walker resolves relative imports: a storage module reaching the engine is caught.
    fake = PACKAGE / "storage" / "backends" / "memory.py"
    names = _imports(fake)
    assert "pyramid_sessioncache._beaker" not in names  # sanity: what it imports is resolved
    sample = tmp_path / "sample.py"
    sample.write_text("from ...engine import hook\nfrom pyramid.config import Configurator\n")
    relocated = PACKAGE / "storage" / "backends" / "_layout_sample.py"
    relocated.write_text(sample.read_text())
    try:
        assert {"pyramid_sessioncache.engine.hook", "pyramid.config"} <= _imports(relocated)
    finally:
        relocated.unlink()


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


BLOCK_PYRAMID = """
    import importlib.abc, sys

    # Imported as Python starts, before anything is blocked: zope.sqlalchemy
    # before 4.0 declares "zope" in a -nspkg.pth file.
    STARTED_WITH = set(sys.modules)

    class Absent(importlib.abc.MetaPathFinder):
        BLOCKED = ("pyramid", "pyramid_tm", "zope", "transaction")

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, Absent())
"""


def test_the_engine_works_without_pyramid():
    done = _run(
        BLOCK_PYRAMID
        + """
    from pyramid_sessioncache import SessionCache, FromCache, RelationshipCache, cached_query
    from pyramid_sessioncache.testing import LookupCounter, SQLCounter, assert_lookups, clear, lookups
    import pyramid_sessioncache

    try:
        import pyramid
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("pyramid was importable")
    sys.path.insert(0, "examples")
    import local_session_caching
    assert local_session_caching.main() == 0
    try:
        pyramid_sessioncache.includeme
    except ModuleNotFoundError as exc:
        print("includeme needs pyramid:", exc)
    assert not [name for name in set(sys.modules) - STARTED_WITH if name.split(".")[0] in Absent.BLOCKED]
    print("standalone ok")
    """
    )
    assert done.returncode == 0, done.stderr
    assert "standalone ok" in done.stdout
    assert "includeme needs pyramid" in done.stdout


def test_importing_installs_nothing_and_the_first_cache_installs_once():
    done = _run(
        """
    import importlib, pkgutil
    from sqlalchemy.orm import Session

    import pyramid_sessioncache
    for module in pkgutil.walk_packages(pyramid_sessioncache.__path__, "pyramid_sessioncache."):
        importlib.import_module(module.name)
    assert not Session().dispatch.do_orm_execute, "importing installed a listener"
    assert not Session().dispatch.after_commit

    pyramid_sessioncache.SessionCache({"local": {"type": "ext:local_session"}})
    pyramid_sessioncache.SessionCache({"local": {"type": "ext:local_session"}})
    pyramid_sessioncache.FromCache("local")
    print(len(Session().dispatch.do_orm_execute), len(Session().dispatch.after_commit))
    """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "1"]


def test_a_caching_option_alone_installs_the_hook():
    done = _run(
        """
    from sqlalchemy.orm import Session
    from pyramid_sessioncache import FromCache

    before = len(Session().dispatch.do_orm_execute)
    FromCache("anywhere")
    print(before, len(Session().dispatch.do_orm_execute))
    """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "1"]
