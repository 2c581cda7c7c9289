"""The JSON Schemas in schemas/ are exported from the code and must not drift from it."""

from __future__ import annotations

from pathlib import Path

import orjson

from consumer.schemas import all_schemas, output_row_schema

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def test_committed_schemas_match_the_models() -> None:
    for name, schema in all_schemas().items():
        committed = orjson.loads((SCHEMAS / name).read_bytes())
        assert committed == schema, f"schemas/{name} is stale: run `make schemas`"


def test_the_output_schema_names_the_configured_response_field() -> None:
    schema = output_row_schema("sentiment")
    assert "sentiment_error" in schema["properties"]
    assert "sentiment_variables_hash" in schema["required"]
