"""Test helper: run ``kosmos2-ref serve`` in a subprocess on a free port of 127.0.0.1 and talk to it.

The server is the real one (``python -m kosmos2_ref serve``), on the demo checkpoint's random weights: the
process prints its URL once it listens (``--port 0`` lets the system pick a free port, so parallel runs never
collide) and is stopped with SIGINT, as Ctrl-C stops it.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "kosmos2_ref" / "assets" / "two_dogs.jpg"
START_TIMEOUT_S = 120


class Server:
    """A running server: its URL, its output so far, and small HTTP helpers."""

    def __init__(self, process: subprocess.Popen, host: str, port: int):
        self.process = process
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}/"
        self.output: list[str] = []

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 120
    ):
        """(status, headers, body bytes) of one request; the path is sent exactly as given."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, obj=None, raw: bytes | None = None, headers: dict | None = None):
        """(status, parsed JSON body) of a request with a JSON (or ``raw``) body."""
        body = raw if raw is not None else (json.dumps(obj).encode() if obj is not None else None)
        hdrs = {"Content-Type": "application/json", **(headers or {})} if body is not None else headers
        status, hdrs_out, data = self.request(method, path, body, hdrs)
        assert hdrs_out.get("Content-Type", "").startswith("application/json"), (status, hdrs_out, data[:200])
        return status, json.loads(data)

    def upload(self, data: bytes):
        return self.json("POST", "/api/images", raw=data, headers={"Content-Type": "application/octet-stream"})

    def alive(self) -> bool:
        """Does the server still answer, and is it still running?"""
        status, info = self.json("GET", "/api/info")
        return status == 200 and "model" in info and self.process.poll() is None


def _reader(stream, lines: list[str], ready: threading.Event, found: dict) -> None:
    for line in stream:
        lines.append(line)
        m = re.search(r"on http://([\d.]+):(\d+)/", line)
        if m and not ready.is_set():
            found["host"], found["port"] = m.group(1), int(m.group(2))
            ready.set()
    ready.set()


@contextmanager
def running_server(model_folder, *extra_args: str):
    """Start the server on 127.0.0.1 (a free port) for ``model_folder``; stop it with SIGINT afterwards."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "kosmos2_ref",
        "serve",
        "--model",
        str(model_folder),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        *extra_args,
    ]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    lines: list[str] = []
    ready, found = threading.Event(), {}
    threading.Thread(target=_reader, args=(process.stdout, lines, ready, found), daemon=True).start()
    try:
        if not ready.wait(START_TIMEOUT_S) or "port" not in found:
            raise RuntimeError("the server did not start:\n" + "".join(lines))
        server = Server(process, found["host"], found["port"])
        server.output = lines
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
