"""Real `reactor worker` processes on one Kafka topic prefix and one database, each logging JSON lines to a file."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from reactor.events import Topic


class Workers:
    """`reactor worker` processes sharing one environment; worker `i` logs to `<logs>/worker-<i>.log`."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, role: str = "all") -> subprocess.Popen[bytes]:
        log = self.log_path(len(self.processes)).open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "reactor.cli.main", "worker", "--role", role],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def log_path(self, index: int) -> Path:
        return self.logs / f"worker-{index}.log"

    def records(self, index: int) -> list[dict[str, Any]]:
        """The structured log records worker `index` wrote so far (lines that are no JSON object are skipped)."""
        found = []
        for line in self.log_path(index).read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    found.append(record)
        return found

    def http_port(self, index: int) -> int | None:
        """The port of worker `index`'s /healthz and /metrics, once it logged it."""
        for record in self.records(index):
            if record.get("event") == "health and metrics endpoint":
                return int(record["port"])
        return None


@contextlib.contextmanager
def worker_group(kafka_bootstrap: str, mongo_url: str, mongo_database: str, directory: Path) -> Iterator[Workers]:
    """Workers (none started yet) on a fresh topic prefix of 4 partitions, with short waits; all stopped after."""
    env = {
        **os.environ,
        "REACTOR_MODE": "distributed",
        # Tests publish through fixture buses that sign nothing (signed commands: test_signed_commands.py).
        "REACTOR_REQUIRE_SIGNED": "false",
        "REACTOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "REACTOR_TOPIC_PREFIX": f"w{os.urandom(5).hex()}.",
        "REACTOR_TOPIC_PARTITIONS": "4",
        "REACTOR_MONGO_URL": mongo_url,
        "REACTOR_MONGO_DATABASE": mongo_database,
        "REACTOR_STATE_DIR": str(directory / "state"),
        "REACTOR_HTTP_PORT": "0",
        "REACTOR_NOOP_DELAY_S": "0.2",
        "REACTOR_RESEND_AFTER_S": "5",
        "REACTOR_GRACE_S": "2",
        # A SIGKILLed worker cannot give its claims up: the others take them over once the lease ran out.
        "REACTOR_LEASE_S": "3",
        "REACTOR_LOG_FORMAT": "json",
    }
    group = Workers(env, directory)
    try:
        yield group
    finally:
        group.stop_all()


def commands_assigned(workers: Workers, index: int) -> set[int]:
    """The commands partitions worker `index` was last assigned (none before its first assignment), from its log."""
    topic = f"topic='{workers.env['REACTOR_TOPIC_PREFIX']}{Topic.COMMANDS.value}'"
    assigned: set[int] = set()
    for record in workers.records(index):
        partitions = [str(name) for name in record.get("partitions", [])]
        if record.get("event") == "partitions assigned" and any(topic in name for name in partitions):
            assigned = {int(re.findall(r"partition=(\d+)", name)[0]) for name in partitions if topic in name}
    return assigned
