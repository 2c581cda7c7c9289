"""AIMD limit on concurrent LLM requests, shared by every row of every window in the process.

Decisions, and why:
- The increase follows where the limit stands against the last congestion level (the
  "ceiling": the requests in flight when the congestion was answered, or the limit if lower):
  - below ceiling - 1 (recovering after a cut): half the way back per round trip, at least
    `increase_step`, since the level just below the ceiling held until the overload;
  - in [ceiling - 1, ceiling) (at the known-safe level): `probe_step` per round trip, so the
    sawtooth is flat and each 429 and Retry-After pause comes rarely; divided among the
    replicas sharing the provider, which meets the sum of their probes;
  - at or past the ceiling without congestion, or with no congestion seen yet: the capacity is
    unknown above, so the increase starts at `increase_step` per round trip and doubles every
    round trip while traffic keeps pressing (BIC's max probing; exponential like TCP's slow
    start, but starting gently at the old level): a jump of the provider's capacity is found
    in a few round trips instead of one step per round trip.
  Only while the limit is actually in use, so the idle tail of a window does not inflate it.
- Multiplicative decrease once per congestion event: a request that was admitted before the
  last decrease belongs to the overload that decrease already answered, so it cannot cut again.
  The cut starts from the requests in flight (the limit may have run ahead of them while
  climbing), but from no lower than one cut of the limit, so one event takes at most two cuts'
  worth (with one request in flight, a proxy refusing for its own reasons, three 429s used to
  take the limit from 16 to 1). Each further refusal of the same event lowers the congestion
  level by one (those requests did not fit either), so a limit far above the capacity (a
  start, a capacity drop, replicas all at `initial`) comes down in one round trip instead of
  one cut per round trip, each with its own round of 429s.
- Two kinds of overload (consumer/llm/ratelimit.py tells them apart). At capacity (503, 529, a
  plain 429) the limit is cut and only the request that got the hint waits it, with jitter
  (`hint_delay`): the requests in flight still succeed, and a limiter-wide gate for a 1 s hint
  idled everything about 20 times a minute. A spent rate quota gates every admission until
  its reset (`on_quota`), since nobody gets in before it; it does not cut the limit, which
  measures concurrency.
- Pacing by the provider's rate-limit headers (`QuotaPacer`): the announced requests and tokens
  per minute, at the level of the provider's remaining count, with no budget configured.
- Round-trip samples only from successful attempts, per attempt. Servers that queue instead of
  answering 429 (vLLM, llama.cpp, Ollama) are read from the shape of latency against
  concurrency, not from latency as such (`QueueProbe`): the throughput (level / round trip) is
  kept per level of requests in flight, and a level that adds less than 1 / latency_tolerance
  (half, by default) of the throughput an extra parallel request would (`L / (L - 1)`) only
  lengthens a queue, so the limit steps down below it, and climbs only where a level still
  pays. CPU batching slows each
  request as more are served, which read as congestion in the old "round trip above 2x the
  minimum" rule and put the limit below the slot count. `latency_signal` None (the default)
  runs it until the provider sends rate-limit headers (hosted APIs meter by quota and do not
  queue this way); True always; False never.
- Replicas sharing one provider (`peers_told`, by consumer/llm/peers.py) would otherwise
  keep the shares they happen to have: the first replica to reach its ceiling after the
  capacity grows climbs fast and takes what appeared, and each then returns to its own level
  after every cut, so the shares persist. A ceiling below 0.9 of the mean limit of the
  replicas pressing on theirs is raised to that mean: the replica climbs back to its share at
  once, and the one holding more meets the 429s when it probes past its level. Only with
  limits told after its last cut: the others cut for the same overload, and limits told
  before their cuts would all look too high. The other way round, a replica above 1.1 of the
  mean cuts when another replica cuts (to no lower than the mean): the provider refuses
  whoever sends into it when it is full, the replica climbing back to its share, and the one
  holding the capacity only replaces what it finishes, so it would otherwise give back only
  when its own probe met a 429. Alone, nothing changes.
- The quota gate is a limiter-wide "not before" time, with jitter, and a ramp after it: the
  permits come back over `retry_after_jitter` x the hint, so waiting requests do not come back
  as a herd.
- Optional RPM and TPM token buckets: a request is admitted when a permit, a request token and
  its estimated tokens are all available; the estimate is reconciled with the usage reported.
  A request that can never fit fails fast (`exceeds_token_budget`), it never waits forever.
The arithmetic is synchronous and takes a clock, so it is tested without sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from consumer.config import ConcurrencySettings
from consumer.llm.budgets import RetryBudget, TokenBucket
from consumer.llm.errors import FailureKind, LLMFailure
from consumer.llm.ratelimit import QuotaPacer, RateLimits

log = logging.getLogger(__name__)

_USED_FRACTION = 0.8
_RTT_EWMA_ALPHA = 0.2
# The RTT floor creeps up by this fraction per second, so a lasting change of the base latency
# (a different model, longer prompts) is learnt instead of reading as congestion forever.
_RTT_FLOOR_DRIFT_PER_S = 0.01
# A wake-up computed for a moment already past (float rounding at a ramp step) waits this long.
_MIN_WAKE_S = 0.001
# The RPM bucket holds 10 s worth of requests: Azure enforces RPM over 1 s / 10 s sub-windows.
_RPM_BURST_S = 10.0
# Queue detection: samples per level before a verdict; how long a level's latency stays known.
_QUEUE_MIN_SAMPLES = 4
_QUEUE_STALE_S = 15.0
# Sharing a provider: a ceiling below this fraction of the replicas' mean limit is not kept.
_BELOW_FAIR = 0.9
# ... and a replica whose limit is above this fraction of it follows the others' cuts.
_ABOVE_FAIR = 1.1


@dataclass(frozen=True)
class Ticket:
    """Proof of admission; remembers when, so congestion can be matched to its event."""

    admitted_at: float
    in_flight_at_admission: int
    tokens: int = 0
    # The permits when it was admitted: whether the limit was in use is judged against the
    # limit of that moment, since a climbing limit doubles its increase every round trip.
    permits_at_admission: int = 0
    # Admissions (and their tokens) before this one, so a reply's remaining count can be
    # corrected by what was sent after it.
    seq: int = 0
    tokens_before: float = 0.0


@dataclass(frozen=True)
class LimiterState:
    limit: float
    in_flight: int
    waiting: int
    not_before_in_s: float
    decreases: int
    ceiling: float | None = None
    rtt_s: float | None = None
    min_rtt_s: float | None = None
    rpm_tokens: float | None = None
    tpm_tokens: float | None = None
    retry_budget_tokens: float | None = None
    # What the provider's rate-limit headers announced (per minute), and the pacer's levels.
    learnt_rpm: float | None = None
    learnt_tpm: float | None = None
    quota_gates: int = 0
    # Other replicas pressing on the same provider, as last told (peers_told).
    peers: int = 0


class QueueProbe:
    """Throughput per level of requests in flight, to find the level past which more
    concurrency only queues at the server.

    Samples are the round trips of requests admitted with the limit full (in flight == the
    permits), kept as an EWMA per level and forgotten after `_QUEUE_STALE_S`, so a level found
    useless is probed again later. The probe takes over from the AIMD increase ("engaged")
    only while latency grows with the level the way a queue makes it grow: against the lowest
    level known, faster than (level ratio) ^ (1 / tolerance). A server that answers 429 at a
    fixed latency never engages it. One verdict per round trip's worth of samples at a level.
    """

    def __init__(self, tolerance: float) -> None:
        self._share = 1.0 / tolerance
        self._levels: dict[int, tuple[float, int, float]] = {}  # level -> (ewma, n, at)
        self._count = 0
        # engaged: latency grows like a queue's, the probe steps the limit; holds: the level
        # above is known not to pay, so the limit does not climb into it.
        self.engaged = False
        self.holds = False
        # The lowest level found not to pay (the slot count + 1, for a queueing server).
        self.knee: int | None = None

    def _rtt(self, level: int, now: float) -> float | None:
        found = self._levels.get(level)
        if found is None or found[1] < _QUEUE_MIN_SAMPLES or now - found[2] > _QUEUE_STALE_S:
            return None
        return found[0]

    def _pays(self, level: int, now: float) -> bool | None:
        """Whether `level` gives at least `1 / tolerance` of the extra throughput of one more
        parallel request over `level - 1` (None: not known)."""
        upper, lower = self._rtt(level, now), self._rtt(level - 1, now)
        if upper is None or lower is None or level < 2 or upper <= 0 or lower <= 0:
            return None
        gain = (level / upper) / ((level - 1) / lower)
        return gain >= 1.0 + self._share / (level - 1)

    def record(self, ticket: Ticket, rtt: float, now: float, permits: int) -> int:
        """Add a sample; the verdict, once per round trip's worth of samples at the limit:
        < 0 step down that many levels, 1 step up, 0 stay (or no verdict yet)."""
        level = ticket.in_flight_at_admission
        if level != ticket.permits_at_admission or rtt <= 0:
            return 0  # admitted below the limit: says nothing about it
        ewma, n, _ = self._levels.get(level, (rtt, 0, now))
        ewma = ewma + _RTT_EWMA_ALPHA * (rtt - ewma) if n else rtt
        self._levels[level] = (ewma, n + 1, now)
        below = [lvl for lvl in self._levels if lvl < level and self._rtt(lvl, now) is not None]
        base_level = min(below) if below else None
        base = self._rtt(base_level, now) if base_level is not None else None
        if n + 1 >= _QUEUE_MIN_SAMPLES:
            self.engaged = (
                base_level is not None
                and base is not None
                and ewma / base >= (level / base_level) ** self._share
            )
        if level != permits:
            return 0  # the limit moved since: no verdict on the new one yet
        self._count += 1
        if self._count < max(_QUEUE_MIN_SAMPLES, level):
            return 0
        self._count = 0
        here, above = self._pays(level, now), self._pays(level + 1, now)
        if here is False and self.engaged:  # (noise alone can make a level look unpaid)
            self.knee = level if self.knee is None else min(self.knee, level)
        elif here is True and self.knee is not None and level >= self.knee:
            self.knee = None  # the server serves more at once now: find its new knee
        self.holds = self.driving and above is False and here is True
        if not self.driving:
            return 0
        near_knee = self.knee is not None and level >= self.knee - 1
        if here is False or (here is None and level > 1 and (self.engaged or near_knee)):
            # This level only queues, or the one below is unknown and this one may: step down,
            # by half the queue Vegas would estimate, L (1 - base rtt / rtt), while it is long.
            queue = level * (1.0 - (base or ewma) / ewma)
            return -max(1, round(queue / 2))
        return 0 if self.holds else 1  # stay below a level that does not pay, else try one up

    @property
    def driving(self) -> bool:
        """The probe moves the limit (not the AIMD increase): a queue shows now, or a level
        past which requests only queued is known."""
        return self.engaged or self.knee is not None


class AIMDLimiter:
    """Admission control: `ticket = await limiter.acquire()`, then report how the attempt went."""

    def __init__(
        self,
        initial: int,
        minimum: int,
        maximum: int,
        decrease_factor: float = 0.8,
        increase_step: float = 1.0,
        retry_after_jitter: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        *,
        probe_step: float | None = 0.2,
        fast_climb: bool = True,
        latency_signal: bool | None = None,
        latency_tolerance: float = 2.0,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
    ) -> None:
        if not 1 <= minimum <= initial <= maximum:
            raise ValueError("need 1 <= minimum <= initial <= maximum")
        self._limit = float(initial)
        self._min = minimum
        self._max = maximum
        self._factor = decrease_factor
        self._step = increase_step
        self._probe_step = probe_step
        self._fast_climb = fast_climb
        # Multiplies increase_step while climbing; doubles per round trip of pressing traffic.
        self._climb_gain = 1.0
        self._jitter = retry_after_jitter
        self._clock = clock
        self._rng = rng
        self._latency_signal = latency_signal
        self._queue_probe = QueueProbe(latency_tolerance) if latency_signal is not False else None
        self._in_flight = 0
        self._last_decrease_at = -math.inf
        self._ceiling: float | None = None
        self._not_before = -math.inf
        self._ramp_s = 0.0
        self._decreases = 0
        self._rtt_ewma: float | None = None
        self._rtt_floor: float | None = None
        self._rtt_floor_at = 0.0
        self._pacer = QuotaPacer()
        self._admitted = 0
        self._admitted_tokens = 0.0
        self._quota_gates = 0
        now = clock()
        self._rpm = (
            TokenBucket(requests_per_minute / 60.0, max(1.0, requests_per_minute / 6.0), now)
            if requests_per_minute
            else None
        )
        self._tpm = (
            TokenBucket(tokens_per_minute / 60.0, float(tokens_per_minute), now)
            if tokens_per_minute
            else None
        )
        # Two FIFO queues: retries are served before first attempts, so a row that met a 429
        # goes again before rows of later windows that queued meanwhile, instead of behind them.
        self._waiters: deque[tuple[asyncio.Future[Ticket], int]] = deque()
        self._retries: deque[tuple[asyncio.Future[Ticket], int]] = deque()
        self._wake_handle: asyncio.Handle | None = None
        # The process-wide retry budget; the caller attaches it so one state() shows it all.
        self.retry_budget: RetryBudget | None = None
        # The limits of the other replicas pressing on the same provider, and when they were
        # told (`peers_told`).
        self._peer_limits: list[float] = []
        self._peers_told_at = -math.inf
        self._peers_answered_at = -math.inf
        self._pressed_at = -math.inf
        self._answered_at = -math.inf

    @classmethod
    def from_settings(
        cls,
        settings: ConcurrencySettings,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> AIMDLimiter:
        """The process-wide limiter as configured in `llm.concurrency`."""
        return cls(
            initial=settings.initial,
            minimum=settings.min,
            maximum=settings.max,
            decrease_factor=settings.decrease_factor,
            increase_step=settings.increase_step,
            retry_after_jitter=settings.retry_after_jitter,
            clock=clock,
            rng=rng,
            probe_step=settings.probe_step,
            fast_climb=settings.fast_climb,
            latency_signal=settings.latency_signal,
            latency_tolerance=settings.latency_tolerance,
            requests_per_minute=settings.requests_per_minute,
            tokens_per_minute=settings.tokens_per_minute,
        )

    @property
    def limit(self) -> float:
        return self._limit

    @property
    def cuts(self) -> int:
        """Congestion events the provider made this limiter cut for (not the cuts it followed
        from other replicas: counting those, two replicas would echo each other's)."""
        return self._decreases

    @property
    def permits(self) -> int:
        return max(self._min, int(self._limit))

    def state(self) -> LimiterState:
        now = self._clock()
        return LimiterState(
            limit=self._limit,
            in_flight=self._in_flight,
            waiting=len(self._waiters) + len(self._retries),
            not_before_in_s=max(0.0, self._not_before - now),
            decreases=self._decreases,
            ceiling=self._ceiling,
            rtt_s=self._rtt_ewma,
            min_rtt_s=self._rtt_floor,
            rpm_tokens=self._rpm.level(now) if self._rpm else None,
            tpm_tokens=self._tpm.level(now) if self._tpm else None,
            retry_budget_tokens=self.retry_budget.tokens(now) if self.retry_budget else None,
            learnt_rpm=self._pacer.rates()[0],
            learnt_tpm=self._pacer.rates()[1],
            quota_gates=self._quota_gates,
            peers=len(self._peer_limits),
        )

    # ---- admission ------------------------------------------------------------------------

    def fit_slots(self, slots: int, *, keep_latency_signal: bool = False) -> None:
        """A server that serves `slots` requests at once and queues the rest (it said so):
        cap the limit at one above them, so a slot never idles while the client turns a
        request around and at most one request waits; the latency probe has nothing left to
        find, unless asked to keep it."""
        self._max = max(self._min, min(self._max, slots + 1))
        self._limit = min(self._limit, float(self._max))
        if not keep_latency_signal:
            self._queue_probe = None

    def peers_told(self, limits: list[float], answering: bool = False, cut: bool = False) -> None:
        """The limits of the other replicas pressing on the same provider, whether any of
        them is being answered, and whether any cut since last told (consumer/llm/peers.py).

        A replica holding more than its share cuts with them: the provider refuses whoever
        sends into it when it is full, and that is the replica climbing back to its share,
        rarely the one that holds the capacity and only replaces the requests it finishes.
        Without the shared cut the one holding more gave back only when its own probe met a
        429. The cut goes no lower than the share, and does not count as the provider's."""
        now = self._clock()
        self._peer_limits = limits
        self._peers_told_at = now
        if answering:
            self._peers_answered_at = now
        fair = self._fair_share() if cut else None
        if (
            fair is not None
            and self._limit > _ABOVE_FAIR * fair
            and now - self._last_decrease_at > (self._rtt_ewma or 0.0)
        ):
            before = self._limit
            self._ceiling = before
            self._limit = max(fair, before * self._factor)
            self._climb_gain = 1.0
            self._last_decrease_at = now
            log.debug("limiter follows a replica's cut %.1f -> %.1f", before, self._limit)

    def peers_answered_within(self, seconds: float) -> bool:
        """Whether another replica told, in the last `seconds`, that the provider answers it."""
        return self._clock() - self._peers_answered_at <= seconds

    def answered_within(self, seconds: float) -> bool:
        """Whether this replica had an answer in the last `seconds` (what it tells: never the
        peers' answers, or two replicas in an outage would keep telling each other so)."""
        return self._clock() - self._answered_at < seconds

    def pressed_within(self, seconds: float) -> bool:
        """Whether traffic filled the limit in the last `seconds`: only then does this
        replica's limit say what it would take of a shared provider."""
        return self._clock() - self._pressed_at <= seconds

    def _fair_share(self) -> float | None:
        """The mean limit of the replicas pressing on the provider, this one included; None
        alone."""
        peers = self._peer_limits
        if not peers or self._peers_told_at <= self._last_decrease_at:
            # Told before this replica's last cut: the others cut for that overload too, and
            # limits told before their cuts would all look like more than its share.
            return None
        return (self._limit + sum(peers)) / (1 + len(peers))

    def idle(self) -> bool:
        """Free permits and no request waiting for one (a closed quota gate is not idle)."""
        now = self._clock()
        return (
            not self._waiters
            and not self._retries
            and self._blocked_until(now, 0) <= now
            and self._in_flight < self._permits_now(now)
        )

    def check_fits(self, tokens: int) -> None:
        """Fail fast, as a row error, when one request is bigger than the whole token budget."""
        if self._tpm is not None and tokens > self._tpm.capacity:
            raise LLMFailure(
                FailureKind.ROW,
                "exceeds_token_budget",
                f"the request needs about {tokens} tokens (prompt estimate + max_tokens), more "
                f"than the whole budget of {int(self._tpm.capacity)} tokens per minute",
            )

    def try_acquire(self, tokens: int = 0) -> Ticket | None:
        """Admit one request now if the limit, the Retry-After gate and the budgets allow it."""
        self.check_fits(tokens)
        now = self._clock()
        if self._blocked_until(now, tokens) > now or self._in_flight >= self._permits_now(now):
            return None
        if self._rpm is not None:
            self._rpm.take(1.0, now)
        if self._tpm is not None and tokens:
            self._tpm.take(float(tokens), now)
        self._pacer.take(tokens, now)
        self._in_flight += 1
        if self._in_flight >= self.permits:
            self._pressed_at = now
        ticket = Ticket(
            now, self._in_flight, tokens, self.permits, self._admitted, self._admitted_tokens
        )
        self._admitted += 1
        self._admitted_tokens += tokens
        return ticket

    async def acquire(self, tokens: int = 0, *, retry: bool = False) -> Ticket:
        """Wait for admission, in FIFO order, retries first. Raises LLMFailure if `tokens` can
        never fit."""
        self.check_fits(tokens)
        if not self._waiters and not self._retries:
            ticket = self.try_acquire(tokens)
            if ticket is not None:
                return ticket
        future: asyncio.Future[Ticket] = asyncio.get_running_loop().create_future()
        (self._retries if retry else self._waiters).append((future, tokens))
        self._schedule_wakeup()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._in_flight -= 1
                self._wake()
            else:
                self._remove_waiter(future)
            raise

    # ---- feedback -------------------------------------------------------------------------

    def on_success(
        self, ticket: Ticket, used_tokens: int | None = None, rate_limits: RateLimits | None = None
    ) -> None:
        """A completed attempt: a round-trip sample; grow the limit if it held traffic back."""
        now = self._clock()
        self._in_flight -= 1
        self._answered_at = now
        self._reconcile(ticket, used_tokens, now)
        self.observe(ticket, rate_limits, now)
        rtt = now - ticket.admitted_at
        self._record_rtt(rtt, now)
        probe = self._queue_probe
        if probe is not None and rate_limits is not None and self._latency_signal is None:
            probe = self._queue_probe = None  # a hosted API announcing its quota: no queue
        if probe is None:
            self._increase(ticket)
        else:
            step = probe.record(ticket, rtt, now, self.permits)
            if probe.driving and step:
                # a queue showed: the probe walks the limit, a level or half a queue at a time
                before = self.permits
                self._limit = float(max(self._min, min(self._max, before + step)))
                self._decreases += step < 0
                self._ceiling = None
                log.debug("limiter: queue probe %d -> %d", before, self.permits)
            elif not probe.holds and not probe.driving:
                self._increase(ticket)
        self._wake()

    def on_congestion(self, ticket: Ticket, rate_limits: RateLimits | None = None) -> None:
        """At capacity (a 429, 503, 529, a timeout): cut once per event. The wait hint is the
        request's own (`hint_delay`): the others go on."""
        now = self._clock()
        self._in_flight -= 1
        self.observe(ticket, rate_limits, now)
        self._decrease(ticket, now, "congestion")
        self._wake()

    def on_quota(
        self, ticket: Ticket, wait_s: float | None, rate_limits: RateLimits | None = None
    ) -> None:
        """A spent rate quota: no cut (it is not concurrency), every admission waits for the
        reset (the hint, else the reset of the spent limit)."""
        now = self._clock()
        self._in_flight -= 1
        self.observe(ticket, rate_limits, now)
        if wait_s is None and rate_limits is not None:
            wait_s = rate_limits.reset_of_exhausted()
        if wait_s is not None and wait_s > 0:
            if now + wait_s > self._not_before:  # a new gate, not one already answered
                self._quota_gates += 1
                self._pacer.back_off(rate_limits, now)
            self.defer(wait_s)
        self._wake()

    def on_ignore(
        self,
        ticket: Ticket | None = None,
        used_tokens: int | None = None,
        rate_limits: RateLimits | None = None,
    ) -> None:
        """An attempt that says nothing about capacity (a 400, a transient 500, a pool wait)."""
        self._in_flight -= 1
        if ticket is not None:
            now = self._clock()
            if used_tokens is not None:
                self._reconcile(ticket, used_tokens, now)
            self.observe(ticket, rate_limits, now)
        self._wake()

    def observe(self, ticket: Ticket, rate_limits: RateLimits | None, now: float) -> None:
        """Learn the provider's quota and where it stands from a reply's rate-limit headers."""
        if rate_limits is None:
            return
        self._pacer.observe(
            rate_limits,
            now,
            self._admitted - ticket.seq - 1,
            self._admitted_tokens - ticket.tokens_before - ticket.tokens,
        )

    def hint_delay(self, seconds: float) -> float:
        """The wait of the one request that got a capacity hint: the hint plus jitter, so the
        requests refused together do not come back together."""
        return seconds * (1.0 + self._jitter * self._rng())

    def defer(self, seconds: float) -> None:
        """Hold every admission until `seconds` from now (plus jitter), then ramp back in."""
        now = self._clock()
        until = now + seconds * (1.0 + self._jitter * self._rng())
        if until > self._not_before:
            self._not_before = until
            self._ramp_s = self._jitter * seconds
            log.debug("limiter gate closed for %.2fs, then a %.2fs ramp", until - now, self._ramp_s)
        self._schedule_wakeup()

    # ---- arithmetic -----------------------------------------------------------------------

    def _increase(self, ticket: Ticket) -> None:
        used = (
            bool(self._waiters)
            or bool(self._retries)
            or (ticket.in_flight_at_admission >= ticket.permits_at_admission * _USED_FRACTION)
        )
        if not used:
            self._climb_gain = 1.0  # a climb continues only while traffic presses on the limit
            return
        if self._limit >= self._max:
            return
        self._limit = min(float(self._max), self._limit + self._step_per_round_trip() / self._limit)

    def _step_per_round_trip(self) -> float:
        """The increase per round trip for where the limit stands; reaching the ceiling clears
        it, and each call while climbing advances the climb's doubling."""
        ceiling = self._ceiling
        if ceiling is not None and self._limit >= ceiling:
            self._ceiling = ceiling = None  # at the old congestion level without any: it moved
            log.debug("limiter reached its ceiling without congestion: climbing")
        elif (
            ceiling is not None
            and (fair := self._fair_share()) is not None
            and ceiling < _BELOW_FAIR * fair
        ):
            self._ceiling = ceiling = fair  # a level below its share is no ceiling of its own
        if ceiling is None:
            if not self._fast_climb:
                return self._step
            step = min(self._step * self._climb_gain, self._limit)
            self._climb_gain *= 2.0 ** (1.0 / self._limit)
            return step
        if self._probe_step is None:
            return self._step
        safe = ceiling - 1.0
        if self._limit >= safe:
            # The provider sees the sum of the replicas' probes: each probes its share of one
            # replica's rate, or N replicas would meet 429s N times as often, and cut together.
            return self._probe_step / (1 + len(self._peer_limits))
        return max(self._step, (safe - self._limit) / 2.0)

    def _decrease(self, ticket: Ticket, now: float, why: str) -> None:
        if ticket.admitted_at <= self._last_decrease_at:
            # Part of the event the last cut already answered: no second cut, but one more
            # request refused at once says the capacity was one lower than the level the cut
            # started from. A start or a capacity drop far above the capacity (every replica
            # at `initial`) is then answered in one round trip instead of one cut per round
            # trip, each adding its round of 429s.
            if self._ceiling is not None:
                self._ceiling = max(1.0, self._ceiling - 1.0)
                self._limit = max(float(self._min), min(self._limit, self._ceiling * self._factor))
            return
        before = self._limit
        # Where the overload showed: the requests in flight when it was answered, this one
        # included (the limit may have run ahead of that while climbing, and refused rows
        # waiting out their hints hold no permit). The cut starts there, but from no lower than
        # one cut of the limit: one event takes at most two cuts' worth, so a proxy refusing a
        # lone request for its own reasons cannot take the limit to the floor at once.
        level = min(before, float(self._in_flight + 1))
        self._ceiling = level
        self._limit = max(float(self._min), max(level, before * self._factor) * self._factor)
        self._climb_gain = 1.0
        self._last_decrease_at = now
        self._decreases += 1
        log.debug("limiter decrease %.1f -> %.1f (%s)", before, self._limit, why)
        if self.permits <= self._min:
            # At the floor a cut cannot say "fewer at once", so it says "later": the next
            # request waits a round trip. Without it, each row queued for the one permit was
            # sent into the full server the moment the last was refused (about a hundred 429s
            # in a tenth of a second when two replicas met after a rebalance).
            self.defer(max(self._rtt_ewma or 0.0, now - ticket.admitted_at))

    def _record_rtt(self, rtt: float, now: float) -> None:
        ewma = (
            rtt
            if self._rtt_ewma is None
            else self._rtt_ewma + _RTT_EWMA_ALPHA * (rtt - self._rtt_ewma)
        )
        self._rtt_ewma = ewma
        floor = self._rtt_floor
        if floor is not None:
            floor *= 1.0 + _RTT_FLOOR_DRIFT_PER_S * max(0.0, now - self._rtt_floor_at)
        self._rtt_floor = ewma if floor is None else min(floor, ewma)
        self._rtt_floor_at = now

    def _reconcile(self, ticket: Ticket, used_tokens: int | None, now: float) -> None:
        if used_tokens is not None and ticket.tokens:
            if self._tpm is not None:
                self._tpm.adjust(float(ticket.tokens - used_tokens), now)
            self._pacer.reconcile(float(ticket.tokens - used_tokens), now)

    def _permits_now(self, now: float) -> int:
        """The permits, ramped up linearly over the re-entry spread after a Retry-After gate."""
        permits = self.permits
        if self._ramp_s > 0 and now < self._not_before + self._ramp_s:
            fraction = (now - self._not_before) / self._ramp_s
            return max(1, min(permits, math.ceil(permits * fraction)))
        return permits

    def _blocked_until(self, now: float, tokens: int) -> float:
        """The earliest time the gate and the budgets would let a request of `tokens` in."""
        until = max(now, self._not_before)
        if self._rpm is not None:
            until = max(until, now + self._rpm.seconds_until(1.0, now))
        if self._tpm is not None and tokens:
            until = max(until, now + self._tpm.seconds_until(float(tokens), now))
        if self._pacer.learnt:
            until = max(until, now + self._pacer.seconds_until(tokens, now))
        return until

    # ---- waking ---------------------------------------------------------------------------

    def _remove_waiter(self, future: asyncio.Future[Ticket]) -> None:
        for queue in (self._retries, self._waiters):
            for entry in queue:
                if entry[0] is future:
                    queue.remove(entry)
                    return

    def _head(self) -> deque[tuple[asyncio.Future[Ticket], int]] | None:
        """The queue to serve next, its head not yet done (cancelled heads are dropped)."""
        for queue in (self._retries, self._waiters):
            while queue and queue[0][0].done():
                queue.popleft()
            if queue:
                return queue
        return None

    def _wake(self) -> None:
        while (queue := self._head()) is not None:
            future, tokens = queue[0]
            ticket = self.try_acquire(tokens)
            if ticket is None:
                break
            queue.popleft()
            future.set_result(ticket)
        self._schedule_wakeup()

    def _schedule_wakeup(self) -> None:
        """Make sure the queue's head gets woken: now if it could be admitted now, when time
        alone would admit it (gate, ramp, bucket refill), or by a request in flight completing.

        Called after every change; it replaces the pending wake-up, so it must never leave an
        admissible head without one: with nothing in flight, nothing else would wake it.
        """
        if self._wake_handle is not None:
            self._wake_handle.cancel()
            self._wake_handle = None
        queue = self._head()
        if queue is None:
            return
        permits = self.permits
        if self._in_flight >= permits:
            return  # full: the completion of one of the requests in flight wakes the queue
        loop = asyncio.get_running_loop()
        now = self._clock()
        at = self._blocked_until(now, queue[0][1])
        if at <= now:
            if self._in_flight < self._permits_now(now):
                self._wake_handle = loop.call_soon(self._wake)
                return
            # inside the re-entry ramp: the next permit opens at this point of it
            at = self._not_before + self._ramp_s * (self._in_flight + 1) / permits
        self._wake_handle = loop.call_later(max(at - now, _MIN_WAKE_S), self._wake)
