"""What the distributions hold: the library's wheel ships the library only; the demo is a distribution of its own."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib.metadata import distribution
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The library's wheel, built from a copy of the files setup.py reads."""
    source = tmp_path_factory.mktemp("source")
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "pyramid_sessioncache", source / "pyramid_sessioncache")
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "would be ignored" not in done.stdout + done.stderr
    (path,) = out.glob("pyramid_sessioncache-*.whl")
    with zipfile.ZipFile(path) as opened:
        yield opened


def test_the_wheel_holds_the_library_only(wheel):
    names = wheel.namelist()
    top = {name.split("/")[0] for name in names}
    dist_info = {name for name in top if name.endswith(".dist-info")}
    assert top - dist_info == {"pyramid_sessioncache"}
    for needed in ("py.typed", "testing.py", "addon/templates/toolbar.dbtmako", "storage/backends/redis.py"):
        assert f"pyramid_sessioncache/{needed}" in names
    assert any(re.search(r"\.dist-info/(licenses/)?LICENSE$", name) for name in names)


def test_the_wheels_metadata(wheel):
    (metadata,) = [name for name in wheel.namelist() if name.endswith(".dist-info/METADATA")]
    headers = Parser().parsestr(wheel.read(metadata).decode())
    assert "MIT" in (headers.get("License") or headers.get("License-Expression") or "")
    requires = headers.get_all("Requires-Dist")
    plain = [r for r in requires if "extra ==" not in r]
    assert not [r for r in plain if re.match(r"(pyramid_jinja2|pyramid_debugtoolbar|waitress|sessioncache)", r)]
    (entry_points,) = [name for name in wheel.namelist() if name.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(entry_points).decode()
    assert "paste.app_factory" not in text
    assert "sessioncache-demo-seed" not in text
    assert "sessioncache-invalidate = pyramid_sessioncache.addon.scripts:invalidate" in text
    assert "ext:local_session = pyramid_sessioncache.storage.backends.local_session:ScopedSessionNamespace" in text


def test_the_demo_is_a_distribution_of_its_own():
    demo = distribution("sessioncache_demo")
    points = {(point.group, point.name): point.value for point in demo.entry_points}
    assert points[("paste.app_factory", "main")] == "sessioncache_demo:main"
    assert points[("console_scripts", "sessioncache-demo-seed")] == "sessioncache_demo.seed:main"
    requires = " ".join(demo.requires or [])
    for name in ("pyramid_sessioncache", "pyramid_jinja2", "pyramid_debugtoolbar", "waitress"):
        assert name in requires
    assert "sessioncache_demo" in " ".join(distribution("pyramid_sessioncache").requires or [])  # testing extra


def test_the_license_is_mit():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert (ROOT / "demo" / "LICENSE").read_text() == text


def test_the_readme_commands_install_from_a_clone():
    readme = (ROOT / "README.md").read_text()
    serve, test = [line.strip() for line in readme.splitlines() if line.startswith("    python3 -m venv .venv")][:2]
    assert serve == "python3 -m venv .venv && .venv/bin/pip install -e . -e ./demo && .venv/bin/pserve development.ini"
    assert test.startswith("python3 -m venv .venv && .venv/bin/pip install -e '.[testing]' -e ./demo && ")
    assert "pip install pyramid_sessioncache" not in readme  # not released yet
    # .ci/run runs the README's test command, found with a grep: it must find this line.
    line = next(line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("test_command=$("))
    found = subprocess.run(["bash", "-c", line[len("test_command=$(") : -1]], cwd=ROOT, capture_output=True, text=True)
    assert found.stdout.strip() == test
