"""Starts the release mull binary for the benchmark scripts."""

import re
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_server(model, *flags):
    """Starts `mull serve` on a free port and returns (process, url) once ready.

    The server's log is drained in a thread, because a full pipe would block
    the server in the middle of a long benchmark.
    """
    server = subprocess.Popen(
        [str(ROOT / "target/release/mull"), "serve", "--port", "0", "--model-path", str(model), *flags],
        stderr=subprocess.PIPE,
        text=True,
    )
    url = None
    while url is None:
        line = server.stderr.readline()
        if not line:
            raise RuntimeError(f"mull exited before listening (status {server.wait()})")
        found = re.search(r"listening on (http://\S+)", line)
        url = found.group(1) if found else None
    threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
    while True:
        try:
            urllib.request.urlopen(url + "/ready")
            return server, url
        except OSError:
            time.sleep(0.2)
