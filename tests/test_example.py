"""The seed's own scenario runs as a script, outside Pyramid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parent.parent / "examples" / "local_session_caching.py"


def test_local_session_caching_example(tmp_path):
    url = f"sqlite:///{tmp_path / 'example.sqlite'}"
    done = subprocess.run([sys.executable, str(EXAMPLE), url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "two q.one() calls ran 1 SQL statement(s)",
        "after Session.remove(), q.one() ran 1 SQL statement(s)",
        "person10 is cache.get(key)[0]: True (person 10)",
    ]
