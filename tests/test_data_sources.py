"""Training data from where notebook users keep it: DataFrames, datasets, CSV, Parquet, JSON
arrays and save_to_disk folders give the same examples as the equivalent JSONL."""

import json
import sys

import datasets
import pandas as pd
import pytest
from transformers import ByT5Tokenizer

from fineinfer_jupyter.engine.data import DataError, build_dataset, fingerprint, unchanged
from fineinfer_jupyter.kernel.client import FineInferError
from fineinfer_jupyter.kernel.tables import records_of

RECORDS = [
    {"prompt": "Color of moonveil?", "completion": "Silver blue."},
    {"prompt": "Where grows glimmerroot?", "completion": "In caves."},
    {"prompt": "When does vesperine bloom?", "completion": 'At dusk, "always".'},
    {"prompt": "Is ashbloom safe?", "completion": "No,\nit burns."},
]
TABLE = [
    {"question": r["prompt"], "answer": r["completion"], "n": i} for i, r in enumerate(RECORDS)
]
COLUMNS = {"prompt": "question", "completion": "answer"}


@pytest.fixture(scope="module")
def tok():
    tok = ByT5Tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return tok


def examples(source, tok, **kwargs):
    data = build_dataset(source, tok, max_length=256, val_fraction=0.25, seed=3, **kwargs)
    return [(e.input_ids, e.labels, e.prompt, e.answer) for e in data.train + data.val]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("ref") / "notes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return examples(path, tok)


def test_csv_parquet_json_and_save_to_disk_files_give_the_jsonl_examples(tmp_path, tok, reference):
    frame = pd.DataFrame(TABLE)
    frame.to_csv(tmp_path / "notes.csv", index=False)
    frame.to_parquet(tmp_path / "notes.parquet")
    (tmp_path / "notes.json").write_text(json.dumps(TABLE))
    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(TABLE)}).save_to_disk(
        str(tmp_path / "saved_dict")
    )
    for name in ("notes.csv", "notes.parquet", "notes.json", "saved", "saved_dict"):
        assert examples(tmp_path / name, tok, columns=COLUMNS) == reference, name


def test_dataframe_dataset_and_table_variables_give_the_jsonl_examples(tok, reference):
    frame = pd.DataFrame(TABLE)
    variables = {
        "frame": frame,
        "dataset": datasets.Dataset.from_pandas(frame),
        "splits": datasets.DatasetDict({"train": datasets.Dataset.from_list(TABLE)}),
        "table": datasets.Dataset.from_list(TABLE).data.table,
        "records": TABLE,
    }
    for name, value in variables.items():
        rows = records_of(value, name)
        assert rows == TABLE, name
        assert examples(rows, tok, columns=COLUMNS) == reference, name
    renamed = pd.DataFrame(RECORDS)  # the shape's own column names: no mapping needed
    assert examples(records_of(renamed, "renamed"), tok) == reference


def test_a_chat_column_and_a_text_column_are_mapped(tok):
    chats = [
        {
            "conv": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["completion"]},
            ]
        }
        for r in RECORDS
    ]
    rows = records_of(datasets.Dataset.from_list(chats), "chats")
    mapped = build_dataset(rows, tok, columns={"messages": "conv"})
    direct = build_dataset([{"messages": c["conv"]} for c in chats], tok)
    assert [e.input_ids for e in mapped.train] == [e.input_ids for e in direct.train]
    assert mapped.train[0].prompt[-1]["role"] == "user" and mapped.train[0].answer
    frame = pd.DataFrame({"body": ["One note.", "Two notes."], "other": [1, 2]})
    texts = build_dataset(records_of(frame, "frame"), tok, columns={"text": "body"})
    assert len(texts.train) == 2 and texts.train[0].prompt is None


def test_wrong_columns_are_one_line_errors_naming_the_columns_found(tmp_path, tok):
    pd.DataFrame(TABLE).to_csv(tmp_path / "notes.csv", index=False)
    cases = [
        (
            {"prompt": "q"},
            "notes.csv: no column 'q' for prompt (columns: 'question', 'answer', 'n')",
        ),
        (
            {"prompt": "question"},
            "notes.csv: prompt comes from 'question'; which column is the completion? "
            "(--completion-column; columns: 'question', 'answer', 'n')",
        ),
        (None, "record 1: unrecognised record (keys: 'question', 'answer', 'n'); expected"),
        ({"answer": "x"}, "columns: unknown part 'answer'; use text, prompt, completion, messages"),
    ]
    for columns, message in cases:
        with pytest.raises(DataError) as e:
            build_dataset(tmp_path / "notes.csv", tok, columns=columns)
        assert message in str(e.value) and "\n" not in str(e.value)


def test_a_missing_optional_library_says_what_to_install(tmp_path, tok, monkeypatch):
    pd.DataFrame(TABLE).to_parquet(tmp_path / "notes.parquet")
    datasets.Dataset.from_list(TABLE).save_to_disk(str(tmp_path / "saved"))
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(
        DataError, match=r"reading .parquet files needs pyarrow: pip install pyarrow"
    ):
        build_dataset(tmp_path / "notes.parquet", tok)
    with pytest.raises(
        DataError, match=r"save_to_disk folders needs datasets: pip install datasets"
    ):
        build_dataset(tmp_path / "saved", tok)


def test_a_variable_past_the_size_limit_is_refused_in_one_line():
    frame = pd.DataFrame({"text": ["x" * 1000] * 3000})  # ~3 MB as JSON
    with pytest.raises(FineInferError) as e:
        records_of(frame, "frame", max_bytes=1 << 20)
    assert e.value.message == (
        "frame is more than 1 MiB as JSON; write it to a file under the server root "
        "(df.to_parquet('data/train.parquet')) and pass that path to --data"
    )
    assert len(records_of(frame, "frame", max_bytes=4 << 20)) == 3000
    with pytest.raises(FineInferError, match="s is a set; expected a pandas DataFrame"):
        records_of({1}, "s")
    splits = datasets.DatasetDict(
        {"a": datasets.Dataset.from_list(TABLE), "b": datasets.Dataset.from_list(TABLE)}
    )
    with pytest.raises(FineInferError, match="splits 'a', 'b' and no 'train'; pick one"):
        records_of(splits, "splits")


def test_missing_values_and_numpy_types_become_json(tok):
    frame = pd.DataFrame({"text": ["a", None], "score": [1.5, float("nan")]})
    assert records_of(frame, "f") == [{"text": "a", "score": 1.5}, {"text": None, "score": None}]


def test_a_save_to_disk_folder_is_fingerprinted_by_its_files(tmp_path):
    datasets.Dataset.from_list(TABLE).save_to_disk(str(tmp_path / "saved"))
    before = fingerprint(tmp_path / "saved")
    assert unchanged(before)
    datasets.Dataset.from_list(TABLE[:2]).save_to_disk(str(tmp_path / "other"))
    for f in (tmp_path / "saved").glob("*.arrow"):
        f.write_bytes((tmp_path / "other" / f.name).read_bytes())
    assert not unchanged(before)
