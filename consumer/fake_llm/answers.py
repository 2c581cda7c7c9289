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


def completion_tokens(content: str) -> int:
    return max(1, math.ceil(len(content) / 4))
