"""Reading a self-hosted server's slots, and what known slots do to the limiter."""

from __future__ import annotations

import pytest

from consumer.config import LLMSettings
from consumer.llm.selfhosted import announced_slots, props_url, slots_of


@pytest.mark.parametrize(
    ("base_url", "url"),
    [
        ("http://127.0.0.1:8080/v1", "http://127.0.0.1:8080/props"),
        ("http://gpu-box:8080/v1/", "http://gpu-box:8080/props"),
        ("http://gpu-box:8080", "http://gpu-box:8080/props"),
    ],
)
def test_props_sit_at_the_servers_root(base_url: str, url: str) -> None:
    assert props_url(base_url) == url


def test_only_a_positive_integer_total_slots_counts() -> None:
    # the shape llama.cpp's server answers (build b8681, trimmed)
    assert slots_of({"model_alias": "qwen", "total_slots": 4, "build_info": "b8681"}) == 4
    for props in ({"total_slots": 0}, {"total_slots": "4"}, {"total_slots": True}, {}, [4], None):
        assert slots_of(props) is None


@pytest.mark.parametrize(
    ("provider", "base_url"),
    [
        ("openai", None),  # api.openai.com
        ("openai", "https://api.openai.com/v1"),
        ("openrouter", None),
        ("azure", "https://acme.openai.azure.com"),
    ],
)
async def test_hosted_apis_are_never_asked(provider: str, base_url: str | None) -> None:
    settings = LLMSettings.model_validate(
        {
            "provider": provider,
            "base_url": base_url,
            "api_key": "k",
            "model": "m",
            "deployment": "d",
            "template": "{{ row.t }}",
        }
    )
    assert await announced_slots(settings) is None  # no request is made: none could answer
