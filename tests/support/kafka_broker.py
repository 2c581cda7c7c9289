"""A real Kafka broker for the test session.

Order of preference (override with ``KAFKA_TEST_BACKEND=external|docker|local``):

1. ``KAFKA_BOOTSTRAP_SERVERS`` is set: use that broker as is (kind ``external``).
2. A Docker daemon answers a ping within a few seconds: an ``apache/kafka``
   container through testcontainers (kind ``docker``; image from
   ``KAFKA_TEST_IMAGE``).
3. Otherwise ``deploy/kafka/kafka.sh`` runs the broker from Maven Central jars
   (kind ``local``) with its own temporary state dir and free ports, so it never
   clashes with a broker started by ``make demo`` (state in ``.cache/run``,
   ports 19092/19093). Only this kind can be stopped and restarted by a test:
   see :func:`stop_local_broker` and :func:`start_local_broker`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

REPO_ROOT = Path(__file__).resolve().parents[2]
KAFKA_SH = REPO_ROOT / "deploy" / "kafka" / "kafka.sh"
DEFAULT_IMAGE = "apache/kafka:4.4.0"
# The first start may have to download the jars (about 45 MB) with Maven.
START_TIMEOUT_S = float(os.environ.get("KAFKA_TEST_START_TIMEOUT", "600"))
STOP_TIMEOUT_S = 60.0

Kind = Literal["external", "docker", "local"]


@dataclass
class BrokerHandle:
    """Where the broker is and, for a local one, how to drive it."""

    kind: Kind
    bootstrap: str
    state_dir: Path | None = None
    broker_port: int | None = None
    controller_port: int | None = None
    # Environment for kafka.sh (local kind only): ports and state dir.
    env: dict[str, str] = field(default_factory=dict)

    @property
    def restartable(self) -> bool:
        return self.kind == "local"

    @property
    def log_file(self) -> Path | None:
        return self.state_dir / "logs" / "broker.out" if self.state_dir else None


def free_port() -> int:
    """A port that is free now (bind to 0); the small race is accepted."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _two_free_ports() -> tuple[int, int]:
    a = free_port()
    b = free_port()
    while b == a:
        b = free_port()
    return a, b


def docker_available(timeout: float = 3.0) -> bool:
    """True when a Docker daemon answers a ping. Never blocks longer than ~timeout."""
    if not (os.environ.get("DOCKER_HOST") or Path("/var/run/docker.sock").exists()):
        return False
    result: list[bool] = []

    def ping() -> None:
        try:
            import docker

            client = docker.from_env(timeout=max(1, int(timeout)))
            try:
                result.append(bool(client.ping()))
            finally:
                client.close()
        except Exception:
            result.append(False)

    t = threading.Thread(target=ping, name="docker-ping", daemon=True)
    t.start()
    t.join(timeout + 1.0)
    return bool(result and result[0])


# ---------------------------------------------------------------- local broker


def _run_kafka_sh(handle: BrokerHandle, command: str, timeout: float, **extra: str) -> str:
    env = {**os.environ, **handle.env, **extra}
    try:
        proc = subprocess.run(
            ["bash", str(KAFKA_SH), command],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"kafka.sh {command} timed out after {timeout:.0f}s") from e
    if proc.returncode != 0:
        raise RuntimeError(
            f"kafka.sh {command} failed (exit {proc.returncode}):\n{proc.stderr}{proc.stdout}"
        )
    return proc.stdout.strip()


def start_local_broker(handle: BrokerHandle, keep_data: bool = True) -> str:
    """(Re)start the local broker of ``handle`` on the same ports and state dir.

    With ``keep_data`` the formatted data dir is reused, so topics and committed
    offsets survive. Returns the bootstrap address (unchanged).
    """
    _require_local(handle)
    out = _run_kafka_sh(handle, "start", START_TIMEOUT_S, KAFKA_KEEP_DATA="1" if keep_data else "0")
    bootstrap = out.splitlines()[-1].strip() if out else ""
    if bootstrap != handle.bootstrap:
        raise RuntimeError(f"kafka.sh start printed {out!r}, expected {handle.bootstrap!r}")
    return bootstrap


def stop_local_broker(handle: BrokerHandle, kill: bool = False) -> None:
    """Stop the local broker: SIGTERM (controlled shutdown, ~2-3 s), SIGKILL
    after 30 s; with ``kill`` SIGKILL at once, like a crash. Idempotent."""
    _require_local(handle)
    extra = {"KAFKA_STOP_TIMEOUT": "0"} if kill else {}
    _run_kafka_sh(handle, "stop", STOP_TIMEOUT_S, **extra)


def local_broker_running(handle: BrokerHandle) -> bool:
    _require_local(handle)
    try:
        _run_kafka_sh(handle, "status", 10)
    except RuntimeError:
        return False
    return True


def _require_local(handle: BrokerHandle) -> None:
    if handle.kind != "local":
        raise ValueError(f"only a local (kafka.sh) broker can be driven, not {handle.kind!r}")


@contextlib.contextmanager
def _local_broker() -> Iterator[BrokerHandle]:
    if shutil.which("java") is None:
        raise RuntimeError("no Docker and no java on PATH: cannot run a Kafka broker")
    state_dir = Path(tempfile.mkdtemp(prefix="kafka-test-"))
    broker_port, controller_port = _two_free_ports()
    handle = BrokerHandle(
        kind="local",
        bootstrap=f"127.0.0.1:{broker_port}",
        state_dir=state_dir,
        broker_port=broker_port,
        controller_port=controller_port,
        env={
            "KAFKA_PORT": str(broker_port),
            "KAFKA_CONTROLLER_PORT": str(controller_port),
            "KAFKA_STATE_DIR": str(state_dir),
        },
    )
    try:
        start_local_broker(handle, keep_data=False)
        yield handle
    finally:
        try:
            stop_local_broker(handle)
        finally:
            if os.environ.get("KAFKA_TEST_KEEP_STATE") != "1":
                shutil.rmtree(state_dir, ignore_errors=True)


# --------------------------------------------------------------- docker broker


@contextlib.contextmanager
def _docker_broker() -> Iterator[BrokerHandle]:
    # testcontainers' KafkaContainer drives Confluent's cp-kafka start scripts
    # and cannot configure the apache/kafka image, so configure it by env here.
    # The host port is fixed (same number inside and outside) so that the
    # advertised listener is right without a post-start rewrite.
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.wait_strategies import LogMessageWaitStrategy

    port = free_port()
    cport = 9093 if port != 9093 else 9094
    container = DockerContainer(os.environ.get("KAFKA_TEST_IMAGE", DEFAULT_IMAGE))
    try:
        # Known before start only for a plain docker host (the usual case).
        host = container.get_container_host_ip()
    except Exception:
        host = "127.0.0.1"
    if host in ("localhost", "::1"):
        host = "127.0.0.1"
    container.with_bind_ports(port, port).with_envs(
        CLUSTER_ID="bGxtLWNvbnN1bWVyLWRldg",
        KAFKA_NODE_ID="1",
        KAFKA_PROCESS_ROLES="broker,controller",
        KAFKA_LISTENERS=f"PLAINTEXT://0.0.0.0:{port},CONTROLLER://0.0.0.0:{cport}",
        KAFKA_ADVERTISED_LISTENERS=f"PLAINTEXT://{host}:{port}",
        KAFKA_CONTROLLER_LISTENER_NAMES="CONTROLLER",
        KAFKA_INTER_BROKER_LISTENER_NAME="PLAINTEXT",
        KAFKA_LISTENER_SECURITY_PROTOCOL_MAP="CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        KAFKA_CONTROLLER_QUORUM_VOTERS=f"1@localhost:{cport}",
        KAFKA_NUM_PARTITIONS="1",
        KAFKA_AUTO_CREATE_TOPICS_ENABLE="true",
        KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR="1",
        KAFKA_OFFSETS_TOPIC_NUM_PARTITIONS="3",
        KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS="0",
        KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR="1",
        KAFKA_TRANSACTION_STATE_LOG_MIN_ISR="1",
        KAFKA_TRANSACTION_STATE_LOG_NUM_PARTITIONS="3",
        KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR="1",
        KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR="1",
        KAFKA_SHARE_COORDINATOR_STATE_TOPIC_NUM_PARTITIONS="1",
    ).waiting_for(LogMessageWaitStrategy("Kafka Server started").with_startup_timeout(120))
    with container:
        yield BrokerHandle(kind="docker", bootstrap=f"{host}:{port}", broker_port=port)


# ---------------------------------------------------------------------- public


def _backend() -> Kind:
    forced = os.environ.get("KAFKA_TEST_BACKEND", "auto").strip().lower()
    if forced in ("external", "docker", "local"):
        return forced  # type: ignore[return-value]
    if forced != "auto":
        raise ValueError(f"KAFKA_TEST_BACKEND={forced!r}: use auto, external, docker or local")
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        return "external"
    return "docker" if docker_available() else "local"


@contextlib.contextmanager
def kafka_broker() -> Iterator[BrokerHandle]:
    """A running broker for the duration of the block (see module docstring)."""
    kind = _backend()
    if kind == "external":
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
        if not bootstrap:
            raise RuntimeError("KAFKA_TEST_BACKEND=external needs KAFKA_BOOTSTRAP_SERVERS")
        yield BrokerHandle(kind="external", bootstrap=bootstrap)
    elif kind == "docker":
        with _docker_broker() as handle:
            yield handle
    else:
        with _local_broker() as handle:
            yield handle


@contextlib.contextmanager
def broker_bootstrap() -> Iterator[str]:
    """Like :func:`kafka_broker`, yielding only the bootstrap address."""
    with kafka_broker() as handle:
        yield handle.bootstrap


@contextlib.contextmanager
def private_local_broker() -> Iterator[BrokerHandle]:
    """A broker of the test's own (kafka.sh on free ports), for faults that stop the broker."""
    with _local_broker() as handle:
        yield handle
