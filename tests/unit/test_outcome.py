"""The output fields of the contract, and when a window is held back instead of emitted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from consumer.config import LLMSettings
from consumer.enrich.outcome import OutputFields, RowOutcome
from consumer.enrich.runner import window_failed_systemically
from consumer.enrich.template import PromptTemplate
from consumer.llm.client import Completion, Usage
from consumer.llm.errors import FailureKind, RowError

VARS_HASH = "ab" * 32


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
    out = fields.apply({"id": 1, "t": "x"}, success())
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


def test_apply_does_not_mutate_the_input_row() -> None:
    row = {"id": 1}
    OutputFields("llm_response", "gpt-test", template()).apply(row, success())
    assert row == {"id": 1}


def test_a_json_answer_is_stored_as_an_object() -> None:
    out = OutputFields("rf", "m", template()).apply({}, success({"label": "spam"}))
    assert out["rf"] == {"label": "spam"}


def test_a_failure_has_a_null_response_and_an_error_object() -> None:
    fields = OutputFields("llm_response", "gpt-test", template())
    out = fields.apply({"id": 2}, failure("bad_request", FailureKind.ROW, 400))
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
    out = OutputFields("rf", "m", template()).apply({}, template_failure())
    assert out["rf_error"]["reason"] == "template_error"
    assert "status_code" not in out["rf_error"]
    assert out["rf_error"]["attempts"] == 0


def test_a_custom_response_field_names_every_field() -> None:
    out = OutputFields("summary", "gpt-test", template()).apply({"a": 1}, success())
    assert out["summary"] == "an answer"
    for suffix in ("model", "usage", "template_hash", "variables_hash", "error"):
        assert f"summary_{suffix}" in out
    assert not any(key.startswith("llm_response") for key in out)


def test_response_fields_win_over_input_fields_of_the_same_name() -> None:
    out = OutputFields("rf", "m", template()).apply({"rf": "old", "rf_error": "x"}, success())
    assert out["rf"] == "an answer"
    assert out["rf_error"] is None


def test_template_file_and_lookup_provenance_fields(tmp_path: Path) -> None:
    path = tmp_path / "p.j2"
    path.write_text("{{ row.t }}", encoding="utf-8")
    tpl = template(template=None, template_file=path, lookup={"k": "v"})
    out = OutputFields("rf", "m", tpl).apply({}, success())
    assert out["rf_template_source"] == str(path)
    assert out["rf_lookup_hash"] == tpl.lookup_hash
    assert out["rf_lookup_source"] == "inline"


def test_a_systemic_failure_holds_the_window() -> None:
    outcomes = [success(), success(), failure("unauthorized", FailureKind.SYSTEMIC, 401)]
    assert window_failed_systemically(outcomes)


def test_a_window_where_every_row_ran_out_of_retries_is_held() -> None:
    assert window_failed_systemically([exhausted(), exhausted(), exhausted()])


def test_exhausted_rows_beside_template_errors_still_hold_the_window() -> None:
    assert window_failed_systemically([template_failure(), exhausted()])


def test_a_mix_of_success_and_one_exhausted_row_is_not_held() -> None:
    assert not window_failed_systemically([success(), success(), exhausted()])


def test_template_errors_alone_do_not_hold_the_window() -> None:
    assert not window_failed_systemically([template_failure(), template_failure()])


def test_row_errors_do_not_hold_the_window() -> None:
    outcomes = [failure("bad_request", FailureKind.ROW), failure("content_filter", FailureKind.ROW)]
    assert not window_failed_systemically(outcomes)


def test_an_all_success_window_is_not_held() -> None:
    assert not window_failed_systemically([success()])
    assert not window_failed_systemically([])
