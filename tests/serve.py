"""Serve tests/app.py under waitress in a process of its own.

``python -m tests.serve DB_URL REGION_JSON [SETTINGS_JSON [THREADS]]`` prints the port it listens on
(127.0.0.1, chosen by the system) and serves until its standard input
closes.
"""

from __future__ import annotations

import json
import sys
import threading

import waitress

from .app import make_app


def main() -> None:
    db_url, region = sys.argv[1], json.loads(sys.argv[2])
    extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    threads = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    server = waitress.create_server(make_app(db_url, region, **extra), host="127.0.0.1", port=0, threads=threads)
    print(server.effective_port, flush=True)
    threading.Thread(target=server.run, daemon=True).start()
    sys.stdin.read()  # until the test closes our standard input
    server.close()


if __name__ == "__main__":
    main()
