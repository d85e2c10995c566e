"""The deploy policy (`REACTOR_POLICY_FILE`): which identity may release which service to which nodes from which
artifact sources, and who may approve, pause, abort and roll back; four-eyes approval per service.

The policy file is YAML; identities are the names of the trust file (`reactor/trust/identities.py`):

    services:
      app:
        submit: [ci]                    # may submit releases of app
        deploy: [ci]                    # may send a direct `reactor deploy` / `reactor rollback` of app's nodes
        approve: [alice, bob]
        pause: [alice, bob]             # pause and resume
        abort: [alice]
        rollback: [alice]
        four_eyes: true                 # the submitter never approves its own release (the default)
        nodes:                          # a node is allowed when any rule matches it
          - key: "local/*/app"          # glob on the node key (`*` also matches `/`)
          - labels: {env: prod}         # every label listed, with that value
        artifacts:
          packages: ["https://packages.example.com/app/"]   # URL prefixes, each ending with "/"
          images: ["registry.example.com/app"]               # repositories; one ending with "/" is a prefix

Every decision here is a pure function of the policy and the request; a refusal is a PolicyRefused whose text
starts with `policy:` and names the rule (`services.app.nodes`).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, StrictBool, ValidationError

from reactor.codec import describe_validation_error
from reactor.errors import InvalidInput, PolicyRefused
from reactor.events import (
    ACTOR,
    LABEL_KEY,
    LABEL_VALUE,
    SERVICE,
    DeployRequested,
    Model,
    Package,
    ReleasePlan,
    RollbackRequested,
)

Name = Annotated[str, Field(pattern=ACTOR)]
NodeGlob = Annotated[str, Field(pattern=r"^[A-Za-z0-9*?\[\]/._-]{1,512}$")]
# A prefix ends with "/" so that it cannot match a longer host or name ("https://pkgs.example.com" would match
# "https://pkgs.example.com.evil.test/...").
PackagePrefix = Annotated[
    str, Field(pattern=r"^(?:https?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?|file://)/[A-Za-z0-9._~/%+=-]*/$", max_length=2048)
]
ImageRepository = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._/-]{0,200}$")]
Command = Literal["approve", "pause", "resume", "abort", "rollback"]


class NodeRule(Model):
    """Nodes a rule allows: keys matching `key` (a glob) that carry every label of `labels`."""

    key: NodeGlob = "*"
    labels: dict[Annotated[str, Field(pattern=LABEL_KEY)], Annotated[str, Field(pattern=LABEL_VALUE)]] = Field(
        default_factory=dict
    )


class Artifacts(Model):
    """Where a service's artifacts may come from; nothing listed, nothing of that kind is allowed."""

    packages: list[PackagePrefix] = Field(default_factory=list)
    images: list[ImageRepository] = Field(default_factory=list)


class ServiceRule(Model):
    """Who may do what with one service, to which nodes, from which artifact sources."""

    submit: list[Name] = Field(default_factory=list)
    deploy: list[Name] = Field(default_factory=list)
    approve: list[Name] = Field(default_factory=list)
    pause: list[Name] = Field(default_factory=list)
    abort: list[Name] = Field(default_factory=list)
    rollback: list[Name] = Field(default_factory=list)
    four_eyes: StrictBool = True
    nodes: Annotated[list[NodeRule], Field(min_length=1)]
    artifacts: Artifacts = Artifacts()


class PolicyDocument(Model):
    """A policy file: one rule per service; a service not listed may not be released or deployed."""

    services: Annotated[dict[Annotated[str, Field(pattern=SERVICE)], ServiceRule], Field(min_length=1)]


def load_policy(path: Path) -> Policy:
    """Read and validate a policy file; errors name every broken field (`services.app.nodes.0.key: ...`)."""
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise InvalidInput(str(path), f"cannot read: {exc.strerror}") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InvalidInput(str(path), f"not valid YAML: {exc}") from exc
    if not isinstance(document, dict):
        raise InvalidInput(str(path), "must be a mapping with `services`")
    try:
        return Policy(PolicyDocument.model_validate(document))
    except ValidationError as exc:
        first = exc.errors()[0]
        # A broken mapping key (a service or label name) is reported at the key itself, not at "name.[key]".
        field = ".".join(str(part) for part in first["loc"] if part != "[key]") or "(policy)"
        described = describe_validation_error(exc).replace(".[key]", "")
        raise InvalidInput(field, described.removeprefix(f"{field}: ")) from exc


def image_repository(image: str) -> str:
    """The repository of an image reference: without its digest and tag."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def _refuse(rule: str, why: str) -> PolicyRefused:
    return PolicyRefused(f"policy: {rule}: {why}")


class Policy:
    """The decisions of a validated policy document; each `check_*` raises PolicyRefused or returns."""

    def __init__(self, document: PolicyDocument) -> None:
        self.document = document

    def direct_signers(self) -> frozenset[str]:
        """Identities the policy lets sign a node command themselves (a direct deploy or rollback)."""
        return frozenset(name for rule in self.document.services.values() for name in rule.deploy)

    def _service(self, service: str) -> ServiceRule:
        rule = self.document.services.get(service)
        if rule is None:
            raise _refuse("services", f"service {service!r} is not in the policy")
        return rule

    def check_release(self, submitter: str | None, plan: ReleasePlan) -> None:
        """May `submitter` release `plan`: its service, every node, and every artifact?"""
        where = f"services.{plan.service}"
        rule = self._service(plan.service)
        if submitter not in rule.submit:
            raise _refuse(f"{where}.submit", f"{_named(submitter)} may not submit releases of {plan.service}")
        for node in plan.nodes:
            self._check_node(rule, where, node.node_key, node.labels)
            self._check_artifacts(
                rule, where, node.package or plan.package, node.image or plan.image, subject=node.node_key
            )

    def check_command(self, who: str | None, command: Command, service: str, submitter: str | None) -> None:
        """May `who` send `command` to a release of `service` that `submitter` submitted?"""
        where = f"services.{service}"
        rule = self._service(service)
        name = _named(who)
        allowed: list[str] = rule.pause if command == "resume" else getattr(rule, command)
        if who not in allowed:
            field = "pause" if command == "resume" else command
            raise _refuse(f"{where}.{field}", f"{name} may not {command} releases of {service}")
        if command == "approve" and rule.four_eyes and who is not None and who == submitter:
            raise _refuse(f"{where}.four_eyes", f"{name} submitted this release; another identity must approve it")

    def check_node_command(
        self,
        signer: str | None,
        reactor: bool,
        command: DeployRequested | RollbackRequested,
        *,
        release_service: str | None = None,
        release_submitter: str | None = None,
        release_labels: dict[str, str] | None = None,
    ) -> None:
        """May a worker run `command`? Inside a release (`release_service` given): signed by a reactor identity,
        for a release whose submitter may release this service to this node from this artifact source.
        Otherwise a direct command: by an identity in the service's `deploy` list, or a rollback a reactor
        identity derived (it only returns a node to a version it ran)."""
        where = f"services.{command.service}"
        rule = self._service(command.service)
        labels = release_labels or {}
        if release_service is not None:
            if release_labels is None:
                raise _refuse(where, f"{command.node_key} is not a node of release {command.release_id}")
            if not reactor:
                raise _refuse(where, f"{_named(signer)} is not a reactor identity; only one sends a release's commands")
            if release_service != command.service:
                raise _refuse(where, f"the release is of {release_service}, the command of {command.service}")
            if release_submitter not in rule.submit:
                raise _refuse(
                    f"{where}.submit", f"{_named(release_submitter)} may not submit releases of {command.service}"
                )
        elif not (reactor and isinstance(command, RollbackRequested)) and signer not in rule.deploy:
            kind = "deploy" if isinstance(command, DeployRequested) else "roll back"
            raise _refuse(f"{where}.deploy", f"{_named(signer)} may not {kind} {command.service} directly")
        self._check_node(rule, where, command.node_key, labels)
        if isinstance(command, DeployRequested):
            self._check_artifacts(rule, where, command.package, command.image, subject=command.node_key)

    @staticmethod
    def _check_node(rule: ServiceRule, where: str, node_key: str, labels: dict[str, str]) -> None:
        for node_rule in rule.nodes:
            if fnmatch.fnmatchcase(node_key, node_rule.key) and all(
                labels.get(name) == value for name, value in node_rule.labels.items()
            ):
                return
        raise _refuse(f"{where}.nodes", f"{node_key} (labels {labels or '{}'}) matches no node rule")

    @staticmethod
    def _check_artifacts(
        rule: ServiceRule, where: str, package: Package | None, image: str | None, *, subject: str
    ) -> None:
        if package is not None and not any(package.url.startswith(prefix) for prefix in rule.artifacts.packages):
            raise _refuse(f"{where}.artifacts.packages", f"{package.url} ({subject}) is not under an allowed prefix")
        if image is not None:
            repository = image_repository(image)
            if not any(
                repository == allowed or (allowed.endswith("/") and repository.startswith(allowed))
                for allowed in rule.artifacts.images
            ):
                raise _refuse(f"{where}.artifacts.images", f"{image} ({subject}) is not from an allowed repository")


def _named(identity: str | None) -> str:
    """How an identity shows in a refusal; None is a message no trusted key signed."""
    return "an unsigned sender" if identity is None else repr(identity)
