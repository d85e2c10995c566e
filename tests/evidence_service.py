"""A service for `local` test nodes that writes every start, listen and stop to an evidence log of the test's.

Run as `evidence_service.py <evidence log> <gate file> <slow version> <slow seconds>` with PORT and SERVICE_VERSION
set, as the `local` executor starts a package's `run`. It answers its version on /version and 200 on /healthz. The
slow version listens only once the gate file exists and the slow seconds have passed since it started. Each start
names the other processes of its node (same port) that were still alive then: a witness from the kernel, not
from the reactor, that two runs of one node overlapped.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any


def main() -> None:
    evidence, gate, slow_version, slow_s = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    version, port = os.environ["SERVICE_VERSION"], int(os.environ["PORT"])

    def record(event: str, **details: object) -> None:
        entry = {"event": event, "version": version, "port": port, "pid": os.getpid(), **details}
        line = json.dumps({**entry, "monotonic": time.monotonic(), "wall": time.time()}) + "\n"
        # One append per line: lines of concurrent processes never interleave.
        descriptor = os.open(evidence, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, line.encode())
        finally:
            os.close(descriptor)

    def stop(signum: int, frame: FrameType | None) -> None:
        record("stop", signal=signal.Signals(signum).name)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    record("start", others_alive=others_alive(evidence, port))
    if version == slow_version:
        started = time.monotonic()
        while not gate.exists() or time.monotonic() - started < slow_s:
            time.sleep(0.05)
    server = ThreadingHTTPServer(("127.0.0.1", port), handler(version))
    record("listening")
    server.serve_forever()


def others_alive(evidence: Path, port: int) -> list[int]:
    """The pids of earlier processes of this node (same port, started in the node's releases) still alive."""
    try:
        lines = evidence.read_text().splitlines()
    except FileNotFoundError:
        return []
    started = {entry["pid"] for entry in entries(lines) if entry["event"] == "start" and entry["port"] == port}
    started.discard(os.getpid())
    releases = Path.cwd().parent
    return sorted(pid for pid in started if alive_in(pid, releases))


def entries(lines: list[str]) -> list[dict[str, Any]]:
    """The records of an evidence log's lines; a line still being written is left out."""
    found = []
    for line in lines:
        with contextlib.suppress(ValueError):
            found.append(json.loads(line))
    return found


def alive_in(pid: int, folder: Path) -> bool:
    """Whether `pid` runs (no zombie) with its working directory under `folder` (no stranger that reused the pid)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return False
    return state != "Z" and folder in cwd.parents


def handler(version: str) -> type[BaseHTTPRequestHandler]:
    """Answers the version on / and /version, 200 on /healthz."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path not in ("/", "/version", "/healthz"):
                self.send_error(404)
                return
            body = b"ok\n" if self.path == "/healthz" else f"{version}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return  # the evidence log is what counts; request lines would only fill the node's log

    return Handler


if __name__ == "__main__":
    main()
