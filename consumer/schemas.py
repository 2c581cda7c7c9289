"""JSON Schemas of what this tool reads and writes, exported into `schemas/`.

The settings schema comes from the pydantic models; the record schemas describe the contract
(with the default response field `llm_response`) so downstream teams can validate against it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from consumer.config import settings_json_schema
from consumer.records import DEAD_LETTER_REASONS

_DRAFT = "https://json-schema.org/draft/2020-12/schema"


def output_row_schema(rf: str = "llm_response") -> dict[str, Any]:
    usage = {
        "type": ["object", "null"],
        "properties": {
            "prompt_tokens": {"type": "integer", "minimum": 0},
            "completion_tokens": {"type": "integer", "minimum": 0},
            "total_tokens": {"type": "integer", "minimum": 0},
        },
        "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    }
    error = {
        "type": ["object", "null"],
        "properties": {
            "reason": {"type": "string"},
            "message": {"type": "string"},
            "status_code": {"type": "integer"},
            "attempts": {"type": "integer", "minimum": 0},
            "retryable": {"type": "boolean"},
        },
        "required": ["reason", "message", "attempts", "retryable"],
    }
    sha256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
    return {
        "$schema": _DRAFT,
        "title": "llm-consumer output row",
        "description": (
            "The input object plus these response fields. On failure the response is null "
            f"and {rf}_error says why."
        ),
        "type": "object",
        "properties": {
            rf: {"description": "The model's text, or parsed JSON with response_format json."},
            f"{rf}_model": {"type": "string"},
            f"{rf}_usage": usage,
            f"{rf}_finish_reason": {"type": ["string", "null"]},
            f"{rf}_truncated": {
                "type": ["boolean", "null"],
                "description": "true when the answer was cut by max_tokens (finish_reason length)",
            },
            f"{rf}_error": error,
            f"{rf}_template_hash": sha256,
            f"{rf}_variables_hash": sha256,
            f"{rf}_request_hash": {
                "type": ["string", "null"],
                "pattern": "^[0-9a-f]{64}$",
                "description": "sha256 of the canonical request (the response cache's key); "
                "null when no request was made (template or internal error)",
            },
            f"{rf}_cache": {
                "enum": ["hit", "miss", None],
                "description": "hit: answered from the response cache, not paid again; null: "
                "the cache is off or no request was made",
            },
            f"{rf}_cost_usd": {
                "type": ["number", "null"],
                "minimum": 0,
                "description": "USD the row's request cost (a cache hit: 0); null when unknown "
                "(no price for the model, or no answer was bought)",
            },
            f"{rf}_cost_source": {
                "enum": ["provider", "prices", "cache", None],
                "description": "provider: the provider's own figure (OpenRouter usage.cost); "
                "prices: llm.pricing; cache: a cache hit",
            },
            f"{rf}_mode": {
                "enum": ["live", "batch"],
                "description": "live: answered by one request; batch: by a provider batch job "
                "(llm.mode batch)",
            },
            f"{rf}_template_source": {"type": "string"},
            f"{rf}_lookup_hash": sha256,
            f"{rf}_lookup_source": {"type": "string"},
        },
        "required": [
            rf,
            f"{rf}_model",
            f"{rf}_usage",
            f"{rf}_error",
            f"{rf}_template_hash",
            f"{rf}_variables_hash",
        ],
        "additionalProperties": True,
    }


def input_row_schema() -> dict[str, Any]:
    return {
        "$schema": _DRAFT,
        "title": "llm-consumer input row",
        "description": (
            "Any JSON object (UTF-8, at most kafka.max_row_bytes). Its fields are available to "
            "the prompt template as `row`. Anything else goes to the dead-letter topic."
        ),
        "type": "object",
    }


def dead_letter_schema() -> dict[str, Any]:
    reasons = list(DEAD_LETTER_REASONS)
    return {
        "$schema": _DRAFT,
        "title": "llm-consumer dead-letter record headers",
        "description": (
            "A dead-letter record keeps the input's key, value bytes and headers untouched; "
            "these headers are added (values are UTF-8 strings). When the dead-letter topic "
            "refused the whole record (too large for it), a stub is written instead: the first "
            "KB of the key and value, these headers without the input's own, and dlq.truncated."
        ),
        "type": "object",
        "properties": {
            "dlq.reason": {"enum": reasons},
            "dlq.message": {"type": "string"},
            "source.topic": {"type": "string"},
            "source.partition": {"type": "string", "pattern": "^[0-9]+$"},
            "source.offset": {"type": "string", "pattern": "^[0-9]+$"},
            "source.timestamp": {"type": "string"},
            "window.id": {"type": "string"},
            "dlq.truncated": {"const": "true"},
            "dlq.original_value_bytes": {"type": "string", "pattern": "^[0-9]+$"},
            "dlq.original_key_bytes": {"type": "string", "pattern": "^[0-9]+$"},
            "dlq.refused": {"type": "string", "description": "Why the whole record was refused."},
        },
        "required": [
            "dlq.reason",
            "dlq.message",
            "source.topic",
            "source.partition",
            "source.offset",
        ],
    }


def all_schemas() -> dict[str, dict[str, Any]]:
    return {
        "settings.schema.json": settings_json_schema(),
        "input-row.schema.json": input_row_schema(),
        "output-row.schema.json": output_row_schema(),
        "dead-letter.schema.json": dead_letter_schema(),
    }


def write_schemas(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in all_schemas().items():
        path = folder / name
        path.write_bytes(
            orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
        )
        written.append(path)
    return written
