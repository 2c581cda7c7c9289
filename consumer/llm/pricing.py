"""What a request cost, in USD, and where the figure came from.

Two sources, in this order: the provider's own figure (OpenRouter reports `usage.cost` in
credits, which are USD, when asked for usage accounting), then the configured prices
(`llm.pricing.models`). A model without a price costs `None`, never a guess. Cached prompt
tokens are priced at their own rate; reasoning tokens are completion tokens and already
counted in `completion_tokens` by every provider we speak to (OpenAI, Azure, OpenRouter).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from consumer.config import LLMSettings, ModelPrice, PricingSettings
from consumer.llm.client import Completion, Usage

log = logging.getLogger(__name__)

CostSource = Literal["provider", "prices", "cache"]
_MILLION = 1_000_000.0


@dataclass(frozen=True)
class Cost:
    """A request's cost; `usd` None when the model has no price and the provider said nothing."""

    usd: float | None
    source: CostSource | None


UNKNOWN = Cost(None, None)
FREE_HIT = Cost(0.0, "cache")  # a cache hit paid nothing


class Pricing:
    """Prices per model name; the longest configured name a model starts with prices it."""

    def __init__(self, settings: PricingSettings, default_model: str) -> None:
        self._prices = settings.models
        self._default_model = default_model
        self.provider_cost = settings.provider_cost
        self.source = settings.source

    @classmethod
    def from_settings(cls, llm: LLMSettings) -> Pricing:
        pricing = cls(llm.pricing, llm.model_name)
        if pricing.price(llm.model_name) is None:
            log.warning(
                "no price for the model in use: rows' cost_usd is null",
                extra={"model": llm.model_name, "key": f"llm.pricing.models.{llm.model_name}"},
            )
        return pricing

    def price(self, model: str) -> ModelPrice | None:
        exact = self._prices.get(model)
        if exact is not None:
            return exact
        names = [name for name in self._prices if model.startswith(name)]
        return self._prices[max(names, key=len)] if names else None

    def _price_of_answer(self, completion: Completion) -> ModelPrice | None:
        """The answered model (often a dated snapshot), else the one asked for: a fallback's
        answer is priced by the fallback, never by the primary."""
        return self.price(completion.model) or self.price(
            completion.requested_model or self._default_model
        )

    def cost(self, completion: Completion) -> Cost:
        if self.provider_cost and completion.provider_cost_usd is not None:
            return Cost(completion.provider_cost_usd, "provider")
        price = self._price_of_answer(completion)
        if price is None:
            return UNKNOWN
        return Cost(usage_cost(price, completion.usage), "prices")

    def estimate(self, model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
        """An admission's charge: the prompt estimate as uncached input, the answer at output."""
        price = self.price(model)
        if price is None:
            return None
        return usage_cost(price, Usage(prompt_tokens, completion_tokens, 0))


def usage_cost(price: ModelPrice, usage: Usage) -> float:
    cached = min(usage.cached_tokens or 0, usage.prompt_tokens)
    cached_rate = (
        price.cached_input_per_million
        if price.cached_input_per_million is not None
        else price.input_per_million
    )
    return (
        (usage.prompt_tokens - cached) * price.input_per_million
        + cached * cached_rate
        + usage.completion_tokens * price.output_per_million
    ) / _MILLION + price.per_request
