"""Real server processes killed or stopped at bad moments: SIGTERM while a job trains (or while
the engine thread is stuck), SIGKILL mid-training then a new server on the same data directory,
and SIGKILL during adapter saves."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from test_training import RECORDS

from fineinfer_jupyter.engine.config import EngineConfig
from fineinfer_jupyter.engine.engine import Engine
from fineinfer_jupyter.engine.training import HOLD_STEP
from fineinfer_jupyter.launch import JupyterProcess

pytestmark = [pytest.mark.timeout(300), pytest.mark.realtime]
PARAMS = {"r": 8, "lora_alpha": 16, "learning_rate": 1e-2, "batch_size": 4,
          "micro_batch_size": 2, "max_length": 64}  # fmt: skip


def server(tmp_path, name: str) -> JupyterProcess:
    return JupyterProcess(
        tmp_path / "root", model="tiny", data_dir=tmp_path / "data", base=tmp_path / name
    ).start()


def until(server: JupyterProcess, path: str, predicate, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while True:
        status, body = server.call("GET", path)
        if status == 200 and predicate(body):
            return body
        assert time.monotonic() < deadline, (path, status, body, server.log_tail())
        time.sleep(0.1)


def start_job(server: JupyterProcess, **params) -> dict:
    status, job = server.call(
        "POST", "fineinfer/api/jobs", {"adapter": "herb", "records": RECORDS, "params": params}
    )
    assert status == 201, job
    return job


# Seconds from SIGTERM to exit that "stops in seconds" allows: the engine's part is bounded by
# its own give-up (2 s when stuck) and logged; the rest is Jupyter's cleanup and the interpreter
# unloading torch, transformers and bitsandbytes, which took 2-5 s here on a quiet machine and
# more under load. A server that waits for the job (minutes) or the stuck thread (forever) fails.
EXIT_BOUND = 10.0


def terminate(server: JupyterProcess) -> float:
    """Seconds from SIGTERM to the process's exit."""
    start = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no exit 30 s after SIGTERM\n{server.log_tail()}")
    return time.monotonic() - start


def held_at(monkeypatch, step: int) -> None:
    """Servers started from here on hold a job at `step` (the engine's test-only hook in
    training.py), so that a test acts at a known step: the job cannot finish or move on
    between the test's look and its action."""
    monkeypatch.setenv(HOLD_STEP, str(step))


def test_sigterm_while_a_job_trains_stops_the_server_in_seconds_and_keeps_its_progress(
    tmp_path, monkeypatch
):
    held_at(monkeypatch, 3)
    first = server(tmp_path, "first")
    try:
        first.wait_ready(120)
        job = start_job(first, **PARAMS, max_steps=100_000, checkpoint_every=1000)
        until(first, f"fineinfer/api/jobs/{job['id']}", lambda j: j["step"] == 3)
        seconds = terminate(first)
        print(f"sigterm while training: exit after {seconds:.2f} s")
        assert seconds < EXIT_BOUND, first.log_tail()
    finally:
        first.stop()
    monkeypatch.delenv(HOLD_STEP)
    second = server(tmp_path, "second")
    try:
        second.wait_ready(120)
        status, again = second.call("GET", f"fineinfer/api/jobs/{job['id']}")
        assert status == 200 and again["state"] == "interrupted" and again["step"] == 3
        assert again["checkpoint"].endswith(f"checkpoint-{again['step']:06d}")  # at shutdown
        status, adapters = second.call("GET", "fineinfer/api/adapters")
        assert [(a["name"], a["job"], a["step"]) for a in adapters["adapters"]] == [
            ("herb", job["id"], again["step"])
        ]
    finally:
        second.stop()


STUCK = """
import os, threading

marker = os.environ.get("FINEINFER_TEST_STUCK")
if marker:  # the engine thread blocks for good in a micro-step once `marker` exists
    from fineinfer_jupyter.engine import training

    work = training.Trainer.work

    def stuck(self, *args, **kwargs):
        if os.path.exists(marker):
            threading.Event().wait()
        return work(self, *args, **kwargs)

    training.Trainer.work = stuck
"""


def test_sigterm_stops_the_server_in_seconds_even_when_the_engine_thread_is_stuck(
    tmp_path, monkeypatch
):
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(textwrap.dedent(STUCK))
    marker = tmp_path / "stuck-now"
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(inject), os.environ.get("PYTHONPATH", "")])
    )
    monkeypatch.setenv("FINEINFER_TEST_STUCK", str(marker))
    process = server(tmp_path, "stuck")
    try:
        process.wait_ready(120)
        job = start_job(process, **PARAMS, max_steps=100_000)
        until(process, f"fineinfer/api/jobs/{job['id']}", lambda j: j["step"] >= 1)
        marker.touch()  # from the next micro-step on, the engine thread is stuck for good
        deadline = time.monotonic() + 15
        while True:  # until a call that needs the engine thread hangs (a timeout): stuck
            try:
                status, body = process.call("GET", "fineinfer/api/jobs", timeout=2)
            except OSError:
                break
            assert time.monotonic() < deadline, (status, body, process.log_tail())
        seconds = terminate(process)
        print(f"sigterm with the engine thread stuck: exit after {seconds:.2f} s")
        assert seconds < EXIT_BOUND, process.log_tail()
        assert "the engine thread did not stop within 2 s" in process.log.read_text()
    finally:
        process.stop()


def uninterrupted_losses(tmp_path, **params) -> list:
    with Engine(EngineConfig(model="tiny", data_dir=tmp_path / "alone"), thread=False) as engine:
        job = engine.tune("herb", RECORDS, **params)
        while engine.core.trainer.active:
            engine.iterate()
        return engine.job(job["id"])["loss_history"]


def test_sigkill_mid_training_then_a_new_server_resumes_the_job_to_the_same_final_loss(
    tmp_path, monkeypatch
):
    params = {**PARAMS, "max_steps": 12, "checkpoint_every": 3}
    expected = uninterrupted_losses(tmp_path, **params)
    held_at(monkeypatch, 7)  # past the checkpoint of step 6, and the job cannot end first
    first = server(tmp_path, "first")
    try:
        first.wait_ready(120)
        job = start_job(first, **params)
        until(first, f"fineinfer/api/jobs/{job['id']}", lambda j: j["step"] == 7)
        os.killpg(first.process.pid, signal.SIGKILL)
        first.process.wait(10)
    finally:
        first.stop()
    monkeypatch.delenv(HOLD_STEP)
    second = server(tmp_path, "second")
    try:
        second.wait_ready(120)
        status, jobs = second.call("GET", "fineinfer/api/jobs")
        assert status == 200 and [(j["id"], j["state"]) for j in jobs["jobs"]] == [
            (job["id"], "interrupted")
        ]
        assert jobs["jobs"][0]["step"] == 6  # its last checkpoint
        status, resumed = second.call("POST", f"fineinfer/api/jobs/{job['id']}/resume")
        assert status == 200 and resumed["state"] == "queued", resumed
        done = until(second, f"fineinfer/api/jobs/{job['id']}", lambda j: j["state"] == "done")
    finally:
        second.stop()
    assert [s for s, _ in done["loss_history"]] == list(range(1, 13))
    assert [v for _, v in done["loss_history"]] == pytest.approx([v for _, v in expected], rel=1e-5)
    assert done["loss"] == pytest.approx(expected[-1][1], rel=1e-5)


SAVER = """
import json, sys
from pathlib import Path

import torch
from peft import LoraConfig

from fineinfer_jupyter.engine import storage
from fineinfer_jupyter.engine.adapters import AdapterStore
from fineinfer_jupyter.engine.models import load_model
from fineinfer_jupyter.engine.runner import Runner

folder, fallback = Path(sys.argv[1]), sys.argv[2] == "fallback"
if fallback:  # as on a system without renameat2: two renames, with recover() between
    storage._exchange = lambda a, b: False
store = AdapterStore(Runner(load_model("tiny").model, device=torch.device("cpu")), folder.parent)
store.create("herb", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
version = json.loads((folder / "fineinfer.json").read_text())["step"] if folder.exists() else 0
first = version + 1
while True:
    version += 1
    with torch.no_grad():
        for layer in store._lora_layers():
            layer.lora_B["herb"].weight.fill_(version)
    store.save("herb", folder, {"step": version})
    if version == first:
        print("saved once", flush=True)  # the kill comes after: each run adds a version
"""


def test_a_kill_during_an_adapter_save_always_leaves_the_previous_adapter_whole(tmp_path):
    """A process saves one adapter over and over (its lora_B weights = its version), and is
    SIGKILLed at a random moment, many times; the folder must always be one whole version."""
    from safetensors.torch import load_file

    from fineinfer_jupyter.engine.adapter_check import check_lora_folder
    from fineinfer_jupyter.engine.models import load_model
    from fineinfer_jupyter.engine.storage import recover

    script = tmp_path / "saver.py"
    script.write_text(textwrap.dedent(SAVER))
    folder = tmp_path / "adapters" / "herb"
    shapes = None
    rng = random.Random(5)
    versions = []
    for kill in range(12):
        mode = "fallback" if kill % 2 else "exchange"
        saver = subprocess.Popen(
            [sys.executable, str(script), str(folder), mode], stdout=subprocess.PIPE, text=True
        )
        assert saver.stdout.readline() == "saved once\n"
        time.sleep(rng.uniform(0.05, 0.6))
        saver.send_signal(signal.SIGKILL)
        saver.wait()
        recover(folder)  # what every reader does first
        meta = json.loads((folder / "fineinfer.json").read_text())
        weights = load_file(str(folder / "adapter_model.safetensors"))
        b = {float(v.flatten()[0]) for k, v in weights.items() if "lora_B" in k}
        assert b == {float(meta["step"])}, (kill, mode, meta, b)  # one whole version
        shapes = shapes or _shapes(load_model)
        check_lora_folder(folder, shapes)  # and it loads
        versions.append(meta["step"])
    assert versions == sorted(set(versions))  # every run saved a new version before its kill
    leftovers = [p.name for p in folder.parent.iterdir() if p.name != "herb"]
    assert all(p.startswith(".herb.") for p in leftovers)  # only scratch, never read as data


def _shapes(load_model):
    from fineinfer_jupyter.engine.adapter_check import layer_shapes

    return layer_shapes(load_model("tiny").model)
