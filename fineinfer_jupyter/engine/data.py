"""Training data (JSONL, TXT or records) -> tokenized examples whose labels mask what is not learned."""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

IGNORE = -100
SHAPES = '{"text"}, {"messages"}, {"prompt", "completion"} or {"instruction", "input", "output"}'


class DataError(ValueError):
    """Training data the user can fix: the message says where and what."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where masked; not shifted (the model shifts)

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


def load_records(source, *, max_bytes: int | None = None) -> list[dict]:
    if isinstance(source, (list, tuple)):
        for i, r in enumerate(source, 1):
            if not isinstance(r, dict):
                raise DataError(f"record {i}: expected a dict, got {type(r).__name__}")
        return list(source)
    if not isinstance(source, (str, Path)):
        raise DataError(
            f"expected a .jsonl or .txt path or a list of dicts, got {type(source).__name__}"
        )
    path = Path(source)
    if path.suffix not in (".jsonl", ".txt"):
        raise DataError(f"{path}: unknown file type {path.suffix!r} (expected .jsonl or .txt)")
    try:
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise DataError(f"{path}: {size} bytes; at most {max_bytes} are read")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    return read_jsonl(text, path.name) if path.suffix == ".jsonl" else read_txt(text)


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


def read_txt(text: str) -> list[dict]:
    paragraphs = re.split(r"\n[ \t\r]*\n", text)
    return [{"text": p.strip()} for p in paragraphs if p.strip()]


def record_to_example(record: dict, tokenizer, *, max_length: int) -> Example | None:
    ids, spans = encode(record, tokenizer)
    labels = [IGNORE] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE for x in labels[1:]):  # the first label never counts
        return None
    return Example(ids, labels)


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
    raise DataError(f"unrecognised record (keys: {keys}); expected {SHAPES}")


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
) -> Dataset:
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_length < 2:
        raise DataError(f"max_length must be >= 2, got {max_length}")
    name = source_name(source)
    records = load_records(source, max_bytes=max_bytes)
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
    """What says a data file is the one a job trained on: its path, size, mtime and hash."""
    path = Path(path).resolve()
    st = path.stat()
    return {
        "path": str(path),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


def unchanged(source: dict) -> bool:
    """The file of `fingerprint` is still there with the same content."""
    try:
        st = Path(source["path"]).stat()
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
