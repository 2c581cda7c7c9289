"""`check-config --sample rows.jsonl`: the prompts a template makes from real rows, unpaid.

A template that names a field the rows lack is valid Jinja, so only rendering it against rows
shows the mistake; without this the first sign is a topic of `template_error` rows. Rows are
read as the consumer would see them: JSONL lines through the consumer's own decoder (so a line
that would be a dead letter says so) and CSV through the reader `publish` uses.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from consumer.csvrows import CsvTypes, RowFileError, read_csv
from consumer.decode import RowLimits, decode_row
from consumer.enrich.template import PromptTemplate, TemplateRenderError
from consumer.records import DeadLetter


@dataclass(frozen=True)
class SampleRow:
    """The `number`th row of the file (from 1), its first line, and the row or why not."""

    number: int
    line: int
    row: dict[str, Any] | None
    error: str | None


def sample_rows(
    path: Path, limits: RowLimits, csv_types: CsvTypes | None = None
) -> Iterator[SampleRow]:
    """Every row of a JSONL or CSV file, as the consumer would get it after `publish`."""
    if path.suffix.lower() == ".csv":
        for number, record in enumerate(read_csv(path, csv_types), start=1):
            yield SampleRow(number, record.line, record.row, record.error)
        return
    try:
        handle = path.open("rb")
    except OSError as error:
        raise RowFileError(f"{path}: cannot read: {error.strerror}") from None
    with handle:
        number = 0
        for line_number, line in enumerate(handle, start=1):
            line = line.rstrip(b"\r\n")
            if not line.strip():
                continue  # publish skips blank lines too
            number += 1
            decoded = decode_row(None, line, limits)
            if isinstance(decoded, DeadLetter):
                letter = f"would be a dead letter ({decoded.reason}): {decoded.message}"
                yield SampleRow(number, line_number, None, letter)
            else:
                yield SampleRow(number, line_number, decoded, None)


def render_sample(
    template: PromptTemplate,
    path: Path,
    rows: int,
    limits: RowLimits,
    csv_types: CsvTypes | None = None,
    out: TextIO | None = None,
) -> int:
    """Print the messages for the first `rows` rows (0: all); returns how many failed."""
    failed = checked = 0
    print(f"sample: {'every row' if rows == 0 else f'up to {rows} rows'} of {path}", file=out)
    for sample in sample_rows(path, limits, csv_types):
        if rows and checked >= rows:
            break
        checked += 1
        where = f"row {sample.number} (line {sample.line})"
        if sample.row is None:
            failed += 1
            print(f"{where}: {sample.error}", file=out)
            continue
        try:
            messages = template.render(sample.row)
        except TemplateRenderError as error:
            failed += 1
            fields = ", ".join(sample.row) or "none"
            print(f"{where}: template error: {error} (the row's fields: {fields})", file=out)
            continue
        print(f"{where}:", file=out)
        for message in messages:
            first, *rest = message["content"].split("\n")
            print(f"  [{message['role']}] {first}", file=out)
            for line in rest:
                print(f"      {line}".rstrip(), file=out)
    print(f"{checked} rows checked, {failed} with errors", file=out)
    return failed


__all__ = ["SampleRow", "render_sample", "sample_rows"]
