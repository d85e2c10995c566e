"""Clients of the SASL_SSL broker as its principals: each one's security settings, and a fresh topic prefix's topics
and ACLs set in-process by the admin (Kafka's AclCommand costs a JVM start per call; a test needs them in
milliseconds)."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import for_code
from aiokafka.protocol.admin import CreateAclsRequest
from pydantic import SecretStr

from reactor.adapters.kafka_bus import KafkaBus
from reactor.adapters.kafka_security import KafkaSecurity
from tests.infra import kafka_secure
from tests.infra.testenv import Service

# Kafka's wire codes (org.apache.kafka.common.resource / acl): ResourceType, PatternType, AclOperation,
# AclPermissionType.
_RESOURCE = {"topic": 2, "group": 3}
_PATTERN = {"literal": 3, "prefixed": 4}
_OPERATION = {"Read": 3, "Write": 4}
_ALLOW = 3


def security(broker: Service, user: str) -> KafkaSecurity:
    """Client settings of `user` on the secure broker."""
    return KafkaSecurity(
        protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",  # kafka_secure.MECHANISM
        username=user,
        password=SecretStr(kafka_secure.passwords(broker)[user]),
        cafile=Path(broker.env["REACTOR_KAFKA_SSL_CAFILE"]),
    )


def bootstrap(broker: Service) -> str:
    return broker.env["REACTOR_KAFKA_BOOTSTRAP"]


async def grant(
    broker: Service,
    prefix: str,
    *,
    partitions: int = kafka_secure.PARTITIONS,
    leave_out: Collection[kafka_secure.AclBinding] = (),
) -> None:
    """As the admin: the reactor's topics under `prefix` and every principal's ACLs on them, the same bindings
    `kafka_secure.grant` sets with Kafka's tools, but those in `leave_out`."""
    async with KafkaBus(bootstrap(broker), prefix=prefix, security=security(broker, kafka_secure.ADMIN)) as admin_bus:
        await admin_bus.create_topics(partitions=partitions)
    await allow(broker, [binding for binding in kafka_secure.acl_bindings(prefix) if binding not in leave_out])
    await _visible(broker, kafka_secure.WORKER, [prefix + name for name in kafka_secure.TOPICS])
    await _visible(broker, kafka_secure.CI, [prefix + "releases"])


async def allow(broker: Service, bindings: Collection[kafka_secure.AclBinding]) -> None:
    """As the admin: add `bindings` (the broker applies them moments later)."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap(broker), **security(broker, kafka_secure.ADMIN).client_options()
    )
    await admin.start()
    try:
        for binding in bindings:
            request = CreateAclsRequest(
                _RESOURCE[binding.resource],
                binding.name,
                _PATTERN[binding.pattern],
                f"User:{binding.principal}",
                "*",
                _OPERATION[binding.operation],
                _ALLOW,
            )
            # aiokafka's admin client has no create_acls: the request goes through its one way to send any.
            response: Any = await admin._send_request(request)
            for error_code, message in response.creation_responses:
                if error_code:
                    raise for_code(error_code)(f"creating {binding}: {message}")
    finally:
        await admin.close()


async def _visible(broker: Service, user: str, topics: list[str]) -> None:
    """Wait until `user` may describe `topics`: the broker applies new ACLs from its metadata log moments after
    the controller took them."""
    client = AIOKafkaAdminClient(bootstrap_servers=bootstrap(broker), **security(broker, user).client_options())
    await client.start()
    try:
        async with asyncio.timeout(30):
            while any(topic["error_code"] for topic in await client.describe_topics(topics)):
                await asyncio.sleep(0.05)
    finally:
        await client.close()
