"""Where training data comes from: files and folders -> records (dicts), and the column mapping
that names a table's columns for the record shapes data.py knows (docs/design.md, "Data").

JSONL and TXT as before; a JSON array; CSV (the standard library); Parquet (pyarrow); a
`datasets` save_to_disk folder (datasets). pyarrow and datasets are optional: a file that
needs one says what to install.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

FILE_TYPES = (".jsonl", ".txt", ".json", ".csv", ".parquet")
KINDS = ".jsonl, .txt, .json (an array), .csv or .parquet file, or a datasets save_to_disk folder"
COLUMNS = ("text", "prompt", "completion", "messages")  # what --<name>-column may map
PAIRS = {"prompt": "completion", "completion": "prompt"}


class DataError(ValueError):
    """Training data the user can fix: the message says where and what."""


def read_path(path: Path, *, max_bytes: int | None = None) -> list[dict]:
    """The records of a data file or a save_to_disk folder, at most `max_bytes` read."""
    if path.is_dir():
        _check_size(path, sum(f.stat().st_size for f in path.rglob("*") if f.is_file()), max_bytes)
        return read_saved(path)
    if path.suffix not in FILE_TYPES:
        raise DataError(f"{path}: unknown file type {path.suffix!r} (expected a {KINDS})")
    try:
        _check_size(path, path.stat().st_size, max_bytes)
        if path.suffix == ".parquet":
            return read_parquet(path)
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    readers = {".jsonl": read_jsonl, ".txt": read_txt, ".json": read_json, ".csv": read_csv}
    return readers[path.suffix](text, path.name)


def _check_size(path: Path, size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise DataError(f"{path}: {size} bytes; at most {max_bytes} are read")


def read_jsonl(text: str, name: str) -> list[dict]:
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{name} line {n}: not valid JSON ({e})") from None
        if not isinstance(record, dict):
            raise DataError(f"{name} line {n}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def read_txt(text: str, name: str = "") -> list[dict]:
    paragraphs = re.split(r"\n[ \t\r]*\n", text)
    return [{"text": p.strip()} for p in paragraphs if p.strip()]


def read_json(text: str, name: str) -> list[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{name}: not valid JSON ({e}); a .json file holds an array") from None
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a JSON array of objects, got {type(data).__name__}")
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError(f"{name} item {i}: expected an object, got {type(record).__name__}")
    return data


def read_csv(text: str, name: str) -> list[dict]:
    try:
        return [dict(row) for row in csv.DictReader(io.StringIO(text, newline=""))]
    except csv.Error as e:
        raise DataError(f"{name}: not valid CSV ({e})") from None


def read_parquet(path: Path) -> list[dict]:
    pq = _optional("pyarrow.parquet", "pyarrow", ".parquet files")
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow's own errors: a damaged or foreign file
        raise DataError(f"{path.name}: not a readable Parquet file ({e})") from None


def read_saved(folder: Path) -> list[dict]:
    """A folder written by datasets' save_to_disk: a Dataset, or the "train" split (or the only
    split) of a DatasetDict."""
    is_dict = (folder / "dataset_dict.json").is_file()
    if not is_dict and not (folder / "dataset_info.json").is_file():
        raise DataError(f"{folder.name}: a folder, but not a datasets save_to_disk folder")
    datasets = _optional("datasets", "datasets", "save_to_disk folders")
    try:
        data = datasets.load_from_disk(str(folder))
    except Exception as e:
        raise DataError(f"{folder.name}: load_from_disk failed ({e})") from None
    if is_dict:
        data = only_split(data, folder.name)
    return data.to_list()


def only_split(data, name: str):
    """The split of a DatasetDict to train on: "train", or the only one there is."""
    splits = list(data.keys())
    if "train" in splits:
        return data["train"]
    if len(splits) == 1:
        return data[splits[0]]
    listed = ", ".join(repr(s) for s in splits)
    raise DataError(f"{name}: a DatasetDict with splits {listed} and no 'train'; pick one")


def _optional(module: str, package: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(
            f"reading {what} needs {package}: pip install {package} "
            "(or pip install 'fineinfer-jupyter[data]')"
        ) from None


def check_columns(columns: dict | None) -> dict:
    """{"prompt": "question", ...}: which column holds each part of a record."""
    columns = dict(columns or {})
    for key, value in columns.items():
        if key not in COLUMNS:
            raise DataError(f"columns: unknown part {key!r}; use {', '.join(COLUMNS)}")
        if not isinstance(value, str) or not value:
            raise DataError(f"columns.{key}: must be a column name")
    return columns


def map_columns(records: list[dict], columns: dict | None, name: str) -> list[dict]:
    """Records with the mapped columns under the names data.py reads. With a mapping, a record
    holds only those parts (and the other half of a prompt/completion pair under its own name,
    if it is there), so another column can never change the shape."""
    columns = check_columns(columns)
    if not columns or not records:
        return records
    found = list(records[0])
    for key, column in columns.items():
        if column not in found:
            raise DataError(f"{name}: no column {column!r} for {key} (columns: {_listed(found)})")
    for key, partner in PAIRS.items():
        if key in columns and partner not in columns:
            if partner not in found:
                raise DataError(
                    f"{name}: {key} comes from {columns[key]!r}; which column is the {partner}? "
                    f"(--{partner}-column; columns: {_listed(found)})"
                )
            columns[partner] = partner
    return [{key: r.get(column) for key, column in columns.items()} for r in records]


def _listed(names) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:20])
    return (shown + ", ...") if names[20:] else (shown or "none")
