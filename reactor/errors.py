"""One exception root; `retriable` decides between a retry and a failure outcome."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class ReactorError(Exception):
    """Root of every error the reactor raises on purpose."""

    retriable: bool = False


class InvalidInput(ReactorError):
    """A plan, event or command line that breaks a rule; names the field and the rule."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class DecodeError(ReactorError):
    """A message on the bus that is not a valid event; it goes to the dead-letter topic."""


class IllegalTransition(ReactorError):
    """A node state change the domain does not allow."""


class NodeBusy(ReactorError):
    """Another request holds the node; try again later."""

    retriable = True


class ConflictError(ReactorError):
    """A compare-and-set lost against a concurrent writer; re-read and try again."""

    retriable = True


class Fenced(ConflictError):
    """A run's claim on its node was taken over (the node has a newer epoch): its writes are refused and it emits
    nothing. Retriable: the redelivery re-emits the outcome the new holder records, or waits for the node."""


class BackendUnavailable(ReactorError):
    """The bus or the store cannot be reached right now."""

    retriable = True


class AccessDenied(ReactorError):
    """A backend refused our credentials or our permissions: not an outage, waiting does not help."""


class Misconfigured(ReactorError):
    """The deployment's own setup refuses it (a Kafka topic's size limit, say): trying again will not help, an
    operator must change the setup."""


class ExecutorNotFound(ReactorError):
    """No executor is registered for a platform."""


class StepFailed(ReactorError):
    """An executor step failed; `step` names it (download, verify, unpack, stop, start, health, switch)."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.message = message


class PolicyRefused(ReactorError):
    """The deploy policy does not allow a request; the text starts with `policy:` and names the rule."""


@contextmanager
def first_reactor_error() -> Iterator[None]:
    """Inside: a task group's ExceptionGroup holding a ReactorError is raised as its first ReactorError, so callers
    (and the CLI's exit codes) see the reactor's own error, not a group of them."""
    try:
        yield
    except ExceptionGroup as group:
        found = group.subgroup(ReactorError)
        if found is None:
            raise
        first: BaseException = found
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from group
