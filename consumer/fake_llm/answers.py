"""Deterministic answers and token counts, so tests and benchmarks can assert exact outputs."""

from __future__ import annotations

import math
import re
from typing import Any, Literal

import orjson

POSITIVE_WORDS = frozenset(
    {
        "amazing",
        "awesome",
        "best",
        "excellent",
        "fantastic",
        "glad",
        "good",
        "great",
        "happy",
        "love",
        "loved",
        "nice",
        "perfect",
        "pleased",
        "recommend",
        "satisfied",
        "wonderful",
    }
)
NEGATIVE_WORDS = frozenset(
    {
        "angry",
        "awful",
        "bad",
        "broken",
        "defective",
        "disappointed",
        "disappointing",
        "hate",
        "hated",
        "horrible",
        "poor",
        "refund",
        "terrible",
        "useless",
        "waste",
        "worst",
    }
)
_WORD = re.compile(r"[a-z]+")


def message_text(message: Any) -> str:
    """Text of one chat message: a plain string or the text parts of a content list."""
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def last_user_text(messages: list[Any]) -> str:
    """The answer and the fault directives both key on the last user message only."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return message_text(message)
    return ""


def sentiment(text: str) -> tuple[str, float]:
    """Lexicon vote: label and a confidence that grows with the margin."""
    positive = negative = 0
    for word in _WORD.findall(text.lower()):
        if word in POSITIVE_WORDS:
            positive += 1
        elif word in NEGATIVE_WORDS:
            negative += 1
    margin = positive - negative
    if margin == 0:
        return "NEUTRAL", 0.5
    label = "POSITIVE" if margin > 0 else "NEGATIVE"
    return label, round(min(0.95, 0.5 + 0.15 * abs(margin)), 2)


def answer(text: str, mode: Literal["sentiment", "echo"], json_mode: bool) -> str:
    """The assistant content for `text`; JSON text when the request asked for a JSON format."""
    if mode == "echo":
        return orjson.dumps({"echo": text}).decode() if json_mode else text
    label, confidence = sentiment(text)
    if json_mode:
        return orjson.dumps({"sentiment": label, "confidence": confidence}).decode()
    return label


def prompt_tokens(messages: list[Any]) -> int:
    """chars/4 plus 4 per message: the usual estimate when no tokenizer is at hand."""
    chars = sum(len(message_text(message)) for message in messages)
    return math.ceil(chars / 4) + 4 * len(messages)


class PrefixCache:
    """Which prompt prefixes were seen, in blocks of `block` tokens (4 characters a token)."""

    def __init__(self, block: int, max_prefixes: int = 1_000_000) -> None:
        self.block = block
        self._max = max_prefixes
        self._seen: set[int] = set()

    def cached_tokens(self, messages: list[Any]) -> int:
        """Tokens of the longest block-aligned prefix seen before; this prompt's are noted."""
        if self.block <= 0:
            return 0
        if len(self._seen) > self._max:  # bounded memory: forget, like an evicting cache
            self._seen.clear()
        text = "\x00".join(message_text(message) for message in messages)
        step = self.block * 4
        cached = 0
        for end in range(step, len(text) + 1, step):
            key = hash(text[:end])
            if key in self._seen:
                cached = end // 4
            else:
                self._seen.add(key)
        return cached


def completion_tokens(content: str) -> int:
    return max(1, math.ceil(len(content) / 4))


# Requested name -> the dated snapshot a real server answers with; other names come back as given.
SNAPSHOTS = {
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-4.1": "gpt-4.1-2025-04-14",
    "gpt-4.1-mini": "gpt-4.1-mini-2025-04-14",
    "o1": "o1-2024-12-17",
    "o3": "o3-2025-04-16",
    "o3-mini": "o3-mini-2025-01-31",
    "o4-mini": "o4-mini-2025-04-16",
    "gpt-5": "gpt-5-2025-08-07",
    "gpt-5-mini": "gpt-5-mini-2025-08-07",
}
_REASONING_MODEL = re.compile(r"(?:^|/)(?:o[1-9]|gpt-5)(?:[-.:]|$)", re.IGNORECASE)


def answered_model(requested: str) -> str:
    prefix, _, name = requested.rpartition("/")
    snapshot = SNAPSHOTS.get(name)
    if snapshot is None:
        return requested
    return f"{prefix}/{snapshot}" if prefix else snapshot


def is_reasoning_model(name: str) -> bool:
    """OpenAI's o-series and gpt-5 names: they take max_completion_tokens and temperature 1."""
    return _REASONING_MODEL.search(name) is not None


def go_duration(seconds: float) -> str:
    """OpenAI's x-ratelimit-reset-* spelling: 2ms, 1.5s, 6m0s, 1h2m3s."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole_minutes, rest = divmod(seconds, 60)
    hours, minutes = divmod(int(whole_minutes), 60)
    text = f"{round(rest, 3):g}s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    return f"{minutes}m{text}" if minutes else text


# Directives that spoil the answer itself: a 200 that is not what the prompt asked for, as a
# small model answers (for answer validation). `untidy` is right once normalised.
ANSWER_FAULTS = frozenset({"wrong", "untidy"})


def spoiled_answer(
    fault: str, text: str, mode: Literal["sentiment", "echo"], json_mode: bool
) -> str:
    """`wrong`: a sentence around the label (JSON: a lower-case label and a word for the
    confidence, breaking an enum and a number type); `untidy`: the label in lower case with
    surrounding whitespace."""
    label, _ = sentiment(text)
    if fault == "untidy":
        right = answer(text, mode, json_mode)
        return f"  {right if json_mode or mode == 'echo' else label.lower()}\n"
    if json_mode:
        return orjson.dumps({"sentiment": label.lower(), "confidence": "high"}).decode()
    if mode == "echo":
        return f"Sure! Here is the text: {text}"
    return f"The sentiment of this review is {label.lower()}."
