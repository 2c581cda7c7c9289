"""CSV fields arrive as the values a user means: numbers, booleans and empty as null."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from consumer.csvrows import (
    CsvTypes,
    CsvValueError,
    RowFileError,
    auto_value,
    convert,
    parse_csv_types,
    read_csv,
)
from consumer.topics import read_rows


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("42", 42),
        ("-3", -3),
        ("+3", 3),
        ("0", 0),
        ("3.5", 3.5),
        ("-0.25", -0.25),
        (".5", 0.5),
        ("1e3", 1000.0),
        ("true", True),
        ("FALSE", False),
        ("", None),
        ("high", "high"),
    ],
)
def test_auto_converts_exact_numbers_booleans_and_empty(text: str, value: Any) -> None:
    converted = auto_value(text)
    assert converted == value
    assert type(converted) is type(value)


@pytest.mark.parametrize(
    "text",
    [
        "007",  # an identifier: the zeros would be lost
        "00.5",
        "12345678901234567890123",  # past 64 bits: JSON readers would round it
        "1e999",  # past the double range: it would become null
        " 5",  # not exactly a number
        "1,5",
        "nan",
        "yes",  # only true/false are booleans without --csv-types
        "0x1F",
    ],
)
def test_auto_keeps_text_that_a_conversion_would_change(text: str) -> None:
    assert auto_value(text) == text


def test_declared_types_take_what_auto_leaves_alone() -> None:
    assert convert("007", "int") == 7
    assert convert(" 5 ", "int") == 5
    assert convert("yes", "bool") is True
    assert convert("0", "bool") is False
    assert convert('["a", "b"]', "json") == ["a", "b"]
    assert convert("2", "float") == 2.0
    assert convert("007", "str") == "007"


def test_an_empty_field_is_null_except_in_a_str_column() -> None:
    assert convert("", "int") is None
    assert convert("", "json") is None
    assert convert("", "str") == ""


@pytest.mark.parametrize(
    ("text", "column_type", "says"),
    [
        ("high", "int", "not an integer"),
        ("99999999999999999999", "int", "beyond 64 bits"),
        ("maybe", "bool", "not a boolean"),
        ("abc", "float", "not a number"),
        ("inf", "float", "not a finite number"),
        ("{oops", "json", "not JSON"),
    ],
)
def test_a_field_that_does_not_fit_its_declared_type_says_why(
    text: str, column_type: Any, says: str
) -> None:
    with pytest.raises(CsvValueError, match=says):
        convert(text, column_type)


def test_csv_types_parse_and_name_the_bad_part() -> None:
    assert parse_csv_types("zip=str, priority=INT,tags=json,") == {
        "zip": "str",
        "priority": "int",
        "tags": "json",
    }
    with pytest.raises(ValueError, match="'zip' is not column=type"):
        parse_csv_types("zip")
    with pytest.raises(ValueError, match="type 'date' is not one of auto, str, int"):
        parse_csv_types("when=date")


def _write(tmp_path: Path, text: str, name: str = "rows.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_rows_carry_their_first_line_across_quoted_newlines_and_blank_lines(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path, 'id,text\n1,"two\nlines"\n\n2,plain\n')
    rows = list(read_csv(path))
    assert [(r.line, r.row) for r in rows] == [
        (2, {"id": 1, "text": "two\nlines"}),
        (5, {"id": 2, "text": "plain"}),
    ]


def test_a_spreadsheet_byte_order_mark_is_not_part_of_the_first_column(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffid,n\na,1\n".encode())
    assert [r.row for r in read_csv(path)] == [{"id": "a", "n": 1}]


def test_csv_strings_keeps_every_field_as_written(tmp_path: Path) -> None:
    path = _write(tmp_path, "id,n,flag,empty\n007,1,true,\n")
    (row,) = read_csv(path, CsvTypes(default="str"))
    assert row.row == {"id": "007", "n": "1", "flag": "true", "empty": ""}


def test_declared_columns_override_the_default(tmp_path: Path) -> None:
    path = _write(tmp_path, "zip,priority\n01234,2\n")
    (row,) = read_csv(path, CsvTypes("auto", {"zip": "str", "priority": "float"}))
    assert row.row == {"zip": "01234", "priority": 2.0}


def test_a_record_with_the_wrong_number_of_fields_is_an_error_naming_both_counts(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path, "a,b\n1,2,3\n4,5\n")
    first, second = read_csv(path)
    assert first.row is None
    assert first.error is not None
    assert "3 fields, the header has 2" in first.error
    assert second.row == {"a": 4, "b": 5}


def test_a_bad_declared_value_names_the_column_and_the_value(tmp_path: Path) -> None:
    path = _write(tmp_path, "id,priority\nt1,high\n")
    (row,) = read_csv(path, CsvTypes("auto", {"priority": "int"}))
    assert row.error == "column priority (int): 'high' is not an integer"


def test_a_declared_column_missing_from_the_header_suggests_the_close_one(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path, "id,priority\nt1,1\n")
    with pytest.raises(RowFileError, match="did you mean `priority`"):
        list(read_csv(path, CsvTypes("auto", {"priorty": "int"})))


def test_a_repeated_header_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "id,text,id\n1,a,2\n")
    with pytest.raises(RowFileError, match="repeats column"):
        list(read_csv(path))


def test_a_missing_file_is_a_row_file_error(tmp_path: Path) -> None:
    with pytest.raises(RowFileError, match="cannot read"):
        list(read_csv(tmp_path / "nope.csv"))


def test_publish_sends_converted_json_keyed_by_the_text_as_written(tmp_path: Path) -> None:
    path = _write(tmp_path, "id,priority,vip,note\n007,2,false,\n")
    (row,) = read_rows(path, "id")
    assert row.key == b"007"
    assert orjson.loads(row.value) == {"id": "007", "priority": 2, "vip": False, "note": None}


def test_publish_refuses_a_file_with_bad_rows_before_sending_any(tmp_path: Path) -> None:
    path = _write(tmp_path, "id,priority\na,1\nb,high\nc,3\nd,x\n")
    with pytest.raises(RowFileError) as caught:
        list(read_rows(path, None, CsvTypes("auto", {"priority": "int"})))
    message = str(caught.value)
    assert "2 row(s) do not convert, nothing was published" in message
    assert "line 3: column priority (int): 'high'" in message
    assert "line 5:" in message


def test_jsonl_lines_are_still_sent_byte_for_byte(tmp_path: Path) -> None:
    path = _write(tmp_path, '{"id": 7,  "n": "007"}\nnot json\n\n', "rows.jsonl")
    rows = list(read_rows(path, "id"))
    assert [(r.key, r.value) for r in rows] == [
        (b"7", b'{"id": 7,  "n": "007"}'),
        (None, b"not json"),
    ]
