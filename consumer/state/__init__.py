"""State shared by every replica: a compacted topic read into a local store (a global table).

The one mechanism behind the response cache, the spend budget and the batch-job registry.
"""

from consumer.state.store import (
    LocalStore,
    StateRecord,
    StoreCorrupt,
    StoreError,
    StoreLocked,
    StoreStats,
)
from consumer.state.table import (
    CatchUp,
    GlobalTable,
    StateTopicError,
    StateUnavailable,
    TableStats,
)

__all__ = [
    "CatchUp",
    "GlobalTable",
    "LocalStore",
    "StateRecord",
    "StateTopicError",
    "StateUnavailable",
    "StoreCorrupt",
    "StoreError",
    "StoreLocked",
    "StoreStats",
    "TableStats",
]
