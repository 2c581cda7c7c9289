"""`/metrics`, `/healthz` and `/readyz` from one small aiohttp server in the app's event loop.

- `/healthz` (liveness): the poll loop made progress within `stale_after_s`. The poll loop calls
  `beat()` on every turn, also while a window runs or is held back, so only a stuck loop (a
  blocked event loop, a hung client call) fails it. Restarting is the right answer to that.
- `/readyz` (readiness): partitions are assigned and no window is held back by a provider
  outage. It says "this member is doing useful work now"; it is a signal for dashboards, alerts
  and rollouts, not a reason to restart (there is no traffic to steer away from a consumer).
- `/metrics`: the Prometheus exposition of the app's own registry.

Two background tasks run beside the server: a 1 s heartbeat that measures event-loop lag, and
the consumer-lag probe (high watermark minus committed offset per assigned partition) every
`lag_interval_s`, so lag is never computed per message.
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
from consumer.observability.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger("consumer.observability")

_COMMITTED_TIMEOUT_S = 5.0


class ObservedApp(Protocol):
    """What the endpoints read from the app."""

    limiter: AIMDLimiter

    @property
    def held_back(self) -> bool: ...


class Observability:
    """Health state, the lag probe and the HTTP server; `start()`/`stop()` from `app.run()`."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        app: ObservedApp,
        consumer: Any,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings.observability
        self.metrics = metrics
        self._app = app
        self._consumer = consumer
        self._clock = clock
        self._last_beat = clock()
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        metrics.watch_limiter(app.limiter)
        metrics.watch_held_back(lambda: app.held_back)
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

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        assigned = len(self._consumer.assignment())
        held_back = bool(self._app.held_back)
        healthy, _ = self.health()
        problems = []
        if not assigned:
            problems.append("no partitions assigned")
        if held_back:
            problems.append("held back: the LLM provider is failing")
        if not healthy:
            problems.append("poll loop stuck")
        return not problems, {
            "status": "ready" if not problems else "not ready",
            "problems": problems,
            "assigned_partitions": assigned,
            "held_back": held_back,
        }

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._last_beat = self._clock()
        if self.settings.port == 0:
            log.info("metrics and health server disabled (observability.port: 0)")
            return
        self._tasks = [
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
            try:
                self.metrics.set_lag(await self.measure_lag())
            except Exception as error:  # a probe must never take the consumer down
                log.debug("lag probe failed", extra={"error": repr(error)})
            await asyncio.sleep(self.settings.lag_interval_s)

    async def measure_lag(self) -> list[tuple[str, int, int]]:
        """(topic, partition, high watermark - committed) for every assigned partition."""
        lags = []
        for tp in sorted(self._consumer.assignment(), key=lambda t: (t.topic, t.partition)):
            high = self._consumer.highwater(tp)
            if high is None:  # nothing fetched yet for this partition
                continue
            committed = await asyncio.wait_for(
                self._consumer.committed(tp), timeout=_COMMITTED_TIMEOUT_S
            )
            lags.append((tp.topic, tp.partition, max(0, high - (committed or 0))))
        return lags

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
