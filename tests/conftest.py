"""Shared fixtures. The broker is started once per session, on first use."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Make `tests.support` importable however pytest is launched (the repo root is
# not on sys.path for the `pytest` script; pyproject has no `pythonpath`).
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.support.kafka_broker import (  # noqa: E402
    BrokerHandle,
)
from tests.support.kafka_broker import (  # noqa: E402
    kafka_broker as _start_kafka_broker,
)


@pytest.fixture(scope="session")
def _kafka_session() -> Iterator[BrokerHandle]:
    with _start_kafka_broker() as handle:
        yield handle


@pytest.fixture(scope="session")
def kafka_bootstrap(_kafka_session: BrokerHandle) -> str:
    """Bootstrap address of the session's broker (external, docker or local)."""
    return _kafka_session.bootstrap


@pytest.fixture(scope="session")
def kafka_broker(_kafka_session: BrokerHandle) -> BrokerHandle:
    """The session broker's handle, for tests that stop and restart it.

    Only a broker run by deploy/kafka/kafka.sh can be restarted; with an
    external or Docker broker such tests are skipped.
    """
    if not _kafka_session.restartable:
        pytest.skip(
            f"needs a local kafka.sh broker to stop/restart; this session uses a "
            f"{_kafka_session.kind} broker at {_kafka_session.bootstrap} "
            f"(set KAFKA_TEST_BACKEND=local)"
        )
    return _kafka_session
