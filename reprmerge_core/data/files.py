"""A user's own text files: unlabeled inputs (`read_texts`) and labelled examples (`read_labelled`).

One reader for every command that takes files (`merge` and `calibrate --calibration`, `evaluate --test`).
The format comes from the name: `.txt` (or no suffix) one input per line, `.jsonl`/`.json` JSON lines, `.csv`
and `.tsv` with a header row naming the columns; any of them may be gzip-compressed (`.gz`, or recognised by its
first bytes). Text must be UTF-8. Every problem is reported with the file and line it is on, so a user can fix
their data without guessing: bad encoding, a malformed line, a missing column, an empty text or a label the task
does not have.
"""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from reprmerge_core.data.tasks import Task

TEXT_SUFFIXES = (".txt", "")
JSON_SUFFIXES = (".jsonl", ".json")
CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}
GZIP_MAGIC = b"\x1f\x8b"
FORMATS = ".txt (one input per line), .jsonl, .csv or .tsv, each optionally .gz"


def file_format(path: str | Path) -> str:
    """The format a file's name announces: its last suffix, or the one before `.gz` ("" when it has none)."""
    path = Path(path)
    name = path.with_suffix("") if path.suffix.lower() == ".gz" else path
    return name.suffix.lower()


def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line of a UTF-8 file (gzip read transparently), line ends kept.

    Decoded line by line, so a byte that is not UTF-8 (a latin-1 or Windows-1252 file, say) is reported
    with its line; a leading byte-order mark (as Excel writes) is dropped.
    """
    path = Path(path)
    with path.open("rb") as raw:
        compressed = raw.read(2) == GZIP_MAGIC
    number = 0
    try:
        with (gzip.open(path, "rb") if compressed else path.open("rb")) as f:
            for number, data in enumerate(f, 1):
                try:
                    line = data.decode("utf-8")
                except UnicodeDecodeError as exc:
                    byte = f"byte 0x{data[exc.start]:02x} at byte {exc.start + 1} of the line"
                    raise ValueError(f"{path}:{number}: not UTF-8 ({byte}); files must be UTF-8: convert it, e.g. "
                                     "`iconv -f latin1 -t utf-8`") from None
                yield number, line.removeprefix("\ufeff") if number == 1 else line
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}:{number + 1}: corrupt or truncated gzip data ({exc})") from None


def _json_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    opened = False  # past the first non-blank line, where a file that is not JSON lines shows it
    for number, line in iter_lines(path):
        stripped = line.strip()
        if not stripped:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if not opened and stripped.startswith("["):
                record = []
            elif not opened and stripped.startswith("{"):
                raise ValueError(f"{path}:{number}: a JSON object over several lines, not JSON lines (one object "
                                 f"per line); convert it with `jq -c . {path}`") from None
            else:
                raise ValueError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
        opened = True
        if isinstance(record, list):
            raise ValueError(f"{path}:{number}: a JSON array, not JSON lines (one object per line); "
                             f"convert it with `jq -c '.[]' {path}`")
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def _csv_records(path: Path, delimiter: str, required: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows as header -> cell; a row's line number is the line it starts on (a quoted field may span lines)."""
    reader = csv.reader((line for _, line in iter_lines(path)), delimiter=delimiter)
    start = 1
    try:
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file, expected a header row")
        missing = [name for name in required if name not in header]
        if missing:
            raise ValueError(f"{path}:{start}: no column {missing[0]!r} in the header row (has "
                             f"{', '.join(map(repr, header))}); the first line must name the columns")
        start = reader.line_num + 1
        for row in reader:
            number, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}:{number}: {len(row)} fields, the header has {len(header)}")
            yield number, dict(zip(header, row))
    except csv.Error as exc:
        raise ValueError(f"{path}:{start}: malformed CSV ({exc})") from None


def iter_records(path: str | Path, required: Sequence[str] = ()) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of a JSON-lines or CSV/TSV file (optionally gzip), blank lines skipped; every
    record has the `required` fields (checked once on a CSV header, on each line of JSON)."""
    path = Path(path)
    kind = file_format(path)
    if kind in CSV_DELIMITERS:
        yield from _csv_records(path, CSV_DELIMITERS[kind], required)
    elif kind in JSON_SUFFIXES:
        for number, record in _json_records(path):
            missing = [name for name in required if name not in record]
            if missing:
                raise ValueError(f"{path}:{number}: no field {missing[0]!r} (has {', '.join(map(repr, record))})")
            yield number, record
    else:
        raise ValueError(f"{path}: unknown file type {path.suffix!r}; use .csv, .tsv or .jsonl (optionally .gz)")


def _text(record: dict[str, Any], field: str, path: Path, number: int) -> str:
    text = record[field]
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{path}:{number}: field {field!r} must be a non-empty string, got {text!r}")
    return text


def read_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """Unlabeled inputs: one per non-blank line of a text file, or the `text_field` of each JSON line or
    CSV/TSV row (see the module docstring for the formats)."""
    path = Path(path)
    kind = file_format(path)
    if kind in TEXT_SUFFIXES:
        texts = [line.rstrip("\r\n") for _, line in iter_lines(path) if line.strip()]
    elif kind in JSON_SUFFIXES or kind in CSV_DELIMITERS:
        texts = [_text(record, text_field, path, number) for number, record in iter_records(path, (text_field,))]
    else:
        raise ValueError(f"{path}: unknown file type {path.suffix!r}; use {FORMATS}")
    if not texts:
        raise ValueError(f"{path}: no inputs")
    return texts


def ids_allowed(label_names: Sequence[str]) -> bool:
    """Whether integer ids name classes unambiguously: no label name is a number other than its own id."""
    return not any(n.strip().lstrip("-").isdigit() and int(n) != i for i, n in enumerate(label_names))


def label_index(value: object, label_names: Sequence[str]) -> int | None:
    """The class a label value names: a label name (exactly, else case-insensitively when that is unique),
    or an integer id 0..K-1 when `ids_allowed`. None when the value names no class."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    text = str(value).strip()
    if text in label_names:
        return list(label_names).index(text)
    folded = [i for i, name in enumerate(label_names) if name.casefold() == text.casefold()]
    if len(folded) == 1:
        return folded[0]
    if ids_allowed(label_names) and text.isdigit() and int(text) < len(label_names):
        return int(text)
    return None


def read_labelled(path: str | Path, task: str, label_names: Sequence[str], *, text_field: str = "text",
                  label_field: str = "label") -> Task:
    """The labelled examples of `task` in `path` (CSV/TSV with a header, or JSON lines; optionally gzip), labels as
    class ids."""
    path = Path(path)
    names = list(label_names)
    texts: list[str] = []
    labels: list[int] = []
    for number, record in iter_records(path, (text_field, label_field)):
        text = _text(record, text_field, path, number)
        index = label_index(record[label_field], names)
        if index is None:
            ids = f", or ids 0-{len(names) - 1}" if ids_allowed(names) else ""
            raise ValueError(f"{path}:{number}: unknown label {record[label_field]!r} for task {task!r}; "
                             f"allowed: {', '.join(names)}{ids}")
        texts.append(text)
        labels.append(index)
    if not texts:
        raise ValueError(f"{path}: no examples")
    return Task(task, tuple(names), tuple(texts), tuple(labels))
