"""The spend ledger and the budget: what this consumer group spent per hour and per day.

Each replica keeps its own spend per period under its own key in a compacted state topic (a
`GlobalTable`, like the response cache): `<period>/<index>/<template hash>/<replica>` ->
USD. A replica only ever writes its own keys, so no two replicas overwrite each other, and the
period's spend is the sum over every key of the period, read from the local store. A process
that was SIGKILLed left its keys behind: the one that replaces it counts them, and does not get
a fresh budget.

Admission is the TPM budget's scheme in dollars: a request is charged its estimated cost
before it is sent (prompt estimate + max_tokens at the output price) and reconciled with the
real cost when it ends (a failed request is given back: providers do not bill errors). A
request whose charge would pass a limit is refused with a SYSTEMIC `budget_exhausted` failure,
so the window is held back with offsets uncommitted exactly as in an outage (never error rows),
and it goes on when the period rolls over. In-flight requests are already charged, so a single
replica cannot pass its budget by more than the estimates' error. Other replicas' spend is seen
with a delay (a coalesced write, the topic, a read: `_UNSEEN_S`), so in that time a replica
takes at most its share of what is left (see `admit`); replicas not seen spending yet (at
the start) are not counted in the share. bench/budget.py measures what remains.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import orjson

from consumer.config import BudgetSettings
from consumer.llm.caller import CallResult
from consumer.llm.errors import FailureKind, LLMFailure
from consumer.llm.pricing import Pricing

log = logging.getLogger("consumer")

# Own spend is written at most this often (coalesced): what a SIGKILL can lose.
_WRITE_EVERY_S = 0.2
# Other replicas' spend is read from the store at most this often.
_READ_EVERY_S = 0.2
# How long until an admission of this replica is surely seen by the others: a write, the
# topic's round trip, a read.
_UNSEEN_S = 0.5
_LOG_EVERY_S = 60.0


class SpendTable(Protocol):
    """What the ledger needs of a GlobalTable."""

    def put(self, key: bytes, value: bytes) -> None: ...

    def scan(self, prefix: bytes) -> list[tuple[bytes, bytes]]: ...


@dataclass(frozen=True)
class Limit:
    """One cap: `usd` per period `kind` over the keys under `scope` (all templates or one)."""

    kind: str  # "hour" | "day"
    seconds: float
    usd: float
    template_hash: str | None  # None: every template


@dataclass(frozen=True)
class Reservation:
    """An admitted request's charge, on the keys of the periods it was admitted in."""

    usd: float
    keys: tuple[bytes, ...]


def limits_of(budget: BudgetSettings, template_hash: str) -> list[Limit]:
    """The caps that apply to this consumer's template."""
    limits = []
    for scope, caps in [(None, budget), (template_hash, budget.per_template.get(template_hash))]:
        if caps is None:
            continue
        if caps.usd_per_hour is not None:
            limits.append(Limit("hour", budget.hour_s, caps.usd_per_hour, scope))
        if caps.usd_per_day is not None:
            limits.append(Limit("day", budget.day_s, caps.usd_per_day, scope))
    return limits


class SpendLedger:
    """Charges, reconciles and refuses; reads every replica's spend from the table."""

    def __init__(
        self,
        table: SpendTable,
        budget: BudgetSettings,
        template_hash: str,
        *,
        replica: str | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        write_every_s: float = _WRITE_EVERY_S,
        read_every_s: float = _READ_EVERY_S,
    ) -> None:
        self._table = table
        self._template_hash = template_hash
        self._limits = limits_of(budget, template_hash)
        self._kinds = {(limit.kind, limit.seconds) for limit in self._limits}
        # A new id per process: a restarted process writes new keys, and counts the old ones.
        self.replica = replica or uuid.uuid4().hex[:12]
        self._clock = clock
        self._monotonic = monotonic
        self._write_every_s = write_every_s
        self._read_every_s = read_every_s
        self._own: dict[bytes, float] = {}
        self._dirty: set[bytes] = set()
        self._written_at = -math.inf
        self._write_scheduled = False
        self._others: dict[bytes, tuple[float, float]] = {}  # prefix -> (read at, others' USD)
        self._replicas: dict[bytes, tuple[float, int]] = {}  # prefix -> (read at, replicas)
        self._unseen: deque[tuple[float, float]] = deque()  # own admissions: (at, USD)
        self._logged_at = -math.inf
        self.refusals = 0

    @property
    def periods(self) -> list[str]:
        """The periods capped: 'hour', 'day' or both."""
        return sorted({limit.kind for limit in self._limits})

    # ------------------------------------------------------------------ admission

    def admit(self, usd: float) -> Reservation | LLMFailure | float:
        """Charge `usd` now; or the failure that holds the window until the period rolls over;
        or (a float) how many seconds to wait first.

        The wait is what keeps replicas from spending one budget twice over in a burst (at a
        period's start every replica's held windows go at once): what a replica admitted in
        the last `_UNSEEN_S` the others cannot have seen yet, so it may be at most its share
        (1 / replicas active in this period or the last) of the budget left; one request at a
        time always goes.
        """
        now = self._clock()
        unseen = self._unseen_usd()
        for limit in self._limits:
            spent = self.spent(limit, now)
            if spent + usd > limit.usd:
                return self._refuse(limit, spent, usd, now)
            replicas = self._replica_count(limit, now)
            if unseen and unseen + usd > (limit.usd - spent + unseen) / replicas:
                return max(0.0, self._unseen[0][0] + _UNSEEN_S - self._monotonic())
        self._unseen.append((self._monotonic(), usd))
        keys = tuple(self._key(kind, seconds, now) for kind, seconds in sorted(self._kinds))
        if any(key not in self._own for key in keys):
            self._forget_old_periods(now)
        for key in keys:
            self._add(key, usd)
        return Reservation(usd, keys)

    def settle(self, reservation: Reservation, usd: float) -> None:
        """The request ended and cost `usd`: replace its estimate with that."""
        for key in reservation.keys:
            if key in self._own:  # else its period ended long ago and no longer counts
                self._add(key, usd - reservation.usd)

    def spent(self, limit: Limit, now: float | None = None) -> float:
        """Every replica's spend (charges in flight included) in the current period of `limit`."""
        at = self._clock() if now is None else now
        prefix = self._prefix(limit, math.floor(at / limit.seconds))
        own = sum(usd for key, usd in self._own.items() if key.startswith(prefix))
        return own + self._others_under(prefix)

    def remaining(self, kind: str) -> float | None:
        """The smallest budget left among the `kind` caps (None: no such cap)."""
        left = [limit.usd - self.spent(limit) for limit in self._limits if limit.kind == kind]
        return max(0.0, min(left)) if left else None

    # ------------------------------------------------------------------ internals

    def _refuse(self, limit: Limit, spent: float, usd: float, now: float) -> LLMFailure:
        self.refusals += 1
        resumes_in = limit.seconds - (now % limit.seconds)
        scope = f" for template {limit.template_hash[:12]}" if limit.template_hash else ""
        message = (
            f"the budget per {limit.kind}{scope} is spent: {spent:.6f} of {limit.usd:g} USD, "
            f"and this request may cost {usd:.6f}; spending resumes in {resumes_in:.0f} s"
        )
        if self._monotonic() - self._logged_at >= _LOG_EVERY_S:
            self._logged_at = self._monotonic()
            log.warning(
                "budget exhausted: windows are held back, offsets stay uncommitted",
                extra={
                    "period": limit.kind,
                    "budget_usd": limit.usd,
                    "spent_usd": round(spent, 6),
                    "template_hash": limit.template_hash,
                    "resumes_in_s": round(resumes_in, 1),
                },
            )
        return LLMFailure(FailureKind.SYSTEMIC, "budget_exhausted", message, None, resumes_in)

    def _key(self, kind: str, seconds: float, now: float) -> bytes:
        index = math.floor(now / seconds)
        return f"{kind}/{index}/{self._template_hash}/{self.replica}".encode()

    def _unseen_usd(self) -> float:
        horizon = self._monotonic() - _UNSEEN_S
        while self._unseen and self._unseen[0][0] <= horizon:
            self._unseen.popleft()
        return sum(usd for _, usd in self._unseen)

    def _prefix(self, limit: Limit, index: int) -> bytes:
        scope = f"{limit.template_hash}/" if limit.template_hash else ""
        return f"{limit.kind}/{index}/{scope}".encode()

    def _replica_count(self, limit: Limit, now: float) -> int:
        """Replicas that spent in this period or the last (this one included)."""
        index = math.floor(now / limit.seconds)
        prefix = self._prefix(limit, index)
        cached = self._replicas.get(prefix)
        if cached is not None and self._monotonic() - cached[0] < self._read_every_s:
            return cached[1]
        seen = {self.replica.encode()}
        for period in (index - 1, index):
            seen.update(
                key.rsplit(b"/", 1)[-1] for key, _ in self._table.scan(self._prefix(limit, period))
            )
        self._replicas[prefix] = (self._monotonic(), len(seen))
        return len(seen)

    def _forget_old_periods(self, now: float) -> None:
        """Keep own keys of the current and the previous period only (written ones)."""
        current = {kind: math.floor(now / seconds) for kind, seconds in self._kinds}
        for key in list(self._own):
            kind, index = key.decode().split("/", 2)[:2]
            if key not in self._dirty and int(index) < current.get(kind, 0) - 1:
                del self._own[key]

    def _add(self, key: bytes, usd: float) -> None:
        self._own[key] = max(0.0, self._own.get(key, 0.0) + usd)
        self._dirty.add(key)
        self._write_soon()

    def _others_under(self, prefix: bytes) -> float:
        now = self._monotonic()
        cached = self._others.get(prefix)
        if cached is not None and now - cached[0] < self._read_every_s:
            return cached[1]
        total = 0.0
        for key, value in self._table.scan(prefix):
            if key in self._own:
                continue
            try:
                total += float(orjson.loads(value)["usd"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # an entry this version cannot read
        self._others[prefix] = (now, total)
        return total

    def _write_soon(self) -> None:
        wait = self._write_every_s - (self._monotonic() - self._written_at)
        if wait <= 0:
            self.write()
            return
        if not self._write_scheduled:
            self._write_scheduled = True
            asyncio.get_running_loop().call_later(wait, self.write)

    def write(self) -> None:
        """Put every changed own key in the table (the topic gets them without waiting)."""
        self._write_scheduled = False
        self._written_at = self._monotonic()
        at = self._clock()
        for key in sorted(self._dirty):
            self._table.put(key, orjson.dumps({"usd": self._own[key], "at": at}))
        self._dirty.clear()


class Call(Protocol):
    async def call(self, messages: list[dict[str, str]]) -> CallResult: ...


class BudgetedCaller:
    """The caller behind the budget: admit by the estimated cost, then settle the real one."""

    def __init__(
        self,
        caller: Call,
        ledger: SpendLedger,
        pricing: Pricing,
        model: str,
        estimate_tokens: Callable[[list[dict[str, str]]], int],
        max_tokens: int,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._sleep = sleep
        self._caller = caller
        self._ledger = ledger
        self._pricing = pricing
        self._model = model
        self._estimate_tokens = estimate_tokens
        self._max_tokens = max_tokens

    def estimate_usd(self, messages: list[dict[str, str]]) -> float:
        prompt = self._estimate_tokens(messages)
        usd = self._pricing.estimate(self._model, prompt, self._max_tokens)
        return usd if usd is not None else 0.0

    async def call(self, messages: list[dict[str, str]]) -> CallResult:
        usd = self.estimate_usd(messages)
        admitted = self._ledger.admit(usd)
        while isinstance(admitted, float):  # after the wait, what was unseen has been seen
            await self._sleep(admitted)
            admitted = self._ledger.admit(usd)
        if isinstance(admitted, LLMFailure):
            return CallResult(None, admitted, 0)
        try:
            result = await self._caller.call(messages)
        except BaseException:
            # Cancelled in flight: the provider may have answered and billed it.
            self._ledger.settle(admitted, admitted.usd)
            raise
        cost = 0.0
        if result.completion is not None:
            real = self._pricing.cost(result.completion).usd
            cost = admitted.usd if real is None else real
        self._ledger.settle(admitted, cost)
        return result
