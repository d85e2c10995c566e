"""The container files agree with the code: docker-compose.yml and the Dockerfile only use real settings with
valid values, real worker roles and real CLI commands, and wire Kafka, MongoDB and the workers in a startable
order. Nothing here needs a Docker engine."""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.core
import yaml
from pydantic import ValidationError

from reactor.cli.main import app
from reactor.runtime import Role
from reactor.settings import Settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"

ENV_PREFIX = str(Settings.model_config.get("env_prefix") or "")
# Read by the settings loader itself (where the TOML file is), so not a field of the model.
LOADER_VARIABLES = {f"{ENV_PREFIX}CONFIG"}
DEFAULT_HTTP_PORT = int(Settings.model_fields["http_port"].default)
WORKER_SERVICES = {"executor", "pacer", "rollback", "cdevents"}
HEALTHY = "service_healthy"
COMPLETED = "service_completed_successfully"

Service = dict[str, Any]
Instruction = tuple[str, str]


# ---------------------------------------------------------------------------------------------- compose file


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml as Compose reads it (anchors and merge keys resolved)."""
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict), "docker-compose.yml must be a mapping"
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Service]:
    """The `services:` mapping."""
    found = compose.get("services")
    assert isinstance(found, dict), "docker-compose.yml has no services mapping"
    return found


def environment(service: Service) -> dict[str, str]:
    """A service's environment, from either the mapping or the list form, values as strings."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        return dict(str(item).partition("=")[::2] for item in raw)
    assert isinstance(raw, dict), f"environment must be a mapping or a list, got {raw!r}"
    return {str(name): "" if value is None else str(value) for name, value in raw.items()}


def command(service: Service) -> list[str]:
    """A service's command as an argument list (string commands are split like Compose does)."""
    raw = service.get("command") or []
    return shlex.split(raw) if isinstance(raw, str) else [str(part) for part in raw]


def depends_on(service: Service) -> dict[str, str]:
    """Dependency name -> condition (the short list form means `service_started`)."""
    raw = service.get("depends_on") or {}
    if isinstance(raw, list):
        return {str(name): "service_started" for name in raw}
    return {str(name): str((spec or {}).get("condition", "service_started")) for name, spec in raw.items()}


def published(service: Service) -> list[tuple[str, str]]:
    """(host port or range, container port) of every published port, short or long syntax."""
    pairs: list[tuple[str, str]] = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            pairs.append((str(port.get("published", "")), str(port["target"])))
        else:
            parts = str(port).split("/")[0].split(":")
            pairs.append((parts[-2] if len(parts) > 1 else "", parts[-1]))
    return pairs


def role_of(argv: list[str]) -> str | None:
    """The value of `--role` in a `worker` command line, or None when not given."""
    for index, argument in enumerate(argv):
        if argument == "--role" and index + 1 < len(argv):
            return argv[index + 1]
        if argument.startswith("--role="):
            return argument.partition("=")[2]
    return None


def reactor_services(services: dict[str, Service]) -> dict[str, Service]:
    """The services that run the reactor image (built from the Dockerfile)."""
    return {name: service for name, service in services.items() if "build" in service}


def worker_services(services: dict[str, Service]) -> dict[str, Service]:
    """The services that run `reactor worker`."""
    return {name: service for name, service in services.items() if command(service)[:1] == ["worker"]}


def reactor_variables(text: str) -> set[str]:
    """Every `REACTOR_*` name mentioned in a file."""
    return set(re.findall(rf"\b{re.escape(ENV_PREFIX)}[A-Z0-9_]+\b", text))


def test_compose_defines_kafka_mongo_topic_setup_and_a_service_per_worker_role(services: dict[str, Service]) -> None:
    missing = {"kafka", "mongo", "topics", *WORKER_SERVICES} - services.keys()
    assert not missing, f"services missing from docker-compose.yml: {sorted(missing)}"


def test_compose_has_no_obsolete_top_level_version(compose: dict[str, Any]) -> None:
    assert "version" not in compose, "the Compose specification has no top-level `version:`"


def test_every_reactor_variable_in_compose_and_dockerfile_names_a_settings_field() -> None:
    for path in (COMPOSE_FILE, DOCKERFILE):
        names = reactor_variables(path.read_text())
        unknown = {
            name
            for name in names - LOADER_VARIABLES
            if name.removeprefix(ENV_PREFIX).lower() not in Settings.model_fields
        }
        assert not unknown, f"{path.name} sets variables that no Settings field reads: {sorted(unknown)}"


def test_every_reactor_service_environment_variable_names_a_settings_field(services: dict[str, Service]) -> None:
    for name, service in reactor_services(services).items():
        variables = environment(service)
        assert variables, f"{name} has no environment"
        unknown = sorted(
            variable
            for variable in variables
            if variable not in LOADER_VARIABLES
            and (
                not variable.startswith(ENV_PREFIX)
                or variable.removeprefix(ENV_PREFIX).lower() not in Settings.model_fields
            )
        )
        assert not unknown, f"{name}: not a Settings field: {unknown}"


def test_every_reactor_variable_value_in_compose_passes_settings_validation(services: dict[str, Service]) -> None:
    problems: list[str] = []
    for name, service in reactor_services(services).items():
        for variable, value in environment(service).items():
            if variable in LOADER_VARIABLES:
                continue
            field = variable.removeprefix(ENV_PREFIX).lower()
            if field not in Settings.model_fields:
                continue  # an unknown name is the naming test's failure, not this one's
            try:
                Settings.model_validate({field: value})
            except ValidationError as exc:
                problems.append(f"{name}: {variable}={value!r}: {exc.errors()[0]['msg']}")
    assert not problems, "\n".join(problems)


def test_reactor_services_run_in_distributed_mode_against_the_compose_kafka_and_mongo(
    services: dict[str, Service],
) -> None:
    for name, service in reactor_services(services).items():
        variables = environment(service)
        fields = {variable.removeprefix(ENV_PREFIX).lower(): value for variable, value in variables.items()}
        settings = Settings.model_validate(fields)
        assert settings.mode == "distributed", name
        host, _, port = settings.kafka_bootstrap.rpartition(":")
        assert host in services, f"{name}: Kafka bootstrap {settings.kafka_bootstrap} is not a compose service"
        assert port.isdigit(), f"{name}: Kafka bootstrap {settings.kafka_bootstrap} has no port"
        assert settings.mongo_url.startswith("mongodb://mongo:"), (
            f"{name}: {settings.mongo_url} is not the mongo service"
        )


def test_the_container_environment_read_through_env_vars_gives_the_same_settings(
    services: dict[str, Service], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name, service in reactor_services(services).items():
        with monkeypatch.context() as patched:
            for variable in [variable for variable in os.environ if variable.startswith(ENV_PREFIX)]:
                patched.delenv(variable)
            patched.setenv(f"{ENV_PREFIX}CONFIG", str(tmp_path / "absent.toml"))
            variables = environment(service)
            for variable, value in variables.items():
                patched.setenv(variable, value)
            from_env = Settings()
            # In the same environment: the settings read the process's variables too, and the test session's may
            # name its own servers (REACTOR_FERRETDB_SQLITE_DIR, say).
            expected = Settings.model_validate(
                {variable.removeprefix(ENV_PREFIX).lower(): value for variable, value in variables.items()}
            )
        for field in expected.model_fields_set:
            assert getattr(from_env, field) == getattr(expected, field), f"{name}: {field} not read from the env"


def test_every_reactor_service_shares_the_x_reactor_env_block(
    compose: dict[str, Any], services: dict[str, Service]
) -> None:
    shared = compose.get("x-reactor-env")
    assert isinstance(shared, dict), "docker-compose.yml has no `x-reactor-env` mapping"
    expected = {str(name): str(value) for name, value in shared.items()}
    for name, service in reactor_services(services).items():
        assert environment(service) == expected, f"{name} does not use the x-reactor-env anchor as is"


def test_every_reactor_service_is_built_from_the_project_dockerfile(services: dict[str, Service]) -> None:
    built = reactor_services(services)
    assert {"topics", *WORKER_SERVICES} <= built.keys(), f"not built from the Dockerfile: {set(services) - set(built)}"
    for name, service in built.items():
        build = service["build"]
        context, dockerfile = (
            (build, "Dockerfile")
            if isinstance(build, str)
            else (
                build.get("context", "."),
                build.get("dockerfile", "Dockerfile"),
            )
        )
        assert (COMPOSE_FILE.parent / context / dockerfile).resolve() == DOCKERFILE, f"{name} builds {build!r}"


def test_each_worker_runs_a_valid_role_and_every_role_but_all_has_a_worker(services: dict[str, Service]) -> None:
    workers = worker_services(services)
    assert workers.keys() == WORKER_SERVICES, f"worker services: {sorted(workers)}"
    roles: set[Role] = set()
    for name, service in workers.items():
        role = role_of(command(service))
        assert role is not None, f"{name} runs a worker without --role"
        assert role in {member.value for member in Role}, f"{name}: {role!r} is not a reactor.runtime.Role"
        roles.add(Role(role))
    missing = {member for member in Role if member is not Role.ALL} - roles
    assert not missing, f"no service runs the roles {sorted(missing)}"


def test_every_worker_waits_for_healthy_kafka_and_mongo_and_created_topics(services: dict[str, Service]) -> None:
    workers = worker_services(services)
    assert workers, "no worker services"
    for name, service in workers.items():
        conditions = depends_on(service)
        assert conditions.get("kafka") == HEALTHY, f"{name} does not wait for a healthy kafka: {conditions}"
        assert conditions.get("mongo") == HEALTHY, f"{name} does not wait for a healthy mongo: {conditions}"
        assert conditions.get("topics") == COMPLETED, f"{name} does not wait for the topics: {conditions}"


def test_topics_service_runs_topics_create_once_kafka_is_healthy(services: dict[str, Service]) -> None:
    topics = services["topics"]
    assert command(topics) == ["topics", "create"]
    assert depends_on(topics).get("kafka") == HEALTHY
    assert str(topics.get("restart", "no")) == "no", "a one-shot service must not be restarted"


def test_kafka_and_mongo_have_healthchecks_the_workers_can_wait_for(services: dict[str, Service]) -> None:
    expected = {"kafka": ("kafka-topics.sh", "--list"), "mongo": ("mongosh", "ping")}
    for name, needles in expected.items():
        check = services[name].get("healthcheck") or {}
        assert not check.get("disable"), f"{name} healthcheck is disabled"
        test = check.get("test")
        assert test, f"{name} has no healthcheck"
        text = test if isinstance(test, str) else " ".join(str(part) for part in test)
        assert all(needle in text for needle in needles), f"{name} healthcheck {text!r} lacks {needles}"


def test_kafka_and_mongo_use_the_official_images(services: dict[str, Service]) -> None:
    assert str(services["kafka"].get("image", "")).startswith("apache/kafka:")
    assert str(services["mongo"].get("image", "")).startswith("mongo:7")


def test_kafka_runs_kraft_single_node_without_topic_auto_creation(services: dict[str, Service]) -> None:
    kafka = environment(services["kafka"])
    assert set(kafka["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert kafka["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{kafka['KAFKA_NODE_ID']}@kafka:9093"
    assert kafka["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert kafka["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    assert kafka["KAFKA_AUTO_CREATE_TOPICS_ENABLE"].lower() == "false"


def advertised(services: dict[str, Service]) -> dict[str, str]:
    """Kafka's advertised listeners: listener name -> host:port."""
    listeners = environment(services["kafka"])["KAFKA_ADVERTISED_LISTENERS"].split(",")
    return {name: address.removeprefix("//") for name, _, address in (item.partition(":") for item in listeners)}


def test_kafka_advertises_the_bootstrap_address_the_reactor_services_use(services: dict[str, Service]) -> None:
    addresses = set(advertised(services).values())
    for name, service in reactor_services(services).items():
        bootstrap = environment(service)[f"{ENV_PREFIX}KAFKA_BOOTSTRAP"]
        assert bootstrap in addresses, f"{name} bootstraps from {bootstrap}, Kafka advertises {sorted(addresses)}"


def test_kafka_and_mongo_are_reachable_from_the_host_on_documented_ports(services: dict[str, Service]) -> None:
    assert advertised(services).get("EXTERNAL") == "localhost:19092"
    assert ("19092", "19092") in published(services["kafka"])
    assert ("27017", "27017") in published(services["mongo"])


def test_executor_publishes_the_default_http_port_for_healthz_and_metrics(services: dict[str, Service]) -> None:
    targets = {target for _, target in published(services["executor"])}
    assert str(DEFAULT_HTTP_PORT) in targets, f"executor publishes {targets}, Settings.http_port is {DEFAULT_HTTP_PORT}"


def test_workers_can_be_scaled_no_fixed_container_name_or_single_host_port(services: dict[str, Service]) -> None:
    for name, service in worker_services(services).items():
        assert "container_name" not in service, f"{name} has a container_name, so it cannot be scaled"
        for host, _ in published(service):
            assert not host or "-" in host, f"{name} publishes the single host port {host}: a 2nd replica would clash"


# ------------------------------------------------------------------------------------------------ Dockerfile


def dockerfile_instructions() -> list[Instruction]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def final_stage() -> list[Instruction]:
    """The instructions of the last build stage (the image that runs)."""
    instructions = dockerfile_instructions()
    starts = [index for index, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    assert starts, "the Dockerfile has no FROM"
    return instructions[starts[-1] :]


def arguments_of(keyword: str, instructions: list[Instruction]) -> list[str]:
    """The arguments of every `keyword` instruction, in order."""
    return [arguments for found, arguments in instructions if found == keyword]


def exec_form(keyword: str) -> list[str]:
    """The last `keyword` of the final stage in JSON (exec) form."""
    found = arguments_of(keyword, final_stage())
    assert found, f"the Dockerfile has no {keyword}"
    parsed = json.loads(found[-1])
    assert isinstance(parsed, list), f"{keyword} must be in exec form: {found[-1]}"
    return [str(part) for part in parsed]


def test_dockerfile_builds_on_python_311_slim() -> None:
    images = [arguments.split()[0] for arguments in arguments_of("FROM", dockerfile_instructions())]
    assert images, "the Dockerfile has no FROM"
    assert all(image == "python:3.11-slim" for image in images), images


def test_dockerfile_entrypoint_is_the_reactor_console_script() -> None:
    scripts = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    entrypoint = exec_form("ENTRYPOINT")
    assert entrypoint == ["reactor"], entrypoint
    assert entrypoint[0] in scripts, f"pyproject.toml has no console script {entrypoint[0]!r}"


def test_dockerfile_default_command_runs_a_worker_with_every_role() -> None:
    cmd = exec_form("CMD")
    assert cmd[:1] == ["worker"], cmd
    assert role_of(cmd) == Role.ALL.value, cmd


def test_dockerfile_exposes_the_default_http_port_of_settings() -> None:
    ports = {
        int(port.split("/")[0]) for arguments in arguments_of("EXPOSE", final_stage()) for port in arguments.split()
    }
    assert DEFAULT_HTTP_PORT in ports, f"EXPOSE {sorted(ports)}, Settings.http_port defaults to {DEFAULT_HTTP_PORT}"


def test_dockerfile_installs_the_package_from_its_copied_sources_with_pip() -> None:
    instructions = dockerfile_instructions()
    copied = " ".join(arguments_of("COPY", instructions)).split()
    for source in ("pyproject.toml", "README.md", "reactor"):
        assert any(item.rstrip("/").removeprefix("./") == source for item in copied), f"{source} is not copied"
    runs = arguments_of("RUN", instructions)
    assert any(re.search(r"\bpip install\b", run) for run in runs), f"no `pip install` in {runs}"


def test_dockerfile_runs_as_a_non_root_user() -> None:
    users = arguments_of("USER", final_stage())
    assert users, "the final stage has no USER: it would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, f"USER {users[-1]} is root"


def test_dockerfile_healthcheck_asks_healthz_with_the_standard_library() -> None:
    checks = arguments_of("HEALTHCHECK", final_stage())
    assert checks, "the Dockerfile has no HEALTHCHECK"
    check = checks[-1]
    assert not check.upper().startswith("NONE"), check
    assert "/healthz" in check, check
    assert "urllib" in check, f"the slim image has no curl: {check}"
    assert "127.0.0.1" in check or "localhost" in check, check
    assert str(DEFAULT_HTTP_PORT) in check, f"the check does not fall back to Settings.http_port: {check}"


def dockerignore_patterns() -> set[str]:
    """.dockerignore patterns, normalised (no leading or trailing slash)."""
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return {line.strip("/") for line in lines if line and not line.startswith("#")}


def test_dockerignore_keeps_venv_git_caches_tests_and_built_examples_out_of_the_context() -> None:
    patterns = dockerignore_patterns()
    missing = {".venv", ".git", "tests", "examples/dist", "**/__pycache__", ".mypy_cache"} - patterns
    assert not missing, f".dockerignore does not exclude {sorted(missing)}"


def test_dockerignore_keeps_what_the_image_build_copies() -> None:
    patterns = dockerignore_patterns()
    needed = {"*", "pyproject.toml", "README.md", "reactor", "README*", "*.md", "*.toml"}
    assert not patterns & needed, f".dockerignore excludes files the build copies: {sorted(patterns & needed)}"


# ------------------------------------------------------------------------------------------------------- CLI


def command_lines(services: dict[str, Service]) -> Iterator[tuple[str, list[str]]]:
    """(where, argv after `reactor`) for every reactor command the compose file and the Dockerfile run."""
    for name, service in reactor_services(services).items():
        argv = command(service)
        if argv:
            yield f"docker-compose.yml service {name}", argv
    yield "Dockerfile CMD", exec_form("CMD")


def test_cli_has_every_command_the_compose_file_and_dockerfile_run(services: dict[str, Service]) -> None:
    root = typer.main.get_command(app)
    problems: list[str] = []
    for where, argv in command_lines(services):
        current, rest, path = root, list(argv), ["reactor"]
        while isinstance(current, typer.core.TyperGroup) and rest and rest[0] in current.commands:
            path.append(rest[0])
            current = current.commands[rest.pop(0)]
        if isinstance(current, typer.core.TyperGroup):
            problems.append(f"{where}: {' '.join(argv)!r}: no such command under {' '.join(path)!r}")
            continue
        try:
            current.make_context(" ".join(path), rest)  # parses and validates, never runs
        except typer.TyperException as exc:
            problems.append(f"{where}: {' '.join(argv)!r}: {exc}")
    assert not problems, "\n".join(problems)
