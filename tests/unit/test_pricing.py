"""Prices, the provider's own cost, token details, and the settings errors that name the key."""

from __future__ import annotations

from typing import Any

import pytest

from consumer.config import ConfigError, LLMSettings, parse_settings
from consumer.enrich.outcome import OutputFields, RowOutcome
from consumer.enrich.template import PromptTemplate
from consumer.llm.client import ChatClient, Completion, Usage, parse_completion
from consumer.llm.errors import FailureKind
from consumer.llm.pricing import FREE_HIT, Cost, Pricing
from consumer.observability.metrics import Metrics, parse_exposition
from consumer.window import CloseReason, Window

MESSAGES = [{"role": "user", "content": "hi"}]
PRICES = {
    "gpt-4o-mini": {
        "input_per_million": 0.15,
        "output_per_million": 0.60,
        "cached_input_per_million": 0.075,
    }
}


def llm(**overrides: Any) -> LLMSettings:
    values: dict[str, Any] = {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "template": "{{ row.t }}",
    }
    values.update(overrides)
    return LLMSettings(**values)


def completion(
    usage: Usage, model: str = "gpt-4o-mini-2024-07-18", cost: float | None = None
) -> Completion:
    return Completion("ok", model, usage, "stop", cost)


def test_cost_from_prices_prices_cached_tokens_at_their_own_rate() -> None:
    pricing = Pricing.from_settings(llm(pricing={"models": PRICES}))
    cost = pricing.cost(completion(Usage(1000, 100, 1100, None, 400)))
    # 600 uncached at 0.15, 400 cached at 0.075, 100 out at 0.60 (per million)
    assert cost == Cost(pytest.approx((600 * 0.15 + 400 * 0.075 + 100 * 0.60) / 1e6), "prices")


def test_a_dated_snapshot_is_priced_by_the_name_it_starts_with() -> None:
    pricing = Pricing.from_settings(llm(pricing={"models": PRICES}))
    assert pricing.price("gpt-4o-mini-2024-07-18") is pricing.price("gpt-4o-mini")


def test_per_request_price_is_added() -> None:
    prices = {"gpt-4o-mini": {"input_per_million": 0, "output_per_million": 0, "per_request": 0.01}}
    pricing = Pricing.from_settings(llm(pricing={"models": prices}))
    assert pricing.cost(completion(Usage(10, 1, 11))).usd == pytest.approx(0.01)


def test_an_unpriced_model_costs_null_not_a_guess(caplog: pytest.LogCaptureFixture) -> None:
    pricing = Pricing.from_settings(llm())
    assert pricing.cost(completion(Usage(10, 1, 11))) == Cost(None, None)
    assert "no price for the model in use" in caplog.text


def test_the_providers_figure_wins_and_is_marked() -> None:
    settings = llm(provider="openrouter", model="openai/gpt-4o-mini")
    pricing = Pricing.from_settings(settings)
    body = {
        "model": "openai/gpt-4o-mini",
        "choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": 194,
            "completion_tokens": 2,
            "total_tokens": 196,
            "cost": 0.95,
            "prompt_tokens_details": {"cached_tokens": 100},
            "completion_tokens_details": {"reasoning_tokens": 1},
        },
    }
    answer = parse_completion(body, settings)
    assert answer.usage.cached_tokens == 100
    assert answer.usage.reasoning_tokens == 1
    assert pricing.cost(answer) == Cost(0.95, "provider")


def test_provider_cost_off_uses_the_prices() -> None:
    prices = {"openai/gpt-4o-mini": PRICES["gpt-4o-mini"]}
    settings = llm(
        provider="openrouter",
        model="openai/gpt-4o-mini",
        pricing={"models": prices, "provider_cost": False},
    )
    pricing = Pricing.from_settings(settings)
    cost = pricing.cost(completion(Usage(100, 0, 100), "openai/gpt-4o-mini", cost=0.5))
    assert cost.source == "prices"
    assert ChatClient(settings).request_body(MESSAGES).get("usage") is None


def test_openrouter_requests_ask_for_usage_accounting() -> None:
    body = ChatClient(llm(provider="openrouter", model="openai/gpt-4o-mini")).request_body(MESSAGES)
    assert body["usage"] == {"include": True}


def test_prompt_cache_key_goes_to_openai_only() -> None:
    openai = ChatClient(llm())
    openai.prompt_cache_key = "abc"
    assert openai.request_body(MESSAGES)["prompt_cache_key"] == "abc"
    vllm = ChatClient(llm(base_url="http://127.0.0.1:8000/v1"))
    vllm.prompt_cache_key = "abc"
    assert "prompt_cache_key" not in vllm.request_body(MESSAGES)


def _problem(llm_section: dict[str, Any]) -> str:
    data = {
        "kafka": {
            "bootstrap_servers": "127.0.0.1:9092",
            "input_topic": "in",
            "output_topic": "out",
            "group_id": "g",
        },
        "llm": {"provider": "openai", "model": "gpt-4o-mini", "template": "x", **llm_section},
    }
    with pytest.raises(ConfigError) as caught:
        parse_settings(data)
    return str(caught.value)


def test_a_negative_price_names_its_key() -> None:
    prices = {"gpt-4o-mini": {"input_per_million": -1, "output_per_million": 0.6}}
    message = _problem({"pricing": {"models": prices}})
    assert "llm.pricing.models.gpt-4o-mini.input_per_million" in message


def test_an_unknown_model_in_the_price_table_names_its_key() -> None:
    prices = {"gpt-4o-mni": {"input_per_million": 1, "output_per_million": 1}}
    message = _problem({"pricing": {"models": prices}})
    assert "llm.pricing.models.gpt-4o-mni: unknown model" in message


def test_a_budget_without_prices_names_the_keys() -> None:
    message = _problem({"budget": {"usd_per_hour": 1.0}})
    assert "llm.budget needs llm.pricing.models.gpt-4o-mini" in message


def test_a_negative_budget_names_its_key() -> None:
    message = _problem({"pricing": {"models": PRICES}, "budget": {"usd_per_day": -5}})
    assert "llm.budget.usd_per_day" in message


def test_output_rows_carry_cost_and_source_and_a_hit_costs_nothing() -> None:
    settings = llm(pricing={"models": PRICES})
    template = PromptTemplate(settings)
    fields = OutputFields("rf", settings.model_name, template)
    answer = completion(Usage(1000, 100, 1100))
    paid = Pricing.from_settings(settings).cost(answer)
    out = fields.for_outcome(RowOutcome(answer, None, None, "h", "k", "miss", paid))
    assert out["rf_cost_usd"] == pytest.approx((1000 * 0.15 + 100 * 0.60) / 1e6)
    assert out["rf_cost_source"] == "prices"
    hit = fields.for_outcome(RowOutcome(answer, None, None, "h", "k", "hit", FREE_HIT))
    assert (hit["rf_cost_usd"], hit["rf_cost_source"]) == (0.0, "cache")
    failed = fields.for_outcome(RowOutcome(None, None, FailureKind.ROW, "h"))
    assert (failed["rf_cost_usd"], failed["rf_cost_source"]) == (None, None)


def test_metrics_count_cost_and_tokens_by_kind_model_and_template() -> None:
    metrics = Metrics()
    metrics.template_hash = "t1"
    answer = completion(Usage(1000, 100, 1100, 40, 600), model="m1")
    window = Window("w", [], 0.0, CloseReason.COUNT)
    outcomes = [
        RowOutcome(answer, None, None, "h", "k", "miss", Cost(0.002, "prices")),
        RowOutcome(answer, None, None, "h", "k", "hit", FREE_HIT),
    ]
    metrics.window_done(window, outcomes, 0.1)
    values = parse_exposition(metrics.exposition().decode())
    cost = 'llm_consumer_llm_cost_usd_total{model="m1",source="prices",template_hash="t1"}'
    assert values[cost] == pytest.approx(0.002)
    rows = 'llm_consumer_llm_priced_rows_total{model="m1",template_hash="t1"}'
    assert values[rows] == 2
    for kind, count in (("prompt", 1000), ("cached", 600), ("completion", 100), ("reasoning", 40)):
        key = f'llm_consumer_llm_usage_tokens_total{{kind="{kind}",model="m1",template_hash="t1"}}'
        assert values[key] == count, kind


def test_a_fallback_answer_is_priced_by_the_model_it_asked_not_by_the_primary() -> None:
    prices = {
        "my-deployment": {"input_per_million": 1.0, "output_per_million": 1.0},
        "backup-deployment": {"input_per_million": 10.0, "output_per_million": 10.0},
    }
    pricing = Pricing.from_settings(
        llm(
            model="my-deployment",
            fallbacks=[{"model": "backup-deployment"}],
            pricing={"models": prices},
        )
    )
    usage = Usage(1000, 0, 1000)
    # The answered name (the deployment's model) has no price: the name asked for prices it.
    backup = Completion(
        "ok", "gpt-4o-2024-08-06", usage, "stop", requested_model="backup-deployment"
    )
    primary = Completion("ok", "gpt-4o-2024-08-06", usage, "stop", requested_model="my-deployment")
    assert pricing.cost(backup).usd == pytest.approx(1000 * 10.0 / 1e6)
    assert pricing.cost(primary).usd == pytest.approx(1000 * 1.0 / 1e6)


def test_a_budget_needs_the_prices_of_every_fallback_model() -> None:
    message = _problem(
        {
            "pricing": {"models": PRICES},
            "budget": {"usd_per_hour": 1.0},
            "fallbacks": [{"model": "gpt-4o"}],
        }
    )
    assert "llm.budget needs llm.pricing.models.gpt-4o:" in message


def test_spend_series_of_priced_models_exist_at_zero_before_the_first_answer() -> None:
    metrics = Metrics()
    metrics.start_spend("t1", ["m1"], ["prices"])
    values = parse_exposition(metrics.exposition().decode())
    assert (
        values['llm_consumer_llm_cost_usd_total{model="m1",source="prices",template_hash="t1"}']
        == 0
    )
    assert values['llm_consumer_llm_priced_rows_total{model="m1",template_hash="t1"}'] == 0
    reasoning = (
        'llm_consumer_llm_usage_tokens_total{kind="reasoning",model="m1",template_hash="t1"}'
    )
    assert values[reasoning] == 0
    assert metrics.template_hash == "t1"
