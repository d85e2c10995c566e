"""Test fleet: N Debian hosts with real systemd, each in a systemd-nspawn container on a bridge we own.

Every host is a bookworm minbase rootfs (systemd, sshd, python3, curl, ...) booted with
``systemd-nspawn -b``: systemd is PID 1 inside, the host has its own network namespace with one veth on
the harness bridge, its own overlay over the cached rootfs (its disk survives a power-off), and sshd with
a host key we generated. One supervisor process owns the fleet: it boots the hosts, serves packages over
HTTP on the bridge address, answers control requests (power off, boot, cut off, heal) on a unix socket,
and tears everything down when it gets SIGTERM (or when the process that owns it dies).

Network rule: the bridge is ``10.247.61.0/24`` (host i is ``.(10+i)``, the bridge side ``.1``); hosts
have no default route and no DNS, so nothing they do leaves the bridge.

Needs root, overlayfs, writable cgroupfs and these Debian packages (``APT_INSTALL``)::

    apt-get install -y --no-install-recommends debootstrap systemd-container iproute2 openssh-client

Library use::

    service = start_fleet(tmp / "fleet", hosts=6, owned=True)   # stops itself if this process dies
    fleet = Fleet.load(Path(service.env["REACTOR_FLEET_DIR"]))
    fleet.cut("h2"); fleet.heal("h2"); fleet.power_off("h3"); fleet.boot("h3")
    service.stop()                                             # everything is removed

CLI: ``scripts/testenv up fleet --hosts N`` / ``scripts/testenv down fleet``, and for a running fleet
``python3 -m tests.infra.fleet {status,power-off,boot,cut,heal,ssh} ...`` (see ``--help``).
Pure standard library, like ``testenv``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.infra.testenv import _MARKER, CACHE, Service, TestEnvError, _locked, _proc_starttime, _tail, log, rundir

REPO = Path(__file__).resolve().parents[2]

SUITE = os.environ.get("REACTOR_FLEET_SUITE", "bookworm")
PACKAGES = ("systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "curl", "ca-certificates", "iproute2")
# Bump when the base fixups below change: the cache key changes and a new rootfs is built.
RECIPE_REVISION = "1"
DEFAULT_MIRROR = "http://deb.debian.org/debian"

SUBNET = "10.247.61"  # an unusual private /24, used by nothing else on the machine
PREFIX = "drfleet"
BRIDGE = f"{PREFIX}0"
BRIDGE_ADDRESS = f"{SUBNET}.1"
MAX_HOSTS = 40
DEFAULT_HOSTS = 3

# Debian packages this machine needs, by the command that proves each one is there.
HOST_TOOLS = {
    "debootstrap": "debootstrap",
    "systemd-nspawn": "systemd-container",
    "ip": "iproute2",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
}
APT_INSTALL = (
    "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
    "debootstrap systemd-container iproute2 openssh-client"
)

BOOT_TIMEOUT_S = 120.0
POWER_OFF_GRACE_S = 20.0
START_TIMEOUT_S = 600.0  # includes building the rootfs on a cold cache
STOP_GRACE_S = 120.0
CONTROL_TIMEOUT_S = 180.0

# The one fleet per machine: its supervisor holds this lock for its whole life.
LOCK_PATH = Path("/run/deploy-reactor-fleet.lock")
OWNER_PATH = Path("/run/deploy-reactor-fleet.json")
CGROUP_GROUP = "deploy-reactor-fleet"


# --------------------------------------------------------------------------
# prerequisites and the cached rootfs


def check_prerequisites() -> None:
    """Raise TestEnvError naming what is missing: root, overlayfs, or Debian packages (with the apt line)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("the test fleet needs root (network namespaces, overlay mounts, systemd-nspawn)")
    missing = sorted({package for command, package in HOST_TOOLS.items() if shutil.which(command) is None})
    if missing:
        problems.append(f"missing Debian packages: {' '.join(missing)} -- install with: {APT_INSTALL}")
    try:
        if "overlay" not in Path("/proc/filesystems").read_text():
            problems.append("the kernel has no overlay filesystem")
    except OSError as exc:
        problems.append(f"cannot read /proc/filesystems: {exc}")
    if not Path("/sys/fs/cgroup").is_dir():
        problems.append("no cgroup filesystem at /sys/fs/cgroup")
    if problems:
        raise TestEnvError("test fleet prerequisites: " + "; ".join(problems))


def _mirror(apt: Path = Path("/etc/apt")) -> str:
    """The Debian mirror: $REACTOR_FLEET_MIRROR, else the first one apt uses here, else deb.debian.org.

    apt reads sources.list and sources.list.d/*.list (one-line `deb [options] URI suite ...`) and
    sources.list.d/*.sources (deb822 blocks with `Types`, `URIs`, `Suites`); security suites are skipped.
    """
    if mirror := os.environ.get("REACTOR_FLEET_MIRROR"):
        return mirror
    parts = apt / "sources.list.d"
    sources = [apt / "sources.list", *sorted(parts.glob("*.list")), *sorted(parts.glob("*.sources"))]
    for source in sources:
        try:
            text = source.read_text()
        except OSError:
            continue
        for uri, suites in _apt_entries(text, deb822=source.suffix == ".sources"):
            if not any(suite.endswith("-security") or "/updates" in suite for suite in suites):
                return uri.rstrip("/")
    return DEFAULT_MIRROR


def _apt_entries(text: str, *, deb822: bool) -> list[tuple[str, list[str]]]:
    """(URI, suites) of each enabled binary-package source in an apt sources file."""
    entries: list[tuple[str, list[str]]] = []
    if not deb822:
        for raw in text.splitlines():
            match = re.match(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", raw)
            if match:
                entries.append((match.group(1), [match.group(2)]))
        return entries
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for raw in block.splitlines():
            if raw.startswith("#") or ":" not in raw:
                continue
            name, _, value = raw.partition(":")
            fields[name.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            entries.append((uri, fields.get("suites", "").split()))
    return entries


def rootfs_key(suite: str = SUITE) -> str:
    """The cache entry's name: suite plus a hash of the package list and the recipe revision."""
    digest = hashlib.sha256(f"{RECIPE_REVISION}\0{suite}\0{','.join(sorted(PACKAGES))}".encode()).hexdigest()
    return f"fleet-rootfs-{suite}-{digest[:12]}"


_SSHD_CONFIG = "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUseDNS no\nMaxStartups 100:30:200\n"
# No DNS in the hosts: the machine's resolver is unreachable from the bridge, and a reverse lookup would
# stall any service that calls getfqdn() (python's http.server does) for seconds.
_RESOLV_CONF = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"
_HOSTS_FILE = "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n"
_JOURNALD = "[Journal]\nStorage=volatile\nRuntimeMaxUse=16M\n"
_JOURNAL_PERSISTENT = "[Journal]\nStorage=persistent\nSystemMaxUse=16M\n"  # read after fleet.conf: it wins
_MASKED_UNITS = (
    "getty@tty1.service",
    "console-getty.service",
    "e2scrub_reap.service",
    "systemd-pstore.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "fstrim.timer",
)


def _prepare_base(root: Path) -> None:
    """Make a fresh debootstrap tree a host template: no host keys or machine id, sshd and DNS settings."""
    for key in (root / "etc" / "ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc" / "machine-id").write_text("")
    with contextlib.suppress(FileNotFoundError):
        (root / "var" / "lib" / "dbus" / "machine-id").unlink()
    (root / "etc" / "ssh" / "sshd_config.d" / "fleet.conf").write_text(_SSHD_CONFIG)
    resolv = root / "etc" / "resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.write_text(_RESOLV_CONF)
    (root / "etc" / "hosts").write_text(_HOSTS_FILE)
    (root / "etc" / "systemd" / "journald.conf.d").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "systemd" / "journald.conf.d" / "fleet.conf").write_text(_JOURNALD)
    for unit in _MASKED_UNITS:
        link = root / "etc" / "systemd" / "system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    for wanted in (root / "etc" / "systemd" / "system" / "timers.target.wants").glob("*"):
        wanted.unlink()
    (root / "root" / ".ssh").mkdir(mode=0o700, exist_ok=True)
    for cached in (root / "var" / "cache" / "apt" / "archives").glob("*.deb"):
        cached.unlink()


def ensure_rootfs(suite: str = SUITE) -> Path:
    """The base rootfs for test hosts, built once with debootstrap (about a minute) into the cache."""
    check_prerequisites()
    dest = CACHE / rootfs_key(suite)
    rootfs = dest / "rootfs"
    if (dest / _MARKER).exists():
        return rootfs
    with _locked(CACHE / f".{dest.name}.lock"):
        if (dest / _MARKER).exists():
            return rootfs
        shutil.rmtree(dest, ignore_errors=True)
        for stale in CACHE.glob(f".tmp-{dest.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=CACHE))
        mirror = _mirror()
        log(f"building the test host rootfs ({suite} minbase from {mirror}) into {dest}; about a minute")
        started = time.monotonic()
        try:
            command = [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                suite,
                str(tmp / "rootfs"),
                mirror,
            ]
            with (tmp / "debootstrap.log").open("wb") as output:
                result = subprocess.run(
                    command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, check=False
                )
            if result.returncode != 0:
                raise TestEnvError(
                    f"debootstrap failed (exit {result.returncode}): {shlex.join(command)}\n"
                    f"{_tail(tmp / 'debootstrap.log')}"
                )
            _prepare_base(tmp / "rootfs")
            (tmp / _MARKER).write_text(json.dumps({"suite": suite, "packages": PACKAGES, "mirror": mirror}))
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"test host rootfs built in {time.monotonic() - started:.0f}s")
    return rootfs


# --------------------------------------------------------------------------
# the fleet as its users see it (tests, bench, CLI)


@dataclasses.dataclass(frozen=True)
class FleetHost:
    """One test host: inventory name, address on the bridge, and where its disk is visible from here."""

    name: str
    address: str
    machine: str
    veth: str
    root: Path


@dataclasses.dataclass(frozen=True)
class Fleet:
    """A running fleet, read from its directory; control requests go to its supervisor."""

    directory: Path
    hosts: tuple[FleetHost, ...]
    package_dir: Path
    package_url: str
    private_key: Path
    known_hosts: Path
    inventory: Path
    ssh_config: Path
    supervisor_pid: int

    @classmethod
    def load(cls, directory: Path) -> Fleet:
        """The fleet described by `directory`/fleet.json (written once every host answered)."""
        try:
            data = json.loads((directory / "fleet.json").read_text())
        except (OSError, ValueError) as exc:
            raise TestEnvError(f"no running test fleet in {directory}: {exc}") from exc
        hosts = tuple(
            FleetHost(name=h["name"], address=h["address"], machine=h["machine"], veth=h["veth"], root=Path(h["root"]))
            for h in data["hosts"]
        )
        return cls(
            directory=directory,
            hosts=hosts,
            package_dir=Path(data["package_dir"]),
            package_url=data["package_url"],
            private_key=Path(data["private_key"]),
            known_hosts=Path(data["known_hosts"]),
            inventory=Path(data["inventory"]),
            ssh_config=Path(data["ssh_config"]),
            supervisor_pid=int(data["supervisor_pid"]),
        )

    def host(self, name: str) -> FleetHost:
        """The host called `name` (h1, h2, ...)."""
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    def alive(self) -> bool:
        """Whether the supervisor still runs (and so the fleet)."""
        return _proc_starttime(self.supervisor_pid) is not None

    def ssh(self, name: str, command: str, *, check: bool = True, timeout: float = 30.0) -> str:
        """Run a shell command on a host as root over ssh (host key checked); its stdout."""
        argv = ["ssh", "-F", str(self.ssh_config), self.host(name).address, command]
        try:
            result = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise TestEnvError(f"ssh {name} {command!r}: no answer within {timeout:g}s") from exc
        if check and result.returncode != 0:
            raise TestEnvError(f"ssh {name} {command!r} exited {result.returncode}: {result.stderr.strip()}")
        return result.stdout

    def power_off(self, name: str) -> None:
        """Shut the host down cleanly (its disk is kept)."""
        self._control("power_off", name)

    def boot(self, name: str) -> None:
        """Boot a powered-off host again and wait until sshd answers and systemd is up."""
        self._control("boot", name)

    def cut(self, name: str) -> None:
        """Unplug the host's network cable (its veth goes down; packets vanish, connections hang)."""
        self._control("cut", name)

    def heal(self, name: str) -> None:
        """Plug the cable back in."""
        self._control("heal", name)

    def status(self) -> dict[str, str]:
        """Per host: running, powered-off or cut-off."""
        answer = self._control("status", None)
        return dict(answer["hosts"])

    def _control(self, operation: str, host: str | None) -> dict[str, Any]:
        request = json.dumps({"op": operation, "host": host}).encode() + b"\n"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(CONTROL_TIMEOUT_S)
                conn.connect(str(self.directory / "control.sock"))
                conn.sendall(request)
                reply = b""
                while not reply.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    reply += chunk
        except OSError as exc:
            raise TestEnvError(f"fleet supervisor in {self.directory} does not answer ({operation}): {exc}") from exc
        try:
            answer: dict[str, Any] = json.loads(reply)
        except ValueError as exc:
            raise TestEnvError(f"fleet supervisor sent garbage for {operation}: {reply[:200]!r}") from exc
        if not answer.get("ok"):
            raise TestEnvError(f"fleet {operation} {host or ''}: {answer.get('error')}")
        return answer


def default_directory() -> Path:
    """Where `scripts/testenv up fleet` keeps the fleet: $REACTOR_FLEET_DIR or <rundir>/fleet."""
    return Path(os.environ.get("REACTOR_FLEET_DIR") or rundir() / "fleet")


def start_fleet(workdir: Path, hosts: int | None = None, *, owned: bool = False) -> Service:
    """Boot a fleet of `hosts` hosts ($REACTOR_FLEET_HOSTS, default 3) in `workdir`; return its supervisor.

    `owned`: the fleet belongs to this process and removes itself if this process dies (pytest sessions);
    otherwise it runs until stopped (`scripts/testenv down fleet`).
    """
    count = hosts if hosts is not None else int(os.environ.get("REACTOR_FLEET_HOSTS") or DEFAULT_HOSTS)
    if not 1 <= count <= MAX_HOSTS:
        raise TestEnvError(f"a fleet has 1 to {MAX_HOSTS} hosts, not {count}")
    rootfs = ensure_rootfs()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "fleet.json").unlink(missing_ok=True)
    logfile = workdir.parent / f"{workdir.name}.log"
    owner = os.getpid() if owned else 0
    command = [sys.executable, "-m", "tests.infra.fleet", "supervise", str(workdir), str(count), str(rootfs)]
    command += ["--owner", str(owner)]
    started = time.monotonic()
    with logfile.open("ab") as output:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    service = Service(
        name="fleet",
        pid=process.pid,
        env={},
        workdir=str(workdir),
        log=str(logfile),
        stop_grace=STOP_GRACE_S,
        starttime=_proc_starttime(process.pid),
        _proc=process,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        code = process.poll()
        if code is not None:
            raise TestEnvError(f"the fleet supervisor exited (code {code}); log {logfile}:\n{_tail(logfile)}")
        with contextlib.suppress(TestEnvError):
            fleet = Fleet.load(workdir)
            break
        if time.monotonic() > deadline:
            service.stop()
            raise TestEnvError(f"the fleet was not up after {START_TIMEOUT_S:.0f}s; log {logfile}:\n{_tail(logfile)}")
        time.sleep(0.2)
    service.env = {
        "REACTOR_FLEET_DIR": str(workdir),
        "REACTOR_PHYSICAL_INVENTORY": str(fleet.inventory),
        "REACTOR_PHYSICAL_KNOWN_HOSTS": str(fleet.known_hosts),
        "REACTOR_PHYSICAL_PRIVATE_KEY": str(fleet.private_key),
        "REACTOR_PHYSICAL_USER": "root",
    }
    log(f"fleet of {count} hosts up in {time.monotonic() - started:.1f}s ({fleet.hosts[0].address}..); dir {workdir}")
    return service


# --------------------------------------------------------------------------
# low-level plumbing (runs inside the supervisor)


def _sh(*argv: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise TestEnvError(f"{shlex.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def _cgroup_dirs(machine: str) -> list[Path]:
    """A cgroup of its own per host in each hierarchy nspawn uses.

    Here nspawn's own cgroup is the root, where it would create /payload and /supervisor shared by every
    host, and their systemds would fight over (and kill) each other's units.
    """
    base = Path("/sys/fs/cgroup")
    if (base / "cgroup.controllers").exists():  # pure cgroup2
        return [base / CGROUP_GROUP / machine]
    return [base / tree / CGROUP_GROUP / machine for tree in ("systemd", "unified") if (base / tree).is_dir()]


def _remove_cgroup(path: Path) -> None:
    if not path.is_dir():
        return
    for directory in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            directory.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


def _mounts() -> list[tuple[str, str, str]]:
    """(type, mount point, options) of every mount."""
    entries = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 4:
            entries.append((fields[2], fields[1].replace("\\040", " "), fields[3]))
    return entries


def _our_nspawn_pids() -> list[int]:
    """Processes running systemd-nspawn for one of our machines (left behind by a killed supervisor)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"systemd-nspawn") and any(a.startswith(f"{PREFIX}-h".encode()) for a in argv):
            found.append(int(proc.name))
    return found


def clean_leftovers() -> None:
    """Remove what a killed fleet left: nspawn processes, overlay mounts, netns, links, bridge, cgroups."""
    for pid in _our_nspawn_pids():
        log(f"killing leftover systemd-nspawn (pid {pid})")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _our_nspawn_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    marker = f"lowerdir={CACHE / 'fleet-rootfs-'}"
    for kind, mountpoint, options in reversed(_mounts()):
        if kind == "overlay" and marker in options:
            log(f"unmounting leftover {mountpoint}")
            _sh("umount", "-l", mountpoint, check=False)
    for line in _sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if name.startswith(PREFIX):
            _sh("ip", "link", "del", name, check=False)
    for line in _sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(f"{PREFIX}-"):
            _sh("ip", "netns", "del", name, check=False)
    for tree in ("", "systemd", "unified"):
        _remove_cgroup(Path("/sys/fs/cgroup") / tree / CGROUP_GROUP)
    for propagate in Path("/run/systemd/nspawn/propagate").glob(f"{PREFIX}-*"):
        shutil.rmtree(propagate, ignore_errors=True)


class _Host:
    """A host as the supervisor manages it."""

    def __init__(self, index: int, workdir: Path, rootfs: Path) -> None:
        self.index = index
        self.name = f"h{index}"
        self.address = f"{SUBNET}.{10 + index}"
        self.machine = f"{PREFIX}-h{index}"
        self.veth = f"{PREFIX}-v{index}"
        self.dir = workdir / "hosts" / self.name
        self.merged = self.dir / "merged"
        self.rootfs = rootfs
        self.process: subprocess.Popen[bytes] | None = None
        self.cut = False

    def describe(self) -> dict[str, str]:
        return {
            "name": self.name,
            "address": self.address,
            "machine": self.machine,
            "veth": self.veth,
            "root": str(self.merged),
        }

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def create(self, authorized_key: str) -> str:
        """Mount the disk, give the host its identity and network; return its public host key."""
        for sub in ("upper", "work", "merged"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        _sh(
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir={self.rootfs},upperdir={self.dir / 'upper'},workdir={self.dir / 'work'}",
            str(self.merged),
        )
        root = self.merged
        (root / "etc" / "machine-id").write_text(uuid.uuid4().hex + "\n")
        (root / "etc" / "hostname").write_text(self.name + "\n")
        # The journal survives a power-off: it is the evidence of what ran on the host across boots.
        (root / "etc" / "systemd" / "journald.conf.d" / "persistent.conf").write_text(_JOURNAL_PERSISTENT)
        key = root / "etc" / "ssh" / "ssh_host_ed25519_key"
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self.name, "-f", str(key))
        authorized = root / "root" / ".ssh" / "authorized_keys"
        authorized.parent.mkdir(mode=0o700, exist_ok=True)
        authorized.write_text(authorized_key)
        authorized.chmod(0o600)
        _sh("ip", "netns", "add", self.machine)
        _sh("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.machine)
        _sh("ip", "link", "set", self.veth, "master", BRIDGE, "up")
        _sh("ip", "-n", self.machine, "addr", "add", f"{self.address}/24", "dev", "eth0")
        _sh("ip", "-n", self.machine, "link", "set", "lo", "up")
        _sh("ip", "-n", self.machine, "link", "set", "eth0", "up")
        # Deliberately no default route: a host reaches only the bridge's /24.
        return (key.with_suffix(".pub")).read_text().split(" ")[1]

    def boot(self, logdir: Path) -> None:
        if self.running():
            return
        cgroups = _cgroup_dirs(self.machine)
        for cgroup in cgroups:
            _remove_cgroup(cgroup)
            cgroup.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(Path("/run/systemd/nspawn/propagate") / self.machine, ignore_errors=True)
        # The wrapper moves itself into the host's cgroups, then becomes nspawn (no preexec_fn in threads).
        script = 'for d in $1; do echo $$ > "$d/cgroup.procs"; done; shift; exec "$@"'
        nspawn = [
            "systemd-nspawn",
            "--quiet",
            "-D",
            str(self.merged),
            "-M",
            self.machine,
            f"--hostname={self.name}",
            "-b",
            "--register=no",  # no machined here (PID 1 is not systemd)
            "--keep-unit",
            "--link-journal=no",
            "--console=passive",
            "--resolv-conf=off",
            "--timezone=off",
            f"--network-namespace-path=/run/netns/{self.machine}",
        ]
        with (logdir / f"{self.name}.console.log").open("ab") as output:
            self.process = subprocess.Popen(
                ["sh", "-c", script, "sh", " ".join(str(c) for c in cgroups), *nspawn],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, ssh_config: Path, timeout: float = BOOT_TIMEOUT_S) -> None:
        """Until sshd answers (with the host key we know) and systemd finished booting."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                raise TestEnvError(f"{self.name}: systemd-nspawn exited while booting")
            try:
                with socket.create_connection((self.address, 22), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TestEnvError(f"{self.name}: sshd not listening after {timeout:.0f}s") from None
                time.sleep(0.1)
        remaining = max(5.0, deadline - time.monotonic())
        command = [
            "ssh",
            "-F",
            str(ssh_config),
            self.address,
            f"timeout {int(remaining)} systemctl is-system-running --wait",
        ]
        while True:
            result = subprocess.run(
                command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=remaining + 5, check=False
            )
            state = result.stdout.strip()
            if state == "running":
                return
            if state == "degraded":
                failed = subprocess.run(
                    ["ssh", "-F", str(ssh_config), self.address, "systemctl --failed --plain --no-legend"],
                    capture_output=True,
                    text=True,
                    stdin=subprocess.DEVNULL,
                    timeout=30,
                    check=False,
                ).stdout
                log(f"{self.name}: booted degraded; failed units: {' | '.join(failed.splitlines())}")
                return
            if time.monotonic() > deadline:
                raise TestEnvError(f"{self.name}: not booted after {timeout:.0f}s: {state!r} {result.stderr.strip()}")
            time.sleep(0.3)

    def power_off(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            # nspawn turns SIGTERM into SIGRTMIN+3 for the host's systemd: a clean poweroff.
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(POWER_OFF_GRACE_S)
            except subprocess.TimeoutExpired:
                log(f"{self.name}: no clean poweroff within {POWER_OFF_GRACE_S:.0f}s; SIGKILL")
                process.kill()
                process.wait(10)
        self.process = None
        for cgroup in _cgroup_dirs(self.machine):
            _remove_cgroup(cgroup)
        shutil.rmtree(Path("/run/systemd/nspawn/propagate") / self.machine, ignore_errors=True)

    def set_link(self, up: bool) -> None:
        _sh("ip", "link", "set", self.veth, "up" if up else "down")
        self.cut = not up

    def destroy(self) -> None:
        self.power_off()
        if os.path.ismount(self.merged):
            _sh("umount", str(self.merged), check=False)
            if os.path.ismount(self.merged):
                _sh("umount", "-l", str(self.merged), check=False)
        _sh("ip", "link", "del", self.veth, check=False)
        _sh("ip", "netns", "del", self.machine, check=False)


class _Supervisor:
    """Owns one fleet from boot to teardown."""

    def __init__(self, workdir: Path, count: int, rootfs: Path, owner: int) -> None:
        self.workdir = workdir
        self.rootfs = rootfs
        self.owner = owner
        self.owner_start = _proc_starttime(owner) if owner else None
        self.hosts = [_Host(index, workdir, rootfs) for index in range(1, count + 1)]
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.http: http.server.ThreadingHTTPServer | None = None
        self.control: socketserver.ThreadingUnixStreamServer | None = None

    @property
    def ssh_config(self) -> Path:
        return self.workdir / "ssh_config"

    def host(self, name: str) -> _Host:
        for host in self.hosts:
            if host.name == name:
                return host
        raise TestEnvError(f"no host {name!r} in this fleet")

    def run(self) -> int:
        lock_file = LOCK_PATH.open("w")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(OWNER_PATH.read_text())
            except (OSError, ValueError):
                holder = {}
            log(
                f"another test fleet runs on this machine (supervisor pid {holder.get('pid')}, dir "
                f"{holder.get('dir')}): use it (REACTOR_FLEET_DIR) or stop it (scripts/testenv down fleet)"
            )
            return 1
        OWNER_PATH.write_text(json.dumps({"pid": os.getpid(), "dir": str(self.workdir)}))
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: self.stopping.set())
        try:
            self.setup()
        except (TestEnvError, OSError, subprocess.SubprocessError) as exc:
            log(f"fleet failed: {exc}")
            self.stopping.set()
        try:
            while not self.stopping.wait(1.0):
                if self.owner and _proc_starttime(self.owner) != self.owner_start:
                    log(f"the owning process {self.owner} is gone; tearing the fleet down")
                    break
            return 0 if (self.workdir / "fleet.json").exists() else 1
        finally:
            self.teardown()
            OWNER_PATH.unlink(missing_ok=True)
            lock_file.close()

    def setup(self) -> None:
        started = time.monotonic()
        clean_leftovers()
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(parents=True)
        (self.workdir / "packages").mkdir()
        key = self.workdir / "id_ed25519"
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "deploy-reactor-fleet", "-f", str(key))
        _sh("ip", "link", "add", BRIDGE, "type", "bridge")
        _sh("ip", "addr", "add", f"{BRIDGE_ADDRESS}/24", "dev", BRIDGE)
        _sh("ip", "link", "set", BRIDGE, "up")
        public_key = key.with_suffix(".pub").read_text()
        host_keys = {host.name: host.create(public_key) for host in self.hosts}
        self.write_client_files(key, host_keys)
        for host in self.hosts:
            host.boot(self.workdir)
        self.start_package_server()
        with ThreadPoolExecutor(max_workers=len(self.hosts)) as pool:
            for future in [pool.submit(host.wait_ready, self.ssh_config) for host in self.hosts]:
                future.result()
        self.start_control()
        assert self.http is not None
        port = self.http.server_address[1]
        description = {
            "supervisor_pid": os.getpid(),
            "hosts": [host.describe() for host in self.hosts],
            "package_dir": str(self.workdir / "packages"),
            "package_url": f"http://{BRIDGE_ADDRESS}:{port}/",
            "private_key": str(key),
            "known_hosts": str(self.workdir / "known_hosts"),
            "inventory": str(self.workdir / "inventory.ini"),
            "ssh_config": str(self.ssh_config),
        }
        staging = self.workdir / "fleet.json.new"
        staging.write_text(json.dumps(description, indent=1))
        staging.replace(self.workdir / "fleet.json")
        log(
            f"{len(self.hosts)} hosts up in {time.monotonic() - started:.1f}s; packages at {description['package_url']}"
        )

    def write_client_files(self, key: Path, host_keys: dict[str, str]) -> None:
        known = "".join(f"{h.name},{h.address} ssh-ed25519 {host_keys[h.name]}\n" for h in self.hosts)
        (self.workdir / "known_hosts").write_text(known)
        names = " ".join(h.name for h in self.hosts)
        self.ssh_config.write_text(
            f"Host {SUBNET}.* {names}\n"
            "  User root\n"
            f"  IdentityFile {key}\n"
            "  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {self.workdir / 'known_hosts'}\n"
            "  StrictHostKeyChecking yes\n"
            "  BatchMode yes\n"
            "  ConnectTimeout 5\n"
            "  ServerAliveInterval 2\n"  # a cut cable is noticed in ~6 s, also by Ansible's mux masters
            "  ServerAliveCountMax 3\n"
            "  LogLevel ERROR\n" + "".join(f"Host {h.name}\n  HostName {h.address}\n" for h in self.hosts)
        )
        lines = ["[fleet]", *(f"{h.name} ansible_host={h.address}" for h in self.hosts), "", "[fleet:vars]"]
        lines += [
            "ansible_user=root",
            f"ansible_ssh_private_key_file={key}",
            f"ansible_ssh_common_args='-F {self.ssh_config}'",
        ]
        (self.workdir / "inventory.ini").write_text("\n".join(lines) + "\n")

    def start_package_server(self) -> None:
        handler = functools.partial(_PackageHandler, directory=str(self.workdir / "packages"))
        self.http = http.server.ThreadingHTTPServer((BRIDGE_ADDRESS, 0), handler)
        self.http.daemon_threads = True
        threading.Thread(target=self.http.serve_forever, name="packages", daemon=True).start()

    def start_control(self) -> None:
        supervisor = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                try:
                    request = json.loads(self.rfile.readline())
                    answer = supervisor.handle(str(request["op"]), request.get("host"))
                except Exception as exc:  # noqa: BLE001 - the caller gets every failure as an answer
                    answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                self.wfile.write(json.dumps(answer).encode() + b"\n")

        path = self.workdir / "control.sock"
        path.unlink(missing_ok=True)
        self.control = socketserver.ThreadingUnixStreamServer(str(path), Handler)
        self.control.daemon_threads = True
        threading.Thread(target=self.control.serve_forever, name="control", daemon=True).start()

    def handle(self, operation: str, name: str | None) -> dict[str, Any]:
        with self.lock:
            if operation == "status":
                states = {
                    h.name: "cut-off" if h.cut else "running" if h.running() else "powered-off" for h in self.hosts
                }
                return {"ok": True, "hosts": states}
            if name is None:
                raise TestEnvError(f"{operation} needs a host")
            host = self.host(name)
            if operation == "power_off":
                host.power_off()
            elif operation == "boot":
                host.boot(self.workdir)
                host.wait_ready(self.ssh_config)
            elif operation == "cut":
                host.set_link(up=False)
            elif operation == "heal":
                host.set_link(up=True)
            else:
                raise TestEnvError(f"unknown operation {operation!r}")
            log(f"{operation} {name}: done")
            return {"ok": True}

    def teardown(self) -> None:
        log("tearing the fleet down")
        for server in (self.control, self.http):
            if server is not None:
                server.shutdown()
                server.server_close()
        with ThreadPoolExecutor(max_workers=max(1, len(self.hosts))) as pool:
            for future in [pool.submit(host.power_off) for host in self.hosts]:
                with contextlib.suppress(Exception):
                    future.result()
        for host in self.hosts:
            try:
                host.destroy()
            except Exception as exc:  # noqa: BLE001 - remove the rest whatever one host does
                log(f"{host.name}: {exc}")
        _sh("ip", "link", "del", BRIDGE, check=False)
        clean_leftovers()
        shutil.rmtree(self.workdir / "hosts", ignore_errors=True)
        for name in ("fleet.json", "control.sock"):
            (self.workdir / name).unlink(missing_ok=True)
        log("fleet removed")


class _PackageHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the packages directory; logs to the supervisor's log."""

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"[packages] {self.address_string()} {format % args}\n")


# --------------------------------------------------------------------------
# CLI


@contextlib.contextmanager
def _errors_to_exit() -> Iterator[None]:
    try:
        yield
    except TestEnvError as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def main(argv: list[str]) -> int:
    """`supervise` (internal), and status/power-off/boot/cut/heal/ssh for a running fleet."""
    parser = argparse.ArgumentParser(prog="python3 -m tests.infra.fleet", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="fleet directory (default: $REACTOR_FLEET_DIR)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    supervise = sub.add_parser("supervise", help="internal: boot and own a fleet")
    supervise.add_argument("workdir", type=Path)
    supervise.add_argument("count", type=int)
    supervise.add_argument("rootfs", type=Path)
    supervise.add_argument("--owner", type=int, default=0)
    sub.add_parser("status", help="one line per host")
    for name in ("power-off", "boot", "cut", "heal"):
        sub.add_parser(name).add_argument("host")
    ssh = sub.add_parser("ssh", help="run a command on a host")
    ssh.add_argument("host")
    ssh.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    if args.cmd == "supervise":
        return _Supervisor(args.workdir.resolve(), args.count, args.rootfs, args.owner).run()
    with _errors_to_exit():
        fleet = Fleet.load(args.dir or default_directory())
        if args.cmd == "status":
            for name, state in fleet.status().items():
                print(f"{name}\t{fleet.host(name).address}\t{state}")
        elif args.cmd == "ssh":
            print(fleet.ssh(args.host, " ".join(args.command) or "true"), end="")  # as ssh joins them
        else:
            getattr(fleet, args.cmd.replace("-", "_"))(args.host)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
