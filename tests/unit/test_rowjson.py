"""The output is the input object's own bytes plus the response fields, with nothing lost."""

from __future__ import annotations

import decimal
import json
import random
from typing import Any

import orjson
import pytest

from consumer.rowjson import with_fields

FIELDS: dict[str, Any] = {"llm_response": "positive", "llm_usage": {"total": 3}, "llm_error": None}


def output(original: bytes, fields: dict[str, Any] = FIELDS) -> bytes:
    """`with_fields` called as the pipeline does: with the keys of the row orjson decoded."""
    return with_fields(original, fields, orjson.loads(original).keys())


def lossless(value: bytes) -> Any:
    """Parsed without turning any number into a float, and with every member in order."""
    return json.loads(value, parse_float=decimal.Decimal, object_pairs_hook=list)


def members(value: bytes) -> list[tuple[str, Any]]:
    parsed = lossless(value)
    assert isinstance(parsed, list)
    return parsed


def expected_fields(fields: dict[str, Any]) -> list[tuple[str, Any]]:
    return members(orjson.dumps(fields, option=orjson.OPT_NON_STR_KEYS))


@pytest.mark.parametrize(
    "literal",
    [
        b"18446744073709551616",  # 2^64
        b"1267650600228229401496703205376",  # 2^100
        b"-1267650600228229401496703205376",
        b"123456789012345678901234567890",
        b"0.123456789012345678901234567891",
        b"19.99000000000000000000001",
        b"-0.0",
        b"-0",
        b"1e-400",
        b"2.5E+300",
    ],
)
def test_numbers_come_out_exactly_as_written(literal: bytes) -> None:
    original = b'{"n": ' + literal + b', "m": [' + literal + b"]}"
    result = output(original)
    assert result.startswith(b'{"n": ' + literal + b', "m": [' + literal + b"],")
    assert members(result) == [
        ("n", lossless(literal)),
        ("m", [lossless(literal)]),
        *expected_fields(FIELDS),
    ]


def test_orjson_alone_would_have_lost_them() -> None:
    # Why the output is not re-encoded from the decoded row.
    assert orjson.dumps(orjson.loads(b"18446744073709551616")) == b"1.8446744073709552e+19"
    assert orjson.dumps(orjson.loads(b"1e-400")) == b"0.0"
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(b"1e400")  # never reaches with_fields: decode_row makes it a dead letter


def test_escapes_and_whitespace_inside_the_object_are_kept() -> None:
    original = b'{ "caf\\u00e9" :\t"caf\\u00e9 \\"quoted\\" \\\\" ,\n  "emoji": "\\ud83d\\ude00"\n}'
    result = output(original)
    assert result == original[:-1] + b"," + orjson.dumps(FIELDS)[1:]


def test_whitespace_around_the_object_is_trimmed() -> None:
    assert output(b' \r\n\t{"a": 1}\n ') == b'{"a": 1,' + orjson.dumps(FIELDS)[1:]


NESTED = (
    b'{"a": {"s": "} , ] [ {", "t": ["\\"}", {"u": ",\\\\"}]},'
    b' "b": [[], {}, "\\"", {"llm_response": "nested, not a clash"}]'
)


def test_nested_structures_with_structural_characters_in_strings() -> None:
    original = NESTED + b"}"
    result = output(original)
    assert result == NESTED + b"," + orjson.dumps(FIELDS)[1:]
    assert members(result)[:2] == members(original)


def test_nested_structures_are_skipped_when_scanning_for_a_clash() -> None:
    original = NESTED + b', "llm_error": {"old": ["}", "\\""]}, "c": "\\\\"}'
    result = output(original)
    assert result == NESTED + b', "c": "\\\\",' + orjson.dumps(FIELDS)[1:]


@pytest.mark.parametrize("original", [b"{}", b"{ }", b" {\n\t} "])
def test_an_empty_object_gets_just_the_fields(original: bytes) -> None:
    assert output(original) == orjson.dumps(FIELDS)


def test_no_fields_leave_the_object_as_it_was() -> None:
    original = b' {"a": 1e-400, "llm_response": 2} '
    assert output(original, {}) == original.strip()


@pytest.mark.parametrize(
    ("original", "kept"),
    [
        (b'{"llm_response": "old", "a": 1, "b": 2}', b'{ "a": 1, "b": 2'),
        (b'{"a": 1, "llm_response": {"x": [1, "}"]}, "b": 2}', b'{"a": 1, "b": 2'),
        (b'{"a": 1, "b": 2, "llm_response": ["old"] }', b'{"a": 1, "b": 2'),
        (b'{"a": 1, "llm\\u005fresponse": "escaped spelling"}', b'{"a": 1'),
    ],
    ids=["first", "middle", "last", "escaped-key"],
)
def test_a_clashing_member_is_replaced_and_the_others_are_byte_identical(
    original: bytes, kept: bytes
) -> None:
    result = output(original)
    assert result == kept + b"," + orjson.dumps(FIELDS)[1:]
    assert [key for key, _ in members(result)].count("llm_response") == 1


def test_several_clashes_including_a_repeated_key() -> None:
    original = (
        b'{"llm_error": 1, "a": 18446744073709551616, "llm_response": 2,'
        b' "llm_usage": 3, "llm_response": 4}'
    )
    assert output(original) == b'{ "a": 18446744073709551616,' + orjson.dumps(FIELDS)[1:]


def test_an_object_whose_only_members_clash_gets_just_the_fields() -> None:
    assert output(b'{"llm_response": 1, "llm_error": 2}') == orjson.dumps(FIELDS)


def test_fields_keep_their_order_and_may_hold_non_string_keys() -> None:
    fields = {"z": 1, "a": {2: "two"}, "m": [None, True]}
    assert members(output(b'{"k": 0}', fields)) == [("k", 0), *expected_fields(fields)]


# Random rows, written by hand so that they hold what orjson cannot round-trip.

_TRICKY = [
    "",
    "}",
    "{",
    "]",
    "[",
    ",",
    ":",
    '"',
    "\\",
    '\\"',
    "\n",
    "é",
    "😀",
    "a,b",
    "\x01",
    '{"k":',
]
_KEYS = ["a", "b", "llm_response", "llm_error", "llm_usage", "x y", "é", '"', "}"]
_NUMBERS = [
    b"0",
    b"-0",
    b"-0.0",
    b"7",
    b"18446744073709551616",
    b"-1267650600228229401496703205376",
]
_NUMBERS += [b"0.123456789012345678901234567891", b"1e-400", b"2.5E+300", b"-3.25e-7"]


def _ws(rng: random.Random) -> bytes:
    return rng.choice([b"", b"", b" ", b"\n  ", b"\t", b"\r\n"])


def _string(rng: random.Random, text: str) -> bytes:
    """`text` as a JSON string, each character written plainly or as a `\\u` escape at random."""
    ascii_only = rng.random() < 0.5
    spelled = [
        f"\\u{ord(char):04x}"
        if ord(char) < 0x10000 and rng.random() < 0.05
        else json.dumps(char, ensure_ascii=ascii_only)[1:-1]
        for char in text
    ]
    return ('"' + "".join(spelled) + '"').encode()


def _value(rng: random.Random, depth: int) -> bytes:
    kind = rng.randrange(6 if depth < 4 else 4)
    if kind == 0:
        return rng.choice(_NUMBERS)
    if kind == 1:
        return _string(rng, rng.choice(_TRICKY) + rng.choice(_TRICKY))
    if kind == 2:
        return rng.choice([b"true", b"false", b"null"])
    if kind == 3:
        return str(rng.randint(-(2**70), 2**70)).encode()
    if kind == 4:
        items = [_ws(rng) + _value(rng, depth + 1) + _ws(rng) for _ in range(rng.randrange(4))]
        return b"[" + b",".join(items) + b"]"
    return _object(rng, depth + 1)


def _object(rng: random.Random, depth: int) -> bytes:
    keys = rng.sample(_KEYS, rng.randrange(len(_KEYS) // 2 + 1))
    parts = [
        _ws(rng) + _string(rng, key) + _ws(rng) + b":" + _ws(rng) + _value(rng, depth) + _ws(rng)
        for key in keys
    ]
    return b"{" + b",".join(parts) + _ws(rng) + b"}"


def _fields(rng: random.Random) -> dict[str, Any]:
    keys = rng.sample(["llm_response", "llm_error", "llm_usage", "new"], rng.randrange(1, 5))
    choices: list[Any] = [None, True, 3, -2.5, "ok, }", {"n": [1, {"d": "\\"}]}, [1, "]"]]
    return {key: rng.choice(choices) for key in keys}


def test_random_objects_come_out_as_the_original_without_clashes_plus_the_fields() -> None:
    rng = random.Random(20240611)
    for _ in range(400):
        original = _ws(rng) + _object(rng, 0) + _ws(rng)
        fields = _fields(rng)
        result = output(original, fields)
        without_clashes = [(key, value) for key, value in members(original) if key not in fields]
        assert members(result) == without_clashes + expected_fields(fields), original
        if len(without_clashes) == len(members(original)) > 0:
            # No clash: the original is not even scanned, let alone re-encoded.
            assert result.startswith(original.strip()[:-1] + b","), original


@pytest.mark.parametrize("broken", [b'{"llm_response": "open', b'{"llm_response": 1,, "a": 2}'])
def test_a_broken_object_that_must_be_scanned_raises_instead_of_hanging(broken: bytes) -> None:
    with pytest.raises(ValueError, match="not a JSON object"):
        with_fields(broken, FIELDS, {"llm_response"})
