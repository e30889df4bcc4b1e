"""Notebook variables as training records: a list of dicts, a pandas DataFrame, a datasets
Dataset or DatasetDict, a pyarrow Table. Rows are turned into JSON a chunk at a time and the
whole is refused past `max_bytes` (the server's request limit, 16 MiB by default), with what to
do instead: a file under the server root is read by the server itself.

Nothing here imports pandas, pyarrow or datasets: a variable of one of their types means its
library is there.
"""

from __future__ import annotations

import json
import math

from .client import FineInferError

MAX_BYTES = 16 << 20  # FineInferApp.max_request_bytes' default
CHUNK = 1000  # rows serialised at a time


def kind_of(value) -> str | None:
    """ "records", "DataFrame", "Dataset", "DatasetDict", "Table", or None."""
    if isinstance(value, (list, tuple)):
        return "records"
    module, name = type(value).__module__.split(".")[0], type(value).__name__
    if (module, name) in (
        ("pandas", "DataFrame"),
        ("datasets", "Dataset"),
        ("datasets", "DatasetDict"),
        ("pyarrow", "Table"),
    ):
        return name
    return None


def records_of(value, name: str, *, max_bytes: int = MAX_BYTES) -> list[dict]:
    """The rows of `value` as JSON-ready dicts."""
    kind = kind_of(value)
    if kind is None:
        raise FineInferError(
            f"{name} is a {type(value).__name__}; expected a pandas DataFrame, a datasets "
            "Dataset or DatasetDict, a pyarrow Table, or a list of dicts"
        )
    if kind == "DatasetDict":
        value, kind = only_split(value, name), "Dataset"
    size, out = 2, []
    for chunk in _chunks(value, kind, name):
        text = json.dumps(chunk, ensure_ascii=False, default=_plain, allow_nan=True)
        size += len(text.encode())
        if size > max_bytes:
            raise FineInferError(
                f"{name} is more than {max_bytes >> 20} MiB as JSON; write it to a file under "
                f"the server root ({_hint(kind)}) and pass that path to --data"
            )
        out.extend(_finite(json.loads(text)))
    return out


def only_split(value, name: str):
    """The split of a DatasetDict to use: "train", or the only one there is."""
    splits = list(value.keys())
    if "train" in splits:
        return value["train"]
    if len(splits) == 1:
        return value[splits[0]]
    listed = ", ".join(repr(s) for s in splits)
    raise FineInferError(f"{name} is a DatasetDict with splits {listed} and no 'train'; pick one")


def _chunks(value, kind: str, name: str):
    if kind == "records":
        for i, r in enumerate(value):
            if not isinstance(r, dict):
                raise FineInferError(f"{name}[{i}] is a {type(r).__name__}, not a dict")
        for i in range(0, len(value), CHUNK):
            yield list(value[i : i + CHUNK])
    elif kind == "DataFrame":
        columns = [str(c) for c in value.columns]
        for i in range(0, len(value), CHUNK):
            rows = value.iloc[i : i + CHUNK].itertuples(index=False, name=None)
            yield [dict(zip(columns, row)) for row in rows]
    elif kind == "Dataset":
        for i in range(0, len(value), CHUNK):
            columns = value[i : i + CHUNK]  # {column: [values]}
            yield [dict(zip(columns, row)) for row in zip(*columns.values())]
    else:  # a pyarrow Table
        for i in range(0, value.num_rows, CHUNK):
            yield value.slice(i, CHUNK).to_pylist()


def _plain(value):
    """numpy and pandas scalars and arrays, timestamps: what json cannot take as they are."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _finite(value):
    """NaN (pandas' missing value) as None: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _hint(kind: str) -> str:
    return {
        "DataFrame": "df.to_parquet('data/train.parquet')",
        "Dataset": "ds.save_to_disk('data/train')",
        "Table": "pyarrow.parquet.write_table(table, 'data/train.parquet')",
    }.get(kind, "a .jsonl file")
