"""The dry run: rows rendered, repeats counted once with the cache on, tokens and cost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from consumer.config import Settings, parse_settings
from consumer.estimate import estimate

PRICE = {"input_per_million": 1.0, "output_per_million": 10.0, "per_request": 0.001}


def settings(cache: str) -> Settings:
    data: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": "127.0.0.1:9092",
            "input_topic": "in",
            "output_topic": "out",
            "group_id": "g",
        },
        "llm": {
            "provider": "openai",
            "model": "m",
            "template": "Review: {{ row.text }}",
            "max_tokens": 10,
            "cache": {"backend": cache},
            "pricing": {"models": {"m": PRICE}},
        },
    }
    return parse_settings(data)


def rows_file(tmp_path: Path) -> Path:
    path = tmp_path / "rows.jsonl"
    lines = ['{"text": "good"}', '{"text": "bad"}', '{"text": "good"}', "not json", '{"x": 1}']
    path.write_text("\n".join(lines) + "\n")
    return path


def test_repeats_are_one_request_with_the_cache_on(tmp_path: Path) -> None:
    result = estimate(settings("memory"), rows_file(tmp_path))
    assert (result.rows, result.not_rows, result.template_errors) == (4, 1, 1)
    assert (result.distinct_requests, result.requests) == (2, 2)
    # "Review: good" = 12 chars -> 3 + 4 tokens; "Review: bad" = 11 -> 3 + 4
    assert result.input_tokens == 14
    assert result.output_tokens == 2 * 5  # half of max_tokens each
    assert result.cost_usd == pytest.approx((14 * 1.0 + 10 * 10.0) / 1e6 + 2 * 0.001)
    assert result.max_cost_usd == pytest.approx((14 * 1.0 + 20 * 10.0) / 1e6 + 2 * 0.001)


def test_every_row_is_a_request_with_the_cache_off(tmp_path: Path) -> None:
    result = estimate(settings("off"), rows_file(tmp_path), output_tokens=1)
    assert (result.distinct_requests, result.requests) == (2, 3)
    assert result.output_tokens == 3
    assert "distinct prompts:   2" in result.text()
