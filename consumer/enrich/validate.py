"""Answer validation (`llm.validate`): an answer is checked against what the prompt asked for.

A small model that answers "The review is positive." or stops at max_tokens returns a 200 like
any other; without a check it is written as a success. An answer that fails the check is asked
for again (`retries` times, same prompt), then the row gets the `invalid_answer` error, with the
last answer kept in the error for inspection. A truncated answer is not asked again: the same
prompt with the same token budget ends the same way, and each attempt is paid.

Normalisation, decided once here: surrounding whitespace never counts (models often end with a
newline), and case does not count unless `case_sensitive`; a valid text answer is written
stripped, and with `allowed` as the allowed value it matched, spelled as configured, so
downstream can compare with `==`.

Validation sits inside the response cache's call: an invalid answer is a failure, and failures
are never stored, so the retry reaches the model instead of the cache and no invalid answer is
served from the cache later. Entries stored before validation was configured (or under other
rules) are checked again on every hit (`accept`): one that fails counts as a miss.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from consumer.config import ValidateSettings
from consumer.llm.caller import CallResult
from consumer.llm.client import Completion, Usage
from consumer.llm.errors import FailureKind, LLMFailure
from consumer.llm.fallback import Calls
from consumer.llm.jsonshape import schema_errors

# Failures the client raises for an answer that came but is not what the format asked for:
# with validation on, they are invalid answers too (asked again, then `invalid_answer`).
ANSWER_FAILURES = frozenset({"invalid_json_response", "schema_mismatch"})


class InvalidAnswer(LLMFailure):
    """A paid answer that failed validation; keeps it (and what it cost) for the output row."""

    def __init__(self, message: str, completion: Completion | None) -> None:
        super().__init__(FailureKind.ROW, "invalid_answer", message, 200)
        self.completion = completion


class AnswerRules:
    """The checks of `llm.validate`, pure: `check` says what is wrong, `accept` normalises."""

    def __init__(self, settings: ValidateSettings) -> None:
        self.settings = settings
        self._fold = (lambda text: text) if settings.case_sensitive else str.casefold
        self._allowed = {self._fold(value): value for value in settings.allowed or ()}
        flags = 0 if settings.case_sensitive else re.IGNORECASE
        self._pattern = re.compile(settings.pattern, flags) if settings.pattern else None

    def check(self, completion: Completion) -> tuple[Completion | None, str]:
        """(the normalised completion, "") when valid, else (None, what is wrong)."""
        settings = self.settings
        if settings.reject_truncated and completion.truncated:
            return None, "the answer was cut by max_tokens (finish_reason length)"
        value: Any = completion.content
        if isinstance(value, str):
            value = value.strip()
        if self._allowed:
            if not isinstance(value, str) or self._fold(value) not in self._allowed:
                return None, f"the answer is not one of {list(self._allowed.values())!r}"
            value = self._allowed[self._fold(value)]
        if self._pattern is not None and (
            not isinstance(value, str) or self._pattern.fullmatch(value) is None
        ):
            return None, f"the answer does not match the pattern {self._pattern.pattern!r}"
        if settings.json_schema is not None:
            problems = schema_errors(value, settings.json_schema)
            if problems:
                return None, "the answer does not fit validate.json_schema: " + "; ".join(
                    problems[:5]
                )
        if value is completion.content:
            return completion, ""
        return dataclasses.replace(completion, content=value), ""

    def accept(self, completion: Completion) -> Completion | None:
        """For cache hits: the normalised completion, or None when it is not valid (a miss)."""
        return self.check(completion)[0]


def _summed(first: Usage | None, second: Usage) -> Usage:
    if first is None:
        return second

    def add(a: int | None, b: int | None) -> int | None:
        return None if a is None and b is None else (a or 0) + (b or 0)

    return Usage(
        first.prompt_tokens + second.prompt_tokens,
        first.completion_tokens + second.completion_tokens,
        first.total_tokens + second.total_tokens,
        add(first.reasoning_tokens, second.reasoning_tokens),
        add(first.cached_tokens, second.cached_tokens),
    )


class ValidatedCalls:
    """Wraps the row's caller (or fallback chain): asks again on an invalid answer.

    `attempts` counts every HTTP attempt, and the usage of the completion (valid, or kept in
    the InvalidAnswer) counts every answer paid for, the rejected ones too.
    """

    def __init__(self, inner: Calls, rules: AnswerRules) -> None:
        self._inner = inner
        self._rules = rules

    async def call(self, messages: list[dict[str, str]]) -> CallResult:
        attempts = 0
        paid: Usage | None = None
        problem, rejected = "", None
        for _ in range(self._rules.settings.retries + 1):
            result = await self._inner.call(messages)
            attempts += result.attempts
            completion = result.completion
            if completion is None:
                failure = result.failure
                assert failure is not None
                if failure.reason not in ANSWER_FAILURES:
                    return dataclasses.replace(result, attempts=attempts)
                problem, rejected = f"{failure.reason}: {failure.message}", None
                continue
            paid = _summed(paid, completion.usage)
            valid, problem = self._rules.check(completion)
            if valid is not None:
                return CallResult(dataclasses.replace(valid, usage=paid), None, attempts)
            rejected = dataclasses.replace(completion, usage=paid)
            if completion.truncated:
                break
        return CallResult(None, InvalidAnswer(problem, rejected), attempts)
