"""In-flight limits across releases: which slot scopes a node takes while it is dispatched. Pure; no I/O.

A scope is a named counter with a limit: `all` (every node the pacers dispatch), `service/<service>`,
`label/<key>=<value>` (a zone, a rack, a cluster) and `release/<release id>` (a release's own `max_parallel`,
enforced across pacer processes). A node is dispatched only once it holds one slot of every scope that applies
to it; it gives them back with its outcome.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from reactor.events import NodeTarget

CLUSTER_LABEL = "cluster"


@dataclass(frozen=True, slots=True)
class InFlightLimits:
    """Limits on nodes in flight at once, across every release the pacers run; None: no limit."""

    overall: int | None = None
    per_service: int | None = None
    per_label: dict[str, int] = field(default_factory=dict)  # e.g. {"zone": 2, "cluster": 10}
    # Enforce each release's max_parallel with slots too: needed when several pacer processes share releases.
    release_parallel: bool = False

    @property
    def global_(self) -> bool:
        """Whether a limit spans releases (a freed slot may let another release go on)."""
        return self.overall is not None or self.per_service is not None or bool(self.per_label)

    @property
    def any(self) -> bool:
        """Whether dispatching takes slots at all."""
        return self.global_ or self.release_parallel

    def holds(self, *, max_parallel: int, release_size: int) -> bool:
        """Whether dispatching a release's nodes takes slots: a release of no more nodes than its max_parallel
        can never have more in flight, so its own limit needs none (a limit across releases still does)."""
        return self.global_ or (self.release_parallel and max_parallel < release_size)


def label_value(target: NodeTarget | None, node_key: str, key: str) -> str | None:
    """The node's value of label `key`; a Kubernetes node's cluster is its context unless labelled."""
    if target is not None and key in target.labels:
        return target.labels[key]
    if key == CLUSTER_LABEL and node_key.startswith("k8s/"):
        return node_key.split("/")[1]
    return None


def scopes_for(
    limits: InFlightLimits,
    *,
    release_id: str,
    service: str,
    max_parallel: int,
    node_key: str,
    target: NodeTarget | None,
    release_size: int | None = None,
) -> list[tuple[str, int]]:
    """The (scope, limit) pairs a node must hold a slot of before it is dispatched, in a fixed order.

    The release's own scope is left out when its `release_size` nodes all fit in `max_parallel`.
    """
    scopes: list[tuple[str, int]] = []
    if limits.overall is not None:
        scopes.append(("all", limits.overall))
    if limits.per_service is not None:
        scopes.append((f"service/{service}", limits.per_service))
    for key, limit in sorted(limits.per_label.items()):
        value = label_value(target, node_key, key)
        if value is not None:
            scopes.append((f"label/{key}={value}", limit))
    if limits.release_parallel and (release_size is None or max_parallel < release_size):
        scopes.append((f"release/{release_id}", max_parallel))
    return scopes
