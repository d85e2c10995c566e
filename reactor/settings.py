"""Settings from `REACTOR_*` environment variables and an optional TOML config file."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AnyHttpUrl, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from reactor.adapters.kafka_security import KafkaSecurity, SaslMechanism, SecurityProtocol
from reactor.domain.limits import InFlightLimits
from reactor.events import LABEL_KEY


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "deploy-reactor"


def _config_file() -> Path:
    return Path(os.environ.get("REACTOR_CONFIG", "reactor.toml"))


_PROCESSED_KEEP_S = 7 * 86_400.0  # a week: a finished request's outcome kept by default


class Settings(BaseSettings):
    """Everything a reactor process can be told. Embedded mode needs none of it."""

    # hide_input_in_errors: a validation error must not echo a password (REACTOR_KAFKA_SASL_PASSWORD).
    model_config = SettingsConfigDict(env_prefix="REACTOR_", extra="forbid", frozen=True, hide_input_in_errors=True)

    mode: Literal["embedded", "distributed"] = "embedded"
    state_dir: Path = Field(default_factory=_default_state_dir)
    local_root: Path | None = None
    source: str = "/reactor"
    topic_prefix: str = Field(default="reactor.", pattern=r"^[A-Za-z0-9._-]{0,100}$")
    # Consumer groups are `<group prefix><role>` (reactor.executor, ...); None: the topic prefix. Empty: the bare role
    # names, which workers from before group prefixes joined (set it so to keep their committed offsets).
    group_prefix: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{0,100}$")
    kafka_bootstrap: str = "127.0.0.1:9092"
    mongo_url: str = "mongodb://127.0.0.1:27017/"
    mongo_database: str = "reactor"
    # `probe`: the store races writers at open and uses a lock-free compare-and-set only if the server's conditional
    # update proved atomic (reactor/adapters/mongo_probe.py); `locked`: lock documents always, without a probe.
    mongo_compare_and_set: Literal["probe", "locked"] = "probe"
    # Concurrent store calls share round trips (reactor/adapters/batching.py); false sends each call alone.
    mongo_batch: bool = True
    # Connections (so concurrent requests) of one process to the MongoDB-protocol server.
    mongo_pool_size: int = Field(default=16, ge=1, le=1000)
    # FerretDB 1.x on PostgreSQL: the PostgreSQL it stores in (a libpq URL). The store then makes, at open, the
    # indexes FerretDB's queries can use there (reactor/adapters/ferretdb_postgresql.py); without them every request
    # scans its whole table. Secret: it may hold a password.
    ferretdb_postgresql_url: SecretStr | None = None
    # FerretDB 1.x on SQLite: the directory it keeps its files in (its --sqlite-url), on this machine. The store then
    # makes, at open, the `_id` indexes FerretDB's statements can use there (reactor/adapters/ferretdb_sqlite.py);
    # without them each request by `_id` reads its whole collection.
    ferretdb_sqlite_dir: Path | None = None
    topic_partitions: int = Field(default=6, ge=1, le=1000)
    topic_replication: int = Field(default=1, ge=1, le=10)
    concurrency: int = Field(default=64, ge=1, le=10_000)
    grace_s: float = Field(default=10.0, gt=0)
    http_port: int = Field(default=8080, ge=0, le=65535)
    # A claim not renewed for this long may be taken over; a running claim is renewed every third of it.
    lease_s: float = Field(default=60.0, gt=0)
    resend_after_s: float = Field(default=60.0, gt=0)
    # A command (DeployRequested/RollbackRequested) whose signed `time` is older than this is refused, not run: a
    # message replayed from the log, or left on the topic for a day, does not change a host. 0: no limit. The pacer
    # stamps each send and resend anew, so only a command nobody sent again for this long is refused.
    command_max_age_s: float = Field(default=86_400.0, ge=0)
    # A finished request's recorded outcome (which a redelivery re-emits) is forgotten this long after it finished, so
    # the records do not grow with every command ever run: with FerretDB (but on PostgreSQL with the store's indexes)
    # each read of them decodes them all.
    # At least `command_max_age_s`, so what is forgotten is refused as stale if it comes again. None: a week, or
    # `command_max_age_s` if that is longer. 0: kept for good, as they are whatever this says while
    # `command_max_age_s` is 0 (no command is ever too old).
    processed_keep_s: float | None = Field(default=None, ge=0)
    # Embedded mode: messages the in-memory bus keeps per topic (for consumers that start later, the API's event
    # stream among them); older ones are dropped, as a Kafka topic's retention drops them.
    memory_history: int = Field(default=10_000, ge=0, le=10_000_000)
    timer_tick_s: float = Field(default=1.0, gt=0)
    concurrent_releases: Literal["queue", "refuse"] = "queue"
    # Nodes in flight at once across every release (None: no limit); per label, e.g. {"zone": 2, "cluster": 10}
    # (a Kubernetes node's cluster is its kubeconfig context unless it carries a `cluster` label).
    max_in_flight: int | None = Field(default=None, ge=1, le=1_000_000)
    max_in_flight_per_service: int | None = Field(default=None, ge=1, le=1_000_000)
    max_in_flight_per_label: dict[Annotated[str, Field(pattern=LABEL_KEY)], Annotated[int, Field(ge=1)]] = {}
    # Enforce each release's max_parallel with store slots, exact across pacer processes. None: on in
    # distributed mode (many pacers), off in embedded mode (one pacer, which serialises its own dispatches).
    strict_max_parallel: bool | None = None
    stop_timeout_s: float = Field(default=10.0, gt=0)
    noop_delay_s: float = Field(default=0.0, ge=0, le=3600)
    physical_driver: Literal["ssh", "ansible"] = "ssh"
    physical_inventory: Path | None = None
    physical_known_hosts: Path | None = None
    physical_private_key: Path | None = None
    physical_user: str = Field(default="root", pattern=r"^[a-z_][a-z0-9_-]{0,31}$")
    physical_connect_timeout_s: float = Field(default=10.0, gt=0)
    physical_command_timeout_s: float = Field(default=120.0, gt=0)
    physical_concurrency: int = Field(default=32, ge=1, le=10_000)
    kubeconfig: Path | None = None
    # The `cdevents` worker role: a topic under the prefix ("" for none) and/or HTTP sinks (comma-separated URLs).
    cdevents_topic: str = Field(default="cdevents", pattern=r"^[A-Za-z0-9._-]{0,100}$")
    cdevents_sinks: Annotated[list[AnyHttpUrl], NoDecode] = []
    cdevents_source: str | None = Field(default=None, pattern=r"^\S+$")  # None: `source`
    # The page of a release, `{release_id}` replaced, as each pipelineRun's `uri`; None: a URN naming the release.
    cdevents_release_url: str | None = Field(default=None, pattern=r"^https?://\S+$")
    cdevents_attempts: int = Field(default=5, ge=1, le=100)
    cdevents_backoff_s: float = Field(default=0.5, gt=0)
    cdevents_max_backoff_s: float = Field(default=30.0, gt=0)
    cdevents_timeout_s: float = Field(default=10.0, gt=0)
    # Signed events (docs/security.md): this process's private key, the trusted public keys, and whether every
    # consumed message must verify. None: on in distributed mode, off in embedded mode (one process, no topic).
    signing_key: Path | None = None
    trust_file: Path | None = None
    require_signed: bool | None = None
    # The deploy policy (reactor/trust/policy.py): who may release what where; None: no policy is enforced.
    policy_file: Path | None = None
    # `reactor serve`: a YAML file of token SHA-256 digests and the identities they stand for (reactor/api/auth.py).
    api_tokens: Path | None = None
    # Serve without tokens beyond embedded mode on loopback (everyone who reaches the port acts as "local").
    api_allow_anonymous: bool = False
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] | None = None
    # --- Kafka client security (issue 11, transports): PLAINTEXT unless set; the password never shows in repr.
    kafka_security_protocol: SecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: SaslMechanism | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None  # None: the system's trusted CAs

    @model_validator(mode="after")
    def _kafka_sasl_complete(self) -> Settings:
        """A SASL protocol needs a mechanism, a user name and a password."""
        if self.kafka_security_protocol.startswith("SASL_"):
            missing = [
                name
                for name, value in (
                    ("REACTOR_KAFKA_SASL_MECHANISM", self.kafka_sasl_mechanism),
                    ("REACTOR_KAFKA_SASL_USERNAME", self.kafka_sasl_username),
                    ("REACTOR_KAFKA_SASL_PASSWORD", self.kafka_sasl_password),
                )
                if not value
            ]
            if missing:
                raise ValueError(f"{self.kafka_security_protocol} needs {', '.join(missing)}")
        return self

    @model_validator(mode="after")
    def _processed_kept_while_a_command_may_run(self) -> Settings:
        """A recorded outcome is kept while its command could still run if it came again."""
        if self.processed_keep_s is not None and 0 < self.processed_keep_s < self.command_max_age_s:
            raise ValueError(
                f"REACTOR_PROCESSED_KEEP_S ({self.processed_keep_s:g}) must be 0 (keep forever) or at least"
                f" REACTOR_COMMAND_MAX_AGE_S ({self.command_max_age_s:g}): a command whose outcome is forgotten"
                " must be too old to run again"
            )
        return self

    def processed_keep(self) -> timedelta | None:
        """How long a worker keeps a finished request's outcome; None: for good."""
        keep = (
            max(_PROCESSED_KEEP_S, self.command_max_age_s) if self.processed_keep_s is None else self.processed_keep_s
        )
        if not keep or not self.command_max_age_s:
            return None
        return timedelta(seconds=keep)

    def kafka_security(self) -> KafkaSecurity:
        """What every Kafka client of this process is given."""
        return KafkaSecurity(
            protocol=self.kafka_security_protocol,
            sasl_mechanism=self.kafka_sasl_mechanism,
            username=self.kafka_sasl_username,
            password=self.kafka_sasl_password,
            cafile=self.kafka_ssl_cafile,
        )

    # --- end of Kafka client security

    @field_validator("cdevents_sinks", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        """REACTOR_CDEVENTS_SINKS is a comma-separated list of URLs."""
        if isinstance(value, str):
            return [url.strip() for url in value.split(",") if url.strip()]
        return value

    def effective_log_level(self, default: str) -> str:
        """The configured log level, or the command's own default (workers log more than the CLI)."""
        return self.log_level or default

    def signatures_required(self) -> bool:
        """Whether every consumed message must carry a valid signature by a trusted key."""
        return self.mode == "distributed" if self.require_signed is None else self.require_signed

    def in_flight_limits(self) -> InFlightLimits:
        """The pacer's limits on nodes in flight."""
        strict = self.mode == "distributed" if self.strict_max_parallel is None else self.strict_max_parallel
        return InFlightLimits(
            overall=self.max_in_flight,
            per_service=self.max_in_flight_per_service,
            per_label=dict(self.max_in_flight_per_label),
            release_parallel=strict,
        )

    @property
    def nodes_root(self) -> Path:
        """Where the `local` platform keeps its nodes."""
        return self.local_root or self.state_dir / "nodes"

    @property
    def postgresql_url(self) -> str | None:
        """FerretDB's PostgreSQL URL, revealed for the store's connection only."""
        secret = self.ferretdb_postgresql_url
        return None if secret is None else secret.get_secret_value()

    @property
    def database_path(self) -> Path:
        """The embedded store's file."""
        return self.state_dir / "reactor.db"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments win over environment variables, which win over the config file."""
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=_config_file()))
