"""CSV files as JSON rows, with the values a user expects: numbers, booleans, empty as null.

A template that indexes a lookup by `row.priority` or compares `row.stars > 3` needs numbers,
not the strings a CSV reader gives; so `publish` and `check-config --sample` share this reader
and convert each field. Conversion is conservative: only text that is exactly a number or a
boolean changes, and anything a conversion would lose (leading zeros as in `007`, integers past
64 bits, floats past the double range) stays a string. `--csv-strings` keeps every field a
string, and `--csv-types col=type,...` names a column's type.
"""

from __future__ import annotations

import csv
import difflib
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

import orjson

ColumnType = Literal["auto", "str", "int", "float", "bool", "json"]
COLUMN_TYPES: tuple[str, ...] = get_args(ColumnType)

# No leading zeros ("007" is an identifier, not 7); "0", "-3" and "+3" are integers.
_INT = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")
_ANY_INT = re.compile(r"[-+]?[0-9]+")
_FLOAT = re.compile(r"[-+]?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_INT64 = range(-(2**63), 2**63)  # what orjson can write and most JSON readers keep exact
_TRUE, _FALSE = frozenset({"true", "yes", "1"}), frozenset({"false", "no", "0"})


class RowFileError(Exception):
    """A rows file that cannot be used as a whole (unreadable, bad header, bad option)."""


class CsvValueError(ValueError):
    """One field that does not fit the type its column was given."""


@dataclass(frozen=True)
class CsvTypes:
    """How fields become JSON values: `default` for every column, `columns` for named ones."""

    default: ColumnType = "auto"
    columns: Mapping[str, ColumnType] = field(default_factory=dict)


@dataclass(frozen=True)
class CsvRow:
    """One record: its first line in the file, the fields as written, and the row or why not."""

    line: int
    text: dict[str, str]
    row: dict[str, Any] | None
    error: str | None


def parse_csv_types(text: str) -> dict[str, ColumnType]:
    """Parse `--csv-types "priority=int,tags=json"`; raises ValueError with the bad part."""
    columns: dict[str, ColumnType] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, kind = part.partition("=")
        name, kind = name.strip(), kind.strip().lower()
        if not sep or not name:
            raise ValueError(f"{part.strip()!r} is not column=type")
        if kind not in COLUMN_TYPES:
            raise ValueError(
                f"{part.strip()!r}: type {kind!r} is not one of {', '.join(COLUMN_TYPES)}"
            )
        columns[name] = cast(ColumnType, kind)
    return columns


def auto_value(text: str) -> Any:
    """Empty -> None; exact integers and decimals -> numbers; true/false -> booleans."""
    if text == "":
        return None
    if _INT.fullmatch(text):
        number = int(text)
        return number if number in _INT64 else text
    if _FLOAT.fullmatch(text):
        real = float(text)
        return real if math.isfinite(real) else text
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    return text


def _int_value(text: str) -> int:
    """A column declared int takes leading zeros and surrounding spaces: the user said so."""
    if not _ANY_INT.fullmatch(text.strip()):
        raise CsvValueError("is not an integer")
    number = int(text)
    if number not in _INT64:
        raise CsvValueError("is an integer beyond 64 bits")
    return number


def _float_value(text: str) -> float:
    try:
        real = float(text)
    except ValueError:
        raise CsvValueError("is not a number") from None
    if not math.isfinite(real):
        raise CsvValueError("is not a finite number")
    return real


def _bool_value(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise CsvValueError("is not a boolean (true/false, yes/no, 1/0)")


def _json_value(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as error:
        raise CsvValueError(f"is not JSON ({error})") from None


_EXPLICIT: dict[str, Callable[[str], Any]] = {
    "int": _int_value,
    "float": _float_value,
    "bool": _bool_value,
    "json": _json_value,
}


def convert(text: str, column_type: ColumnType) -> Any:
    """One field as a JSON value. An empty field is null except for `str` columns, where the
    user asked for the text as written."""
    if column_type == "str":
        return text
    if column_type == "auto":
        return auto_value(text)
    if text == "":
        return None
    return _EXPLICIT[column_type](text)


def _unknown_column(name: str, header: list[str]) -> str:
    close = difflib.get_close_matches(name, header, n=1)
    hint = f"; did you mean `{close[0]}`?" if close else ""
    return f"--csv-types names column {name!r}, which the header does not have{hint}"


def read_csv(path: Path, types: CsvTypes | None = None) -> Iterator[CsvRow]:
    """Every record of a CSV file with a header line, converted; a record that cannot be
    converted carries its error instead of a row, so callers decide whether to stop.

    The file is read as UTF-8 with an optional byte-order mark (spreadsheets write one).
    """
    types = types or CsvTypes()
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as error:
        raise RowFileError(f"{path}: cannot read: {error.strerror}") from None
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
        except (csv.Error, UnicodeDecodeError) as error:
            raise RowFileError(f"{path}: the header line is not valid CSV: {error}") from None
        if header is None:
            return
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise RowFileError(f"{path}: the header repeats column(s) {', '.join(repeated)}")
        for name in types.columns:
            if name not in header:
                raise RowFileError(f"{path}: {_unknown_column(name, header)}")
        kinds = [types.columns.get(name, types.default) for name in header]
        line = reader.line_num + 1
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as error:
                raise RowFileError(f"{path}, line {line}: not valid CSV: {error}") from None
            if fields:  # csv gives [] for a blank line
                yield _record(line, header, kinds, fields)
            line = reader.line_num + 1


def _record(line: int, header: list[str], kinds: list[ColumnType], fields: list[str]) -> CsvRow:
    text = dict(zip(header, fields, strict=False))
    if len(fields) != len(header):
        return CsvRow(
            line,
            text,
            None,
            f"{len(fields)} fields, the header has {len(header)} (a quote or a comma out of "
            "place?)",
        )
    row: dict[str, Any] = {}
    for name, kind, value in zip(header, kinds, fields, strict=True):
        try:
            row[name] = convert(value, kind)
        except CsvValueError as error:
            return CsvRow(line, text, None, f"column {name} ({kind}): {value!r} {error}")
    return CsvRow(line, text, row, None)


__all__ = [
    "COLUMN_TYPES",
    "ColumnType",
    "CsvRow",
    "CsvTypes",
    "CsvValueError",
    "RowFileError",
    "auto_value",
    "convert",
    "parse_csv_types",
    "read_csv",
]
