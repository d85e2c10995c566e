"""The deploy policy as plain data: the file's validation (errors name the field) and each rule's decision, both
the request it allows and the one it refuses (`reactor/trust/policy.py`)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from reactor.errors import InvalidInput, PolicyRefused
from reactor.events import DeployRequested, NodeTarget, Package, ReleasePlan, RollbackRequested
from reactor.trust.policy import Policy, PolicyDocument, image_repository, load_policy

pytestmark = pytest.mark.unit

PACKAGES = "https://packages.example.com/app/"
DOCUMENT: dict[str, Any] = {
    "services": {
        "app": {
            "submit": ["ci"],
            "deploy": ["ops"],
            "approve": ["alice", "bob", "ci"],
            "pause": ["alice"],
            "abort": ["alice"],
            "rollback": ["bob"],
            "nodes": [{"key": "local/web-*/app"}, {"labels": {"env": "prod"}}],
            "artifacts": {"packages": [PACKAGES], "images": ["registry.example.com/app", "registry.example.com/team/"]},
        },
        "lax": {"submit": ["ci"], "approve": ["ci"], "four_eyes": False, "nodes": [{}]},
    }
}


def _policy(**service_changes: Any) -> Policy:
    app = {**DOCUMENT["services"]["app"], **service_changes}
    return Policy(PolicyDocument.model_validate({"services": {**DOCUMENT["services"], "app": app}}))


POLICY = _policy()


def _package(url: str = PACKAGES + "app-2.0.0.tar.gz") -> Package:
    return Package(url=url, sha256="a" * 64)


def _plan(*nodes: NodeTarget, service: str = "app", **fields: Any) -> ReleasePlan:
    artifact = fields if fields else {"package": _package()}
    return ReleasePlan(release_id="app-2", service=service, version="2.0.0", nodes=list(nodes), **artifact)


def _refusal(rule: str) -> Any:
    return pytest.raises(PolicyRefused, match=f"^policy: {re.escape(rule)}: ")


# --- the file ---


def test_a_valid_policy_file_loads(tmp_path: Path) -> None:
    """The README's shape loads and keeps every rule."""
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(DOCUMENT))
    policy = load_policy(path)
    assert policy.document.services["app"].approve == ["alice", "bob", "ci"]
    assert policy.document.services["app"].four_eyes is True
    assert policy.document.services["lax"].four_eyes is False


@pytest.mark.parametrize(
    ("change", "field", "why"),
    [
        ({"nodes": []}, "services.app.nodes", "at least 1"),
        ({"approve": ["bad name!"]}, "services.app.approve.0", "pattern"),
        ({"four_eyes": "yes"}, "services.app.four_eyes", "boolean"),
        ({"artifacts": {"packages": ["https://packages.example.com"]}}, "services.app.artifacts.packages.0", "pattern"),
        # Without the trailing "/", "https://packages.example.com/app" would also allow ".../app-evil/...".
        ({"artifacts": {"packages": [PACKAGES.rstrip("/")]}}, "services.app.artifacts.packages.0", "pattern"),
        ({"artifacts": {"images": ["registry.example.com/app:1.0"]}}, "services.app.artifacts.images.0", "pattern"),
        ({"nodes": [{"key": "local/$(id)/app"}]}, "services.app.nodes.0.key", "pattern"),
        ({"nodes": [{"labels": {"Env": "prod"}}]}, "services.app.nodes.0.labels.Env", "pattern"),
        ({"approvers": ["alice"]}, "services.app.approvers", "Extra inputs"),
    ],
)
def test_a_broken_policy_file_names_the_field_and_why(
    tmp_path: Path, change: dict[str, Any], field: str, why: str
) -> None:
    """Each broken rule is refused with the path of the field, as a release file's errors are."""
    app = {**DOCUMENT["services"]["app"], **change}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({"services": {"app": app}}))
    with pytest.raises(InvalidInput) as raised:
        load_policy(path)
    assert raised.value.field == field
    assert why in raised.value.rule


@pytest.mark.parametrize(
    ("text", "field"),
    [("[a, b]", "policy.yaml"), ("services: {}", "services"), ("services: {Bad: {nodes: [{}]}}", "services.Bad")],
)
def test_a_policy_file_of_the_wrong_shape_is_refused(tmp_path: Path, text: str, field: str) -> None:
    """Not a mapping, no service, a service name that is not one: refused, naming where."""
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(InvalidInput) as raised:
        load_policy(path)
    assert raised.value.field.endswith(field)


def test_policy_check_prints_ok_or_the_errors(tmp_path: Path) -> None:
    """`reactor policy check FILE`: OK and exit 0, or each broken field and exit 2 (run as its own process)."""
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump(DOCUMENT))
    bad.write_text(yaml.safe_dump({"services": {"app": {"submit": ["ci"], "nodes": [], "abort": [1]}}}))
    command = [sys.executable, "-m", "reactor.cli.main", "policy", "check"]
    ok = subprocess.run([*command, str(good)], capture_output=True, text=True, check=False, timeout=60)
    assert (ok.returncode, ok.stdout.strip()) == (0, "OK")
    broken = subprocess.run([*command, str(bad)], capture_output=True, text=True, check=False, timeout=60)
    assert broken.returncode == 2
    assert "services.app.abort.0" in broken.stderr
    assert "services.app.nodes" in broken.stderr


# --- releases at submit ---


def test_a_release_inside_the_policy_is_allowed() -> None:
    """Submitter, every node (by key or by label) and the artifact allowed."""
    POLICY.check_release(
        "ci", _plan(NodeTarget(node_key="local/web-1/app"), NodeTarget(node_key="k8s/db", labels={"env": "prod"}))
    )


def test_a_service_not_in_the_policy_is_refused() -> None:
    """No rule for the service: nothing of it may be released."""
    with _refusal("services"):
        POLICY.check_release("ci", _plan(NodeTarget(node_key="local/web-1/other"), service="other"))


@pytest.mark.parametrize("submitter", ["alice", None])
def test_a_submitter_not_listed_is_refused(submitter: str | None) -> None:
    """Only the service's `submit` identities; an unsigned release never passes."""
    with _refusal("services.app.submit"):
        POLICY.check_release(submitter, _plan(NodeTarget(node_key="local/web-1/app")))


@pytest.mark.parametrize(
    "node",
    [
        NodeTarget(node_key="local/db-1/app"),  # the key does not match the glob
        NodeTarget(node_key="k8s/db", labels={"env": "staging"}),  # the label has another value
        NodeTarget(node_key="k8s/db"),  # no label at all
    ],
)
def test_a_node_outside_the_node_rules_is_refused(node: NodeTarget) -> None:
    """A node must match one rule: its key glob, and every label it lists."""
    with _refusal("services.app.nodes"):
        POLICY.check_release("ci", _plan(NodeTarget(node_key="local/web-1/app"), node))


@pytest.mark.parametrize(
    "url",
    [
        "https://packages.example.com/other/app-2.0.0.tar.gz",
        "https://packages.example.com.evil.test/app/app-2.0.0.tar.gz",
        "https://evil.test/app/app-2.0.0.tar.gz",
    ],
)
def test_a_package_outside_the_prefixes_is_refused(url: str) -> None:
    """A package URL must start with an allowed prefix; a per-node package is checked too."""
    with _refusal("services.app.artifacts.packages"):
        POLICY.check_release("ci", _plan(NodeTarget(node_key="local/web-1/app"), package=_package(url)))
    with _refusal("services.app.artifacts.packages"):
        POLICY.check_release("ci", _plan(NodeTarget(node_key="local/web-1/app", package=_package(url))))


@pytest.mark.parametrize(
    ("image", "allowed"),
    [
        ("registry.example.com/app:2.0.0", True),
        ("registry.example.com/app@sha256:" + "b" * 64, True),
        ("registry.example.com/team/api:1", True),
        ("registry.example.com/app-evil:2.0.0", False),
        ("registry.example.com/other:2.0.0", False),
        ("docker.io/library/app:2.0.0", False),
    ],
)
def test_an_image_must_come_from_an_allowed_repository(image: str, allowed: bool) -> None:
    """A repository listed exactly, or under one listed with a trailing '/'."""
    plan = _plan(NodeTarget(node_key="k8s/db", labels={"env": "prod"}), image=image)
    if allowed:
        POLICY.check_release("ci", plan)
    else:
        with _refusal("services.app.artifacts.images"):
            POLICY.check_release("ci", plan)


def test_nothing_listed_allows_nothing_of_that_kind() -> None:
    """A service without artifact sources may release no package."""
    policy = _policy(artifacts={})
    with _refusal("services.app.artifacts.packages"):
        policy.check_release("ci", _plan(NodeTarget(node_key="local/web-1/app")))


def test_image_repository_drops_tag_and_digest() -> None:
    """A registry port is not a tag."""
    assert image_repository("registry:5000/app:1.0@sha256:" + "c" * 64) == "registry:5000/app"
    assert image_repository("registry:5000/app") == "registry:5000/app"


# --- release commands ---


@pytest.mark.parametrize(
    ("command", "allowed", "refused", "rule"),
    [
        ("approve", "alice", "ops", "approve"),
        ("pause", "alice", "bob", "pause"),
        ("resume", "alice", "bob", "pause"),
        ("abort", "alice", "bob", "abort"),
        ("rollback", "bob", "alice", "rollback"),
    ],
)
def test_each_release_command_is_for_its_listed_identities(command: Any, allowed: str, refused: str, rule: str) -> None:
    """Who may approve, pause (and resume), abort and roll back a release of the service."""
    POLICY.check_command(allowed, command, "app", "ci")
    with _refusal(f"services.app.{rule}"):
        POLICY.check_command(refused, command, "app", "ci")
    with _refusal(f"services.app.{rule}"):
        POLICY.check_command(None, command, "app", "ci")


def test_four_eyes_refuses_the_submitters_own_approval() -> None:
    """ci may approve, but not a release it submitted; another identity may."""
    with _refusal("services.app.four_eyes"):
        POLICY.check_command("ci", "approve", "app", "ci")
    POLICY.check_command("ci", "approve", "app", "someone-else")
    POLICY.check_command("alice", "approve", "app", "ci")


def test_four_eyes_can_be_switched_off_per_service() -> None:
    """`four_eyes: false`: the submitter may approve its own release of that service."""
    Policy(PolicyDocument.model_validate(DOCUMENT)).check_command("ci", "approve", "lax", "ci")


# --- node commands at the worker ---


def _deploy(node_key: str = "local/web-1/app", **fields: Any) -> DeployRequested:
    values: dict[str, Any] = {"package": _package(), **fields}
    return DeployRequested(node_key=node_key, service="app", version="2.0.0", **values)


def test_a_release_command_from_a_reactor_identity_for_a_permitted_release_is_allowed() -> None:
    """The pacer's DeployRequested of a release ci submitted, on a node of the release."""
    POLICY.check_node_command(
        "reactor", True, _deploy(release_id="app-2"), release_service="app", release_submitter="ci", release_labels={}
    )


@pytest.mark.parametrize(
    ("signer", "reactor", "submitter", "labels", "rule"),
    [
        ("ci", False, "ci", {}, "services.app"),  # not a reactor identity
        ("reactor", True, "alice", {}, "services.app.submit"),  # the release's submitter may not submit it
        ("reactor", True, None, {}, "services.app.submit"),  # an unsigned release
        ("reactor", True, "ci", None, "services.app"),  # not a node of the release
    ],
)
def test_a_release_command_is_refused_unless_reactor_signed_for_a_permitted_release(
    signer: str, reactor: bool, submitter: str | None, labels: dict[str, str] | None, rule: str
) -> None:
    """Inside a release: a reactor identity, a submitter the policy allows, a node of the release."""
    with _refusal(rule):
        POLICY.check_node_command(
            signer,
            reactor,
            _deploy(release_id="app-2"),
            release_service="app",
            release_submitter=submitter,
            release_labels=labels,
        )


def test_a_release_command_still_needs_an_allowed_node_and_artifact() -> None:
    """The worker checks the node and artifact again, whatever the pacer let through."""
    inside: dict[str, Any] = {"release_service": "app", "release_submitter": "ci", "release_labels": {}}
    with _refusal("services.app.nodes"):
        POLICY.check_node_command("reactor", True, _deploy("local/db-1/app", release_id="app-2"), **inside)
    evil = _package("https://evil.test/app/app.tar.gz")
    with _refusal("services.app.artifacts.packages"):
        POLICY.check_node_command("reactor", True, _deploy(release_id="app-2", package=evil), **inside)


def test_a_direct_deploy_by_a_deploy_identity_is_allowed() -> None:
    """`deploy: [ops]`: ops may deploy and roll back app's nodes directly, not being a reactor identity."""
    POLICY.check_node_command("ops", False, _deploy())
    POLICY.check_node_command("ops", False, RollbackRequested(node_key="local/web-1/app", service="app"))


@pytest.mark.parametrize("signer", ["ci", "reactor", None])
def test_a_direct_deploy_by_anyone_else_is_refused(signer: str | None) -> None:
    """Not in `deploy`: refused, a reactor identity's direct deploy included."""
    with _refusal("services.app.deploy"):
        POLICY.check_node_command(signer, signer == "reactor", _deploy())


def test_a_direct_deploy_must_still_target_allowed_nodes_and_artifacts() -> None:
    """The deploy identity's command is held to the node rules and artifact sources."""
    with _refusal("services.app.nodes"):
        POLICY.check_node_command("ops", False, _deploy("local/db-1/app"))
    with _refusal("services.app.artifacts.images"):
        POLICY.check_node_command("ops", False, _deploy(package=None, image="evil.test/app:1"))


def test_a_rollback_a_reactor_identity_derived_is_allowed() -> None:
    """The rollback consumer's RollbackRequested of a direct deploy (no artifact: back to what the node ran)."""
    POLICY.check_node_command("reactor", True, RollbackRequested(node_key="local/web-1/app", service="app"))
    with _refusal("services.app.deploy"):
        POLICY.check_node_command("ci", False, RollbackRequested(node_key="local/web-1/app", service="app"))


def test_direct_signers_are_the_deploy_identities() -> None:
    """What the signature check lets through to the worker's policy check."""
    assert POLICY.direct_signers() == frozenset({"ops"})
