"""A KRaft broker with a SASL_SSL listener (SCRAM-SHA-512 over TLS), an authorizer and ACLs per principal.

The CA and the broker's certificate (loopback SANs) are made with `cryptography`; SCRAM users are created by
Kafka's own `StorageTool format --add-scram` (the KRaft way: credentials in the bootstrap metadata) and ACLs and
topics by Kafka's own `AclCommand` and `TopicCommand` (the `kafka-tools` jar, cached next to the broker's libs).
The controller listener (loopback, broker to controller only) speaks SASL_PLAINTEXT with PLAIN, since KRaft
controllers cannot check SCRAM; its one user is the harness's super user.

Principals (see `grant`): `admin` (super user: the harness), `worker` (the reactor's workers), `ci` (submits
releases), `subscriber` (reads what happened). Passwords are random, live only in files of mode 0600 in the
broker's workdir and in `Service.env` of the worker principal (printed as `export` lines by `scripts/testenv up`,
kept in its 0600 state file). One exception: `--add-scram` takes them on StorageTool's command line, visible in
the process list for the seconds the format runs (Kafka's tool has no file option for them).
Needs `cryptography` (a dev dependency; Debian's `python3-cryptography` for `scripts/testenv` outside a venv).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tests.infra import testenv
from tests.infra.testenv import HOST, Service, TestEnvError, log

ADMIN = "admin"
WORKER = "worker"
CI = "ci"
SUBSCRIBER = "subscriber"
PRINCIPALS = (ADMIN, WORKER, CI, SUBSCRIBER)
MECHANISM = "SCRAM-SHA-512"
# The consumer groups a `reactor worker` joins (reactor/runtime.py: executor, rollback, pacer, cdevents roles).
WORKER_GROUPS = ("executor", "rollback", "pacer", "cdevents")
TOPICS = ("commands", "outcomes", "releases", "dlq")
# What `reactor topics create` gives the releases topic (reactor.adapters.kafka_security.MAX_MESSAGE_BYTES; this
# harness runs without the project's packages, and a unit test keeps the two equal).
RELEASES_MAX_MESSAGE_BYTES = 33 * 1024 * 1024
PARTITIONS = 4  # of each topic the harness creates


def _private(path: Path, text: str) -> Path:
    """Write `text` to a new file only its owner can read."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    return path


def make_certificates(directory: Path) -> tuple[Path, Path]:
    """A CA (`ca.pem`) and the broker's key and certificate chain (`broker.pem`, 0600) for 127.0.0.1/localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "deploy-reactor test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(pem))
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    broker_file = _private(directory / "broker.pem", (key_pem + cert.public_bytes(pem) + ca.public_bytes(pem)).decode())
    return ca_file, broker_file


def ensure_kafka_tools(version: str = testenv.KAFKA_VERSION) -> Path:
    """The `kafka-tools` jar of `version` (AclCommand, TopicCommand), fetched once into the cache; the broker's
    libs carry the rest of its classpath."""
    dest = testenv.CACHE / f"kafka-tools-{version}"
    jar = dest / f"kafka-tools-{version}.jar"
    if jar.exists():
        return jar
    if not shutil.which("mvn"):
        raise TestEnvError("mvn not found (apt-get install maven)")
    log(f"fetching kafka-tools {version} from Maven Central into {dest}")
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / f".tmp-{os.getpid()}"
    testenv._run(
        [
            "mvn",
            "-q",
            "-B",
            "-Dstyle.color=never",
            f"org.apache.maven.plugins:maven-dependency-plugin:{testenv.MAVEN_DEPENDENCY_PLUGIN_VERSION}:copy",
            f"-Dartifact=org.apache.kafka:kafka-tools:{version}",
            f"-DoutputDirectory={tmp}",
        ],
        cwd=dest,
        what=f"Maven fetch of kafka-tools {version}",
    )
    (tmp / jar.name).rename(jar)
    shutil.rmtree(tmp, ignore_errors=True)
    return jar


def _jaas(module: str, user: str, password: str, **users: str) -> str:
    extra = "".join(f' user_{name}="{secret}"' for name, secret in users.items())
    return f'{module} required username="{user}" password="{password}"{extra};'


def _properties(port: int, cport: int, workdir: Path, ca_file: Path, broker_file: Path, admin_password: str) -> str:
    plain = "org.apache.kafka.common.security.plain.PlainLoginModule"
    scram = "org.apache.kafka.common.security.scram.ScramLoginModule"
    base = testenv._kafka_properties(port, cport, workdir / "data")
    props = {
        "listeners": f"SASL_SSL://{HOST}:{port},CONTROLLER://{HOST}:{cport}",
        "advertised.listeners": f"SASL_SSL://{HOST}:{port}",
        "inter.broker.listener.name": "SASL_SSL",
        "listener.security.protocol.map": "CONTROLLER:SASL_PLAINTEXT,SASL_SSL:SASL_SSL",
        "sasl.enabled.mechanisms": MECHANISM,
        "sasl.mechanism.inter.broker.protocol": MECHANISM,
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": _jaas(scram, ADMIN, admin_password),
        "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
        "sasl.mechanism.controller.protocol": "PLAIN",
        "listener.name.controller.plain.sasl.jaas.config": _jaas(
            plain, ADMIN, admin_password, **{ADMIN: admin_password}
        ),
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(broker_file),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(ca_file),
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "allow.everyone.if.no.acl.found": "false",
        "super.users": f"User:{ADMIN}",
        "auto.create.topics.enable": "false",
    }
    lines = [line for line in base.splitlines() if line.split("=", 1)[0] not in props]
    return "".join(f"{line}\n" for line in lines) + "".join(f"{k}={v}\n" for k, v in props.items())


def _client_properties(user: str, password: str, ca_file: Path) -> str:
    scram = "org.apache.kafka.common.security.scram.ScramLoginModule"
    return (
        "security.protocol=SASL_SSL\n"
        f"sasl.mechanism={MECHANISM}\n"
        f"sasl.jaas.config={_jaas(scram, user, password)}\n"
        "ssl.truststore.type=PEM\n"
        f"ssl.truststore.location={ca_file}\n"
    )


def _tool(svc: Service, main: str, *args: str, what: str) -> None:
    """Run one of Kafka's command-line tools as the admin against the broker; errors name no password."""
    workdir = Path(svc.workdir)
    libs = testenv.ensure_kafka() / "libs"
    cmd = testenv._kafka_java_cmd(libs, workdir, "256m", main, *args)
    cmd[1:1] = ["-XX:TieredStopAtLevel=1"]
    cmd[cmd.index("-cp") + 1] = f"{libs}/*:{ensure_kafka_tools()}"
    bootstrap = svc.env["REACTOR_KAFKA_BOOTSTRAP"]
    cmd += ["--bootstrap-server", bootstrap, "--command-config", str(workdir / "admin.properties")]
    res = subprocess.run(cmd, check=False, cwd=workdir, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).splitlines()[-20:])
        raise TestEnvError(f"{what} failed (exit {res.returncode}):\n{tail}")


def _topic(prefix: str, name: str) -> str:
    return prefix + name


def _configs(name: str) -> list[str]:
    """The settings `reactor topics create` gives topic `name` (the releases topic takes a release's request)."""
    return ["--config", f"max.message.bytes={RELEASES_MAX_MESSAGE_BYTES}"] if name == "releases" else []


def grant(svc: Service, prefix: str, *, partitions: int = PARTITIONS) -> None:
    """Create the reactor's topics under `prefix` (as the admin) and the ACLs of each principal on them.

    worker: READ commands, releases, outcomes (executor: commands; pacer and cdevents: releases, outcomes;
    rollback: outcomes); WRITE commands (the pacer's DeployRequested/RollbackRequested, the rollback consumer's
    RollbackRequested), outcomes (executor's NodeDeployed/NodeFailed..., the pacer's deadline failures), releases
    (the pacer's ReleaseStarted/Completed... outbox), dlq (rejected messages); READ on its consumer groups.
    ci: WRITE releases only. subscriber: READ outcomes and releases, and groups named `<prefix>subscriber*`.
    DESCRIBE comes with READ and WRITE. Nobody but the admin may create, delete or alter anything. Not granted:
    WRITE on `<prefix>cdevents` (the cdevents role, outside `--role all`, would need it) and READ on dlq (only
    `reactor replay`/`recover` read it: an operator's job, as the admin).
    """
    t = {name: _topic(prefix, name) for name in TOPICS}
    runs = [
        (
            "org.apache.kafka.tools.TopicCommand",
            ["--create", "--if-not-exists", "--topic", t[name], "--partitions", str(partitions), *_configs(name)],
            f"creating topic {t[name]}",
        )
        for name in TOPICS
    ]
    # One AclCommand run per principal, operation and pattern type (a pattern type applies to every resource of
    # a run), each JVM start costing seconds.
    runs_of: dict[tuple[str, str, str], list[str]] = {}
    for binding in acl_bindings(prefix):
        resources = runs_of.setdefault((binding.principal, binding.operation, binding.pattern), [])
        resources += [f"--{binding.resource}", binding.name]
    for (user, operation, pattern), resources in runs_of.items():
        args = ["--add", "--allow-principal", f"User:{user}", "--operation", operation, *resources]
        if pattern != "literal":
            args += ["--resource-pattern-type", pattern]
        runs.append(("org.apache.kafka.tools.AclCommand", args, f"ACL {operation} for {user}"))
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=2) as pool:
        for fut in [pool.submit(_tool, svc, main, *args, what=what) for main, args, what in runs]:
            fut.result()
    log(f"topics and ACLs for prefix {prefix!r} in {time.monotonic() - t0:.1f}s")


@dataclass(frozen=True)
class AclBinding:
    """One ACL: `principal` may do `operation` on the `resource` (topic or group) `name`, matched `pattern`."""

    principal: str
    operation: Literal["Read", "Write"]
    resource: Literal["topic", "group"]
    name: str
    pattern: Literal["literal", "prefixed"] = "literal"


def acl_bindings(prefix: str) -> list[AclBinding]:
    """The ACLs of each principal on the reactor's topics under `prefix` (see `grant` for why each is there)."""
    t = {name: _topic(prefix, name) for name in TOPICS}
    return [
        *(AclBinding(WORKER, "Read", "topic", t[name]) for name in ("commands", "releases", "outcomes")),
        *(AclBinding(WORKER, "Read", "group", f"{prefix}{group}") for group in WORKER_GROUPS),
        *(AclBinding(WORKER, "Write", "topic", t[name]) for name in ("commands", "outcomes", "releases", "dlq")),
        AclBinding(CI, "Write", "topic", t["releases"]),
        *(AclBinding(SUBSCRIBER, "Read", "topic", t[name]) for name in ("outcomes", "releases")),
        AclBinding(SUBSCRIBER, "Read", "group", f"{prefix}subscriber", "prefixed"),
    ]


def revoke(svc: Service, user: str, operation: str, topic: str) -> None:
    """Remove one topic ACL (tests prove a protection by taking it away)."""
    _tool(
        svc,
        "org.apache.kafka.tools.AclCommand",
        "--remove",
        "--force",
        "--allow-principal",
        f"User:{user}",
        "--operation",
        operation,
        "--topic",
        topic,
        what=f"removing ACL {operation} for {user} on {topic}",
    )


def add_acl(svc: Service, user: str, operation: str, topic: str) -> None:
    """Add one topic ACL."""
    _tool(
        svc,
        "org.apache.kafka.tools.AclCommand",
        "--add",
        "--allow-principal",
        f"User:{user}",
        "--operation",
        operation,
        "--topic",
        topic,
        what=f"adding ACL {operation} for {user} on {topic}",
    )


def passwords(svc: Service) -> dict[str, str]:
    """Each principal's password, from the broker's 0600 file."""
    text = (Path(svc.workdir) / "passwords").read_text()
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def start_secure_kafka(
    workdir: Path, version: str = testenv.KAFKA_VERSION, *, prefix: str | None = None, outlive_parent: bool = False
) -> Service:
    """Format and start a SASL_SSL broker in `workdir` (wiped first); with `prefix`, its topics and ACLs too.

    `env` holds the worker principal's client settings (REACTOR_KAFKA_*)."""
    home = testenv.ensure_kafka(version)
    ensure_kafka_tools(version)
    libs = home / "libs"
    workdir = Path(workdir).resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True, mode=0o700)
    secret = {user: secrets.token_urlsafe(24) for user in PRINCIPALS}
    _private(workdir / "passwords", "".join(f"{user}={password}\n" for user, password in secret.items()))
    ca_file, broker_file = make_certificates(workdir)
    port, cport = testenv._free_ports(2)
    _private(workdir / "server.properties", _properties(port, cport, workdir, ca_file, broker_file, secret[ADMIN]))
    _private(workdir / "admin.properties", _client_properties(ADMIN, secret[ADMIN], ca_file))
    (workdir / "log4j2.properties").write_text(testenv._LOG4J2_PROPERTIES)
    (workdir / "log4j.properties").write_text(testenv._LOG4J1_PROPERTIES)
    logfile = workdir / "kafka.log"

    t0 = time.monotonic()
    scram = [
        arg for user in PRINCIPALS for arg in ("--add-scram", f"{MECHANISM}=[name={user},password={secret[user]}]")
    ]
    fmt = testenv._kafka_java_cmd(
        libs,
        workdir,
        "256m",
        "kafka.tools.StorageTool",
        "format",
        "-t",
        testenv._kafka_uuid(),
        "-c",
        str(workdir / "server.properties"),
        *scram,
    )
    fmt[1:1] = ["-XX:TieredStopAtLevel=1"]
    res = subprocess.run(fmt, check=False, cwd=workdir, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if res.returncode != 0:  # its command line holds the passwords: show only its output
        raise TestEnvError(
            f"Kafka storage format failed (exit {res.returncode}):\n{res.stdout[-2000:]}{res.stderr[-2000:]}"
        )

    cmd = testenv._kafka_java_cmd(libs, workdir, "512m", "kafka.Kafka", str(workdir / "server.properties"))
    cmd[1:1] = ["-Xms256m"]
    svc = testenv._spawn(
        "kafka", cmd, workdir, logfile, stop_grace=testenv.KAFKA_STOP_GRACE, outlive_parent=outlive_parent
    )
    svc.env = {
        "REACTOR_KAFKA_BOOTSTRAP": f"{HOST}:{port}",
        "REACTOR_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "REACTOR_KAFKA_SASL_MECHANISM": MECHANISM,
        "REACTOR_KAFKA_SASL_USERNAME": WORKER,
        "REACTOR_KAFKA_SASL_PASSWORD": secret[WORKER],
        "REACTOR_KAFKA_SSL_CAFILE": str(ca_file),
    }
    # Listening and logged "started" is ready: an ApiVersions probe in plaintext would only be refused by TLS.
    svc._ready = started(port, logfile)
    testenv._wait_until(svc, svc._ready, testenv.KAFKA_START_TIMEOUT, f"Kafka {version} (SASL_SSL) on {HOST}:{port}")
    log(f"Kafka {version} (SASL_SSL) ready on {HOST}:{port} (pid {svc.pid}) in {time.monotonic() - t0:.1f}s")
    if prefix is not None:
        try:
            grant(svc, prefix)
        except BaseException:
            svc.stop()
            raise
    return svc


def started(port: int, logfile: Path, *, since: int = 0) -> Callable[[], bool]:
    """Whether the broker listens on `port` and says in its log (after byte `since`) that it started."""

    def ready() -> bool:
        if not testenv._tcp_accepts(port):
            return False
        try:
            with open(logfile, "rb") as log_file:
                log_file.seek(since)
                text = log_file.read().decode("utf-8", "replace")
        except OSError:
            return False
        return "Kafka Server started" in text or "started (kafka.server" in text

    return ready
