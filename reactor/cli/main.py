"""`reactor`: run releases, look at nodes, run workers, manage the event contracts."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import tempfile
from collections.abc import Coroutine
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from reactor import logs, recovery, schemas
from reactor.adapters.embedded_store import EmbeddedStore
from reactor.cli import documents
from reactor.cli.exit_codes import ExitCode, for_release
from reactor.cli.report import Reporter, node_table, plan_table, planned_batches
from reactor.codec import describe_validation_error
from reactor.domain.pacer import ItemState, ReleaseState
from reactor.domain.planner import failure_budget, plan_batches
from reactor.domain.replay import Filter, TimelineEntry
from reactor.errors import InvalidInput, ReactorError
from reactor.events import (
    DeployRequested,
    Event,
    HealthCheck,
    NodeDeployed,
    NodeEvent,
    NodeRolledBack,
    Package,
    ReleaseAborted,
    ReleaseApproved,
    ReleaseCompleted,
    ReleaseEvent,
    ReleaseHalted,
    ReleasePaused,
    ReleaseRequested,
    ReleaseResumed,
    ReleaseRollbackRequested,
    RollbackRequested,
    Topic,
    utc_now,
)
from reactor.observability import CountingBus, HealthServer
from reactor.planfile import load_plan
from reactor.recovery import RecoveryReport
from reactor.replay import AuditReport, audit
from reactor.runtime import (
    Backends,
    Role,
    cdevent_sinks,
    kafka_bus,
    load_policy_setting,
    load_signatures,
    mongo_store,
    open_backends,
    run_roles,
    tune_gc,
)
from reactor.session import submit_and_follow
from reactor.settings import Settings
from reactor.trust import generate_key, load_trust_file
from reactor.trust.audit import RecordCheck, check_records
from reactor.trust.policy import load_policy

# No local variables in tracebacks: they would print settings (REACTOR_MONGO_URL with its password).
app = typer.Typer(
    help="Deploy Reactor: event-driven releases for hosts and Kubernetes.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
release_app = typer.Typer(help="Submit and follow releases.", no_args_is_help=True)
schemas_app = typer.Typer(help="Generated event contracts (JSON Schema, AsyncAPI).", no_args_is_help=True)
keys_app = typer.Typer(help="Ed25519 signing keys for signed events.", no_args_is_help=True)
app.add_typer(release_app, name="release")
app.add_typer(schemas_app, name="schemas")
app.add_typer(keys_app, name="keys")
policy_app = typer.Typer(help="The deploy policy (REACTOR_POLICY_FILE).", no_args_is_help=True)
app.add_typer(policy_app, name="policy")

# Piped output is read by programs and people with wide screens: do not cut tables at 80 columns.
_PIPED_WIDTH = 200
# Emoji codes off: ":x:" in a version, path or error message is text, not a picture.
out = Console(highlight=False, emoji=False, width=None if sys.stdout.isatty() else _PIPED_WIDTH)
err = Console(stderr=True, highlight=False, emoji=False, width=None if sys.stderr.isatty() else _PIPED_WIDTH)
T = TypeVar("T")


class OutputFormat(StrEnum):
    """How a command prints what it found: tables for people, or one JSON document for scripts."""

    TEXT = "text"
    JSON = "json"


OutputOption = Annotated[
    OutputFormat,
    typer.Option(
        "--output",
        "-o",
        help="text: tables; json: one JSON document on stdout (errors only on stderr, logs on stderr).",
    ),
]


def _say(console: Console, *parts: str | tuple[str, str]) -> None:
    """Print `parts` as one line, each exactly as given, a (text, style) pair styled.

    Whatever may hold user input or error text goes through here (or into a `Text`), never into markup: rich
    would take `[a-z]` in a refused pattern, or `[bold]` in an error, for markup and print something else.
    """
    console.print(Text.assemble(*parts), soft_wrap=True)


def _settings(log_level: str = "warning") -> Settings:
    try:
        settings = Settings()
    except ValidationError as exc:
        _say(err, ("invalid settings", "red"), f": {describe_validation_error(exc)}")
        raise typer.Exit(ExitCode.INVALID) from exc
    logs.configure(settings.log_format, settings.effective_log_level(log_level))
    return settings


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coroutine)
    except InvalidInput as exc:
        _say(err, ("invalid", "red"), f" {exc.field}: {exc.rule}")
        raise typer.Exit(ExitCode.INVALID) from exc
    except ReactorError as exc:
        _say(err, ("error", "red"), f": {exc}")
        raise typer.Exit(ExitCode.FAILED) from exc


@app.command()
def demo(
    workdir: Annotated[Path | None, typer.Option(help="Keep the demo's files here instead of a temp dir.")] = None,
) -> None:
    """Deploy 1.0.0 then 1.1.0 of the example service to 3 local nodes, then a bad release that rolls back."""
    _settings()
    from reactor.demo.scenario import run_demo  # noqa: PLC0415 (the demo pulls in its own helpers only when asked)

    def say(text: str) -> None:
        _say(out, text)

    with tempfile.TemporaryDirectory(prefix="reactor-demo-") as temporary:
        root = workdir or Path(temporary)
        root.mkdir(parents=True, exist_ok=True)
        _say(out, ("Deploy Reactor demo", "bold"), f" in {root}")
        with Reporter(out, live=False) as reporter:
            result = _run(run_demo(root, observer=reporter, say=say))
    out.print()
    for claim, holds in result.checks:
        _say(out, ("ok  ", "green") if holds else ("FAIL", "red"), f" {claim}")
    if not result.ok:
        err.print("[red]demo failed[/]")
        raise typer.Exit(ExitCode.FAILED)
    out.print("[green]demo passed[/]: every check above was made over HTTP against the running services")


@release_app.command("submit")
def release_submit(
    file: Annotated[Path, typer.Argument(help="Release file (YAML or JSON).")],
    watch: Annotated[bool, typer.Option("--watch", help="Show a live table of node progress.")] = False,
    actor: Annotated[str, typer.Option(help="Who asks, for the audit trail.")] = "cli",
) -> None:
    """Run a release plan; in embedded mode the release runs in this process until it ends."""
    settings = _settings()
    try:
        plan = load_plan(file)
        request = ReleaseRequested(release_id=plan.release_id, plan=plan, actor=actor)
    except InvalidInput as exc:
        _say(err, ("invalid release file", "red"), f" {file}: {exc.field}: {exc.rule}")
        raise typer.Exit(ExitCode.INVALID) from exc
    except ValidationError as exc:
        _say(err, ("invalid release", "red"), f" {file}: {describe_validation_error(exc)}")
        raise typer.Exit(ExitCode.INVALID) from exc

    def ended(event: Event) -> bool:
        return isinstance(event, ReleaseCompleted | ReleaseHalted) and event.release_id == request.release_id

    follow = watch or settings.mode == "embedded"

    async def submit() -> ReleaseState | None:
        with Reporter(out, live=watch) as reporter:
            await submit_and_follow(settings, request, observer=reporter, finished=ended, follow=follow)
        if not follow:
            return None
        async with open_backends(settings) as backends:
            record = await backends.store.get_release(request.release_id)
            return None if record is None else record.state

    state = _run(submit())
    if not follow:
        _say(out, f"release {plan.release_id} submitted; follow it with `reactor release status {plan.release_id}`")
        return
    _say(out, f"release {plan.release_id}: {state.value if state else 'unknown'}")
    code = ExitCode.FAILED if state is None else for_release(state)
    if code != ExitCode.OK:
        raise typer.Exit(code)


@release_app.command("plan")
def release_plan_command(
    file: Annotated[Path, typer.Argument(help="Release file (YAML or JSON).")],
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Validate a release file and print its batches and gates, without running anything."""
    _settings()
    try:
        plan = load_plan(file)
        batches = plan_batches(plan.nodes, plan.strategy)
    except InvalidInput as exc:
        _say(err, ("invalid release file", "red"), f" {file}: {exc.field}: {exc.rule}")
        raise typer.Exit(ExitCode.INVALID) from exc
    strategy = plan.strategy
    planned = planned_batches(batches, {node.node_key: node.labels for node in plan.nodes}, strategy)
    budget = failure_budget(strategy.failure_budget, len(plan.nodes))
    if output == OutputFormat.JSON:
        documents.emit(documents.plan(plan, planned, budget))
        return
    _say(
        out,
        (plan.release_id, "bold"),
        f": {plan.service} {plan.version} to {len(plan.nodes)} nodes in {len(batches)}"
        f" batches; max_parallel {strategy.max_parallel}; failure budget {budget} of the release"
        + (f", {strategy.batch_failure_budget} per batch" if strategy.batch_failure_budget is not None else "")
        + f"; auto_rollback {strategy.auto_rollback.value}"
        + (f"; fast rollback, {strategy.rollback_parallel or 'every node'} at once" if strategy.fast_rollback else "")
        + (f"; node deadline {strategy.node_deadline_s:g}s" if strategy.node_deadline_s else ""),
    )
    if strategy.min_healthy_s:
        out.print(
            f"min_healthy {strategy.min_healthy_s:g}s: a deployed node counts as done only after staying healthy"
            " that long"
        )
    out.print(plan_table(planned))


_ReleaseCommand = type[ReleaseApproved | ReleasePaused | ReleaseResumed | ReleaseAborted | ReleaseRollbackRequested]


def _release_command(kind: _ReleaseCommand, release_id: str, reason: str, actor: str, **options: bool) -> None:
    """Publish a release command; in embedded mode, run the release on from the store until it waits again."""
    settings = _settings()
    try:
        event: ReleaseEvent = kind(release_id=release_id, reason=reason, actor=actor, **options)
    except ValidationError as exc:
        _say(err, ("invalid", "red"), f" {describe_validation_error(exc)}")
        raise typer.Exit(ExitCode.INVALID) from exc

    def settled(seen: Event) -> bool:
        return isinstance(seen, ReleaseEvent) and seen.release_id == event.release_id and seen is not event

    async def send() -> ReleaseState | None:
        with Reporter(out, live=False) as reporter:
            await submit_and_follow(
                settings, event, observer=reporter, finished=settled, follow=settings.mode == "embedded"
            )
        async with open_backends(settings) as backends:
            record = await backends.store.get_release(event.release_id)
            return None if record is None else record.state

    state = _run(send())
    if state is None:
        _say(err, f"no release {event.release_id}")
        raise typer.Exit(ExitCode.FAILED)
    _say(out, f"release {event.release_id}: {state.value}")
    # The command was carried out whatever the release waits for next; it failed only if the release failed
    # other than by the abort or rollback asked for.
    if for_release(state) == ExitCode.FAILED and not isinstance(event, ReleaseAborted | ReleaseRollbackRequested):
        raise typer.Exit(ExitCode.FAILED)


ReleaseIdArgument = Annotated[str, typer.Argument(help="Release id.")]
ReasonOption = Annotated[str, typer.Option(help="Why, for the audit trail.")]
ActorOption = Annotated[str, typer.Option(help="Who asks, for the audit trail.")]


@release_app.command("approve")
def release_approve(release_id: ReleaseIdArgument, reason: ReasonOption = "", actor: ActorOption = "cli") -> None:
    """Let a release waiting for approval start its next batch."""
    _release_command(ReleaseApproved, release_id, reason, actor)


@release_app.command("pause")
def release_pause(release_id: ReleaseIdArgument, reason: ReasonOption = "", actor: ActorOption = "cli") -> None:
    """Stop dispatching new nodes (in-flight ones finish) until resumed."""
    _release_command(ReleasePaused, release_id, reason, actor)


@release_app.command("resume")
def release_resume(release_id: ReleaseIdArgument, reason: ReasonOption = "", actor: ActorOption = "cli") -> None:
    """Dispatch again after a pause."""
    _release_command(ReleaseResumed, release_id, reason, actor)


@release_app.command("abort")
def release_abort(release_id: ReleaseIdArgument, reason: ReasonOption = "", actor: ActorOption = "cli") -> None:
    """Dispatch nothing more for this release (in-flight nodes finish)."""
    _release_command(ReleaseAborted, release_id, reason, actor)


@release_app.command("rollback")
def release_rollback(
    release_id: ReleaseIdArgument,
    reason: ReasonOption = "",
    actor: ActorOption = "cli",
    fast: Annotated[
        bool,
        typer.Option(
            "--fast",
            help="Every deployed node at once (at most the strategy's rollback_parallel) instead of"
            " max_parallel at a time; also speeds up a rollback under way.",
        ),
    ] = False,
) -> None:
    """Roll back every node the release deployed, newest batch first, max_parallel at a time (or --fast)."""
    _release_command(ReleaseRollbackRequested, release_id, reason, actor, fast=fast)


@release_app.command("status")
def release_status(
    release_id: Annotated[str, typer.Argument(help="Release id.")], output: OutputOption = OutputFormat.TEXT
) -> None:
    """Show a release's batches and nodes. Exit 0 completed, 1 failed, 3 awaiting a person, 4 in progress."""
    settings = _settings()

    async def show() -> ReleaseState | None:
        async with open_backends(settings) as backends:
            record = await backends.store.get_release(release_id)
            if record is None:
                return None
            counts = await backends.store.count_release_nodes(release_id)
            members = await backends.store.list_release_nodes(release_id)
            nodes = await backends.store.list_nodes(release_id=release_id)
            if output == OutputFormat.JSON:
                documents.emit(documents.release(record, counts, members, nodes))
                return record.state
            reason = f" ({record.reason})" if record.reason else ""
            if record.fast_rollback:
                reason += " (fast rollback)"
            progress = ", ".join(f"{state.value} {counts[state]}" for state in ItemState)
            _say(
                out,
                (record.release_id, "bold"),
                f": {record.plan.service} {record.plan.version} — {record.state.value}"
                f"{reason}; batch {record.batch + 1}/{len(record.batch_sizes)}; budget {record.budget}; {progress}",
            )
            table = Table(title="Release nodes")
            for column in ("batch", "node", "progress"):
                table.add_column(column)
            for member in members:
                table.add_row(Text(str(member.batch + 1)), Text(member.node_key), Text(member.state.value))
            out.print(table)
            if nodes:
                out.print(node_table(nodes, title="Node status (last touched by this release)"))
            return record.state

    state = _run(show())
    if state is None:
        _say(err, f"no release {release_id}")
        raise typer.Exit(ExitCode.FAILED)
    code = for_release(state)
    if code != ExitCode.OK:
        raise typer.Exit(code)


@app.command()
def status(
    release: Annotated[str | None, typer.Option(help="Only nodes last touched by this release.")] = None,
    service: Annotated[str | None, typer.Option(help="Only nodes of this service.")] = None,
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Show every node the reactor knows."""
    settings = _settings()

    async def show() -> None:
        async with open_backends(settings) as backends:
            nodes = await backends.store.list_nodes(release_id=release, service=service)
        if output == OutputFormat.JSON:
            documents.emit(documents.nodes(nodes))
        else:
            out.print(node_table(nodes))

    _run(show())


def _node_request(event: DeployRequested | RollbackRequested) -> None:
    settings = _settings()

    async def run() -> NodeEvent | None:
        outcome: list[NodeEvent] = []

        with Reporter(out, live=False) as reporter:

            def observe(seen: Event) -> None:
                reporter(seen)
                if isinstance(seen, NodeEvent) and seen.causation_id == event.event_id:
                    outcome.append(seen)

            await submit_and_follow(settings, event, observer=observe, finished=lambda _: bool(outcome))
        return outcome[0] if outcome else None

    result = _run(run())
    if not isinstance(result, NodeDeployed | NodeRolledBack):
        raise typer.Exit(ExitCode.FAILED)


@app.command()
def deploy(
    node_key: Annotated[str, typer.Argument(help="Node key, e.g. local/node-1/hello.")],
    version: Annotated[str, typer.Option(help="Version to deploy.")],
    package_url: Annotated[
        str | None, typer.Option(help="Package URL (http, https or file); hosts need it, with --sha256.")
    ] = None,
    sha256: Annotated[str | None, typer.Option(help="SHA256 of the package, checked before anything changes.")] = None,
    image: Annotated[
        str | None, typer.Option(help="Container image, for Kubernetes nodes (instead of a package).")
    ] = None,
    container: Annotated[
        str | None, typer.Option(help="Kubernetes: the container to update (default: the only one).")
    ] = None,
    service: Annotated[str | None, typer.Option(help="Service name; defaults to the node key's last part.")] = None,
    port: Annotated[int | None, typer.Option(help="Port the service listens on (health check).")] = None,
    health_path: Annotated[str, typer.Option(help="HTTP health path.")] = "/healthz",
    auto_rollback: Annotated[str, typer.Option(help="node or none")] = "none",
    actor: Annotated[str, typer.Option(help="Who asks, for the audit trail.")] = "cli",
) -> None:
    """Deploy one node, outside any release: a package (--package-url and --sha256) or an image (--image)."""
    if (package_url is None) != (sha256 is None) or (package_url is None and image is None):
        _say(err, ("invalid", "red"), " artifact: give --package-url with --sha256, or --image (Kubernetes nodes)")
        raise typer.Exit(ExitCode.INVALID)
    if package_url is not None and "://" not in package_url:
        package_url = Path(package_url).resolve().as_uri()
    try:
        event = DeployRequested(
            node_key=node_key,
            service=service or node_key.rsplit("/", 1)[-1],
            version=version,
            package=None if package_url is None or sha256 is None else Package(url=package_url, sha256=sha256),
            image=image,
            container=container,
            port=port,
            health=HealthCheck(path=health_path),
            auto_rollback=auto_rollback,
            actor=actor,
        )
    except ValidationError as exc:
        _say(err, ("invalid", "red"), f" {describe_validation_error(exc)}")
        raise typer.Exit(ExitCode.INVALID) from exc
    _node_request(event)


@app.command()
def rollback(
    node_key: Annotated[str, typer.Argument(help="Node key, e.g. local/node-1/hello.")],
    to_version: Annotated[str | None, typer.Option(help="Version to return to; default: the previous one.")] = None,
    service: Annotated[str | None, typer.Option(help="Service name; defaults to the node key's last part.")] = None,
    actor: Annotated[str, typer.Option(help="Who asks, for the audit trail.")] = "cli",
) -> None:
    """Roll one node back."""
    try:
        event = RollbackRequested(
            node_key=node_key,
            service=service or node_key.rsplit("/", 1)[-1],
            to_version=to_version,
            reason="manual",
            actor=actor,
        )
    except ValidationError as exc:
        _say(err, ("invalid", "red"), f" {describe_validation_error(exc)}")
        raise typer.Exit(ExitCode.INVALID) from exc
    _node_request(event)


@app.command()
def worker(
    role: Annotated[Role, typer.Option(help="Which consumers to run.")] = Role.ALL,
) -> None:
    """Run consumers until interrupted (distributed mode: Kafka and MongoDB)."""
    settings = _settings(log_level="info")
    if settings.mode == "embedded":
        err.print(
            "[red]invalid[/] mode: a standalone worker needs a shared bus; embedded mode runs workers inside "
            "`reactor release submit`, `reactor deploy` and `reactor demo`. Set REACTOR_MODE=distributed."
        )
        raise typer.Exit(ExitCode.INVALID)
    if role == Role.CDEVENTS and not cdevent_sinks(settings):
        _say(err, ("invalid", "red"), " cdevents sinks: set REACTOR_CDEVENTS_TOPIC or REACTOR_CDEVENTS_SINKS")
        raise typer.Exit(ExitCode.INVALID)

    async def serve() -> None:
        # SIGTERM (docker stop, Kubernetes) shuts down like Ctrl-C: stop taking, drain, commit, exit.
        main_task = asyncio.current_task()
        if main_task is not None:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
        async with contextlib.AsyncExitStack() as stack:
            backends = await _open_when_answering(stack, settings)
            counting = Backends(bus=CountingBus(backends.bus), store=backends.store)
            probes = {"bus": backends.bus.ping, "store": backends.store.ping}
            async with HealthServer(settings.http_port, probes):
                await run_roles(counting, settings, {role})

    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        _run(serve())


async def _open_when_answering(stack: contextlib.AsyncExitStack, settings: Settings) -> Backends:
    """Open the backends, waiting for them while they do not answer (a worker started during an outage of Kafka
    or the database waits, as a running one does, instead of exiting); other errors end the worker."""
    delay = 1.0
    while True:
        try:
            return await stack.enter_async_context(open_backends(settings))
        except ReactorError as exc:
            if not exc.retriable:
                raise
            _say(err, ("waiting", "yellow"), f" for the backends to answer: {exc}; trying again in {delay:g}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="Port to listen on (0: a free one, printed at start).", min=0, max=65535)
    ] = 8000,
) -> None:
    """Serve the HTTP API (releases, nodes, commands, live events); embedded mode runs every worker role here too.

    Prints `serving <url>` on stdout once it takes requests. Bearer tokens come from REACTOR_API_TOKENS.
    """
    settings = _settings(log_level="info")
    from reactor.api import auth, server  # noqa: PLC0415 (the web stack loads only for this command)

    tokens = None
    if settings.api_tokens is not None:
        try:
            tokens = auth.load_tokens(settings.api_tokens)
            signatures = load_signatures(settings)
            tokens.check_signing(signatures.trust, required=signatures.required)
        except InvalidInput as exc:
            _say(err, ("invalid", "red"), f" {exc.field}: {exc.rule}")
            raise typer.Exit(ExitCode.INVALID) from exc
    elif settings.api_allow_anonymous or (settings.mode == "embedded" and server.is_loopback(host)):
        _say(
            err,
            ("warning", "yellow"),
            ": no API tokens (REACTOR_API_TOKENS): every request is allowed and acts as identity 'local'",
        )
    else:
        where = "in distributed mode" if settings.mode == "distributed" else f"on {host}, beyond loopback"
        _say(
            err,
            ("invalid", "red"),
            f" api_tokens: required {where}; set REACTOR_API_TOKENS to a tokens file"
            " (or REACTOR_API_ALLOW_ANONYMOUS=true to serve without authentication)",
        )
        raise typer.Exit(ExitCode.INVALID)
    try:
        sock = server.listen(host, port)
    except OSError as exc:
        _say(err, ("error", "red"), f": cannot listen on {host}:{port}: {exc}")
        raise typer.Exit(ExitCode.FAILED) from exc

    def ready(url: str) -> None:
        sys.stdout.write(f"serving {url}\n")
        sys.stdout.flush()

    with sock, contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        _run(server.serve(settings, sock, tokens, ready))


@app.command("topics")
def topics(
    action: Annotated[str, typer.Argument(help="create")] = "create",
) -> None:
    """Create the Kafka topics (commands, outcomes, releases, dlq) under the configured prefix."""
    settings = _settings(log_level="info")
    if action != "create":
        _say(err, ("invalid", "red"), f" action: {action!r}; the only action is 'create'")
        raise typer.Exit(ExitCode.INVALID)

    async def create() -> list[str]:
        async with kafka_bus(settings) as bus:
            return await bus.create_topics(partitions=settings.topic_partitions, replication=settings.topic_replication)

    created = _run(create())
    _say(out, f"created {', '.join(created)}" if created else "topics already exist")


@app.command()
def recover() -> None:
    """Rebuild a lost database from the topics: node status, finished requests, releases and their progress.

    Stop the workers first; the database must be empty (recovery never writes over one). Start them again after.
    """
    settings = _settings(log_level="info")
    if settings.mode == "embedded":
        err.print("[red]invalid[/] mode: recover reads the Kafka topics; set REACTOR_MODE=distributed")
        raise typer.Exit(ExitCode.INVALID)

    async def run() -> RecoveryReport:
        async with open_backends(settings) as backends:
            return await recovery.recover(
                backends.bus,
                backends.store,
                concurrent_releases=settings.concurrent_releases,
                limits=settings.in_flight_limits(),
                signatures=load_signatures(settings),
                policy=load_policy_setting(settings),
            )

    report = _run(run())
    _say(
        out,
        f"recovered {report.nodes} node statuses, {report.processed} finished requests and {report.releases} "
        f"release records from {report.events} events",
    )
    for problem in report.unplaced:
        _say(err, ("unplaced", "yellow"), f" {problem}")
    if report.unplaced:
        raise typer.Exit(ExitCode.FAILED)


@app.command()
def replay(
    release: Annotated[str | None, typer.Option(help="Only this release.")] = None,
    node: Annotated[str | None, typer.Option(help="Only this node key.")] = None,
    service: Annotated[str | None, typer.Option(help="Only this service.")] = None,
    since: Annotated[datetime | None, typer.Option(help="Only events from this time (ISO 8601, UTC if naive).")] = None,
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Recompute node status from the log into a fresh database and diff.")
    ] = False,
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Read the topics from the beginning and print the audit timeline: who asked what, when, what happened.

    With --rebuild, exit 1 when the live node status differs from the log.
    """
    settings = _settings()
    if settings.mode == "embedded":
        err.print("[red]invalid[/] mode: replay reads the Kafka topics; set REACTOR_MODE=distributed")
        raise typer.Exit(ExitCode.INVALID)
    flt = Filter(since=since, release_id=release, node_key=node, service=service)
    database = f"{settings.mongo_database}-rebuild-{utc_now():%Y%m%d%H%M%S}" if rebuild else None

    async def run() -> AuditReport:
        async with open_backends(settings) as backends:
            trust = load_signatures(settings).trust
            if database is None:
                async with EmbeddedStore(":memory:") as scratch:
                    return await audit(backends.bus, backends.store, scratch, flt, trust=trust)
            async with mongo_store(settings, database) as fresh:
                return await audit(backends.bus, backends.store, fresh, flt, trust=trust)

    report = _run(run())
    failed = database is not None and bool(report.differences)
    if output == OutputFormat.JSON:
        documents.emit(documents.audit(report, database))
        if failed:
            raise typer.Exit(ExitCode.FAILED)
        return
    if database is not None:
        _say(out, f"rebuilt node status into database {database}")
    for entry in report.timeline:
        _say(
            out,
            f"{entry.time:%Y-%m-%dT%H:%M:%S.%fZ} {entry.topic.value:<8} {entry.event_type:<16} {entry.subject}"
            f" [{_who(entry)}] {entry.summary}",
        )
    for topic, problem in report.undecodable:
        _say(out, f"undecodable message on {topic.value}: {problem}")
    if database is not None:
        for difference in report.differences:
            _say(
                out,
                f"DIFFERENCE {difference.node_key} {difference.field}: live {difference.live!r},"
                f" rebuilt from the log {difference.rebuilt!r}",
            )
        if failed:
            raise typer.Exit(ExitCode.FAILED)
        out.print("live node status matches the log")


def _who(entry: TimelineEntry) -> str:
    """Who an audit line names: the verified signer when signatures were checked (and the stated actor where it
    says otherwise), the stated actor when they were not, or UNVERIFIED and why."""
    if entry.unverified is not None:
        return f"UNVERIFIED {entry.unverified}; says {entry.actor}"
    if entry.signer is None:
        return entry.actor
    if entry.actor in (entry.signer, "") or entry.actor.startswith("/"):
        return f"signed by {entry.signer}"
    return f"signed by {entry.signer}; says {entry.actor}"


@keys_app.command("generate")
def keys_generate(
    name: Annotated[str, typer.Argument(help="Key name: DIR/NAME.key (private, mode 0600) and DIR/NAME.pub.")],
    directory: Annotated[Path, typer.Option("--dir", help="Where to write the key pair.")] = Path(),
) -> None:
    """Write a new Ed25519 key pair and print its key id (never overwrites a key)."""
    try:
        identifier = generate_key(name, directory)
    except InvalidInput as exc:
        _say(err, ("invalid", "red"), f" {exc.field}: {exc.rule}")
        raise typer.Exit(ExitCode.INVALID) from exc
    except OSError as exc:
        _say(err, ("error", "red"), f": cannot write the key pair in {directory}: {exc.strerror}")
        raise typer.Exit(ExitCode.FAILED) from exc
    _say(out, identifier)


@policy_app.command("check")
def policy_check(file: Annotated[Path, typer.Argument(help="The policy file (YAML).")]) -> None:
    """Validate a policy file: print OK, or each broken field and why (exit 2)."""
    try:
        load_policy(file)
    except InvalidInput as exc:
        _say(err, ("invalid", "red"), f" {exc.field}: {exc.rule}")
        raise typer.Exit(ExitCode.INVALID) from exc
    out.print("OK")


@app.command()
def verify(
    topic: Annotated[Topic, typer.Option(help="The topic to read from its beginning.")],
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Verify the signature of every message of a topic with the trust file; exit 1 when any fails."""
    settings = _settings()
    if settings.mode == "embedded":
        err.print("[red]invalid[/] mode: verify reads a Kafka topic; set REACTOR_MODE=distributed")
        raise typer.Exit(ExitCode.INVALID)
    if settings.trust_file is None:
        _say(err, ("invalid", "red"), " trust_file: set REACTOR_TRUST_FILE to the trusted public keys")
        raise typer.Exit(ExitCode.INVALID)
    trust_file = settings.trust_file

    async def run() -> list[RecordCheck]:
        trust = load_trust_file(trust_file)
        async with kafka_bus(settings) as bus:
            return check_records(await bus.history(topic), trust)

    checks = _run(run())
    failed = any(not check.verified for check in checks)
    if output == OutputFormat.JSON:
        documents.emit(documents.verification(topic.value, checks))
    else:
        for check in checks:
            head = f"{check.position:>6} {check.event_type or '?':<16} {check.event_id or '?'} {check.subject or '?'}"
            if check.verified:
                role = ", reactor" if check.reactor else ""
                _say(out, head, ("  verified", "green"), f" by {check.signer} (key {check.key_id}{role})")
            else:
                _say(out, head, ("  UNVERIFIED", "red"), f" {check.problem}")
        verified = sum(1 for check in checks if check.verified)
        _say(out, f"{verified} of {len(checks)} messages on {topic.value} verified")
    if failed:
        raise typer.Exit(ExitCode.FAILED)


@schemas_app.command("export")
def schemas_export(
    directory: Annotated[Path, typer.Option("--dir", help="Where to write.")] = Path("schemas"),
) -> None:
    """Write the JSON Schemas and the AsyncAPI document generated from the event models."""
    for path in schemas.export(directory):
        _say(out, f"wrote {path}")


@schemas_app.command("check")
def schemas_check(
    directory: Annotated[Path, typer.Option("--dir", help="Where the checked-in files are.")] = Path("schemas"),
) -> None:
    """Exit non-zero when the files differ from what the models generate."""
    problems = schemas.drift(directory)
    for problem in problems:
        _say(err, ("drift", "red"), f" {problem}")
    if problems:
        err.print("run `reactor schemas export` and commit the result")
        raise typer.Exit(ExitCode.FAILED)
    out.print(f"schemas up to date ({len(schemas.rendered())} files)")


def main() -> None:
    """Console-script entry point."""
    tune_gc()
    app()


if __name__ == "__main__":
    main()
