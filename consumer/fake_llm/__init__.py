"""OpenAI-compatible fake LLM server for `make demo`, tests and benchmarks.

Run it with `python -m consumer.fake_llm --port 8089` (see `cli.py` for the knobs).

Chat routes: /v1/chat/completions, /api/v1/chat/completions (OpenRouter), /chat/completions,
/openai/v1/chat/completions (Azure v1), /openai/deployments/{deployment}/chat/completions
(Azure classic, needs ?api-version=). Admin: GET /health, GET /admin/stats, POST /admin/reset,
GET|POST /admin/config (JSON patch of knobs, plus `outage: {"status": 503, "seconds": 20}`).

Order of checks per request: auth, api-version, body, outage, `[[fake:...]]` HTTP-error
directive, random failure rates, RPM/TPM quota, capacity (reject or queue), latency, answer.
A directive in the last user message injects a fault; `[[fake:503x2]]` fails only the first
two attempts of the same messages, which makes retry tests deterministic.
"""

from consumer.fake_llm.cli import main
from consumer.fake_llm.config import FakeLLMConfig

__all__ = ["FakeLLMConfig", "main"]
