"""Output objects built on the input's own bytes, so every input value comes out as it went in.

Decoding and re-encoding a row is lossy: orjson turns integers beyond 64 bits and long decimals
into floats, and an underflowing literal like `1e-400` into 0.0. Appending the response fields to
the original bytes keeps numbers, escapes and whitespace exactly as the producer wrote them.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

import orjson

_WHITESPACE = b" \t\n\r"  # JSON's whitespace; bytes.strip() would also take \v and \f
_EMPTY_OBJECT = re.compile(rb"\{[ \t\n\r]*\}")
# What matters to the top level of an object: strings (so that brackets and commas inside them
# are skipped), brackets and commas. Numbers, literals and colons need no attention.
_STRUCTURE = re.compile(rb'["{}\[\],]')
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_QUOTE = ord('"')
_OPENING, _CLOSING = frozenset(b"{["), frozenset(b"}]")


def with_fields(original: bytes, fields: Mapping[str, Any], present_keys: Collection[str]) -> bytes:
    """The original JSON object's bytes, untouched, with `fields` appended as members.

    Members of the original whose key equals a key of `fields` are removed first (the response
    fields win on a clash, and a JSON object must not repeat a key). `present_keys` are the
    top-level keys of the decoded original: only when one of them clashes are the bytes scanned.
    """
    text = original.strip(_WHITESPACE)
    if not fields:
        return text
    encoded = orjson.dumps(dict(fields), option=orjson.OPT_NON_STR_KEYS)
    # Joining views copies each byte once; `+` on slices of a large row copies it several times.
    view, tail = memoryview(text), memoryview(encoded)[1:]
    if any(key in present_keys for key in fields):
        members = [
            view[start:end]
            for start, end, key in _members(text)
            if orjson.loads(key) not in fields  # decoded, so an escaped spelling still clashes
        ]
        if not members:
            return encoded
        return b"".join((b"{", b",".join(members), b",", tail))
    if _EMPTY_OBJECT.fullmatch(text):
        return encoded
    return b"".join((view[:-1], b",", tail))


def _members(text: bytes) -> list[tuple[int, int, bytes]]:
    """Each top-level member of the object `text` as (start, end, quoted key).

    `text[start:end]` is the member with the whitespace around it, so the object is `{`, the
    members joined by commas, and `}`.
    """
    members: list[tuple[int, int, bytes]] = []
    depth = 0
    start = 1
    key: bytes | None = None
    match = _STRUCTURE.search(text)
    while match is not None:
        position = match.start()
        char = text[position]
        resume = position + 1
        if char == _QUOTE:
            resume = _string_end(text, position)
            # The first string of a top-level member is its key; later ones are its value.
            if depth == 1 and key is None:
                key = text[position:resume]
        elif char in _OPENING:
            depth += 1
        elif char in _CLOSING:
            depth -= 1
            if depth == 0:
                if key is not None:
                    members.append((start, position, key))
                break
        elif depth == 1:  # a comma between top-level members
            if key is None:
                raise ValueError(f"not a JSON object: a comma without a member at {position}")
            members.append((start, position, key))
            start, key = resume, None
        match = _STRUCTURE.search(text, resume)
    return members


def _string_end(text: bytes, opening: int) -> int:
    """Where the string that starts at `opening` ends (just past its closing quote)."""
    closing = text.find(b'"', opening + 1)
    # Without a backslash the first quote closes it, found at memchr speed; escapes need the
    # regular expression, which is slower per byte on long text.
    if closing != -1 and text.find(b"\\", opening + 1, closing) == -1:
        return closing + 1
    string = _STRING.match(text, opening)
    if string is None:  # raised, not looped on: the scan must always move forward
        raise ValueError(f"not a JSON object: the string at {opening} is not closed")
    return string.end()
