"""`llm-consumer estimate`: what a file of rows would cost, without calling anyone.

Every row is rendered with the settings' template, exactly as `run` would, and its request is
keyed as the response cache keys it, so repeated requests are counted once when the cache is
on (what the cache saves). Tokens are estimated, not counted: no tokenizer that runs offline is
a dependency of this package, so prompts use the estimate the TPM budget and the admission of
the spend budget use (characters / 4 + 4 per message), and answers `--output-tokens` each
(default: half of `llm.max_tokens`, since most answers stop well before their budget; give the
mean answer length of a sample run for a closer figure). The cost uses `llm.pricing`, as the
run does; a provider-reported cost (OpenRouter) is unknown in advance.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
from tqdm import tqdm  # type: ignore[import-untyped]

from consumer.config import Settings
from consumer.csvrows import CsvTypes
from consumer.enrich.cache import request_key
from consumer.enrich.template import PromptTemplate, TemplateRenderError
from consumer.llm.budgets import estimate_prompt_tokens
from consumer.llm.client import ChatClient
from consumer.llm.pricing import Pricing
from consumer.topics import read_rows


@dataclass(frozen=True)
class Estimate:
    rows: int
    not_rows: int  # lines that are not a JSON object: dead letters, no request
    template_errors: int
    distinct_requests: int
    requests: int  # what would be sent: distinct ones when the cache is on
    input_tokens: int
    output_tokens: int
    cost_usd: float | None  # None: no price for the model
    max_cost_usd: float | None  # every answer using all of max_tokens
    token_method: str
    model: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        def usd(value: float | None) -> str:
            return "unknown (no llm.pricing for the model)" if value is None else f"${value:.6f}"

        lines = [
            f"model:              {self.model}",
            f"rows:               {self.rows}"
            + (f" (+ {self.not_rows} lines that are not rows)" if self.not_rows else ""),
            f"template errors:    {self.template_errors}",
            f"distinct prompts:   {self.distinct_requests}",
            f"requests:           {self.requests}",
            f"input tokens:       {self.input_tokens}",
            f"output tokens:      {self.output_tokens}",
            f"estimated cost:     {usd(self.cost_usd)}",
            f"at most:            {usd(self.max_cost_usd)} (every answer at max_tokens)",
            f"tokens estimated by {self.token_method}",
        ]
        return "\n".join(lines)


def _rows(path: Path, csv_types: CsvTypes | None) -> Iterable[Any]:
    for published in read_rows(path, None, csv_types):
        try:
            yield orjson.loads(published.value)
        except orjson.JSONDecodeError:
            yield None


def estimate(
    settings: Settings,
    path: Path,
    *,
    output_tokens: int | None = None,
    csv_types: CsvTypes | None = None,
    progress: bool = False,
) -> Estimate:
    llm = settings.llm
    template = PromptTemplate(llm)
    client = ChatClient(llm, post=_no_post)
    client.prompt_cache_key = template.template_hash
    pricing = Pricing(llm.pricing, llm.model_name)
    max_tokens = llm.max_tokens or 0
    per_answer = output_tokens if output_tokens is not None else math.ceil(max_tokens / 2)
    cached = llm.cache.backend != "off"
    seen: set[str] = set()
    rows = not_rows = template_errors = requests = input_tokens = 0
    for row in tqdm(_rows(path, csv_types), unit="row", disable=not progress, desc="estimate"):
        if not isinstance(row, dict):
            not_rows += 1
            continue
        rows += 1
        try:
            messages = template.render(row)
        except TemplateRenderError:
            template_errors += 1
            continue
        key = request_key(llm.provider, llm.deployment, client.request_body(messages))
        first = key not in seen
        seen.add(key)
        if first or not cached:
            requests += 1
            input_tokens += estimate_prompt_tokens(messages)
    cost = pricing.estimate(llm.model_name, input_tokens, per_answer * requests)
    most = pricing.estimate(llm.model_name, input_tokens, max_tokens * requests)
    return Estimate(
        rows=rows,
        not_rows=not_rows,
        template_errors=template_errors,
        distinct_requests=len(seen),
        requests=requests,
        input_tokens=input_tokens,
        output_tokens=per_answer * requests,
        cost_usd=_with_requests(cost, pricing, llm.model_name, requests),
        max_cost_usd=_with_requests(most, pricing, llm.model_name, requests),
        token_method="characters/4 + 4 per message (no offline tokenizer installed)",
        model=llm.model_name,
    )


def _with_requests(usd: float | None, pricing: Pricing, model: str, requests: int) -> float | None:
    """`Pricing.estimate` adds one per-request charge; a file has `requests` of them."""
    price = pricing.price(model)
    if usd is None or price is None:
        return None
    return usd + price.per_request * (requests - 1) if requests else 0.0


async def _no_post(url: str, payload: bytes, headers: Any) -> Any:
    raise RuntimeError("estimate sends nothing")
