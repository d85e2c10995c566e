"""How the reactor's Kafka clients authenticate and encrypt: PLAINTEXT by default, SASL (SCRAM) over TLS."""

from __future__ import annotations

import contextlib
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aiokafka import AIOKafkaProducer
from aiokafka.conn import create_conn
from aiokafka.errors import AuthenticationFailedError, KafkaError, SaslAuthenticationFailed
from aiokafka.helpers import create_ssl_context
from pydantic import SecretStr

from reactor.codec import MAX_RELEASE_EVENT_BYTES
from reactor.errors import AccessDenied, BackendUnavailable

# The largest message a reactor producer sends and a reader of the releases topic fetches, and that topic's
# max.message.bytes: the codec's largest event body and room for its headers (the broker's default is 1 MiB, which
# the other topics keep: their events are at most `codec.MAX_EVENT_BYTES`).
MAX_MESSAGE_BYTES = MAX_RELEASE_EVENT_BYTES + 1024 * 1024

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


@dataclass(frozen=True)
class KafkaSecurity:
    """Client security settings, given to every producer, consumer and admin client the reactor makes."""

    protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    username: str | None = None
    password: SecretStr | None = field(default=None, repr=False)
    cafile: Path | None = None

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka's clients (a fresh TLS context each call)."""
        options: dict[str, Any] = {"security_protocol": self.protocol}
        if self.protocol in ("SSL", "SASL_SSL"):
            options["ssl_context"] = create_ssl_context(cafile=str(self.cafile) if self.cafile else None)
        if self.protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.username
            options["sasl_plain_password"] = self.password.get_secret_value() if self.password else None
        return options

    async def explain(self, bootstrap: str) -> None:
        """After a client could not bootstrap: raise `AccessDenied` if the first broker refuses our credentials or
        its certificate does not verify against our CA.

        aiokafka only logs why each bootstrap connection failed; a wrong password is not an outage to wait out.
        """
        if self.protocol == "PLAINTEXT":
            return
        host, _, port = bootstrap.split(",", maxsplit=1)[0].strip().rpartition(":")
        try:
            conn = await create_conn(host, int(port), request_timeout_ms=10_000, **self.client_options())
        except (SaslAuthenticationFailed, AuthenticationFailedError) as exc:
            raise AccessDenied(f"kafka {bootstrap}: authentication failed as {self.username!r}: {exc}") from exc
        except ssl.SSLCertVerificationError as exc:
            raise AccessDenied(f"kafka {bootstrap}: the broker's certificate does not verify: {exc}") from exc
        except (KafkaError, OSError, ValueError):
            return  # not a refusal of our credentials: the caller reports the outage
        with contextlib.suppress(Exception):
            conn.close()


async def started_producer(bootstrap: str, client_id: str, security: KafkaSecurity) -> AIOKafkaProducer:
    """An idempotent producer (acks from every replica) connected to `bootstrap`; AccessDenied when the broker
    refuses its credentials or certificate, BackendUnavailable when it does not answer."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        client_id=client_id,
        enable_idempotence=True,
        acks="all",
        linger_ms=2,
        request_timeout_ms=30_000,
        max_request_size=MAX_MESSAGE_BYTES,
        **security.client_options(),
    )
    try:
        await producer.start()
    except KafkaError as exc:
        await producer.stop()
        await security.explain(bootstrap)
        raise BackendUnavailable(f"kafka {bootstrap}: {exc}") from exc
    return producer
