"""%fineinfer export-job: a job the engine trained, trained again by transformers' Trainer on
two processes (accelerate, gloo on CPU), with the engine's losses, and its adapter back in a
running server (docs/design.md, "Beyond one machine")."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fineinfer_jupyter.engine import job_train
from fineinfer_jupyter.engine.config import TrainParams
from fineinfer_jupyter.engine.job import Job
from fineinfer_jupyter.kernel import FineInferError

pytest_plugins = ["kernel_fixtures"]

RECORDS = [
    {"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}, of course."}
    for i in range(10)
]
PARAMS = dict(
    max_steps=4, batch_size=4, micro_batch_size=1, learning_rate=1e-2, r=4, lora_alpha=8, seed=3
)
# Trainer sees the same examples in the same order, each optimizer step the same effective
# batch of 4 (2 processes x 2 micro-batches of 1 here, 4 micro-steps of 1 in the engine), and
# divides the summed token losses by the label tokens of the whole effective batch as the
# engine does: the losses differ only by float32 rounding (sums in another order, the gloo
# all-reduce). Measured here: a relative difference of ~1e-7 over 4 steps.
LOSS_RTOL = 1e-4
BF16_RTOL = 1e-2  # bf16 keeps 8 bits of mantissa (~4e-3 a rounding); measured ~1e-3 here


@pytest.fixture(scope="module")
def trained(client):
    job = client.tune("dist", records=RECORDS, **PARAMS)
    return client.wait(job["id"], timeout=120)


def test_an_exported_job_trains_on_two_processes_with_the_engines_losses_and_loads_back(
    client, server_root, trained
):
    out = server_root / "jobs" / "dist"
    result = client.export_job("dist", out, processes=2)
    assert result["path"] == str(out) and result["processes"] == 2
    assert {"train.py", "job.json", "accelerate_config.yaml", "README.md"} <= set(result["files"])
    assert "data/train.jsonl" in result["files"] and "data/original.jsonl" in result["files"]
    assert result["base_model"]["path"] == str(out / "base")  # tiny is built in code: saved
    spec = json.loads((out / "job.json").read_text())
    assert spec["engine"]["loss_history"] == trained["loss_history"]

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("FINEINFER_SERVER_URL", None)
    run = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch"]
        + ["--config_file", "accelerate_config.yaml", "train.py"],
        cwd=out,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    adapter = out / "output" / "adapter"
    meta = json.loads((adapter / "fineinfer.json").read_text())
    assert (meta["processes"], meta["step"]) == (2, PARAMS["max_steps"])

    theirs = json.loads((out / "output" / "loss_history.json").read_text())
    ours = trained["loss_history"]
    assert [s for s, _ in theirs] == [s for s, _ in ours] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(theirs, ours, strict=True):
        assert a == pytest.approx(b, rel=LOSS_RTOL)

    with pytest.raises(FineInferError) as kept:  # exporting again would delete the run
        client.export_job("dist", out, processes=2)
    assert kept.value.message == (
        "path: dist holds output besides an exported job; they would be deleted: give a new folder"
    )

    client.save_adapter("dist", server_root / "dist-engine")
    engine_weights = load_file(server_root / "dist-engine" / "adapter_model.safetensors")
    exported_weights = load_file(adapter / "adapter_model.safetensors")
    assert engine_weights.keys() == exported_weights.keys()
    for key, value in engine_weights.items():
        torch.testing.assert_close(exported_weights[key], value, rtol=1e-4, atol=1e-5)

    loaded = client.load_adapter("dist_2p", adapter)
    assert (loaded["name"], loaded["step"]) == ("dist_2p", PARAMS["max_steps"])
    prompt = [{"role": "user", "content": "What is 3 plus 3?"}]
    answers = [
        client.complete(messages=prompt, adapter=name, max_new_tokens=12)
        for name in ("dist_2p", "dist")
    ]
    assert answers[0]["usage"]["completion_tokens"] > 0
    assert answers[0]["text"] == answers[1]["text"]

    other = server_root / "other-base"
    shutil.copytree(adapter, other)
    meta["base_model"]["shape_hash"] = "00000000"
    (other / "fineinfer.json").write_text(json.dumps(meta))
    with pytest.raises(FineInferError) as refused:
        client.load_adapter("dist_other", other)
    assert refused.value.status == 400
    assert refused.value.message.startswith(
        "path: other-base was trained on tiny (shape hash 00000000); this engine's base model "
        "has shape hash "
    )


def test_export_job_refusals_are_one_line_and_write_nothing(client, server_root, trained):
    (server_root / "mine").mkdir()
    (server_root / "mine" / "notes.txt").write_text("mine")
    cases = [
        ({"processes": 3}, 400, "processes: 3 does not split the effective batch of 4 examples"),
        ({"path": "/etc/dist"}, 400, "path: '/etc/dist' is outside the server's root directory"),
        ({"path": "mine"}, 400, "path: mine exists and is not an exported job; give a new folder"),
    ]
    for kwargs, status, message in cases:
        with pytest.raises(FineInferError) as e:
            client._json("POST", f"jobs/{trained['id']}/export", kwargs)
        assert (e.value.status, e.value.message[: len(message)]) == (status, message), kwargs
    with pytest.raises(FineInferError) as e:
        client._json("POST", "jobs/job-999/export", {})
    assert e.value.status == 404
    assert (server_root / "mine" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (server_root / "mine").iterdir()) == ["notes.txt"]

    default = client._json("POST", f"jobs/{trained['id']}/export", {})  # in the data directory
    assert default["path"].endswith(f"/jobs/{trained['id']}/export") and default["processes"] == 4


def test_export_job_magic_prints_where_and_the_commands(kernel, server_root, trained):
    run = kernel.run("%fineinfer export-job dist out/dist-job --processes 2")
    out = server_root / "out" / "dist-job"
    assert run.stdout.splitlines()[:2] == [
        f"exported {trained['id']} ('dist') for accelerate / torchrun:",
        f"  {out}",
    ], run.stderr
    assert (
        "  accelerate launch --config_file accelerate_config.yaml --num_processes 2 train.py"
        in (run.stdout.splitlines())
    )
    assert (out / "train.py").is_file()
    assert kernel.run("%fineinfer help").stdout.count("%fineinfer export-job NAME_OR_ID") == 1


@pytest.mark.parametrize("n, batch_size, steps, seed", [(10, 4, 7, 3), (3, 4, 5, 0), (8, 8, 1, -2)])
def test_train_py_takes_the_examples_in_the_engines_order(n, batch_size, steps, seed):
    params = TrainParams(batch_size=batch_size, max_steps=steps, seed=seed)
    job = Job("job-1", "a", params, None, Path("/nonexistent"), examples=n)
    engine = [i for step in range(steps) for i in job.batch_indices(step)]
    assert job_train.engine_order(n, batch_size, steps, seed) == engine


def test_train_py_splits_the_effective_batch_over_processes_and_micro_batches():
    assert job_train.split(8, 2, 1) == (1, 4)  # micro x accumulation x processes = 8
    assert job_train.split(12, 2, 4) == (3, 2)  # 6 per process: the largest micro <= 4 dividing it
    with pytest.raises(SystemExit, match="run 1, 2, 4 processes"):
        job_train.split(4, 3, 1)


def test_a_job_read_back_after_a_restart_exports_the_same_and_trains_alone_in_bf16(tmp_path):
    """The engine in bf16: the export names the dtype, train.py (one process, no launcher) loads
    the base in it, and its losses are the engine's at bf16's precision. A job read back after
    a restart has no data set in memory: it is built again from its (unchanged) file."""
    from fineinfer_jupyter.engine import Engine, EngineConfig

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    config = EngineConfig(model="tiny", data_dir=tmp_path / "fi", dtype="bfloat16")
    with Engine(config) as engine:
        job = engine.wait_job(engine.tune("b", str(data), **PARAMS)["id"], timeout=120)
        first = engine.export_job(job["id"], tmp_path / "first")
    with Engine(config) as engine:
        again = engine.export_job(job["id"], tmp_path / "again", processes=1)
    assert again["base_model"]["dtype"] == "bfloat16" and first["processes"] == 4
    for name in ("data/train.jsonl", "data/original.jsonl"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "first" / name).read_bytes()
    assert (tmp_path / "again" / "data" / "original.jsonl").read_bytes() == data.read_bytes()

    run = subprocess.run(
        [sys.executable, "train.py", "--output", str(tmp_path / "out")],
        cwd=tmp_path / "again",
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = json.loads((tmp_path / "out" / "loss_history.json").read_text())
    for (s, a), (t, b) in zip(theirs, job["loss_history"], strict=True):
        assert s == t and a == pytest.approx(b, rel=BF16_RTOL)


def test_train_py_refuses_a_base_model_of_other_shapes_and_hashes_as_the_engine_does():
    from transformers import LlamaConfig, LlamaForCausalLM

    from fineinfer_jupyter.engine.models import build_tiny, shape_hash

    tiny = build_tiny()[0]
    base = {"name": "tiny", "shape_hash": shape_hash(tiny)}
    job_train.check_base(tiny, base, "base")  # the same model: nothing to say
    small = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    with pytest.raises(SystemExit, match="other is not the base model this job trained on"):
        job_train.check_base(LlamaForCausalLM(small), base, "other")
