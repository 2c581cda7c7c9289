"""Turns raw message bytes into a row, or says precisely why it cannot be one.

Every limit the pipeline depends on is checked here, so a message that could not be processed
becomes a dead letter with its reason before it enters a window, instead of failing later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from consumer.records import DeadLetter

if TYPE_CHECKING:
    from consumer.config import KafkaSettings

# orjson refuses to parse deeper documents itself; that error is a depth problem, not bad JSON.
_PARSER_DEPTH = 1024
_PARSER_DEPTH_ERROR = "depth limit exceeded"


@dataclass(frozen=True, slots=True)
class RowLimits:
    """What a message must stay within to be a row, one setting each."""

    max_bytes: int
    max_depth: int
    max_key_bytes: int

    @classmethod
    def from_settings(cls, kafka: KafkaSettings) -> RowLimits:
        return cls(
            max_bytes=kafka.max_row_bytes,
            max_depth=kafka.max_row_depth,
            max_key_bytes=kafka.max_key_bytes,
        )


def decode_row(
    key: bytes | None, value: bytes | None, limits: RowLimits
) -> dict[str, Any] | DeadLetter:
    """A JSON object, or a DeadLetter with a stable reason and a message a person can read."""
    if value is None:
        return DeadLetter("tombstone", "the message has no value (a tombstone)")
    if len(value) == 0:
        return DeadLetter("empty", "the message value is empty")
    if key is not None and len(key) > limits.max_key_bytes:
        return DeadLetter(
            "key_too_large",
            f"the message key is {len(key)} bytes, over the limit of {limits.max_key_bytes} "
            "(kafka.max_key_bytes)",
        )
    if len(value) > limits.max_bytes:
        return DeadLetter(
            "too_large",
            f"the message is {len(value)} bytes, over the limit of {limits.max_bytes} "
            "(kafka.max_row_bytes)",
        )
    try:
        row = orjson.loads(value)
    except orjson.JSONDecodeError as error:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as encoding_error:
            return DeadLetter("invalid_utf8", f"the message is not valid UTF-8: {encoding_error}")
        if error.msg == _PARSER_DEPTH_ERROR:
            return _too_deep(f"more than {_PARSER_DEPTH}", limits.max_depth)
        return DeadLetter("invalid_json", f"the message is not valid JSON: {error}")
    if not isinstance(row, dict):
        return DeadLetter(
            "not_an_object", f"the message is JSON but a {type(row).__name__}, not an object"
        )
    # Every level of nesting needs at least one opening bracket in the bytes, so a message with
    # few of them cannot be too deep: most rows skip the walk.
    if value.count(b"{") + value.count(b"[") > limits.max_depth:
        depth = _depth(row)
        if depth > limits.max_depth:
            return _too_deep(str(depth), limits.max_depth)
    return row


def _too_deep(depth: str, limit: int) -> DeadLetter:
    return DeadLetter(
        "too_deep",
        f"the row is nested {depth} levels deep, over the limit of {limit} (kafka.max_row_depth)",
    )


def _depth(row: dict[str, Any]) -> int:
    """How many levels of objects and arrays `row` nests (itself is 1), walked without recursion.

    The whole row is walked rather than stopping at the limit, so the dead letter can name the
    depth; the walk is bounded by the message size, which was already checked.
    """
    deepest = 1
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(row, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return deepest
