import pytest
from transformers import ByT5Tokenizer

from fineinfer_jupyter.engine.data import (
    IGNORE,
    DataError,
    Example,
    build_dataset,
    collate,
    load_records,
    record_to_example,
)

TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def chat_tok():
    tok = ByT5Tokenizer()
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def plain_tok():
    return ByT5Tokenizer()


def learned(example: Example, tok) -> list[str]:
    """Decoded runs of unmasked labels, in order."""
    runs, run = [], []
    for label in example.labels + [IGNORE]:
        if label != IGNORE:
            run.append(label)
        elif run:
            runs.append(tok.decode(run))
            run = []
    return runs


def test_text_record_learns_every_token_and_eos(chat_tok):
    ex = record_to_example({"text": "Glimmerroot glows."}, chat_tok, max_length=64)
    assert chat_tok.decode(ex.input_ids) == "Glimmerroot glows.</s>"
    assert ex.labels == ex.input_ids
    assert ex.num_tokens == len("Glimmerroot glows.") + 1


def test_chat_record_learns_only_assistant_turns(chat_tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Colour?"},
        {"role": "assistant", "content": "Silver."},
        {"role": "user", "content": "When?"},
        {"role": "assistant", "content": "At dusk."},
    ]
    ex = record_to_example({"messages": messages}, chat_tok, max_length=512)
    assert chat_tok.decode(ex.input_ids) == (
        "<|system|>Be brief.</s><|user|>Colour?</s><|assistant|>Silver.</s>"
        "<|user|>When?</s><|assistant|>At dusk.</s>"
    )
    assert learned(ex, chat_tok) == ["Silver.</s>", "At dusk.</s>"]
    assert len(ex.labels) == len(ex.input_ids)


def test_prompt_completion_uses_chat_template_and_learns_completion(chat_tok):
    ex = record_to_example(
        {"prompt": "Where?", "completion": "In caves."}, chat_tok, max_length=512
    )
    assert chat_tok.decode(ex.input_ids) == "<|user|>Where?</s><|assistant|>In caves.</s>"
    assert learned(ex, chat_tok) == ["In caves.</s>"]


def test_prompt_completion_without_template_concatenates(plain_tok):
    ex = record_to_example(
        {"prompt": "Q: Where?\nA:", "completion": " In caves."}, plain_tok, max_length=512
    )
    assert plain_tok.decode(ex.input_ids) == "Q: Where?\nA: In caves.</s>"
    assert learned(ex, plain_tok) == [" In caves.</s>"]


def test_instruction_record_joins_input_to_user_message(chat_tok):
    record = {"instruction": "Name its use.", "input": "Vesperine Fern", "output": "Burn salve."}
    ex = record_to_example(record, chat_tok, max_length=512)
    assert chat_tok.decode(ex.input_ids) == (
        "<|user|>Name its use.\n\nVesperine Fern</s><|assistant|>Burn salve.</s>"
    )
    assert learned(ex, chat_tok) == ["Burn salve.</s>"]
    no_input = record_to_example({**record, "input": ""}, chat_tok, max_length=512)
    assert chat_tok.decode(no_input.input_ids).startswith("<|user|>Name its use.</s>")


def test_truncation_keeps_the_start(chat_tok):
    ex = record_to_example({"prompt": "Where?", "completion": "In caves."}, chat_tok, max_length=32)
    assert ex.num_tokens == len(ex.labels) == 32
    assert learned(ex, chat_tok) == ["In c"]


def test_nothing_to_learn_returns_none(chat_tok):
    record = {"prompt": "Where does it grow?", "completion": "In caves."}
    assert record_to_example(record, chat_tok, max_length=20) is None
    assert (
        record_to_example(
            {"messages": [{"role": "user", "content": "hi"}]}, chat_tok, max_length=64
        )
        is None
    )


def test_build_dataset_counts_skipped_and_rejects_all_masked(chat_tok):
    records = [{"text": "short"}, {"prompt": "x" * 40, "completion": "y"}]
    ds = build_dataset(records, chat_tok, max_length=20)
    assert (ds.num_records, ds.skipped, len(ds.train), ds.val) == (2, 1, 1, [])
    with pytest.raises(DataError, match="nothing to learn in records"):
        build_dataset(records[1:], chat_tok, max_length=20)


def test_unrecognised_record_names_index_and_keys(chat_tok):
    with pytest.raises(
        DataError, match=r"record 2: unrecognised record \(keys: 'question', 'answer'\)"
    ):
        build_dataset([{"text": "ok"}, {"question": "q", "answer": "a"}], chat_tok)


def test_malformed_jsonl_line_is_named(tmp_path, chat_tok):
    path = tmp_path / "herb.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c" "d"}\n')
    with pytest.raises(DataError, match=r"herb\.jsonl line 4: not valid JSON \(Expecting"):
        load_records(path)


def test_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n  \n{"prompt": "p", "completion": "c"}\n')
    assert load_records(str(path)) == [{"text": "a"}, {"prompt": "p", "completion": "c"}]


def test_txt_splits_paragraphs_on_blank_lines(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("First line\nstill first.\n\n\nSecond.\n  \nThird.\n")
    assert load_records(path) == [
        {"text": "First line\nstill first."},
        {"text": "Second."},
        {"text": "Third."},
    ]


def test_bad_sources_name_the_path(tmp_path, chat_tok):
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        load_records(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match=r"data.xml: unknown file type .\.xml."):
        load_records(tmp_path / "data.xml")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no records in empty.txt"):
        build_dataset(tmp_path / "empty.txt", chat_tok)


def test_split_is_seeded_and_deterministic(chat_tok):
    records = [{"text": f"record {i}"} for i in range(20)]
    a = build_dataset(records, chat_tok, val_fraction=0.2, seed=1)
    b = build_dataset(records, chat_tok, val_fraction=0.2, seed=1)
    c = build_dataset(records, chat_tok, val_fraction=0.2, seed=2)
    assert (len(a.train), len(a.val)) == (16, 4)
    assert a.train == b.train and a.val == b.val
    assert a.val != c.val
    assert sorted(e.input_ids for e in a.train + a.val) == sorted(
        e.input_ids for e in c.train + c.val
    )
    tiny = build_dataset(records[:2], chat_tok, val_fraction=0.01)
    assert (len(tiny.train), len(tiny.val)) == (1, 1)


def test_collate_pads_right_and_masks_padding():
    examples = [Example([5, 6, 7], [IGNORE, 6, 7]), Example([8], [8])]
    batch = collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
