"""The one reader of users' text files: every format (and its gzip), and every error naming file and line."""

from __future__ import annotations

import csv
import gzip
import json
import re
from pathlib import Path

import pytest

from reprmerge_core.data.files import read_labelled, read_texts

TEXTS = ["Free entry, win a prize", "see you at lunch", 'she said "hi" ü', "naïve café; 10% off"]


def write(path: Path, data: bytes) -> Path:
    """`data` at `path`, gzip-compressed when the name ends in .gz."""
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def csv_bytes(rows: list[list[str]], delimiter: str = ",") -> bytes:
    """Rows as the csv module writes them (quoting fields with delimiters, quotes or newlines)."""
    lines: list[str] = []

    class Sink:
        def write(self, line: str) -> None:
            lines.append(line)

    csv.writer(Sink(), delimiter=delimiter).writerows(rows)
    return "".join(lines).encode()


@pytest.mark.parametrize("gz", ["", ".gz"])
def test_every_format_reads_the_same_texts(tmp_path: Path, gz: str) -> None:
    """TXT one per line (blank lines and CRLF ends dropped), JSON lines, CSV and TSV by a named column."""
    txt = write(tmp_path / f"in.txt{gz}", ("\r\n".join(TEXTS[:2]) + "\n\n  \n" + "\n".join(TEXTS[2:]) + "\n").encode())
    jsonl = write(tmp_path / f"in.jsonl{gz}", "".join(json.dumps({"id": i, "body": t}) + "\n"
                                                       for i, t in enumerate(TEXTS)).encode())
    rows = [["id", "body", "label"]] + [[str(i), t, "x"] for i, t in enumerate(TEXTS)]
    csv_file = write(tmp_path / f"in.csv{gz}", csv_bytes(rows))
    tsv_file = write(tmp_path / f"in.tsv{gz}", csv_bytes(rows, "\t"))
    assert read_texts(txt) == TEXTS
    for path in (jsonl, csv_file, tsv_file):
        assert read_texts(path, "body") == TEXTS, path


def test_csv_text_column_defaults_to_text_and_header_is_never_an_input(tmp_path: Path) -> None:
    """The bug: a CSV read as plain text made its header and every label an input."""
    path = write(tmp_path / "cal.csv", csv_bytes([["label", "text"], ["spam", "win, now"], ["ham", "two\nlines"]]))
    assert read_texts(path) == ["win, now", "two\nlines"]


def test_gzip_is_recognised_by_its_bytes_and_a_byte_order_mark_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "cal.txt"  # compressed, though the name does not say so
    path.write_bytes(gzip.compress("\ufeffone\ntwo\n".encode()))
    assert read_texts(path) == ["one", "two"]
    excel = write(tmp_path / "excel.csv", "\ufefftext,label\nhello,ham\n".encode())  # Excel's UTF-8 CSV
    assert read_texts(excel) == ["hello"]


@pytest.mark.parametrize("name", ["cal.txt", "cal.jsonl", "cal.csv", "cal.txt.gz"])
def test_latin1_is_refused_naming_file_line_and_utf8(tmp_path: Path, name: str) -> None:
    first, bad = ('{"text": "fine"}', '{"text": "café"}') if "jsonl" in name else ("fine", "café")
    header = "text\n" if "csv" in name else ""
    path = write(tmp_path / name, f"{header}{first}\n".encode() + f"{bad}\n".encode("latin-1"))
    number = 3 if header else 2
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:{number}: not UTF-8 \(byte 0xe9 .*must be UTF-8"):
        read_texts(path)


PRETTY = json.dumps([{"text": t} for t in TEXTS], indent=2).encode()
BAD_FILES = [  # (file name, content, the error: file and line first)
    ("cal.jsonl", b'{"text": "one"}\n\n{"text": "two"\n', r"cal.jsonl:3: not a JSON line"),
    # blank lines count: the number an editor shows
    ("cal.jsonl", b'{"text": "one"}\n\n{"text": 2}\n', r"cal.jsonl:3: field 'text' must be a non-empty string, got 2"),
    ("cal.jsonl", b'{"text": "one"}\n{"body": "two"}\n', r"cal.jsonl:2: no field 'text' \(has 'body'\)"),
    ("cal.jsonl", b'{"text": "one"}\n"two"\n', r"cal.jsonl:2: expected a JSON object, got str"),
    ("cal.json", PRETTY,
     r"cal.json:1: a JSON array, not JSON lines \(one object per line\); convert it with `jq -c '\.\[\]'"),
    ("cal.json", json.dumps([{"text": t} for t in TEXTS]).encode(), r"cal.json:1: a JSON array, not JSON lines"),
    ("cal.json", b'\n{\n  "text": "one"\n}\n', r"cal.json:2: a JSON object over several lines, not JSON lines"),
    ("cal.csv", b"message,label\nhello,ham\n",
     r"cal.csv:1: no column 'text' in the header row \(has 'message', 'label'\)"),
    ("cal.csv", b"text,label\nhello,ham\n\nbye,ham,extra\n", r"cal.csv:4: 3 fields, the header has 2"),
    ("cal.csv", b"text,label\nhello,ham\n ,ham\n", r"cal.csv:3: field 'text' must be a non-empty string"),
    ("cal.csv", b"", r"cal.csv: empty file, expected a header row"),
]


@pytest.mark.parametrize(("name", "content", "message"), BAD_FILES)
def test_bad_files_are_refused_naming_file_and_line(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_texts(write(tmp_path / name, content))


def test_other_refusals(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cal.parquet: unknown file type '.parquet'; use .txt \(one input per line\)"):
        read_texts(write(tmp_path / "cal.parquet", b"PAR1"))
    with pytest.raises(ValueError, match=r"cal.txt: no inputs"):
        read_texts(write(tmp_path / "cal.txt", b"\n \n"))
    broken = tmp_path / "cal.txt.gz"
    data = gzip.compress("".join(f"input {i}\n" for i in range(1000)).encode())
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cal.txt.gz:\d+: corrupt or truncated gzip data"):
        read_texts(broken)
    with pytest.raises(ValueError, match=r"labelled.txt: unknown file type '.txt'; use .csv, .tsv or .jsonl"):
        read_labelled(write(tmp_path / "labelled.txt", b"hello\n"), "spam", ["ham", "spam"])


def test_labelled_files_share_the_reader(tmp_path: Path) -> None:
    """`evaluate --test` reads gzip and refuses latin-1 the same way."""
    path = write(tmp_path / "test.csv.gz", csv_bytes([["text", "label"], ["win", "spam"], ["lunch", "0"]]))
    task = read_labelled(path, "spam", ["ham", "spam"])
    assert task.texts == ("win", "lunch") and task.labels == (1, 0)
    write(path, "text,label\nwin,spam\ncafé,ham\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"test.csv.gz:3: not UTF-8"):
        read_labelled(path, "spam", ["ham", "spam"])
    write(path, b"text,gold\nwin,spam\n")
    with pytest.raises(ValueError, match=r"test.csv.gz:1: no column 'label'"):
        read_labelled(path, "spam", ["ham", "spam"])
