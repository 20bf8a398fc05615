"""Read records from JSONL / JSON / Parquet / CSV files or Hugging Face datasets.

Every record carries where it came from (file and line or row), so a bad record's error can
name it. Errors here are ``DataError``s, never a stack trace from deep inside a parser.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A data file cannot be read, or one of its records is malformed (message says where)."""


@dataclass(frozen=True)
class Record:
    fields: dict[str, Any]
    where: str  # "data/train.jsonl:17" or "data/x.parquet row 3"


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 (byte offset {e.start})") from None


def _jsonl(path: Path) -> Iterator[Record]:
    for i, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
        yield Record(obj, f"{path}:{i}")


def _json(path: Path) -> Iterator[Record]:
    try:
        obj = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON list of objects (or {{'data': [...]}})")
    for i, rec in enumerate(obj):
        if not isinstance(rec, dict):
            raise DataError(f"{path} item {i}: expected a JSON object, got {type(rec).__name__}")
        yield Record(rec, f"{path} item {i}")


def _csv(path: Path) -> Iterator[Record]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    try:
        for row in reader:
            # line_num is the physical line the row ended on (header is line 1)
            if None in row:
                raise DataError(f"{path}:{reader.line_num}: more values than header columns")
            yield Record(dict(row), f"{path}:{reader.line_num}")
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None


def _parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq  # a dependency of `datasets`

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise DataError(f"cannot read parquet file {path}: {e}") from None
    for i, rec in enumerate(table.to_pylist()):
        yield Record(rec, f"{path} row {i}")


def _hf_dataset(source: str, split: str) -> Iterator[Record]:
    import datasets

    path = Path(source)
    try:
        ds = (
            datasets.load_from_disk(str(path))
            if path.is_dir()
            else datasets.load_dataset(source, split=split)
        )
    except Exception as e:
        raise DataError(f"cannot load dataset {source!r}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"dataset {source!r} has no split {split!r} (has {list(ds)})")
        ds = ds[split]
    for i, rec in enumerate(ds):
        yield Record(dict(rec), f"{source} row {i}")


READERS = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}


def read_records(source: str | Path, split: str = "train") -> list[Record]:
    """All records of a data source. Files are chosen by suffix; a directory or a name is an HF dataset."""
    path = Path(source)
    reader = READERS.get(path.suffix.lower())
    if reader is not None:
        if not path.exists():
            raise DataError(f"data file {path} does not exist")
        return list(reader(path))
    if path.is_dir() or (
        not path.exists() and "/" in str(source) and not str(source).startswith((".", "/"))
    ):
        return list(_hf_dataset(str(source), split))
    raise DataError(
        f"data source {source!r}: not a .jsonl/.json/.csv/.parquet file, a dataset directory, or a hub name"
    )
