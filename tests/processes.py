"""Server processes for tests and benchmarks: ``tests/serve.py`` started, stopped, killed, and timed requests to it.

Used by the multi-process tests (``test_concurrency.py``, ``test_waits.py``)
and by ``benchmarks/stampede.py``, so that they all start, stop and time
the same servers the same way.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Seconds a client waits for an answer, unless told otherwise.
CLIENT_TIMEOUT = 30.0


class ServerProcess:
    """``tests/serve.py`` in a process of its own, serving ``tests/app.py`` on 127.0.0.1.

    :param db_url: the application's database.
    :param region: the options of its shared region.
    :param settings: more settings of the application (``test.query_seconds``...).
    :param threads: waitress threads.
    :param quiet: drop what the process writes to its standard error (the
        tracebacks of requests failing on purpose).

    Raises ``RuntimeError`` if the process does not start.
    """

    def __init__(
        self, db_url: str, region: dict, settings: dict | None = None, *, threads: int = 4, quiet: bool = False
    ) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.serve", db_url, json.dumps(region), json.dumps(settings or {}), str(threads)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL if quiet else None,
            text=True,
        )
        port = self.process.stdout.readline().strip()
        if not port:
            raise RuntimeError("a server process did not start")
        self.base = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        """Close its standard input (it stops serving and exits); kill it after 20 s."""
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill_in_query(self, path: str, started: Path, timeout: float = 20) -> bool:
        """GET ``path`` and SIGKILL the process once ``started`` exists (its query is running).

        Returns whether ``started`` appeared within ``timeout`` seconds (the
        process is killed either way).
        """
        threading.Thread(target=timed_request, args=(self.base + path,), daemon=True).start()
        deadline = time.monotonic() + timeout
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        return started.exists()


def timed_request(url: str, data: bytes | None = None, timeout: float = CLIENT_TIMEOUT) -> tuple[float, int]:
    """``(seconds, status)`` of one request (a POST of ``data`` if given); status 0 when it got no answer."""
    start = time.monotonic()
    try:
        with urllib.request.urlopen(url, data=data, timeout=timeout) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError:
        status = 0
    return time.monotonic() - start, status


def burst(urls: list[str], timeout: float = CLIENT_TIMEOUT) -> list[tuple[float, int]]:
    """GET every URL at once, each from a thread of its own; their ``(seconds, status)``."""
    results: list = [(timeout, 0)] * len(urls)
    barrier = threading.Barrier(len(urls))

    def run(index: int) -> None:
        barrier.wait()
        results[index] = timed_request(urls[index], timeout=timeout)

    threads = [threading.Thread(target=run, args=(index,), daemon=True) for index in range(len(urls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 10)
    return results
