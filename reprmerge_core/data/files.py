"""A user's own labelled examples from CSV or JSON-lines files, checked against a bundle's label names.

Every problem is reported with the file and line it is on, so a user can fix their data without
guessing: a malformed line, a missing column, an empty text or a label the task does not have.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from reprmerge_core.data.tasks import Task

JSON_SUFFIXES = (".jsonl", ".json")
CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}


def iter_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of a JSON-lines (.jsonl/.json) or CSV/TSV file with a header row; blank lines skipped.

    A CSV record's line number is the line it starts on (a quoted field may span lines).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
                yield number, record
    elif suffix in CSV_DELIMITERS:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter=CSV_DELIMITERS[suffix])
            start = 1
            try:
                header = next(reader, None)
                if header is None:
                    raise ValueError(f"{path}: empty file, expected a header row")
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
    else:
        raise ValueError(f"{path}: unknown file type {path.suffix!r}; use .csv, .tsv or .jsonl")


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
    """The labelled examples of `task` in `path` (CSV/TSV with a header, or JSON lines), labels as class ids."""
    path = Path(path)
    names = list(label_names)
    texts: list[str] = []
    labels: list[int] = []
    for number, record in iter_records(path):
        for field in (text_field, label_field):
            if field not in record:
                raise ValueError(f"{path}:{number}: no field {field!r} (has {', '.join(map(repr, record))})")
        text = record[text_field]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{number}: field {text_field!r} must be a non-empty string, got {text!r}")
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
