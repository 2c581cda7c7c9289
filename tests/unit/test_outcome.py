"""The output fields of the contract, and when a window is held back instead of emitted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from consumer.config import LLMSettings
from consumer.enrich.outcome import OutputFields, RowOutcome
from consumer.enrich.template import PromptTemplate
from consumer.llm.client import Completion, Usage
from consumer.llm.errors import FailureKind, RowError
from consumer.rowjson import with_fields

VARS_HASH = "ab" * 32


def output(fields: OutputFields, row: dict[str, Any], outcome: RowOutcome) -> dict[str, Any]:
    """The output object as the encoder writes it: the input's bytes plus the fields."""
    body = with_fields(orjson.dumps(row), fields.for_outcome(outcome), row.keys())
    result: dict[str, Any] = orjson.loads(body)
    return result


def template(**overrides: Any) -> PromptTemplate:
    values: dict[str, Any] = {"provider": "openai", "model": "gpt-test", "template": "{{ row.t }}"}
    values.update(overrides)
    return PromptTemplate(LLMSettings(**values))


def success(content: Any = "an answer") -> RowOutcome:
    completion = Completion(content, "gpt-test-2024", Usage(11, 7, 18), "stop")
    return RowOutcome(completion, None, None, VARS_HASH)


def failure(reason: str, kind: FailureKind, status: int | None = 400) -> RowOutcome:
    error = RowError(reason, f"{reason} happened", status, 3, kind.retryable)
    return RowOutcome(None, error, kind, VARS_HASH)


def template_failure() -> RowOutcome:
    return RowOutcome(
        None, RowError("template_error", "missing", None, 0, False), FailureKind.ROW, VARS_HASH
    )


def exhausted() -> RowOutcome:
    return failure("retries_exhausted", FailureKind.BACKPRESSURE, 429)


def test_a_success_has_every_contract_field_and_keeps_the_input() -> None:
    tpl = template()
    fields = OutputFields("llm_response", "gpt-test", tpl)
    out = output(fields, {"id": 1, "t": "x"}, success())
    assert out["id"] == 1
    assert out["t"] == "x"
    assert out["llm_response"] == "an answer"
    assert out["llm_response_model"] == "gpt-test-2024"
    assert out["llm_response_usage"] == {
        "prompt_tokens": 11,
        "completion_tokens": 7,
        "total_tokens": 18,
    }
    assert out["llm_response_template_hash"] == tpl.template_hash
    assert out["llm_response_variables_hash"] == VARS_HASH
    assert "llm_response_error" in out
    assert out["llm_response_error"] is None
    assert "llm_response_template_source" not in out
    assert "llm_response_lookup_hash" not in out


def test_the_fields_do_not_include_the_input_row() -> None:
    fields = OutputFields("llm_response", "gpt-test", template()).for_outcome(success())
    assert all(key.startswith("llm_response") for key in fields)


def test_a_json_answer_is_stored_as_an_object() -> None:
    out = output(OutputFields("rf", "m", template()), {}, success({"label": "spam"}))
    assert out["rf"] == {"label": "spam"}


def test_a_failure_has_a_null_response_and_an_error_object() -> None:
    fields = OutputFields("llm_response", "gpt-test", template())
    out = output(fields, {"id": 2}, failure("bad_request", FailureKind.ROW, 400))
    assert out["id"] == 2
    assert "llm_response" in out
    assert out["llm_response"] is None
    assert out["llm_response_model"] == "gpt-test"
    assert out["llm_response_usage"] is None
    assert out["llm_response_variables_hash"] == VARS_HASH
    assert out["llm_response_error"] == {
        "reason": "bad_request",
        "message": "bad_request happened",
        "status_code": 400,
        "attempts": 3,
        "retryable": False,
    }


def test_an_error_without_a_status_code_omits_it() -> None:
    out = output(OutputFields("rf", "m", template()), {}, template_failure())
    assert out["rf_error"]["reason"] == "template_error"
    assert "status_code" not in out["rf_error"]
    assert out["rf_error"]["attempts"] == 0


def test_a_custom_response_field_names_every_field() -> None:
    out = output(OutputFields("summary", "gpt-test", template()), {"a": 1}, success())
    assert out["summary"] == "an answer"
    for suffix in ("model", "usage", "template_hash", "variables_hash", "error"):
        assert f"summary_{suffix}" in out
    assert not any(key.startswith("llm_response") for key in out)


def test_response_fields_win_over_input_fields_of_the_same_name() -> None:
    out = output(OutputFields("rf", "m", template()), {"rf": "old", "rf_error": "x"}, success())
    assert out["rf"] == "an answer"
    assert out["rf_error"] is None


def test_template_file_and_lookup_provenance_fields(tmp_path: Path) -> None:
    path = tmp_path / "p.j2"
    path.write_text("{{ row.t }}", encoding="utf-8")
    tpl = template(template=None, template_file=path, lookup={"k": "v"})
    out = output(OutputFields("rf", "m", tpl), {}, success())
    assert out["rf_template_source"] == str(path)
    assert out["rf_lookup_hash"] == tpl.lookup_hash
    assert out["rf_lookup_source"] == "inline"
