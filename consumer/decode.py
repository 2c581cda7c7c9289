"""Turns raw message bytes into a row, or says precisely why it cannot be one."""

from __future__ import annotations

from typing import Any

import orjson

from consumer.records import DeadLetter


def decode_row(value: bytes | None, max_bytes: int) -> dict[str, Any] | DeadLetter:
    """A JSON object, or a DeadLetter with a stable reason and a message a person can read."""
    if value is None:
        return DeadLetter("tombstone", "the message has no value (a tombstone)")
    if len(value) == 0:
        return DeadLetter("empty", "the message value is empty")
    if len(value) > max_bytes:
        return DeadLetter(
            "too_large", f"the message is {len(value)} bytes, over the limit of {max_bytes}"
        )
    try:
        row = orjson.loads(value)
    except orjson.JSONDecodeError as error:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as encoding_error:
            return DeadLetter("invalid_utf8", f"the message is not valid UTF-8: {encoding_error}")
        return DeadLetter("invalid_json", f"the message is not valid JSON: {error}")
    if not isinstance(row, dict):
        return DeadLetter(
            "not_an_object", f"the message is JSON but a {type(row).__name__}, not an object"
        )
    return row
