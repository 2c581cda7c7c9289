"""`/metrics`, `/healthz` and `/readyz` from one small aiohttp server in the app's event loop.

- `/healthz` (liveness): the poll loop made progress within `stale_after_s`. The poll loop calls
  `beat()` on every turn, also while a window runs or is held back, so only a stuck loop (a
  blocked event loop, a hung client call) fails it. Restarting is the right answer to that.
- `/readyz` (readiness): partitions are assigned, no window is held back, the LLM provider is
  not failing, the broker answers and no partition is stuck (lag, but no committed progress for
  `stuck_partition_after_s`); the body names every problem. It says "this member is doing
  useful work now"; it is a signal for dashboards, alerts and rollouts, not a reason to restart
  (there is no traffic to steer away from a consumer).
- `/metrics`: the Prometheus exposition of the app's own registry.

Three background tasks run beside the server: a 1 s heartbeat that measures event-loop lag, a
broker probe (one bounded metadata request every `broker_probe_interval_s`, so an outage shows
within seconds even while nothing is produced or committed), and the consumer-lag probe (high
watermark minus committed offset per assigned partition) every `lag_interval_s`, so lag is
never computed per message. Readiness judges stuck partitions on the latest lag with the
current time, so one is reported at most `lag_interval_s` after `stuck_partition_after_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import web

from consumer.config import Settings
from consumer.llm.limiter import AIMDLimiter
from consumer.observability.health import BrokerHealth, PartitionProgress, ProviderHealth
from consumer.observability.metrics import CONTENT_TYPE, Metrics
from consumer.records import TopicPartition

log = logging.getLogger("consumer.observability")

_COMMITTED_TIMEOUT_S = 5.0
# One probe interval plus this timeout stays within BrokerHealth's 3 s, so a broker that accepts
# connections but never answers is reported as fast as one that refuses them.
_BROKER_PROBE_TIMEOUT_S = 2.0


class ObservedApp(Protocol):
    """What the endpoints read from the app."""

    limiter: AIMDLimiter

    @property
    def held_back(self) -> bool: ...

    @property
    def held_back_reason(self) -> str | None: ...


class Observability:
    """Health state, the probes and the HTTP server; `start()`/`stop()` from `app.run()`.

    The health trackers are public so the app can hand them to whoever feeds them (the LLM
    caller, produce and commit); any not passed in is created here.
    """

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        app: ObservedApp,
        consumer: Any,
        clock: Callable[[], float] = time.monotonic,
        provider: ProviderHealth | None = None,
        broker: BrokerHealth | None = None,
        progress: PartitionProgress | None = None,
    ) -> None:
        self.settings = settings.observability
        self.metrics = metrics
        self.provider = provider if provider is not None else ProviderHealth(clock=clock)
        self.broker = broker if broker is not None else BrokerHealth(clock=clock)
        self.progress = (
            progress
            if progress is not None
            else PartitionProgress(self.settings.stuck_partition_after_s, clock=clock)
        )
        self._app = app
        self._consumer = consumer
        self._clock = clock
        self._last_beat = clock()
        self._lags: dict[tuple[str, int], int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        metrics.watch_limiter(app.limiter)
        metrics.watch_held_back(lambda: app.held_back)
        metrics.watch_health(
            provider_failing=lambda: self.provider.failing() is not None,
            broker_unreachable=lambda: self.broker.unreachable() is not None,
            stuck_partitions=lambda: len(self.stuck_partitions()),
        )
        metrics.ready.set_function(lambda: 1.0 if self.readiness()[0] else 0.0)

    # ---- state ----------------------------------------------------------------------------

    def beat(self) -> None:
        """The poll loop is alive (called once per turn)."""
        self._last_beat = self._clock()

    def health(self) -> tuple[bool, dict[str, Any]]:
        since = self._clock() - self._last_beat
        ok = since <= self.settings.stale_after_s
        return ok, {
            "status": "ok" if ok else "stuck",
            "seconds_since_progress": round(since, 3),
            "stale_after_s": self.settings.stale_after_s,
        }

    def stuck_partitions(self) -> list[TopicPartition]:
        """Assigned partitions stuck now, judged on the latest lag measured."""
        assigned = {TopicPartition(tp.topic, tp.partition) for tp in self._consumer.assignment()}
        return self.progress.stuck({tp: n for tp, n in self._lags.items() if tp in assigned})

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        assigned = len(self._consumer.assignment())
        held_back = bool(self._app.held_back)
        healthy, _ = self.health()
        provider = self.provider.failing()
        broker = self.broker.unreachable()
        stuck = [f"{tp.topic}/{tp.partition}" for tp in self.stuck_partitions()]
        problems = []
        if not assigned:
            problems.append("no partitions assigned")
        if held_back:
            problems.append(f"held back: {self._app.held_back_reason or 'the provider is failing'}")
        if not healthy:
            problems.append("poll loop stuck")
        if provider is not None:
            problems.append(provider)
        if broker is not None:
            problems.append(broker)
        if stuck:
            problems.append(
                f"partitions stuck: {', '.join(stuck)} "
                f"(no progress for {self.progress.stuck_after_s:g} s with lag)"
            )
        return not problems, {
            "status": "ready" if not problems else "not ready",
            "problems": problems,
            "assigned_partitions": assigned,
            "held_back": held_back,
            "provider": {"failing": provider is not None, "reason": provider},
            "broker": {"unreachable": broker is not None, "reason": broker},
            "stuck_partitions": stuck,
        }

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._last_beat = self._clock()
        # The broker probe runs without the server too: it logs when the broker is lost and
        # back, the lines an operator reads instead of the client library's retries.
        self._tasks = [
            asyncio.create_task(
                self.broker.run_probe(
                    self._consumer.topics,
                    self.settings.broker_probe_interval_s,
                    _BROKER_PROBE_TIMEOUT_S,
                ),
                name="observability-broker",
            )
        ]
        if self.settings.port == 0:
            log.info("metrics and health server disabled (observability.port: 0)")
            return
        self._tasks += [
            asyncio.create_task(self._heartbeat(), name="observability-heartbeat"),
            asyncio.create_task(self._lag_probe(), name="observability-lag"),
        ]
        runner = web.AppRunner(self._web_app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.host, self.settings.port)
        try:
            await site.start()
        except OSError as error:
            await runner.cleanup()
            log.error(
                "metrics and health server could not listen; running without it",
                extra={"host": self.settings.host, "port": self.settings.port, "error": str(error)},
            )
            return
        self._runner = runner
        self.port = _bound_port(runner) or self.settings.port
        log.info(
            "serving /metrics, /healthz, /readyz",
            extra={"host": self.settings.host, "port": self.port},
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- background -----------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        while True:
            before = self._clock()
            await asyncio.sleep(1.0)
            self.metrics.event_loop_lag.set(max(0.0, self._clock() - before - 1.0))

    async def _lag_probe(self) -> None:
        while True:
            started = self._clock()
            await self.probe_lag()
            # A steady cadence: a slow probe does not push the next one (and stuck detection) out.
            elapsed = self._clock() - started
            await asyncio.sleep(max(0.0, self.settings.lag_interval_s - elapsed))

    async def probe_lag(self) -> None:
        """Measure lag once: for the gauges and for stuck partitions; a failure is the broker's."""
        try:
            lags = await self.measure_lag()
        except Exception as error:  # a probe must never take the consumer down
            log.debug("lag probe failed", extra={"error": repr(error)})
            self.broker.record_error("lag probe", str(error) or type(error).__name__)
            return
        self.metrics.set_lag(lags)
        self._lags = {(topic, partition): lag for topic, partition, lag in lags}
        self.progress.stuck(self._lags)  # starts the clock of partitions first seen with lag

    async def measure_lag(self) -> list[tuple[str, int, int]]:
        """(topic, partition, high watermark - committed) for every assigned partition.

        The committed offsets are asked for together under one timeout, so a coordinator that
        does not answer costs one timeout per probe, not one per partition; whatever is still
        asking when one fails or the time is up is cancelled.
        """
        highs = {}
        for tp in sorted(self._consumer.assignment(), key=lambda t: (t.topic, t.partition)):
            high = self._consumer.highwater(tp)
            if high is not None:  # None: nothing fetched yet for this partition
                highs[tp] = high
        asks = [asyncio.create_task(self._consumer.committed(tp)) for tp in highs]
        try:
            committed = await asyncio.wait_for(asyncio.gather(*asks), _COMMITTED_TIMEOUT_S)
        finally:
            for ask in asks:
                ask.cancel()
        return [
            (tp.topic, tp.partition, max(0, high - (offset or 0)))
            for (tp, high), offset in zip(highs.items(), committed, strict=True)
        ]

    # ---- HTTP -----------------------------------------------------------------------------

    def _web_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        return app

    async def _metrics(self, request: web.Request) -> web.Response:
        body = self.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def _healthz(self, request: web.Request) -> web.Response:
        ok, body = self.health()
        return web.json_response(body, status=200 if ok else 503)

    async def _readyz(self, request: web.Request) -> web.Response:
        ok, body = self.readiness()
        return web.json_response(body, status=200 if ok else 503)


def _bound_port(runner: web.AppRunner) -> int | None:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return None
