"""The fallback chain (`llm.fallbacks`): the next model answers when the one before cannot.

A row goes down the chain, primary first, and moves on from a model only for reasons another
model can fix: that model is over quota (billing or a quota policy: waiting will not help), it
rejects the row as too long for its context (another model may have a bigger one), or it has
been failing for everyone (an outage, a broken key, a wrong name) for `after_s`. Until then a
failing primary gives the window the failure it gives without fallbacks, so a short blip holds
the window back instead of switching models for a few seconds. A row error about the row
itself (a content filter, a 400) ends the row where it is, and so does a spent budget (ours,
the same for every model).

A model passed over stays passed over, so rows do not pay its failures again, until it answers:
one row every `probe_s` tries it first. The last model is always tried, so every row ends with
some model's verdict; when every model fails for reasons outside the row, that verdict is an
outage or a configuration error, and the window is held back as usual (never error rows).

Each model has its own caller, so its own limiter, retry budget and client; the answer says
which model gave it (`Completion.model`), and that is what `{rf}_model` and pricing read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from consumer.llm.caller import CallResult
from consumer.llm.errors import FailureKind, LLMFailure

log = logging.getLogger(__name__)

# Over quota: no wait fixes it, another model (another account) may answer.
QUOTA_REASONS = frozenset({"insufficient_quota", "quota_exceeded"})
# Too big for this model: one with a larger context window (or TPM limit) may take it.
TOO_LONG_REASONS = frozenset({"context_length_exceeded", "request_too_large"})
# Our own limits, not the model's: every model of the chain is under the same budget.
OWN_LIMIT_REASONS = frozenset({"budget_exhausted"})


class Calls(Protocol):
    """What the enricher calls for one row: the plain caller, or a wrapper around callers."""

    async def call(self, messages: list[dict[str, str]]) -> CallResult: ...


@dataclass(frozen=True)
class Route:
    """One model of the chain, by the name it is configured with."""

    name: str
    calls: Calls


@dataclass
class _ModelState:
    failing_since: float | None = None
    last_failure: float = float("-inf")
    passed_over: bool = False
    last_try: float = float("-inf")


class FallbackChain:
    """Calls the models of `routes` in order for each row, as the module docstring says."""

    def __init__(
        self,
        routes: Sequence[Route],
        after_s: float,
        probe_s: float,
        clock: Callable[[], float] = time.monotonic,
        forget_s: float = float("inf"),
    ) -> None:
        """`forget_s`: a failure this long after the model's previous one starts a new
        streak (a blip an hour after another is not an hour-long outage); longer than the
        longest gap between the rounds of a held window, which keep failing in an outage."""
        if not routes:
            raise ValueError("a fallback chain needs at least one model")
        self._routes = list(routes)
        self._after_s = after_s
        self._probe_s = probe_s
        self._forget_s = forget_s
        self._clock = clock
        self._states = [_ModelState() for _ in routes]

    def passed_over(self) -> list[str]:
        """Names of the models rows currently go past (for logs and tests)."""
        return [r.name for r, s in zip(self._routes, self._states, strict=True) if s.passed_over]

    async def call(self, messages: list[dict[str, str]]) -> CallResult:
        attempts = 0
        last: CallResult | None = None
        final = len(self._routes) - 1
        for index, route in enumerate(self._routes):
            state = self._states[index]
            if index < final and not self._worth_trying(state):
                continue
            result = await route.calls.call(messages)
            attempts += result.attempts
            if result.completion is not None:
                self._answered(index)
                return CallResult(result.completion, None, attempts)
            last = result
            assert result.failure is not None
            if not self._moves_on(index, result.failure):
                break
        assert last is not None  # the final model is always tried
        return CallResult(None, last.failure, attempts, last.retry_budget_exhausted)

    def _worth_trying(self, state: _ModelState) -> bool:
        """Not passed over, or passed over and due for its probe (which this row makes)."""
        if not state.passed_over:
            return True
        now = self._clock()
        if now - state.last_try < self._probe_s:
            return False
        state.last_try = now
        return True

    def _answered(self, index: int) -> None:
        state = self._states[index]
        if state.passed_over:
            log.warning(
                "model answers again: rows go to it first",
                extra={"model": self._routes[index].name},
            )
        state.failing_since = None
        state.passed_over = False

    def _moves_on(self, index: int, failure: LLMFailure) -> bool:
        """After `failure` of model `index`: does the row try the next model?"""
        if failure.reason in TOO_LONG_REASONS:
            return True
        state = self._states[index]
        now = self._clock()
        if failure.reason in QUOTA_REASONS:
            self._pass_over(index, failure, now)
            return True
        if failure.kind is FailureKind.ROW or failure.reason in OWN_LIMIT_REASONS:
            return False  # the row's own error (or an answer): another model is no cure
        if state.failing_since is None or now - state.last_failure > self._forget_s:
            state.failing_since = now
        state.last_failure = now
        if now - state.failing_since < self._after_s:
            return False
        self._pass_over(index, failure, now)
        return True

    def _pass_over(self, index: int, failure: LLMFailure, now: float) -> None:
        state = self._states[index]
        state.last_try = now
        if state.passed_over or index == len(self._routes) - 1:
            return
        state.passed_over = True
        log.warning(
            "model failing: rows go to the next model of the chain",
            extra={
                "model": self._routes[index].name,
                "next_model": self._routes[index + 1].name,
                "reason": failure.reason,
                "status_code": failure.status_code,
                "failing_for_s": round(now - (state.failing_since or now), 1),
            },
        )
