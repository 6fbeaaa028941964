"""The documentation covers the public names, and its recipes are the ones tests/starter/ runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import pyramid_sessioncache

ROOT = Path(__file__).resolve().parent.parent
API = (ROOT / "docs" / "api.md").read_text()


@pytest.mark.parametrize("name", pyramid_sessioncache.__all__)
def test_every_public_name_is_in_the_api_reference(name):
    documented = re.search(rf"^\.\. (auto\w+|py:data):: (pyramid_sessioncache\.)?{name}$", API, re.M)
    module = re.search(rf"^\.\. automodule:: pyramid_sessioncache\.\S*\b{name}$", API, re.M)
    assert documented or module, f"docs/api.md documents no {name}"


def test_every_module_is_in_the_api_reference():
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in (ROOT / "pyramid_sessioncache").rglob("*.py")
    }
    documented = set(re.findall(r"^\.\. automodule:: (\S+)$", API, re.M))
    assert modules - documented == set()


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.mark.parametrize("page", ["README.md", "docs/testing.md"])
def test_the_fixture_recipe_is_the_one_tests_starter_runs(page):
    conftest = (ROOT / "tests" / "starter" / "conftest.py").read_text()
    (recipe,) = [block for block in python_blocks((ROOT / page).read_text()) if "def sessioncache(app)" in block]
    missing = [line for line in recipe.splitlines() if line.strip() and line not in conftest.splitlines()]
    assert not missing
