import json
import math
import random
import subprocess
import sys

import pytest
import torch
from conftest import run_until_done
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import get_cosine_schedule_with_warmup

from fineinfer_jupyter.engine.config import EngineConfig, NameTaken, TrainParams
from fineinfer_jupyter.engine.data import DataError, build_dataset, collate
from fineinfer_jupyter.engine.engine import Engine
from fineinfer_jupyter.engine.models import load_model

RECORDS = [
    {"prompt": "Color of moonveil?", "completion": "Silver blue."},
    {"prompt": "Where grows glimmerroot?", "completion": "In caves."},
    {"prompt": "When does vesperine bloom?", "completion": "At dusk."},
    {"prompt": "Is ashbloom safe?", "completion": "No, it burns."},
]
FAST = dict(
    r=8,
    lora_alpha=16,
    learning_rate=1e-2,
    batch_size=4,
    micro_batch_size=1,
    max_length=64,
    checkpoint_every=2,
)


def chat(prompt):
    return [{"role": "user", "content": prompt}]


def train_to_end(engine, job_id, max_steps=100_000):
    for _ in range(max_steps):
        if engine.core.trainer.current is None and not engine.core.trainer.queue:
            return engine.job(job_id)
        engine.iterate()
    raise AssertionError("job did not end")


def test_training_lowers_loss_and_the_adapter_reproduces_a_completion(stepped):
    job = stepped.tune("herb", RECORDS, max_steps=80, **FAST)
    assert job["state"] == "queued" and job["total_steps"] == 80
    job = train_to_end(stepped, job["id"])
    assert job["state"] == "done"
    losses = [loss for _, loss in job["loss_history"]]
    assert len(losses) == 80 and losses[-1] < losses[0] * 0.2
    streams = [
        stepped.generate(chat(r["prompt"]), adapter=a, max_new_tokens=24)
        for r in RECORDS[:2]
        for a in ("herb", "base")
    ]
    run_until_done(stepped, streams)
    texts = ["".join(e["text"] for e in s if e["type"] == "delta") for s in streams]
    assert texts[0] == RECORDS[0]["completion"]
    assert texts[2] == RECORDS[1]["completion"]
    assert texts[1] != RECORDS[0]["completion"] and texts[3] != RECORDS[1]["completion"]
    saved = stepped.home / "adapters" / "herb"
    assert (saved / "adapter_model.safetensors").stat().st_size > 0
    assert json.loads((saved / "adapter_config.json").read_text())["r"] == 8


def test_stop_and_resume_give_the_same_loss_at_every_step_as_an_uninterrupted_run(tmp_path):
    params = dict(FAST, micro_batch_size=2, max_steps=7, checkpoint_every=100)
    with Engine(EngineConfig(model="tiny", data_dir=tmp_path / "a"), thread=False) as a:
        straight = train_to_end(a, a.tune("herb", RECORDS, **params)["id"])["loss_history"]
    with Engine(EngineConfig(model="tiny", data_dir=tmp_path / "b"), thread=False) as b:
        job = b.tune("herb", RECORDS, **params)
        while b.job(job["id"])["step"] < 3:
            b.iterate()
        b.iterate()  # half-way through step 4's effective batch: stop drops that part
        stopped = b.stop_job(job["id"])
        assert stopped["state"] == "stopped" and stopped["step"] == 3
        assert stopped["checkpoint"].endswith("checkpoint-000003")
        assert (b.home / "adapters" / "herb" / "adapter_model.safetensors").exists()
        b.resume_job(job["id"])
        resumed = train_to_end(b, job["id"])["loss_history"]
    assert [s for s, _ in resumed] == list(range(1, 8))
    for (s1, l1), (s2, l2) in zip(straight, resumed):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-6)


def test_saved_adapter_loads_with_plain_peft_in_a_fresh_process_with_the_same_logits(
    stepped, tmp_path
):
    job = stepped.tune("herb", RECORDS, max_steps=5, **FAST)
    train_to_end(stepped, job["id"])
    ids = torch.tensor([stepped.core.loaded.tokenizer("Color of moonveil?")["input_ids"]])
    with torch.no_grad():
        mine = stepped.core.runner.forward(
            ids, mask=torch.ones_like(ids), position_ids=None, adapters=["herb"]
        )
    out = tmp_path / "logits.pt"
    script = f"""
import torch
from peft import PeftModel
from fineinfer_jupyter.engine.models import load_model
base = load_model("tiny").model
model = PeftModel.from_pretrained(base, {str(stepped.home / "adapters" / "herb")!r}).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.tensor({ids.tolist()})).logits, {str(out)!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    theirs = torch.load(out)
    assert torch.allclose(mine, theirs, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        base = stepped.core.runner.forward(
            ids, mask=torch.ones_like(ids), position_ids=None, adapters=[None]
        )
    assert not torch.allclose(base, theirs, atol=1e-3)


def plain_peft_losses(records, p: TrainParams, steps: int) -> list[float]:
    """The reference: a textbook PEFT loop, one forward over each whole effective batch."""
    loaded = load_model("tiny")
    data = build_dataset(records, loaded.tokenizer, max_length=p.max_length, seed=p.seed)
    torch.manual_seed(p.seed)
    config = LoraConfig(
        r=p.r,
        lora_alpha=p.lora_alpha,
        target_modules="all-linear",
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(loaded.model, config)
    model.eval()
    trainable = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=p.learning_rate, weight_decay=p.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, p.warmup_steps, steps)
    n = len(data.train)
    losses = []
    for step in range(steps):
        idx = []
        for pos in range(step * p.batch_size, (step + 1) * p.batch_size):
            epoch, i = divmod(pos, n)
            order = list(range(n))
            random.Random(p.seed * 100_003 + epoch).shuffle(order)
            idx.append(order[i])
        batch = collate([data.train[i] for i in idx], loaded.tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, p.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_engine_loss_at_each_step_equals_a_plain_peft_loop(stepped):
    records = RECORDS + [{"text": "Herbology is the study of plants, real and invented."}]
    p = TrainParams(
        **dict(
            FAST, batch_size=3, micro_batch_size=1, warmup_steps=2, learning_rate=5e-3, max_steps=6
        )
    )
    expected = plain_peft_losses(records, p, 6)
    job = train_to_end(stepped, stepped.tune("herb", records, p)["id"])
    got = [loss for _, loss in job["loss_history"]]
    assert got == pytest.approx(expected, rel=1e-5)


def test_a_request_on_a_training_adapter_is_pinned_to_a_snapshot(stepped, tmp_path):
    job = stepped.tune("herb", RECORDS, max_steps=6, **FAST)
    while stepped.job(job["id"])["step"] < 2:
        stepped.iterate()
    at_two = stepped.save_adapter("herb", tmp_path / "herb-at-2")["saved_to"]
    stream = stepped.generate(
        chat(RECORDS[0]["prompt"]), adapter="herb", max_new_tokens=12, ignore_eos=True
    )
    stepped.iterate()  # prefill: pinned to herb@2
    assert stepped.core.adapters.snapshots == ["herb@2"]
    while stream.final is None:
        stepped.core.trainer.micro_step()  # training moves on while the request decodes
        stepped.iterate()
    assert stepped.job(job["id"])["step"] > 2
    loaded = load_model("tiny")
    model = PeftModel.from_pretrained(loaded.model, at_two).eval()
    ids = loaded.tokenizer.apply_chat_template(
        chat(RECORDS[0]["prompt"]), add_generation_prompt=True, tokenize=True, return_dict=False
    )
    ids = torch.tensor([list(ids)])
    ref = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
        min_new_tokens=12,
    )
    assert stream.final["token_ids"] == ref[0, ids.shape[1] :].tolist()
    train_to_end(stepped, job["id"])
    assert not stepped.core.adapters.snapshots  # released once nothing uses them


def test_the_cost_probe_runs_a_backward_pass_and_changes_nothing(stepped):
    model = stepped.core.runner.model
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    stepped.core.runner.train_probe(2, 16)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1] and p.grad is None
    assert (
        stepped.core.scheduler.costs.train.samples
    )  # calibrated at load: a training step's cost is known


def test_one_job_trains_at_a_time_and_the_next_waits(stepped):
    a = stepped.tune("first", RECORDS, max_steps=2, **FAST)
    b = stepped.tune("second", RECORDS, max_steps=2, **FAST)
    stepped.iterate()
    assert stepped.job(a["id"])["state"] == "running" and stepped.job(b["id"])["state"] == "queued"
    train_to_end(stepped, b["id"])
    assert stepped.job(a["id"])["state"] == "done" and stepped.job(b["id"])["state"] == "done"
    assert {x["name"] for x in stepped.list_adapters()} == {"first", "second"}


def test_job_reports_progress_eval_loss_and_rates(stepped):
    records = RECORDS * 3
    job = train_to_end(
        stepped,
        stepped.tune("herb", records, max_steps=4, val_fraction=0.25, eval_every=2, **FAST)["id"],
    )
    assert job["step"] == job["total_steps"] == 4
    assert job["val_examples"] == 3 and job["examples"] == 9
    assert job["eval_loss"] is not None and math.isfinite(job["eval_loss"])
    assert job["tokens_per_s"] > 0 and job["samples_per_s"] > 0
    assert job["epoch"] == pytest.approx(4 * 4 / 9, rel=1e-3)
    on_disk = json.loads((stepped.home / "jobs" / job["id"] / "job.json").read_text())
    assert on_disk["state"] == "done" and on_disk["step"] == 4


def test_epochs_set_the_number_of_steps(stepped):
    job = stepped.tune("herb", RECORDS * 2, epochs=3, **FAST)
    assert job["total_steps"] == 6


def test_nan_loss_fails_the_job_and_keeps_the_last_good_checkpoint(stepped, monkeypatch):
    job = stepped.tune("herb", RECORDS, max_steps=10, **dict(FAST, checkpoint_every=2))
    while stepped.job(job["id"])["step"] < 3:
        stepped.iterate()
    saved_dir = stepped.home / "jobs" / job["id"] / "checkpoint-000002"
    good = (saved_dir / "adapter_model.safetensors").read_bytes()
    real = stepped.core.runner.micro_step

    def diverged(batch, scale):
        run = real(batch, scale=scale)
        run.run(run.units)
        run.loss_sum = float("nan")
        return run

    monkeypatch.setattr(stepped.core.runner, "micro_step", diverged)
    stepped.iterate()
    monkeypatch.setattr(stepped.core.runner, "micro_step", real)
    failed = stepped.job(job["id"])
    assert failed["state"] == "failed" and "loss" in failed["error"] and "nan" in failed["error"]
    assert (saved_dir / "adapter_model.safetensors").read_bytes() == good
    assert not (stepped.home / "adapters" / "herb").exists()  # never saved by a failed job
    assert stepped.list_adapters()[0]["step"] == 2  # usable, at its last good weights
    assert stepped.complete(chat("hi"), adapter="herb", max_new_tokens=3).finish_reason in (
        "length",
        "eos",
    )
    stepped.resume_job(job["id"])
    assert train_to_end(stepped, job["id"])["state"] == "done"


def test_cancel_drops_an_unsaved_adapter(stepped):
    job = stepped.tune("herb", RECORDS, max_steps=10, **FAST)
    stepped.iterate()
    assert stepped.cancel_job(job["id"])["state"] == "cancelled"
    assert stepped.list_adapters() == []
    assert stepped.complete("hi", max_new_tokens=2).finish_reason in ("length", "eos")


@pytest.mark.parametrize(
    "adapter, data, params, error, message",
    [
        ("herb", [], {}, DataError, "no records"),
        (
            "herb",
            [{"prompt": "x", "completion": ""}],
            {"max_length": 8},
            DataError,
            "nothing to learn",
        ),
        ("herb", [{"question": "x"}], {}, DataError, "unrecognised record"),
        ("train", RECORDS, {}, ValueError, "adapter: 'train' is a reserved name"),
        ("bad name", RECORDS, {}, ValueError, "adapter:"),
        ("herb", RECORDS, {"learning_rate": -1}, ValueError, "learning_rate:"),
        (
            "herb",
            RECORDS,
            {"batch_size": 2, "micro_batch_size": 4},
            ValueError,
            "micro_batch_size:",
        ),
        ("herb", RECORDS, {"r": 0}, ValueError, "r:"),
        ("herb", RECORDS, {"lora_dropout": 0.1}, ValueError, "lora_dropout:"),
        ("herb", RECORDS, {"nonsense": 1}, ValueError, "params: unknown parameter(s) 'nonsense'"),
    ],
)
def test_bad_jobs_are_refused_before_they_start(stepped, adapter, data, params, error, message):
    with pytest.raises(error) as info:
        stepped.tune(adapter, data, params)
    assert message in str(info.value)
    assert stepped.jobs() == []


def test_malformed_jsonl_names_the_file_and_line(stepped, tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + "{oops\n")
    with pytest.raises(DataError, match=r"notes.jsonl line 2: not valid JSON"):
        stepped.tune("herb", str(path))


def test_a_taken_name_is_refused(stepped, adapter_dirs):
    stepped.load_adapter("alpha", adapter_dirs["alpha"])
    with pytest.raises(NameTaken):
        stepped.tune("alpha", RECORDS)
    stepped.tune("herb", RECORDS, max_steps=1)
    with pytest.raises(NameTaken):
        stepped.tune("herb", RECORDS)


def test_a_batchs_micro_steps_take_its_longest_examples_first_and_pad_less(stepped):
    """Examples of about the same length share a micro-step (each pads to its longest), the
    longest first, out of the same effective batch (its losses: the plain-loop test above)."""
    words = "moonveil glimmerroot vesperine ashbloom dewcap".split()
    records = [{"text": " ".join(words[: 1 + i % 5] * (1 + 3 * (i % 3)))} for i in range(12)]
    p = dict(FAST, batch_size=6, micro_batch_size=2, max_steps=4)
    job_id = stepped.tune("sorted", records, **p)["id"]
    trainer, saved = stepped.core.trainer, 0
    for step in range(4):
        got = [trainer.work(1 << 30).padded for _ in range(3)]
        job = trainer.current or trainer.get(job_id)
        lengths = [job.dataset.train[i].num_tokens for i in job.batch_indices(step)]
        ordered = sorted(lengths, reverse=True)
        assert got == [2 * max(ordered[k : k + 2]) for k in (0, 2, 4)], (step, lengths)
        shuffled = sum(2 * max(lengths[k : k + 2]) for k in (0, 2, 4))
        saved += shuffled - sum(got)
        assert stepped.job(job_id)["step"] == step + 1
    assert saved > 0  # the data is such that the batch's own order pads more
