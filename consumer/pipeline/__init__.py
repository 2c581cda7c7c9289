"""The steps a record passes through, in order, behind one small protocol (`protocol.py`).

decode -> windowing -> enrich -> encode -> deliver -> commit -> report
"""

from consumer.pipeline.chain import Chain, Parts, build_chain
from consumer.pipeline.commit import CommitStep, OffsetTracker
from consumer.pipeline.decode import DecodeStep
from consumer.pipeline.deliver import (
    DeliveryFailed,
    ProduceStep,
    Replacements,
    TransactionalProduceStep,
)
from consumer.pipeline.encode import EncodedWindow, Encoder, EncodeStep
from consumer.pipeline.enrich import EnrichedWindow, EnrichStep
from consumer.pipeline.protocol import Deadline, Rejected, Step, Wakeup
from consumer.pipeline.report import ReportStep
from consumer.pipeline.windowing import WindowingStep

__all__ = [
    "Chain",
    "CommitStep",
    "Deadline",
    "DecodeStep",
    "DeliveryFailed",
    "EncodeStep",
    "EncodedWindow",
    "Encoder",
    "EnrichStep",
    "EnrichedWindow",
    "OffsetTracker",
    "Parts",
    "ProduceStep",
    "Rejected",
    "Replacements",
    "ReportStep",
    "Step",
    "TransactionalProduceStep",
    "Wakeup",
    "WindowingStep",
    "build_chain",
]
