"""OpenAI-compatible fake LLM server for `make demo`, tests and benchmarks.

Run it with `python -m consumer.fake_llm --port 8089` (see `cli.py` for the knobs).

Chat routes: /v1/chat/completions, /api/v1/chat/completions (OpenRouter), /chat/completions,
/openai/v1/chat/completions (Azure v1), /openai/deployments/{deployment}/chat/completions
(Azure classic, needs ?api-version=). Admin: GET /health, GET /admin/stats, POST /admin/reset,
GET|POST /admin/config (JSON patch of knobs, plus `outage: {"status": 503, "seconds": 20}`).

Order of checks per request: auth, api-version, body, outage, configuration (`quota_exhausted`,
`models`, and the parameters OpenAI reasoning models reject: `max_tokens`, a temperature other
than 1), `[[fake:...]]` HTTP-error directive, random failure rates, RPM/TPM quota, capacity
(reject or queue), latency, answer (as SSE chunks when `stream: true`).
A directive in the last user message injects a fault; `[[fake:503x2]]` fails only the first
two attempts of the same messages, which makes retry tests deterministic.

Errors speak a dialect, by route or the `dialect` knob: OpenAI (`code: "rate_limit_exceeded"`,
`type: requests|tokens`, `code: null` on 5xx), Azure (`code: "429"`, the wait in the message),
OpenRouter (`code` the status, `metadata.error_type`) or LiteLLM (`type: throttling_error`,
`code` as a string); the shapes come from tests/data/provider_errors.yaml. Every answer has an
`x-request-id`, quota answers `x-ratelimit-limit/remaining/reset-*`, and the model answered is
a dated snapshot of a known name (`gpt-4o-mini` -> `gpt-4o-mini-2024-07-18`), other names as
given. `/admin/stats` shows the last request body (`last_request`).

The batch API (Files + Batches on the OpenAI and Azure paths, `GET /admin/batches`) is in
`batch.py`.
"""

from consumer.fake_llm.cli import main
from consumer.fake_llm.config import FakeLLMConfig

__all__ = ["FakeLLMConfig", "main"]
