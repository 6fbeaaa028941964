"""Programs run by one process per hash seed: what a key owes to hash randomization shows as two outputs."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def printed_by_processes(program: str, seeds: int) -> set[str]:
    """What ``program`` prints, run by one process per hash seed (``PYTHONHASHSEED`` 1, 2...)."""
    return {
        subprocess.run(
            [sys.executable, "-c", program],
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            cwd=ROOT,
            timeout=60,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in range(1, seeds + 1)
    }
