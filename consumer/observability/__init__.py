"""Operating the consumer: structured logs, Prometheus metrics, health and readiness endpoints."""

from consumer.observability.events import PipelineEvents
from consumer.observability.health import BrokerHealth, PartitionProgress, ProviderHealth
from consumer.observability.metrics import Metrics
from consumer.observability.server import Observability

__all__ = [
    "BrokerHealth",
    "Metrics",
    "Observability",
    "PartitionProgress",
    "PipelineEvents",
    "ProviderHealth",
]
