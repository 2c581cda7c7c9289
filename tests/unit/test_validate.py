"""Answer validation: the rules, the retry with the same prompt, the cache, the output row."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from consumer.config import LLMSettings, ValidateSettings
from consumer.enrich.cache import CachedCalls, MemoryStore, encode_entry
from consumer.enrich.outcome import OutputFields
from consumer.enrich.runner import WindowEnricher
from consumer.enrich.template import PromptTemplate
from consumer.enrich.validate import AnswerRules, InvalidAnswer, ValidatedCalls
from consumer.llm.caller import CallResult
from consumer.llm.client import Completion, Usage
from consumer.llm.errors import FailureKind, LLMFailure

SENTIMENT = ValidateSettings(allowed=["POSITIVE", "NEGATIVE", "NEUTRAL"])
MESSAGES = [{"role": "user", "content": "Review: great"}]


def completion(content: Any, finish_reason: str = "stop") -> Completion:
    return Completion(content, "small-model", Usage(10, 2, 12), finish_reason)


def answered(content: Any, finish_reason: str = "stop") -> CallResult:
    return CallResult(completion(content, finish_reason), None, 1)


class Scripted:
    """A caller that gives the scripted results in turn and records what it was asked."""

    def __init__(self, results: Sequence[CallResult]) -> None:
        self.results = list(results)
        self.asked: list[list[dict[str, str]]] = []

    async def call(self, messages: list[dict[str, str]]) -> CallResult:
        self.asked.append(messages)
        return self.results.pop(0)


class Events:
    def cache_lookup(self, hit: bool) -> None:
        pass

    def cache_write(self) -> None:
        pass


@pytest.mark.parametrize(
    ("answer", "written"),
    [
        ("POSITIVE", "POSITIVE"),
        ("positive", "POSITIVE"),
        ("  Negative\n", "NEGATIVE"),
        ("neutral ", "NEUTRAL"),
    ],
)
def test_allowed_values_ignore_case_and_surrounding_whitespace_and_write_the_configured_spelling(
    answer: str, written: str
) -> None:
    valid, problem = AnswerRules(SENTIMENT).check(completion(answer))
    assert problem == ""
    assert valid is not None and valid.content == written


@pytest.mark.parametrize(
    "answer", ["The sentiment is positive.", "POSITIVE.", "MIXED", "", {"sentiment": "POSITIVE"}]
)
def test_anything_else_is_not_an_allowed_value(answer: Any) -> None:
    valid, problem = AnswerRules(SENTIMENT).check(completion(answer))
    assert valid is None
    assert "is not one of ['POSITIVE', 'NEGATIVE', 'NEUTRAL']" in problem


def test_case_sensitive_allowed_values_compare_exactly() -> None:
    rules = AnswerRules(ValidateSettings(allowed=["POSITIVE"], case_sensitive=True))
    assert rules.check(completion(" POSITIVE "))[0] is not None
    assert rules.check(completion("positive"))[0] is None


def test_a_pattern_must_match_the_whole_stripped_answer() -> None:
    rules = AnswerRules(ValidateSettings(pattern=r"[1-5] stars?"))
    valid, _ = rules.check(completion(" 4 Stars\n"))
    assert valid is not None and valid.content == "4 Stars"  # stripped, spelling kept
    assert rules.check(completion("I give it 4 stars"))[0] is None
    _, problem = rules.check(completion("six stars"))
    assert problem == "the answer does not match the pattern '[1-5] stars?'"


def test_a_json_schema_checks_the_parsed_answer() -> None:
    schema = {
        "type": "object",
        "required": ["sentiment", "confidence"],
        "properties": {
            "sentiment": {"enum": ["POSITIVE", "NEGATIVE", "NEUTRAL"]},
            "confidence": {"type": "number"},
        },
    }
    rules = AnswerRules(ValidateSettings(json_schema=schema))
    good = {"sentiment": "POSITIVE", "confidence": 0.8}
    assert rules.check(completion(good))[0] == completion(good)
    valid, problem = rules.check(completion({"sentiment": "positive", "confidence": "high"}))
    assert valid is None
    assert problem.startswith("the answer does not fit validate.json_schema: ")
    assert "$.sentiment" in problem and "$.confidence: expected number" in problem


def test_a_truncated_answer_is_invalid_unless_allowed() -> None:
    cut = completion("POSI", finish_reason="length")
    assert AnswerRules(ValidateSettings()).check(cut) == (
        None,
        "the answer was cut by max_tokens (finish_reason length)",
    )
    assert AnswerRules(ValidateSettings(reject_truncated=False)).check(cut)[0] == cut


async def test_an_invalid_answer_is_asked_again_with_the_same_prompt_and_the_retry_can_fix_it() -> (
    None
):
    inner = Scripted([answered("I think positive"), answered("positive")])
    result = await ValidatedCalls(inner, AnswerRules(SENTIMENT)).call(MESSAGES)
    assert inner.asked == [MESSAGES, MESSAGES]
    assert result.failure is None and result.completion is not None
    assert result.completion.content == "POSITIVE"
    assert result.attempts == 2
    assert result.completion.usage == Usage(20, 4, 24), "both paid answers are counted"


async def test_an_answer_still_invalid_after_the_retries_is_an_invalid_answer_keeping_it() -> None:
    inner = Scripted([answered("I think positive"), answered("Positive!")])
    result = await ValidatedCalls(inner, AnswerRules(SENTIMENT)).call(MESSAGES)
    failure = result.failure
    assert isinstance(failure, InvalidAnswer)
    assert (failure.kind, failure.reason, failure.status_code) == (
        FailureKind.ROW,
        "invalid_answer",
        200,
    )
    assert failure.completion is not None and failure.completion.content == "Positive!"
    assert failure.completion.usage.total_tokens == 24
    assert result.attempts == 2


async def test_retries_is_a_setting() -> None:
    rules = AnswerRules(ValidateSettings(allowed=["YES"], retries=0))
    inner = Scripted([answered("no")])
    result = await ValidatedCalls(inner, rules).call(MESSAGES)
    assert isinstance(result.failure, InvalidAnswer) and len(inner.asked) == 1


async def test_a_truncated_answer_is_not_asked_again() -> None:
    inner = Scripted([answered("POSI", "length"), answered("POSITIVE")])
    result = await ValidatedCalls(inner, AnswerRules(SENTIMENT)).call(MESSAGES)
    assert isinstance(result.failure, InvalidAnswer)
    assert "cut by max_tokens" in result.failure.message
    assert len(inner.asked) == 1


async def test_a_schema_mismatch_from_the_client_is_an_invalid_answer_after_the_retry() -> None:
    mismatch = LLMFailure(FailureKind.ROW, "schema_mismatch", "$.x: missing", 200)
    inner = Scripted([CallResult(None, mismatch, 1), CallResult(None, mismatch, 1)])
    result = await ValidatedCalls(inner, AnswerRules(ValidateSettings())).call(MESSAGES)
    assert isinstance(result.failure, InvalidAnswer)
    assert result.failure.message == "schema_mismatch: $.x: missing"
    assert result.attempts == 2


async def test_other_failures_pass_through_unchanged() -> None:
    outage = LLMFailure(FailureKind.TRANSIENT, "server_error", "boom", 503)
    inner = Scripted([CallResult(None, outage, 6)])
    result = await ValidatedCalls(inner, AnswerRules(SENTIMENT)).call(MESSAGES)
    assert result.failure is outage and result.attempts == 6


def llm_settings(**overrides: Any) -> LLMSettings:
    base: dict[str, Any] = {
        "provider": "openai",
        "model": "small-model",
        "template": "Review: {{ row.text }}",
    }
    return LLMSettings.model_validate(base | overrides)


def enricher(inner: Scripted, cache: CachedCalls | None) -> WindowEnricher:
    rules = AnswerRules(SENTIMENT)
    return WindowEnricher(
        PromptTemplate(llm_settings()),
        ValidatedCalls(inner, rules),
        lambda messages: "key-" + messages[-1]["content"],
        cache,
        accept=rules.accept,
    )


async def test_an_invalid_answer_is_never_stored_so_the_retry_and_the_next_run_ask_the_model() -> (
    None
):
    store = MemoryStore(100, 1 << 20)
    cache = CachedCalls(store, Events())
    inner = Scripted([answered("maybe"), answered("perhaps"), answered("NEUTRAL")])
    first = await enricher(inner, cache).enrich_row({"text": "great"})
    assert first.error is not None and first.error.reason == "invalid_answer"
    assert len(store) == 0
    again = await enricher(inner, cache).enrich_row({"text": "great"})
    assert again.completion is not None and again.completion.content == "NEUTRAL"
    assert (again.cache, len(store)) == ("miss", 1)
    hit = await enricher(inner, cache).enrich_row({"text": "great"})
    assert (hit.cache, len(inner.asked)) == ("hit", 3)


async def test_a_stored_answer_invalid_under_the_current_rules_is_a_miss_and_is_replaced() -> None:
    store = MemoryStore(100, 1 << 20)
    # stored by a run without validation
    store.put(b"key-Review: great", encode_entry(completion("The review is great"), 0.0))
    stored_untidy = completion(" positive\n")
    store.put(b"key-Review: fine", encode_entry(stored_untidy, 0.0))
    inner = Scripted([answered("POSITIVE")])
    cache = CachedCalls(store, Events())
    replaced = await enricher(inner, cache).enrich_row({"text": "great"})
    assert (replaced.cache, replaced.completion and replaced.completion.content) == (
        "miss",
        "POSITIVE",
    )
    normalised = await enricher(inner, cache).enrich_row({"text": "fine"})
    assert normalised.cache == "hit"
    assert normalised.completion is not None and normalised.completion.content == "POSITIVE"
    assert len(inner.asked) == 1


async def test_the_output_row_keeps_the_rejected_answer_its_model_and_usage() -> None:
    inner = Scripted([answered("I think positive"), answered("Positive!")])
    outcome = await enricher(inner, None).enrich_row({"text": "great"})
    template = PromptTemplate(llm_settings())
    fields = OutputFields("llm_response", "small-model", template).for_outcome(outcome)
    assert fields["llm_response"] is None
    assert fields["llm_response_error"] == {
        "reason": "invalid_answer",
        "message": "the answer is not one of ['POSITIVE', 'NEGATIVE', 'NEUTRAL']",
        "status_code": 200,
        "attempts": 2,
        "retryable": False,
        "answer": "Positive!",
    }
    assert fields["llm_response_model"] == "small-model"
    assert fields["llm_response_usage"] == {
        "prompt_tokens": 20,
        "completion_tokens": 4,
        "total_tokens": 24,
    }
    assert outcome.failure_kind is FailureKind.ROW and not outcome.needs_retry_later


def test_validate_is_read_from_the_settings_key_validate() -> None:
    settings = llm_settings(validate={"allowed": ["A", "B"], "retries": 2})
    assert settings.validate_answers == ValidateSettings(allowed=["A", "B"], retries=2)
    assert llm_settings().validate_answers is None


def test_allowed_values_with_a_json_response_format_are_a_settings_error() -> None:
    with pytest.raises(ValueError, match=r"validate\.allowed and validate\.pattern check text"):
        llm_settings(response_format="json_object", validate={"allowed": ["A"]})
