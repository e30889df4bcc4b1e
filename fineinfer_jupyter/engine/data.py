"""Training data (records, or a file or folder sources.py reads) -> tokenized examples whose
labels mask what is not learned."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .sources import DataError, map_columns, read_path

IGNORE = -100
SHAPES = '{"text"}, {"messages"}, {"prompt", "completion"} or {"instruction", "input", "output"}'


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where masked; not shifted (the model shifts)
    prompt: str | list[dict] | None = None  # what to ask to check the answer (None: text)
    answer: str | None = None  # the record's last answer, for exact-match evaluation

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class Dataset:
    train: list[Example] = field(default_factory=list)
    val: list[Example] = field(default_factory=list)
    num_records: int = 0
    skipped: int = 0  # records with nothing to learn

    @property
    def num_tokens(self) -> int:
        return sum(e.num_tokens for e in self.train)


def load_records(source, *, max_bytes: int | None = None, columns: dict | None = None):
    """Records from a list of dicts or a path (sources.read_path), with `columns` mapped."""
    if isinstance(source, (list, tuple)):
        for i, r in enumerate(source, 1):
            if not isinstance(r, dict):
                raise DataError(f"record {i}: expected a dict, got {type(r).__name__}")
        records = list(source)
    elif isinstance(source, (str, Path)):
        records = read_path(Path(source), max_bytes=max_bytes)
    else:
        raise DataError(f"expected a path or a list of dicts, got {type(source).__name__}")
    return map_columns(records, columns, source_name(source))


def record_to_example(record: dict, tokenizer, *, max_length: int) -> Example | None:
    ids, spans = encode(record, tokenizer)
    labels = [IGNORE] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE for x in labels[1:]):  # the first label never counts
        return None
    return Example(ids, labels, *question(record, tokenizer))


def question(record: dict, tokenizer) -> tuple[str | list[dict] | None, str | None]:
    """(prompt, answer) of a record with an answer to check: chat messages ending with the
    assistant's, or a pair (as messages with a chat template, as raw text without)."""
    if "messages" in record:
        messages = record["messages"]
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            return None, None
        return messages[:-1], messages[-1]["content"]
    if "prompt" in record and "completion" in record:
        user, sep, answer = record["prompt"], "", record["completion"]
    elif "instruction" in record and "output" in record:
        user, sep, answer = record["instruction"], "\n\n", record["output"]
        if record.get("input"):
            user += "\n\n" + record["input"]
    else:
        return None, None
    if getattr(tokenizer, "chat_template", None):
        return [{"role": "user", "content": user}], answer
    return user + sep, answer


def encode(record: dict, tokenizer) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and the [start, end) spans to learn."""
    if not isinstance(record, dict):
        raise DataError(f"expected an object, got {type(record).__name__}")
    if "messages" in record:
        return encode_chat(messages_of(record), tokenizer)
    if "prompt" in record and "completion" in record:
        return encode_pair(text_of(record, "prompt"), text_of(record, "completion"), tokenizer)
    if "instruction" in record and "output" in record:
        user = text_of(record, "instruction")
        if record.get("input"):
            user += "\n\n" + text_of(record, "input")
        return encode_pair(user, text_of(record, "output"), tokenizer, sep="\n\n")
    if "text" in record:
        ids = with_eos(tokens(tokenizer, text_of(record, "text")), tokenizer)
        return ids, [(0, len(ids))]
    keys = ", ".join(repr(k) for k in record) or "none"
    raise DataError(
        f"unrecognised record (keys: {keys}); expected {SHAPES}, or name the columns to use "
        "(--text-column, --prompt-column and --completion-column, --messages-column)"
    )


def encode_pair(prompt: str, completion: str, tokenizer, sep: str = ""):
    if getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": completion},
        ]
        return encode_chat(messages, tokenizer)
    prefix = prompt + sep
    ids = with_eos(tokens(tokenizer, prefix + completion), tokenizer)
    return ids, [(common_prefix(ids, tokens(tokenizer, prefix)), len(ids))]


def encode_chat(messages: list[dict], tokenizer):
    if not getattr(tokenizer, "chat_template", None):
        raise DataError('"messages" records need a tokenizer with a chat template')
    ids = tokens(tokenizer, render(tokenizer, messages), special=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = tokens(tokenizer, render(tokenizer, messages[:i], prompt=True), special=False)
            end = tokens(tokenizer, render(tokenizer, messages[: i + 1]), special=False)
            spans.append((common_prefix(ids, start), common_prefix(ids, end)))
    return ids, spans


def render(tokenizer, messages: list[dict], prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    except Exception as e:
        raise DataError(f"chat template failed: {e}") from None


def tokens(tokenizer, text: str, special: bool = True) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=special)["input_ids"])
    if special and ids and ids[-1] == tokenizer.eos_token_id:
        ids.pop()  # some tokenizers (T5) append eos themselves
    return ids


def with_eos(ids: list[int], tokenizer) -> list[int]:
    return ids + [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else ids


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def messages_of(record: dict) -> list[dict]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError('"messages" must be a non-empty list')
    for i, m in enumerate(messages):
        ok = isinstance(m, dict) and isinstance(m.get("role"), str)
        if not ok or not isinstance(m.get("content"), str):
            raise DataError(f'messages[{i}]: needs "role" and "content" strings')
    return messages


def text_of(record: dict, key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f'"{key}" must be a string, got {type(value).__name__}')
    return value


def build_dataset(
    source,
    tokenizer,
    *,
    max_length: int = 512,
    val_fraction: float = 0.0,
    seed: int = 0,
    max_bytes: int | None = None,
    columns: dict | None = None,
) -> Dataset:
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_length < 2:
        raise DataError(f"max_length must be >= 2, got {max_length}")
    name = source_name(source)
    records = load_records(source, max_bytes=max_bytes, columns=columns)
    if not records:
        raise DataError(f"no records in {name}")
    examples = []
    for i, record in enumerate(records, 1):
        try:
            example = record_to_example(record, tokenizer, max_length=max_length)
        except DataError as e:
            raise DataError(f"{name} record {i}: {e}") from None
        if example is not None:
            examples.append(example)
    if not examples:
        raise DataError(
            f"nothing to learn in {name}: all {len(records)} records are fully masked "
            f"(max_length={max_length})"
        )
    random.Random(seed).shuffle(examples)
    n_val = 0
    if val_fraction > 0 and len(examples) >= 2:
        n_val = min(max(1, round(len(examples) * val_fraction)), len(examples) - 1)
    return Dataset(examples[n_val:], examples[:n_val], len(records), len(records) - len(examples))


def fingerprint(path) -> dict:
    """What says a data file (or folder) is the one a job trained on: its path, size, mtime
    and hash (of a folder: its files' names and contents)."""
    path = Path(path).resolve()
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files:
        if path.is_dir():
            digest.update(str(f.relative_to(path)).encode() + b"\0")
        digest.update(f.read_bytes())
    stats = [f.stat() for f in files]
    return {
        "path": str(path),
        "size": sum(st.st_size for st in stats),
        "mtime_ns": max((st.st_mtime_ns for st in stats), default=0),
        "sha256": digest.hexdigest(),
    }


def unchanged(source: dict) -> bool:
    """The file (or folder) of `fingerprint` is still there with the same content."""
    try:
        path = Path(source["path"])
        if path.is_dir():
            return fingerprint(path)["sha256"] == source["sha256"]
        st = path.stat()
        if st.st_size != source["size"]:
            return False
        if st.st_mtime_ns == source["mtime_ns"]:
            return True
        return fingerprint(source["path"])["sha256"] == source["sha256"]
    except (OSError, KeyError, TypeError):
        return False


def source_name(source) -> str:
    return Path(source).name if isinstance(source, (str, Path)) else "records"


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    seq_len = max(e.num_tokens for e in examples)
    input_ids = torch.full((len(examples), seq_len), pad_id, dtype=torch.long)  # [B, S]
    attention_mask = torch.zeros((len(examples), seq_len), dtype=torch.long)
    labels = torch.full((len(examples), seq_len), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        n = e.num_tokens
        input_ids[row, :n] = torch.tensor(e.input_ids)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
