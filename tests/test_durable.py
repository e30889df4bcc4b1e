"""Durable state: what the engine reads back from its data directory at start, and what it
refuses to overwrite (docs/design.md, "The data directory")."""

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import hf_greedy, run_until_done
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_training import FAST, RECORDS, train_to_end

from fineinfer_jupyter.engine.config import EngineConfig, NameTaken
from fineinfer_jupyter.engine.engine import Engine
from fineinfer_jupyter.engine.job import latest_checkpoint
from fineinfer_jupyter.engine.models import data_slug, load_model


def home_of(data_dir):
    return data_dir / data_slug(load_model("tiny"))


def tiny_engine(data_dir, **kwargs):
    return Engine(EngineConfig(model="tiny", data_dir=data_dir, **kwargs), thread=False)


def save_peft(path, config, seed=3):
    torch.manual_seed(seed)
    get_peft_model(load_model("tiny").model, config).save_pretrained(path)
    return path


def test_the_data_directory_has_one_folder_per_base_model(tmp_path):
    with tiny_engine(tmp_path) as engine:
        engine.tune("herb", RECORDS, max_steps=1, **FAST)
        assert engine.home == home_of(tmp_path)
        assert engine.status()["model"]["data_dir"] == str(engine.home)
        assert engine.home.name.startswith("tiny-") and len(engine.home.name) == len("tiny-") + 8
        assert sorted(p.name for p in tmp_path.iterdir()) == [engine.home.name]
        assert (engine.home / "jobs" / "job-1" / "job.json").is_file()


def test_an_older_flat_layout_is_left_alone_and_the_log_says_how_to_move_it(tmp_path, caplog):
    shutil.copytree(make_good(tmp_path / "elsewhere"), tmp_path / "data" / "adapters" / "old")
    with caplog.at_level(logging.WARNING, "fineinfer"), tiny_engine(tmp_path / "data") as engine:
        assert engine.list_adapters() == []
    assert f"mv {tmp_path / 'data' / 'adapters'} {home_of(tmp_path / 'data')}/" in caplog.text
    assert (tmp_path / "data" / "adapters" / "old" / "adapter_config.json").is_file()


def make_good(path):
    from conftest import make_adapter

    return make_adapter(path, seed=1)


def broken_adapters(root, good):
    """Adapter folders the engine must not serve, and the message each load gives."""
    torn = shutil.copytree(good, root / "torn")
    weights = torn / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    untyped = shutil.copytree(good, root / "untyped")
    config = json.loads((untyped / "adapter_config.json").read_text())
    del config["peft_type"]
    (untyped / "adapter_config.json").write_text(json.dumps(config))
    other = shutil.copytree(good, root / "other")  # as if trained on a 48-wide model
    state = load_file(str(other / "adapter_model.safetensors"))
    state = {k: (v[:, :48] if "lora_A" in k else v).contiguous() for k, v in state.items()}
    save_file(state, str(other / "adapter_model.safetensors"))
    dora = save_peft(root / "dora", LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    ia3 = save_peft(
        root / "ia3", IA3Config(target_modules=["q_proj", "v_proj"], feedforward_modules=[])
    )
    return {
        torn: "the weights do not load (Error while deserializing header",
        untyped: "adapter_config.json has no peft_type",
        other: "down_proj.lora_A.weight has shape [4, 48], the base model's layer takes 128 "
        "features there (an adapter for another base model?)",
        dora: "a DoRA adapter: its magnitude vectors cannot share a pass",
        ia3: "ia3: IA3 adapters are not served, only LoRA ones",
    }


def test_saved_adapters_that_do_not_load_are_skipped_and_the_model_is_untouched(
    tmp_path, caplog, adapter_dirs
):
    adapters = home_of(tmp_path / "data") / "adapters"
    adapters.mkdir(parents=True)
    shutil.copytree(adapter_dirs["alpha"], adapters / "good")
    broken = broken_adapters(adapters, adapter_dirs["alpha"])
    shutil.copytree(adapter_dirs["beta"], adapters / ".good.tmp-1-abcdef01")  # scratch
    (adapters / "notes.txt").write_text("not an adapter")
    with caplog.at_level(logging.ERROR, "fineinfer"), tiny_engine(tmp_path / "data") as engine:
        assert [a["name"] for a in engine.list_adapters()] == ["good"]
        for folder in broken:
            assert f"saved adapter {folder} does not load; skipped" in caplog.text
        tiny = load_model("tiny")
        prompt = "Hello there"
        base = hf_greedy(tiny.model, tiny.tokenizer, prompt, 8, eos_token_id=None)
        good = PeftModel.from_pretrained(load_model("tiny").model, adapter_dirs["alpha"]).eval()
        with_good = hf_greedy(good, tiny.tokenizer, prompt, 8, eos_token_id=None)
        streams = [
            engine.generate(prompt, adapter=a, max_new_tokens=8, ignore_eos=True)
            for a in (None, "good")
        ]
        run_until_done(engine, streams)
        assert [s.final["token_ids"] for s in streams] == [base, with_good]
        for folder, message in broken.items():  # and loading one by hand says why, in a line
            with pytest.raises(ValueError, match="^path: ") as info:
                engine.load_adapter("again", folder)
            assert message in str(info.value), str(info.value)
        assert engine.core.runner.model.peft_config.keys() == {"good"}


def test_a_load_that_fails_half_way_leaves_the_model_as_it_was(stepped, adapter_dirs, monkeypatch):
    import peft.peft_model

    def fail(*args, **kwargs):
        raise RuntimeError("disk went away")

    tiny = load_model("tiny")
    base = hf_greedy(tiny.model, tiny.tokenizer, "Hello", 6, eos_token_id=None)
    with monkeypatch.context() as m:
        m.setattr(peft.peft_model, "set_peft_model_state_dict", fail)
        with pytest.raises(RuntimeError, match="disk went away"):
            stepped.load_adapter("alpha", adapter_dirs["alpha"])  # the first: wraps the model
    assert not stepped.core.runner.peft and stepped.list_adapters() == []
    assert stepped.complete("Hello", max_new_tokens=6, ignore_eos=True).token_ids == base
    stepped.load_adapter("alpha", adapter_dirs["alpha"])
    with monkeypatch.context() as m:
        m.setattr(peft.peft_model, "set_peft_model_state_dict", fail)
        with pytest.raises(RuntimeError, match="disk went away"):
            stepped.load_adapter("beta", adapter_dirs["beta"])
    assert stepped.core.runner.model.peft_config.keys() == {"alpha"}
    stepped.load_adapter("beta", adapter_dirs["beta"])
    assert [a["name"] for a in stepped.list_adapters()] == ["alpha", "beta"]


def test_a_restart_lists_every_job_and_an_interrupted_one_resumes_to_the_same_losses(tmp_path):
    params = dict(FAST, micro_batch_size=2, max_steps=7, checkpoint_every=2)
    with tiny_engine(tmp_path / "straight") as straight_engine:
        straight = train_to_end(
            straight_engine, straight_engine.tune("herb", RECORDS, **params)["id"]
        )
    data = tmp_path / "herb.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    first = tiny_engine(tmp_path / "data")
    train_to_end(first, first.tune("done", RECORDS, max_steps=2, **FAST)["id"])
    stopped = first.tune("paused", str(data), max_steps=5, **FAST)
    while first.job(stopped["id"])["step"] < 1:
        first.iterate()
    first.stop_job(stopped["id"])
    crashed = first.tune("herb", RECORDS, **params)
    while first.job(crashed["id"])["step"] < 5:
        first.iterate()
    first.iterate()  # into step 6: lost with the process
    later = first.tune("later", str(data), max_steps=3, **FAST)
    # the process dies here: no shutdown, nothing more is written
    second = tiny_engine(tmp_path / "data")
    jobs = {j["adapter"]: j for j in second.jobs()}
    assert [j["id"] for j in second.jobs()] == ["job-1", "job-2", "job-3", "job-4"]
    assert {a: (j["state"], j["step"]) for a, j in jobs.items()} == {
        "done": ("done", 2),
        "paused": ("stopped", 1),
        "herb": ("interrupted", 4),
        "later": ("interrupted", 0),
    }
    assert jobs["herb"]["checkpoint"] == str(second.home / "jobs" / "job-3" / "checkpoint-000004")
    assert [s for s, _ in jobs["herb"]["loss_history"]] == [1, 2, 3, 4]
    assert [v for _, v in jobs["herb"]["loss_history"]] == pytest.approx(
        [v for _, v in straight["loss_history"][:4]], rel=1e-5
    )
    assert [a["name"] for a in second.list_adapters()] == ["done", "paused"]  # saved ones
    fresh = second.tune("fresh", RECORDS, max_steps=1, **FAST)
    assert fresh["id"] == "job-5"  # the count goes on
    second.cancel_job(fresh["id"])
    second.resume_job(crashed["id"])
    resumed = train_to_end(second, crashed["id"])
    assert resumed["state"] == "done"
    assert [s for s, _ in resumed["loss_history"]] == list(range(1, 8))
    assert [v for _, v in resumed["loss_history"]] == pytest.approx(
        [v for _, v in straight["loss_history"]], rel=1e-5
    )
    assert second.resume_job(later["id"])["state"] == "queued"  # its file is unchanged
    second.cancel_job(later["id"])
    data.write_text(data.read_text() + json.dumps(RECORDS[0]) + "\n")
    with pytest.raises(ValueError, match=r"^data: .*herb.jsonl changed since job-2 started"):
        second.resume_job(stopped["id"])
    assert second.job(stopped["id"])["state"] == "stopped"


def test_inline_records_are_kept_with_the_job(tmp_path):
    first = tiny_engine(tmp_path)
    job = first.tune("herb", RECORDS, max_steps=3, **FAST)
    kept = first.home / "jobs" / job["id"] / "records.jsonl"
    assert [json.loads(line) for line in kept.read_text().splitlines()] == RECORDS
    record = json.loads((first.home / "jobs" / job["id"] / "job.json").read_text())
    assert record["state"] == "queued" and record["source"] == {"records": "records.jsonl"}
    second = tiny_engine(tmp_path)
    assert second.resume_job(job["id"])["state"] == "queued"
    assert train_to_end(second, job["id"])["state"] == "done"


def test_shutdown_checkpoints_the_running_job_and_the_next_start_resumes_it(tmp_path):
    first = tiny_engine(tmp_path)
    job = first.tune("herb", RECORDS, max_steps=6, **dict(FAST, checkpoint_every=100))
    while first.job(job["id"])["step"] < 3:
        first.iterate()
    first.shutdown()
    second = tiny_engine(tmp_path)
    assert second.job(job["id"])["state"] == "interrupted"
    assert second.job(job["id"])["step"] == 3
    assert second.list_adapters()[0] == {
        "name": "herb",
        "path": str(second.home / "adapters" / "herb"),
        "r": 8,
        "training": False,
        "step": 3,
        "job": job["id"],
    }
    second.resume_job(job["id"])
    assert train_to_end(second, job["id"])["step"] == 6


def test_resume_never_takes_over_an_adapter_name_given_to_another(stepped, adapter_dirs):
    a = stepped.tune("herb", RECORDS, max_steps=6, **FAST)
    while stepped.job(a["id"])["step"] < 2:
        stepped.iterate()
    stepped.stop_job(a["id"])
    stepped.delete_adapter("herb")
    b = train_to_end(stepped, stepped.tune("herb", RECORDS, max_steps=1, **FAST)["id"])
    saved = (stepped.home / "adapters" / "herb" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(NameTaken, match=f"^adapter: 'herb' is now {b['id']}; resuming {a['id']}"):
        stepped.resume_job(a["id"])
    assert stepped.job(a["id"])["state"] == "stopped"
    assert stepped.list_adapters()[0]["job"] == b["id"]
    assert (stepped.home / "adapters" / "herb" / "adapter_model.safetensors").read_bytes() == saved
    stepped.delete_adapter("herb")  # once the name is free, A takes it up again
    stepped.resume_job(a["id"])
    assert train_to_end(stepped, a["id"])["state"] == "done"


def test_a_job_that_finds_its_name_taken_when_it_starts_fails_and_leaves_that_adapter_alone(
    stepped, adapter_dirs
):
    a = stepped.tune("herb", RECORDS, max_steps=6, **FAST)
    while stepped.job(a["id"])["step"] < 2:
        stepped.iterate()
    stepped.stop_job(a["id"])
    stepped.delete_adapter("herb")
    other = stepped.tune("other", RECORDS, max_steps=2, **FAST)
    stepped.resume_job(a["id"])  # queued behind "other"
    with pytest.raises(NameTaken, match=f"^name: {a['id']} is to train an adapter named 'herb'"):
        stepped.load_adapter("herb", adapter_dirs["alpha"])
    stepped.core.adapters.load("herb", adapter_dirs["alpha"])  # (past the engine's own check)
    train_to_end(stepped, other["id"])
    failed = stepped.job(a["id"])
    assert failed["state"] == "failed" and failed["error"].startswith("NameTaken: adapter: 'herb'")
    alpha = PeftModel.from_pretrained(load_model("tiny").model, adapter_dirs["alpha"]).eval()
    tiny = load_model("tiny")
    expected = hf_greedy(alpha, tiny.tokenizer, "Hello", 6, eos_token_id=None)
    got = stepped.complete("Hello", adapter="herb", max_new_tokens=6, ignore_eos=True)
    assert got.token_ids == expected


def test_deleting_an_adapter_in_use_lets_its_requests_finish_then_unloads_it(stepped, adapter_dirs):
    stepped.load_adapter("alpha", adapter_dirs["alpha"])

    def ask():
        return [
            stepped.generate(p, adapter=a, max_new_tokens=10, ignore_eos=True)
            for p, a in (("Hello", "alpha"), ("Hi", None))
        ]

    reference = ask()
    run_until_done(stepped, reference)
    streams = ask()
    while not all(s._queue.qsize() for s in streams):  # both have their first token
        stepped.iterate()
    stepped.delete_adapter("alpha")
    assert stepped.list_adapters() == []
    with pytest.raises(ValueError, match="^adapter: no adapter named 'alpha'"):
        stepped.generate("Hello", adapter="alpha")
    with pytest.raises(NameTaken, match="^name: 'alpha' was deleted but 1 running requests"):
        stepped.load_adapter("alpha", adapter_dirs["alpha"])
    assert "alpha" in stepped.core.runner.model.peft_config  # still loaded for its request
    run_until_done(stepped, streams)
    assert [s.final["token_ids"] for s in streams] == [s.final["token_ids"] for s in reference]
    assert not stepped.core.runner.peft  # unloaded with its last request
    stepped.load_adapter("alpha", adapter_dirs["alpha"])


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_only_whole_checkpoints_count_and_a_set_aside_one_is_put_back(stepped):
    job = stepped.tune("herb", RECORDS, max_steps=10, **FAST)  # checkpoint_every=2
    while stepped.job(job["id"])["step"] < 5:
        stepped.iterate()
    folder = stepped.home / "jobs" / job["id"]
    assert latest_checkpoint(folder) == folder / "checkpoint-000004"
    torn = shutil.copytree(folder / "checkpoint-000004", folder / "checkpoint-000006")
    (torn / "trainer_state.pt").unlink()  # no trainer state: never valid
    pid = dead_pid()
    shutil.copytree(folder / "checkpoint-000004", folder / f".checkpoint-000008.tmp-{pid}-0a1b")
    assert latest_checkpoint(folder) == folder / "checkpoint-000004"
    os.rename(folder / "checkpoint-000004", folder / f".checkpoint-000004.old-{pid}-2c3d")
    assert latest_checkpoint(folder) == folder / "checkpoint-000004"  # a swap cut short: back
    assert (folder / "checkpoint-000004" / "trainer_state.pt").is_file()
