"""What the delivery and commit steps report, passed on to the metrics and the health checks.

The steps know only the small `DeliveryEvents` / `CommitEvents` protocols; this one class
implements both for the running process.
"""

from __future__ import annotations

from consumer.observability.health import BrokerHealth, PartitionProgress
from consumer.observability.metrics import Metrics
from consumer.records import TopicPartition


class PipelineEvents:
    def __init__(self, metrics: Metrics, broker: BrokerHealth, progress: PartitionProgress) -> None:
        self._metrics = metrics
        self._broker = broker
        self._progress = progress

    def dead_lettered(self, reason: str) -> None:
        self._metrics.dead_letter(reason)

    def broker_ok(self) -> None:
        self._broker.record_ok()

    def broker_error(self, what: str, error: BaseException) -> None:
        self._broker.record_error(what, repr(error))

    def partition_advanced(self, tp: TopicPartition) -> None:
        self._progress.advanced(tp)

    def committed(self, seconds: float) -> None:
        self._metrics.committed(seconds)
