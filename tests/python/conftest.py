"""Starts the mull binary on a free loopback port for the tests in this folder."""

import os
import re
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q8_0.gguf"


@pytest.fixture(scope="session")
def server_url():
    binary = os.environ.get("MULL_BIN", str(ROOT / "target" / "debug" / "mull"))
    model = os.environ.get("MULL_TEST_MODEL", str(MODEL))
    traces_dir = tempfile.TemporaryDirectory(prefix="mull-traces-")
    traces = traces_dir.name
    process = subprocess.Popen(
        [binary, "serve", "--port", "0", "--model-path", model,
         "--traces-path", os.path.join(traces, "traces.db")],
        stderr=subprocess.PIPE,
        text=True,
    )
    address = None
    lines = []
    deadline = time.time() + 120
    while address is None and time.time() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r"listening on (http://\S+)", line)
        if found:
            address = found.group(1)
    if address is None:
        process.kill()
        raise RuntimeError("mull did not start:\n" + "".join(lines))
    # Keep draining the log so the server never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(address + "/ready") as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        time.sleep(0.2)
    else:
        process.kill()
        raise RuntimeError("mull never became ready")
    yield address
    process.terminate()
    process.wait(timeout=60)
    traces_dir.cleanup()
