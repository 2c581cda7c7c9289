"""aiokafka consumer and producer built from the settings, with the options this tool relies on.

Auto-commit is off (offsets are committed only after outputs are acknowledged), the producer is
idempotent with acks=all, and the consumer reads committed data only by default.
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.helpers import create_ssl_context

from consumer.config import KafkaSettings


def connection_options(settings: KafkaSettings) -> dict[str, Any]:
    """Bootstrap, client id and SASL/SSL options shared by consumer, producer and admin."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "security_protocol": settings.security_protocol,
    }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(
            cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None,
            certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
            keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        )
    if settings.security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        options["sasl_plain_password"] = (
            settings.sasl_password.get_secret_value() if settings.sasl_password else None
        )
    return options


def build_consumer(settings: KafkaSettings) -> AIOKafkaConsumer:
    options: dict[str, Any] = {
        **connection_options(settings),
        "group_id": settings.group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": settings.auto_offset_reset,
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": settings.heartbeat_interval_ms,
        "max_poll_interval_ms": settings.max_poll_interval_ms,
        "rebalance_timeout_ms": settings.rebalance_timeout_ms,
        "group_instance_id": settings.group_instance_id,
        "isolation_level": "read_committed",
        "fetch_max_bytes": max(52_428_800, settings.max_row_bytes * 2),
        "max_partition_fetch_bytes": max(1_048_576, settings.max_row_bytes + 1024),
    }
    options.update(settings.consumer_options)
    return AIOKafkaConsumer(**options)


def build_producer(
    settings: KafkaSettings, compression: str | None, transactional_id: str | None = None
) -> AIOKafkaProducer:
    options: dict[str, Any] = {
        "transactional_id": transactional_id,
        **connection_options(settings),
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 5,
        "max_batch_size": 262_144,
        "max_request_size": max(1_048_576, settings.max_row_bytes * 4),
        "compression_type": compression,
    }
    options.update(settings.producer_options)
    return AIOKafkaProducer(**options)
