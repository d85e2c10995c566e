"""Kafka client security settings: PLAINTEXT by default, SASL_SSL given to clients, the password never shown."""

from __future__ import annotations

import secrets
import ssl
from pathlib import Path

import pytest
from pydantic import ValidationError

from reactor.adapters.kafka_security import KafkaSecurity
from reactor.runtime import kafka_bus
from reactor.settings import Settings

PASSWORD = secrets.token_urlsafe(16)  # a fresh one per run: found only if leaked


def secure(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "kafka_security_protocol": "SASL_SSL",
        "kafka_sasl_mechanism": "SCRAM-SHA-512",
        "kafka_sasl_username": "worker",
        "kafka_sasl_password": PASSWORD,
        "kafka_ssl_cafile": None,
    }
    values.update(overrides)
    return Settings(state_dir=tmp_path, **values)  # type: ignore[arg-type]


def test_plaintext_is_the_default_and_adds_no_tls_or_sasl() -> None:
    """Without settings, clients get `security_protocol=PLAINTEXT` and nothing else."""
    assert Settings().kafka_security().client_options() == {"security_protocol": "PLAINTEXT"}


def test_sasl_ssl_settings_reach_the_bus_clients_with_a_tls_context(tmp_path: Path) -> None:
    """The bus the runtime builds carries the SCRAM user, the password's value and a verifying TLS context."""
    options = kafka_bus(secure(tmp_path)).security.client_options()
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("worker", PASSWORD)
    assert isinstance(options["ssl_context"], ssl.SSLContext)
    assert options["ssl_context"].verify_mode == ssl.CERT_REQUIRED


def test_the_password_shows_in_no_repr(tmp_path: Path) -> None:
    """Neither the settings nor the security object print the password."""
    settings = secure(tmp_path)
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(settings)
    assert PASSWORD not in repr(settings.kafka_security())
    assert PASSWORD not in repr(KafkaSecurity(password=settings.kafka_sasl_password))


def test_sasl_without_a_user_is_refused_without_echoing_the_password(tmp_path: Path) -> None:
    """A SASL protocol needs mechanism, user and password; the error names what is missing, not the input."""
    with pytest.raises(ValidationError, match="REACTOR_KAFKA_SASL_USERNAME") as refused:
        secure(tmp_path, kafka_sasl_username=None)
    assert PASSWORD not in str(refused.value)
