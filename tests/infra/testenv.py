"""Real test infrastructure for Deploy Reactor: install, start, wait for and stop
a single-node Apache Kafka broker (KRaft, jars from Maven Central) and FerretDB
(MongoDB wire protocol, built from its Go module by our own tiny main in
``tests/infra/ferretdb``) on SQLite or on a PostgreSQL cluster of its own
(Debian's ``postgresql``); fetch the official AsyncAPI JSON Schema (npm
package ``@asyncapi/specs``) that ``schemas/asyncapi.json`` is checked against.

Pure standard library on purpose: it runs before any virtualenv exists (CI
bootstrap, ``scripts/testenv``) and from pytest fixtures alike.

Everything listens on 127.0.0.1 only, on free ports. Builds are cached outside
the repo in ``$REACTOR_CACHE_DIR`` (default ``~/.cache/deploy-reactor``); a
cache entry counts only once its marker file is written, so an interrupted
build is redone.

Library use (e.g. from a pytest fixture)::

    with start_kafka(tmp_path / "kafka") as kafka:
        bootstrap = kafka.env["REACTOR_KAFKA_BOOTSTRAP"]

CLI use: see ``scripts/testenv`` (``up``/``down``/``env``/``install``), which
records what it started in ``<rundir>/state.json`` so a later invocation can
stop it.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

CACHE = Path(os.environ.get("REACTOR_CACHE_DIR", "~/.cache/deploy-reactor")).expanduser()

# Kafka 4.x verified with aiokafka 0.14 (admin create_topics, idempotent
# producer, consumer group + manual commit). 3.9.x stays supported as a
# fallback: REACTOR_KAFKA_VERSION=3.9.1.
DEFAULT_KAFKA_VERSION = "4.3.1"
KAFKA_VERSION = os.environ.get("REACTOR_KAFKA_VERSION") or DEFAULT_KAFKA_VERSION
FERRETDB_VERSION = "v1.24.2"
# npm package with the official AsyncAPI JSON Schemas (draft-07); 6.x ships schemas/3.0.0.json.
ASYNCAPI_SPECS_VERSION = "6.11.1"
ASYNCAPI_VERSION = "3.0.0"

# Logging bindings added next to kafka_2.13 (its runtime scope has none).
LOG4J2_VERSION = "2.25.4"  # Kafka 4.x: log4j2 + slf4j 1.x binding
RELOAD4J_VERSION = "1.2.25"  # Kafka 3.x: reload4j + slf4j-reload4j
SLF4J1_VERSION = "1.7.36"
MAVEN_DEPENDENCY_PLUGIN_VERSION = "3.8.1"

KAFKA_START_TIMEOUT = 120.0
FERRETDB_START_TIMEOUT = 60.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
KAFKA_STOP_GRACE = 30.0
FERRETDB_STOP_GRACE = 10.0
FERRETDB_BACKENDS = ("sqlite", "postgresql")
# What a FerretDB service exports of its storage, for stores to make the indexes FerretDB can use there: a test that
# starts a server of its own replaces the session's with its own (or drops them), never lets its processes inherit them.
FERRETDB_STORAGE_VARIABLES = ("REACTOR_FERRETDB_POSTGRESQL_URL", "REACTOR_FERRETDB_SQLITE_DIR")
POSTGRES_START_TIMEOUT = 60.0
POSTGRES_STOP_GRACE = 30.0
# PostgreSQL refuses to run as root; as root the harness runs it as this system user (Debian's package makes it).
POSTGRES_USER = "postgres"

HOST = "127.0.0.1"
FERRETDB_SRC = Path(__file__).resolve().parent / "ferretdb"
_MARKER = ".complete"


class TestEnvError(RuntimeError):
    """Installing, starting or stopping a component failed."""

    __test__ = False  # not a pytest test class


def log(msg: str) -> None:
    """Progress messages go to stderr (stdout is reserved for `export` lines)."""
    print(f"[testenv] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# helpers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):  # hold all at once so they are distinct
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tcp_accepts(port: int, host: str = HOST, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 40) -> str:
    try:
        data = path.read_bytes()[-65536:].decode("utf-8", "replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(data.splitlines()[-lines:])


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start time in clock ticks since boot) of `pid`, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], int(fields[2]), int(fields[19])


def _proc_starttime(pid: int) -> int | None:
    """Start time (clock ticks since boot) of `pid`, or None if it is gone or a zombie."""
    stat = _proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return None
    return stat[2]


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[1] == pgid and stat[0] not in ("Z", "X"):
                members.append(int(entry.name))
    return members


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (so concurrent callers don't build twice)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _clean_stale(dest: Path, tmp_prefix: str) -> None:
    """Remove an incomplete cache entry and temp dirs of killed builds (call with the lock held)."""
    shutil.rmtree(dest, ignore_errors=True)
    for p in dest.parent.glob(f"{tmp_prefix}*"):
        shutil.rmtree(p, ignore_errors=True)


def _run(
    cmd: list[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    user: str | None = None,
    what: str,
) -> None:
    try:
        res = subprocess.run(
            cmd,
            check=False,
            cwd=cwd,
            env=env,
            **_as_user(user),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    except FileNotFoundError as e:
        raise TestEnvError(f"{what}: {cmd[0]!r} not found on PATH") from e
    if res.returncode != 0:
        tail = "\n".join(res.stdout.splitlines()[-40:])
        raise TestEnvError(f"{what} failed (exit {res.returncode}): {shlex.join(cmd)}\n{tail}")


def _as_user(user: str | None) -> dict[str, Any]:
    """Popen arguments that run a child as `user` with their own group and no supplementary ones (None: as we are)."""
    if user is None:
        return {}
    return {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return str(Path(home) / "bin" / "java")
    java = shutil.which("java")
    if not java:
        raise TestEnvError("java not found (install a JDK >= 17, e.g. apt-get install openjdk-17-jre-headless)")
    return java


# --------------------------------------------------------------------------
# Service


@dataclasses.dataclass
class Service:
    """A started background process plus the env vars that point clients at it."""

    name: str
    pid: int
    env: dict[str, str]
    workdir: str = ""
    log: str = ""
    stop_grace: float = 10.0
    starttime: int | None = None  # /proc starttime, guards against pid reuse
    command: list[str] = dataclasses.field(default_factory=list)  # what started it (`relaunch` runs it again)
    stop_signal: int = signal.SIGTERM.value  # what asks it to stop (PostgreSQL: SIGINT, its fast shutdown)
    # What it runs on and started for itself (FerretDB's PostgreSQL): stopped after it, left alone by `kill`.
    parts: list[Service] = dataclasses.field(default_factory=list)
    # A directory outside `workdir` that holds its files (see `start_postgres`), removed once it has stopped.
    scratch: str = ""
    _proc: subprocess.Popen[bytes] | None = dataclasses.field(default=None, repr=False, compare=False)
    _ready: Callable[[], bool] | None = dataclasses.field(default=None, repr=False, compare=False)

    def alive(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            return False
        st = _proc_starttime(self.pid)
        return st is not None and (self.starttime is None or st == self.starttime)

    def _wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                return True
            time.sleep(0.1)
        return not self.alive()

    def stop(self, grace: float | None = None) -> None:
        """`stop_signal`, wait up to `grace` seconds, then SIGKILL; then kill what it left behind; then stop its
        parts. Idempotent."""
        try:
            self._stop_own(self.stop_grace if grace is None else grace)
        finally:
            for part in reversed(self.parts):
                part.stop(grace)

    def _stop_own(self, grace: float) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, self.stop_signal)
            if not self._wait_gone(grace):
                name = signal.Signals(self.stop_signal).name
                log(f"{self.name} (pid {self.pid}) ignored {name} for {grace:.0f}s; sending SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                if not self._wait_gone(10):
                    raise TestEnvError(f"{self.name} (pid {self.pid}) survived SIGKILL")
        self._reap()
        self._kill_leftovers()
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def all_alive(self) -> bool:
        """The service and every part it runs on are alive."""
        return self.alive() and all(part.all_alive() for part in self.parts)

    def kill(self) -> None:
        """SIGKILL the service and its process group at once, as a crash would: no chance to clean up. Its parts
        (FerretDB's PostgreSQL) keep running, as a database does when its client crashes."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)  # its own session: the group id is its pid
            if not self._wait_gone(10):
                raise TestEnvError(f"{self.name} (pid {self.pid}) survived SIGKILL")
        self._reap()
        self._kill_leftovers()

    def wait_ready(self, timeout: float) -> None:
        """Wait until the service is ready (as its start waits), for at most `timeout` seconds."""
        if self._ready is None:
            raise TestEnvError(f"{self.name} (pid {self.pid}) has no readiness check")
        _wait_until(self, self._ready, timeout, f"{self.name} ready again")

    def _leftovers(self) -> list[int]:
        """Processes still in the service's process group now that its leader is gone.

        Every service leads a session of its own (`_spawn`, the fleet), so its group id is its pid and whatever
        it started without a session of its own is in that group: the k8s supervisor's etcd, API server, etc.
        Normally the leader stops those itself (and they die with it); this catches what a SIGKILLed leader
        could not. A group id is never reused as a pid while the group has members, so while the pid is free
        (or a zombie) the members are ours; a live process under that pid means the group is not ours.
        """
        leader = _proc_stat(self.pid)
        if leader is not None and leader[0] not in ("Z", "X"):
            return []
        return _group_members(self.pid)

    def _kill_leftovers(self) -> None:
        members = self._leftovers()
        if not members:
            return
        log(f"{self.name} (pid {self.pid}) left {len(members)} process(es) in its group; killing {members}")
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self._leftovers():
            if time.monotonic() > deadline:
                raise TestEnvError(f"{self.name} (pid {self.pid}): {self._leftovers()} survived SIGKILL")
            time.sleep(0.1)

    def _reap(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(Exception):
                self._proc.wait(timeout=5)

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        d["parts"] = [part.to_json() for part in self.parts]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Service:
        fields = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
        known = {k: v for k, v in d.items() if k in fields}
        known["parts"] = [cls.from_json(part) for part in d.get("parts", [])]
        return cls(**known)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the process that started it dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _spawn(
    name: str,
    cmd: list[str],
    workdir: Path,
    logfile: Path,
    *,
    stop_grace: float,
    env: dict[str, str] | None = None,
    outlive_parent: bool = False,
    user: str | None = None,
) -> Service:
    """Start a service in its own session (the terminal's ^C does not reach it; its process group, whose id is
    its pid, holds what it starts, which `Service.stop` kills if the service left any of it behind).

    Unless `outlive_parent` (the `up` command, whose services live until `down`), the service is killed with
    the process that started it, so a test run that is SIGKILLed leaves no broker or database behind. The
    parent must be a thread that lives as long as the service (the kernel signals on the forking thread's exit).
    With `user`, it runs as that user (the parent-death signal is set after the switch, which would clear it).
    """
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **_as_user(user),
            preexec_fn=None if outlive_parent else _die_with_parent,  # noqa: PLW1509 (no threads fork here)
        )
    return Service(
        name=name,
        pid=proc.pid,
        env={},
        workdir=str(workdir),
        log=str(logfile),
        stop_grace=stop_grace,
        starttime=_proc_starttime(proc.pid),
        command=list(cmd),
        _proc=proc,
    )


def _wait_until(svc: Service, ready: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not svc.alive():
            code = svc._proc.poll() if svc._proc is not None else None
            raise TestEnvError(f"{svc.name} exited (code {code}) before {what}; log {svc.log}:\n{_tail(Path(svc.log))}")
        if ready():
            return
        if time.monotonic() > deadline:
            svc.stop(grace=5)
            raise TestEnvError(
                f"{svc.name} not ready ({what}) after {timeout:.0f}s; log {svc.log}:\n{_tail(Path(svc.log))}"
            )
        time.sleep(0.25)


# --------------------------------------------------------------------------
# Kafka


def _kafka_major(version: str) -> int:
    return int(version.split(".", 1)[0])


def _kafka_pom(version: str) -> str:
    deps = [("org.apache.kafka", "kafka_2.13", version)]
    if _kafka_major(version) >= 4:
        deps += [
            ("org.apache.logging.log4j", a, LOG4J2_VERSION) for a in ("log4j-api", "log4j-core", "log4j-slf4j-impl")
        ]
    else:
        deps += [("ch.qos.reload4j", "reload4j", RELOAD4J_VERSION), ("org.slf4j", "slf4j-reload4j", SLF4J1_VERSION)]
    dep_xml = "\n".join(
        f"    <dependency><groupId>{g}</groupId><artifactId>{a}</artifactId><version>{v}</version></dependency>"
        for g, a, v in deps
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- generated by tests/infra/testenv.py: runtime classpath of a Kafka {version} broker -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.deploy-reactor</groupId>
  <artifactId>kafka-broker-libs</artifactId>
  <version>{version}</version>
  <packaging>pom</packaging>
  <dependencies>
{dep_xml}
  </dependencies>
  <build><pluginManagement><plugins><plugin>
    <groupId>org.apache.maven.plugins</groupId>
    <artifactId>maven-dependency-plugin</artifactId>
    <version>{MAVEN_DEPENDENCY_PLUGIN_VERSION}</version>
  </plugin></plugins></pluginManagement></build>
</project>
"""


def ensure_kafka(version: str = KAFKA_VERSION) -> Path:
    """Directory with ``libs/*.jar`` for a Kafka `version` broker, built once into the cache."""
    dest = CACHE / f"kafka-{version}"
    if (dest / _MARKER).exists():
        return dest
    with _locked(CACHE / f".kafka-{version}.lock"):
        if (dest / _MARKER).exists():
            return dest
        if not shutil.which("mvn"):
            raise TestEnvError("mvn not found (apt-get install maven)")
        log(f"installing Kafka {version} jars from Maven Central into {dest}")
        t0 = time.monotonic()
        _clean_stale(dest, f".tmp-kafka-{version}-")  # half-done earlier attempt
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-kafka-{version}-", dir=CACHE))
        try:
            (tmp / "pom.xml").write_text(_kafka_pom(version))
            _run(
                [
                    "mvn",
                    "-q",
                    "-B",
                    "-Dstyle.color=never",
                    "dependency:copy-dependencies",
                    "-DincludeScope=runtime",
                    "-DoutputDirectory=libs",
                ],
                cwd=tmp,
                what=f"Maven fetch of Kafka {version}",
            )
            jars = sorted(p.name for p in (tmp / "libs").glob("*.jar"))
            if f"kafka_2.13-{version}.jar" not in jars:
                raise TestEnvError(f"Maven fetch of Kafka {version} produced no kafka_2.13 jar: {jars}")
            (tmp / _MARKER).write_text(json.dumps({"version": version, "jars": jars}, indent=1))
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"Kafka {version} installed in {time.monotonic() - t0:.1f}s")
    return dest


def _kafka_uuid() -> str:
    """Same format as Kafka's Uuid.randomUuid() (base64url, no padding, no leading '-')."""
    while True:
        s = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not s.startswith("-"):
            return s


_LOG4J2_PROPERTIES = """\
status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = STDOUT
logger.state.name = state.change.logger
logger.state.level = warn
"""

_LOG4J1_PROPERTIES = """\
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.state.change.logger=WARN
"""


def _kafka_properties(port: int, cport: int, datadir: Path) -> str:
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{HOST}:{cport}",
        "listeners": f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{cport}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(datadir),
        "num.partitions": "4",
        "auto.create.topics.enable": "true",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "4",  # fewer partitions: faster first group join
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "4",
        "share.coordinator.state.topic.replication.factor": "1",  # 4.x; ignored by 3.9
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "num.network.threads": "2",
        "num.io.threads": "4",
        "log.flush.interval.messages": "9223372036854775807",
    }
    return "".join(f"{k}={v}\n" for k, v in props.items())


def _kafka_java_cmd(libs: Path, workdir: Path, heap: str, main: str, *args: str) -> list[str]:
    return [
        _java(),
        f"-Xmx{heap}",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={workdir / 'log4j2.properties'}",
        f"-Dlog4j.configuration=file:{workdir / 'log4j.properties'}",
        "-cp",
        f"{libs}/*",
        main,
        *args,
    ]


def _kafka_api_versions_ok(port: int) -> bool:
    """Send ApiVersions v0 and check for error_code 0 (the broker speaks Kafka)."""
    client_id = b"reactor-testenv"
    body = struct.pack(">hhih", 18, 0, 7, len(client_id)) + client_id
    try:
        with socket.create_connection((HOST, port), timeout=2) as s:
            s.sendall(struct.pack(">i", len(body)) + body)
            hdr = b""
            while len(hdr) < 10:  # size(4) + correlation_id(4) + error_code(2)
                chunk = s.recv(10 - len(hdr))
                if not chunk:
                    return False
                hdr += chunk
    except OSError:
        return False
    _size, corr, err = struct.unpack(">iih", hdr)
    return bool(corr == 7 and err == 0)


def _kafka_ready(port: int, logfile: Path, *, since: int) -> Callable[[], bool]:
    """Whether the broker on `port` says in its log (after byte `since`) that it started, and speaks Kafka."""

    def ready() -> bool:
        if not _tcp_accepts(port):
            return False
        try:
            with open(logfile, "rb") as log_file:
                log_file.seek(since)
                text = log_file.read().decode("utf-8", "replace")
        except OSError:
            return False
        if "Kafka Server started" not in text and "started (kafka.server" not in text:
            return False
        return _kafka_api_versions_ok(port)

    return ready


def start_kafka(workdir: Path, version: str = KAFKA_VERSION, *, outlive_parent: bool = False) -> Service:
    """Format and start a single-node KRaft broker in `workdir` (wiped first); wait until ready."""
    home = ensure_kafka(version)
    libs = home / "libs"
    workdir = Path(workdir).resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    port, cport = _free_ports(2)
    (workdir / "server.properties").write_text(_kafka_properties(port, cport, workdir / "data"))
    (workdir / "log4j2.properties").write_text(_LOG4J2_PROPERTIES)
    (workdir / "log4j.properties").write_text(_LOG4J1_PROPERTIES)
    logfile = workdir / "kafka.log"

    t0 = time.monotonic()
    fmt = _kafka_java_cmd(
        libs,
        workdir,
        "256m",
        "kafka.tools.StorageTool",
        "format",
        "-t",
        _kafka_uuid(),
        "-c",
        str(workdir / "server.properties"),
    )
    fmt[1:1] = ["-XX:TieredStopAtLevel=1"]  # short-lived tool: faster JIT start
    _run(fmt, cwd=workdir, what="Kafka storage format")

    cmd = _kafka_java_cmd(libs, workdir, "512m", "kafka.Kafka", str(workdir / "server.properties"))
    cmd[1:1] = ["-Xms256m"]
    svc = _spawn("kafka", cmd, workdir, logfile, stop_grace=KAFKA_STOP_GRACE, outlive_parent=outlive_parent)
    svc.env = {"REACTOR_KAFKA_BOOTSTRAP": f"{HOST}:{port}"}
    svc._ready = _kafka_ready(port, logfile, since=0)
    _wait_until(svc, svc._ready, KAFKA_START_TIMEOUT, f"Kafka {version} on {HOST}:{port}")
    log(f"Kafka {version} ready on {HOST}:{port} (pid {svc.pid}) in {time.monotonic() - t0:.1f}s")
    return svc


# --------------------------------------------------------------------------
# FerretDB


def _ferretdb_src_hash() -> str:
    h = hashlib.sha256()
    for name in ("main.go", "go.mod", "go.sum"):
        h.update(name.encode() + b"\0" + (FERRETDB_SRC / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def ensure_ferretdb(version: str = FERRETDB_VERSION) -> Path:
    """Path to our FerretDB launcher binary for `version`, built once into the cache.

    The cache entry is named by the launcher's source hash too, so checkouts with different launchers (branches,
    worktrees sharing one cache) each keep their own build instead of rebuilding over each other's.
    """
    src_hash = _ferretdb_src_hash()
    dest = CACHE / f"ferretdb-{version}-{src_hash}"
    binary = dest / "ferretdb"

    def cached() -> bool:
        try:
            marker = json.loads((dest / _MARKER).read_text())
        except (OSError, ValueError):
            return False
        return marker.get("src") == src_hash and binary.exists()

    if cached():
        return binary
    with _locked(CACHE / f".ferretdb-{version}-{src_hash}.lock"):
        if cached():
            return binary
        go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
        if not go:
            raise TestEnvError("go not found on PATH (Go >= 1.24 is needed to build FerretDB)")
        log(f"building FerretDB {version} (Go module, SQLite and PostgreSQL backends) into {dest}")
        t0 = time.monotonic()
        _clean_stale(dest, f".tmp-ferretdb-{version}-{src_hash}-")  # half-done earlier attempt
        dest.mkdir(parents=True)
        with tempfile.TemporaryDirectory(prefix=f".tmp-ferretdb-{version}-{src_hash}-", dir=CACHE) as tmp:
            tmpd = Path(tmp)
            for name in ("main.go", "go.mod", "go.sum"):
                shutil.copy2(FERRETDB_SRC / name, tmpd / name)
            env = dict(os.environ, CGO_ENABLED="0", GOFLAGS="-mod=readonly -buildvcs=false")
            if f"github.com/FerretDB/FerretDB {version}" not in (tmpd / "go.mod").read_text():
                env["GOFLAGS"] = "-mod=mod -buildvcs=false"
                _run(
                    [go, "get", f"github.com/FerretDB/FerretDB@{version}"],
                    cwd=tmpd,
                    env=env,
                    what=f"go get FerretDB {version}",
                )
                _run([go, "mod", "tidy"], cwd=tmpd, env=env, what="go mod tidy")
            _run(
                [go, "build", "-trimpath", "-ldflags", "-s -w", "-o", str(tmpd / "ferretdb"), "."],
                cwd=tmpd,
                env=env,
                what=f"go build of FerretDB {version}",
            )
            shutil.move(str(tmpd / "ferretdb"), binary)
        (dest / _MARKER).write_text(json.dumps({"version": version, "src": src_hash}))
        log(f"FerretDB {version} built in {time.monotonic() - t0:.1f}s")
    return binary


def mongo_backend() -> str:
    """FerretDB's storage chosen by $REACTOR_MONGO_BACKEND: `sqlite` (the default) or `postgresql`."""
    backend = os.environ.get("REACTOR_MONGO_BACKEND") or "sqlite"
    if backend not in FERRETDB_BACKENDS:
        raise TestEnvError(f"REACTOR_MONGO_BACKEND={backend!r}: one of {', '.join(FERRETDB_BACKENDS)}")
    return backend


def install_ferretdb(backend: str) -> None:
    """Build FerretDB into the cache; for `postgresql`, check that PostgreSQL is installed too."""
    ensure_ferretdb()
    if backend == "postgresql":
        ensure_postgres()


def ferretdb_backend(svc: Service) -> str:
    """The storage a FerretDB service started by `start_ferretdb` runs on."""
    command = svc.command
    return command[command.index("-handler") + 1] if "-handler" in command else "sqlite"


def start_ferretdb(
    workdir: Path,
    version: str = FERRETDB_VERSION,
    *,
    backend: str = "sqlite",
    tls: bool = False,
    client_certificates: bool = False,
    outlive_parent: bool = False,
) -> Service:
    """Start FerretDB and wait until it accepts TCP. Its data is in `workdir` (wiped first): SQLite files, or with
    `backend="postgresql"` a PostgreSQL cluster of its own (`start_postgres`), which is part of the service:
    stopped after FerretDB stops, left running when FerretDB is killed or relaunched. With `tls`, it listens with
    TLS only (no plaintext port), with a server certificate for 127.0.0.1/localhost from a CA made here
    (`workdir/ca.pem`, the `tlsCAFile` of the URL it exports); with `client_certificates` it also demands a client
    certificate signed by that CA, and the URL names one (`tlsCertificateKeyFile`, the server's own, which may serve
    as a client's too)."""
    if backend not in FERRETDB_BACKENDS:
        raise TestEnvError(f"FerretDB backend {backend!r}: one of {', '.join(FERRETDB_BACKENDS)}")
    binary = ensure_ferretdb(version)
    workdir = Path(workdir).resolve()
    _wipe_postgres(workdir / "postgres")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    t0 = time.monotonic()
    parts: list[Service] = []
    if backend == "postgresql":
        parts.append(start_postgres(workdir / "postgres", outlive_parent=outlive_parent))
        storage = ["-handler", "postgresql", "-postgresql-url", parts[0].env["REACTOR_POSTGRESQL_URL"]]
    else:
        storage = ["-handler", "sqlite", "-sqlite-dir", str(workdir / "data")]
    port = free_port()
    listen = ["-listen-addr", f"{HOST}:{port}"]
    url = f"mongodb://{HOST}:{port}/"
    if tls:
        ca_file, server_file = _kafka_secure().make_certificates(workdir)  # key and chain in one file, 0600
        listen = ["-listen-addr", "", "-listen-tls", f"{HOST}:{port}"]
        listen += ["-listen-tls-cert-file", str(server_file), "-listen-tls-key-file", str(server_file)]
        url += f"?tls=true&tlsCAFile={ca_file}"
        if client_certificates:
            listen += ["-listen-tls-ca-file", str(ca_file)]
            url += f"&tlsCertificateKeyFile={server_file}"
    try:
        svc = _spawn(
            "mongo",
            [str(binary), *listen, *storage],
            workdir,
            workdir / "ferretdb.log",
            stop_grace=FERRETDB_STOP_GRACE,
            outlive_parent=outlive_parent,
        )
        svc.parts = parts
        svc.env = {"REACTOR_MONGO_URL": url}
        # The store makes the indexes FerretDB's queries can use in its PostgreSQL, or its SQLite files (README).
        if parts:
            svc.env["REACTOR_FERRETDB_POSTGRESQL_URL"] = parts[0].env["REACTOR_POSTGRESQL_URL"]
        else:
            svc.env["REACTOR_FERRETDB_SQLITE_DIR"] = str(workdir / "data")
        svc._ready = lambda: _tcp_accepts(port)
        _wait_until(svc, svc._ready, FERRETDB_START_TIMEOUT, f"FerretDB on {HOST}:{port}")
    except BaseException:
        for part in parts:
            part.stop()
        raise
    how = "TLS" if tls else "TCP"
    log(f"FerretDB {version} on {backend} ready on {how} {HOST}:{port} (pid {svc.pid}) in {time.monotonic() - t0:.1f}s")
    return svc


def relaunch(svc: Service, *, outlive_parent: bool = False) -> Service:
    """Kafka or FerretDB started again after it stopped or was killed: its command in its workdir, so the same
    port and the same data (nothing is wiped or formatted). Returns at once; `Service.wait_ready` waits for it
    (from any thread). As at the first start, the service dies with the thread that called this unless
    `outlive_parent`."""
    if svc.alive():
        raise TestEnvError(f"{svc.name} (pid {svc.pid}) is still running")
    svc._reap()
    svc._kill_leftovers()
    if not svc.command:
        raise TestEnvError(f"{svc.name} (pid {svc.pid}) has no recorded command to start again")
    logfile = Path(svc.log)
    since = logfile.stat().st_size if logfile.exists() else 0
    if svc.name == "kafka":
        port = int(svc.env["REACTOR_KAFKA_BOOTSTRAP"].rsplit(":", 1)[1])
        ready = (
            _kafka_secure().started(port, logfile, since=since)  # TLS only: no plaintext ApiVersions probe
            if "REACTOR_KAFKA_SASL_USERNAME" in svc.env
            else _kafka_ready(port, logfile, since=since)
        )
    elif svc.name == "mongo":
        port = int(svc.env["REACTOR_MONGO_URL"].rstrip("/").rsplit(":", 1)[1])
        ready = functools.partial(_tcp_accepts, port)
    else:
        raise TestEnvError(f"{svc.name}: only Kafka and FerretDB can be relaunched")
    again = _spawn(
        svc.name, svc.command, Path(svc.workdir), logfile, stop_grace=svc.stop_grace, outlive_parent=outlive_parent
    )
    again.env = dict(svc.env)
    again.parts, again.stop_signal, again.scratch = svc.parts, svc.stop_signal, svc.scratch
    again._ready = ready
    log(f"{svc.name} started again (pid {again.pid}, was {svc.pid}) on port {port}")
    return again


# --------------------------------------------------------------------------
# PostgreSQL (FerretDB's second backend): Debian's `postgresql`, an unprivileged cluster per start


def ensure_postgres() -> Path:
    """The directory of PostgreSQL's server programs (`initdb`, `postgres`): Debian's newest, else on PATH."""
    debian = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/postgres") if p.parent.parent.name.isdigit()]
    if debian:
        return max(debian, key=lambda bindir: int(bindir.parent.name))
    on_path = shutil.which("postgres")
    if on_path and (Path(on_path).parent / "initdb").exists():
        return Path(on_path).parent
    raise TestEnvError("PostgreSQL server not found (apt-get install postgresql)")


def _postgres_user() -> str | None:
    """Who runs the cluster: this user (None), or as root (which PostgreSQL refuses to run as) `POSTGRES_USER`."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(POSTGRES_USER)
    except KeyError:
        raise TestEnvError(
            f"as root, PostgreSQL runs as the system user {POSTGRES_USER!r}, which does not exist "
            "(apt-get install postgresql makes it)"
        ) from None
    return POSTGRES_USER


def _reachable_by(user: str | None, directory: Path) -> bool:
    """Whether `user` can get into `directory` (every directory above it lets them through)."""
    if user is None:
        return True
    probe = subprocess.run(
        ["test", "-x", str(directory)],
        **_as_user(user),
        cwd="/",
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


def _give(path: Path, user: str | None) -> None:
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _wipe_postgres(workdir: Path) -> None:
    """Remove a cluster `start_postgres` made in `workdir` earlier, with its private directory if it had one."""
    link = workdir / "cluster"
    if link.is_symlink():
        target = Path(os.readlink(link))
        if target.name.startswith("reactor-postgres-"):
            shutil.rmtree(target, ignore_errors=True)
    shutil.rmtree(workdir, ignore_errors=True)


def start_postgres(workdir: Path, *, outlive_parent: bool = False) -> Service:
    """initdb a PostgreSQL cluster in `workdir` (wiped first) and start it on a free port of 127.0.0.1, its unix
    socket in the cluster directory, trust authentication for loopback and that socket only; wait until it takes
    connections and has the database `ferretdb`. Its URL is ``env["REACTOR_POSTGRESQL_URL"]``.

    As root it runs as the system user `postgres`. That user cannot get into a workdir under /root or pytest's
    private temp root, so then the cluster lives in a private directory of its own under the system temp dir,
    linked from ``<workdir>/cluster`` and removed when the service stops (or on the next start here).
    """
    bindir = ensure_postgres()
    user = _postgres_user()
    workdir = Path(workdir).resolve()
    _wipe_postgres(workdir)
    workdir.mkdir(parents=True)
    scratch = ""
    if _reachable_by(user, workdir):
        cluster = workdir / "cluster"
        cluster.mkdir()
    else:
        scratch = tempfile.mkdtemp(prefix="reactor-postgres-")
        (workdir / "cluster").symlink_to(scratch)
        cluster = Path(scratch)
    _give(cluster, user)
    data, sockets = cluster / "data", cluster / "socket"
    sockets.mkdir()
    _give(sockets, user)
    t0 = time.monotonic()
    try:
        _run(
            [
                str(bindir / "initdb"),
                *("-D", str(data), "-U", "postgres", "-E", "UTF8", "--locale=C", "--auth=trust"),
                "--no-sync",  # a test cluster: no fsync of the new files
                "--no-instructions",
            ],
            cwd=cluster,
            user=user,
            what="PostgreSQL initdb",
        )
        hba = data / "pg_hba.conf"  # replaces initdb's, which also trusts replication connections and IPv6
        hba.write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
        _give(hba, user)
    except BaseException:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    port = free_port()
    settings = {
        "listen_addresses": HOST,
        "port": str(port),
        "unix_socket_directories": str(sockets),
        # A test cluster, thrown away after the run: no waiting for the disk.
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        # FerretDB prepares `_jsonb->$1 @> $2`: planned for its values, a query can use the store's GIN indexes
        # (reactor/adapters/ferretdb_postgresql.py); a generic plan never can.
        "plan_cache_mode": "force_custom_plan",
    }
    command = [str(bindir / "postgres"), "-D", str(data)]
    for key, value in settings.items():
        command += ["-c", f"{key}={value}"]
    svc = _spawn(
        "postgres",
        command,
        cluster,
        workdir / "postgres.log",
        stop_grace=POSTGRES_STOP_GRACE,
        outlive_parent=outlive_parent,
        user=user,
    )
    svc.workdir, svc.stop_signal, svc.scratch = str(workdir), signal.SIGINT.value, scratch
    url = f"postgres://postgres@{HOST}:{port}/ferretdb"
    svc.env = {"REACTOR_POSTGRESQL_URL": url}
    client = ["-h", HOST, "-p", str(port), "-U", "postgres"]

    def ready() -> bool:
        isready = [str(bindir / "pg_isready"), *client, "-d", "postgres", "-q", "-t", "2"]
        return subprocess.run(isready, stdin=subprocess.DEVNULL, capture_output=True, check=False).returncode == 0

    svc._ready = ready
    try:
        _wait_until(svc, ready, POSTGRES_START_TIMEOUT, f"PostgreSQL on {HOST}:{port}")
        _run([str(bindir / "createdb"), *client, "ferretdb"], what="createdb ferretdb")
    except BaseException:
        svc.stop(grace=5)
        raise
    log(f"PostgreSQL {bindir.parent.name} ready on {HOST}:{port} (pid {svc.pid}) in {time.monotonic() - t0:.1f}s")
    return svc


# --------------------------------------------------------------------------
# AsyncAPI JSON Schema (a file, not a service: used by tests/unit/test_schemas.py)


def ensure_asyncapi_schema(version: str = ASYNCAPI_SPECS_VERSION) -> Path:
    """The official AsyncAPI 3.0.0 JSON Schema from npm package ``@asyncapi/specs@<version>``, cached once."""
    dest = CACHE / f"asyncapi-specs-{version}"
    schema = dest / f"{ASYNCAPI_VERSION}.json"
    if (dest / _MARKER).exists() and schema.exists():
        return schema
    with _locked(CACHE / f".asyncapi-specs-{version}.lock"):
        if (dest / _MARKER).exists() and schema.exists():
            return schema
        npm = shutil.which("npm")
        if not npm:
            raise TestEnvError("npm not found (apt-get install npm); it fetches the AsyncAPI JSON Schema")
        log(f"fetching @asyncapi/specs@{version} from the npm registry into {dest}")
        _clean_stale(dest, f".tmp-asyncapi-specs-{version}-")  # half-done earlier attempt
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-asyncapi-specs-{version}-", dir=CACHE))
        try:
            _run(
                [npm, "pack", f"@asyncapi/specs@{version}", "--pack-destination", str(tmp), "--ignore-scripts"],
                cwd=tmp,
                what=f"npm pack @asyncapi/specs@{version}",
            )
            tarballs = list(tmp.glob("*.tgz"))
            if len(tarballs) != 1:
                raise TestEnvError(f"npm pack @asyncapi/specs@{version} left {len(tarballs)} tarballs in {tmp}")
            with tarfile.open(tarballs[0]) as tar:
                tar.extractall(tmp / "unpacked", filter="data")
            found = tmp / "unpacked" / "package" / "schemas" / f"{ASYNCAPI_VERSION}.json"
            try:
                text = found.read_text()
                spec = json.loads(text)
            except (OSError, ValueError) as e:
                raise TestEnvError(f"@asyncapi/specs@{version} has no readable schemas/{found.name}: {e}") from e
            if spec.get("properties", {}).get("asyncapi", {}).get("const") != ASYNCAPI_VERSION:
                raise TestEnvError(f"@asyncapi/specs@{version} schemas/{found.name} is not the AsyncAPI 3.0.0 schema")
            entry = tmp / "entry"
            entry.mkdir()
            (entry / found.name).write_text(text)
            digest = hashlib.sha256(text.encode()).hexdigest()
            (entry / _MARKER).write_text(json.dumps({"version": version, "file": found.name, "sha256": digest}))
            entry.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"AsyncAPI {ASYNCAPI_VERSION} schema cached at {schema}")
    return schema


# --------------------------------------------------------------------------
# components (CLI names) and the state file


@dataclasses.dataclass(frozen=True)
class Component:
    """A named part of the test environment. Add `fleet`, `k8s`, ... here."""

    name: str
    description: str
    install: Callable[[], object]
    start: Callable[[Path], Service]
    # Why a running instance is not what `start` would start now (None: it is), e.g. FerretDB on another backend.
    differs: Callable[[Service], str | None] = lambda _svc: None


COMPONENTS: dict[str, Component] = {
    # `up kafka --secure` ($REACTOR_KAFKA_SECURE=1): SASL_SSL, SCRAM users and ACLs (tests/infra/kafka_secure.py,
    # imported on use: it needs `cryptography`); its topics and ACLs are for $REACTOR_TOPIC_PREFIX (else reactor.).
    "kafka": Component(
        "kafka",
        f"Apache Kafka {KAFKA_VERSION} (KRaft, single node; SASL_SSL with ACLs if --secure)",
        lambda: _kafka_secure().ensure_kafka_tools() if kafka_secure() else ensure_kafka(),
        lambda workdir: (
            _kafka_secure().start_secure_kafka(
                workdir, prefix=os.environ.get("REACTOR_TOPIC_PREFIX", "reactor."), outlive_parent=True
            )
            if kafka_secure()
            else start_kafka(workdir, outlive_parent=True)
        ),
        lambda svc: (
            None
            if ("REACTOR_KAFKA_SASL_USERNAME" in svc.env) == kafka_secure()
            else f"it runs {'with' if 'REACTOR_KAFKA_SASL_USERNAME' in svc.env else 'without'} SASL_SSL"
        ),
    ),
    # Backend: $REACTOR_MONGO_BACKEND (`up mongo --backend postgresql`); on PostgreSQL its cluster is part of it.
    # `up mongo --tls` ($REACTOR_MONGO_TLS=1): a TLS listener only, with a CA of its own (`start_ferretdb`).
    "mongo": Component(
        "mongo",
        f"FerretDB {FERRETDB_VERSION} (MongoDB wire protocol) on SQLite or on a PostgreSQL cluster of its own",
        lambda: install_ferretdb(mongo_backend()),
        lambda workdir: start_ferretdb(workdir, backend=mongo_backend(), tls=mongo_tls(), outlive_parent=True),
        lambda svc: (
            f"it runs on {ferretdb_backend(svc)}, not {mongo_backend()}"
            if ferretdb_backend(svc) != mongo_backend()
            else None
            if ("-listen-tls" in svc.command) == mongo_tls()
            else f"it runs {'with' if '-listen-tls' in svc.command else 'without'} TLS"
        ),
    ),
    # Imported on use: tests/infra/fleet.py imports this module. Hosts: $REACTOR_FLEET_HOSTS (`up --hosts N`).
    "fleet": Component(
        "fleet",
        "N Debian hosts with real systemd in systemd-nspawn on a bridge, plus a package server (root)",
        lambda: __import__("tests.infra.fleet", fromlist=["ensure_rootfs"]).ensure_rootfs(),
        lambda workdir: __import__("tests.infra.fleet", fromlist=["start_fleet"]).start_fleet(workdir),
    ),
    # Imported on use: tests/infra/k8s.py imports this module. Built once from Go modules (slow the first time).
    "k8s": Component(
        "k8s",
        "Kubernetes 1.34 control plane (apiserver, controller-manager, scheduler, etcd) with 2 kwok fake nodes",
        lambda: __import__("tests.infra.k8s", fromlist=["ensure_k8s"]).ensure_k8s(),
        lambda workdir: __import__("tests.infra.k8s", fromlist=["start_k8s"]).start_k8s(workdir, outlive_parent=True),
    ),
}


def kafka_secure() -> bool:
    """Whether `up kafka` starts the SASL_SSL broker ($REACTOR_KAFKA_SECURE, set by `--secure`)."""
    return os.environ.get("REACTOR_KAFKA_SECURE", "") not in ("", "0")


def mongo_tls() -> bool:
    """Whether `up mongo` starts FerretDB with TLS ($REACTOR_MONGO_TLS, set by `--tls`)."""
    return os.environ.get("REACTOR_MONGO_TLS", "") not in ("", "0")


def _kafka_secure() -> Any:
    return __import__("tests.infra.kafka_secure", fromlist=["start_secure_kafka"])


SECRET_VARIABLES = ("REACTOR_KAFKA_SASL_PASSWORD",)  # never shown by `status`; state.json holding them is 0600


def rundir() -> Path:
    return Path(os.environ.get("REACTOR_TESTENV_DIR") or CACHE / "run").expanduser()


def _state_path() -> Path:
    return rundir() / "state.json"


def resolve(names: list[str]) -> list[Component]:
    unknown = [n for n in names if n not in COMPONENTS]
    if unknown:
        raise KeyError(f"unknown component(s): {', '.join(unknown)} (known: {', '.join(COMPONENTS)})")
    return [COMPONENTS[n] for n in dict.fromkeys(names)]


def load_state() -> dict[str, Service]:
    try:
        raw = json.loads(_state_path().read_text())
    except FileNotFoundError:
        return {}
    return {name: Service.from_json(d) for name, d in raw.get("services", {}).items()}


def save_state(services: dict[str, Service]) -> None:
    path = _state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    if not services:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # it may hold a password (SECRET_VARIABLES)
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps({"services": {n: s.to_json() for n, s in services.items()}}, indent=1))
    tmp.replace(path)


def export_lines(services: dict[str, Service]) -> list[str]:
    return [f"export {k}={shlex.quote(v)}" for s in services.values() for k, v in s.env.items()]


def install(names: list[str]) -> None:
    comps = resolve(names)
    CACHE.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=len(comps) or 1) as pool:  # mvn (network) || go build (CPU)
        for fut in [pool.submit(c.install) for c in comps]:
            fut.result()


def up(names: list[str]) -> dict[str, Service]:
    """Start the named components (reusing ones already running); return all running services."""
    comps = resolve(names)
    install(names)
    with _locked(rundir() / ".state.lock"):
        state = load_state()
        for name, svc in list(state.items()):
            if not svc.all_alive():
                svc.stop()  # a dead one's leftovers (children of a killed supervisor) go before it is restarted
                del state[name]
        for c in comps:
            if c.name in state and (why := c.differs(state[c.name])):
                raise TestEnvError(f"{c.name} is already running, but {why}: `scripts/testenv down {c.name}` first")
        todo = [c for c in comps if c.name not in state]
        for c in comps:
            if c.name in state:
                log(f"{c.name} already running (pid {state[c.name].pid})")
        started: dict[str, Service] = {}
        errors: list[BaseException] = []
        with ThreadPoolExecutor(max_workers=len(todo) or 1) as pool:
            futs = {c.name: pool.submit(c.start, rundir() / c.name) for c in todo}
            for name, fut in futs.items():
                try:
                    started[name] = fut.result()
                except BaseException as e:  # noqa: BLE001 - collect, then clean up
                    errors.append(e)
        try:
            if errors:
                raise errors[0]
            state.update(started)
            save_state(state)
        except BaseException:
            for svc in started.values():  # don't leak what nobody will know to stop
                svc.stop()
            raise
        return state


def down(names: list[str] | None = None) -> list[str]:
    """Stop the named (default: all) services recorded in the state file."""
    if names:
        resolve(names)
    with _locked(rundir() / ".state.lock"):
        state = load_state()
        stopped = []
        for name in list(state):
            if names and name not in names:
                continue
            svc = state.pop(name)
            if svc.all_alive():
                log(f"stopping {name} (pid {svc.pid})")
                stopped.append(name)
            else:
                log(f"{name} (pid {svc.pid}) was not running")
            svc.stop()  # also what a dead one left in its process group
        save_state(state)
        return stopped


def running() -> dict[str, Service]:
    return {n: s for n, s in load_state().items() if s.all_alive()}
