"""POST /fineinfer/api/engine/restart: a failed engine is reported and rebuilt without
restarting the server."""

from __future__ import annotations

import asyncio
import threading

import pytest
from test_training import RECORDS

pytest_plugins = ["pytest_jupyter.jupyter_server", "server_fixtures"]
pytestmark = [pytest.mark.timeout(180), pytest.mark.realtime]
PARAMS = {"r": 4, "lora_alpha": 8, "batch_size": 1, "max_length": 64, "checkpoint_every": 2}


async def test_a_failed_engine_is_reported_and_restarted_without_restarting_the_server(
    ready_api, monkeypatch
):
    api, host = ready_api, ready_api.app.host
    body = {"adapter": "herb", "records": RECORDS, "params": {**PARAMS, "max_steps": 100_000}}
    code, job = await api.post("jobs", body)
    assert code == 201
    await api.until(f"jobs/{job['id']}", lambda j: j["step"] >= 2)
    broken = host.engine
    monkeypatch.setattr(broken.core.scheduler, "schedule", lambda *a, **k: 1 / 0)
    status = await api.until("status", lambda s: s["state"] == "error")
    assert status["error"] == "engine loop failed: ZeroDivisionError: division by zero"
    # "error" shows while the thread still checkpoints and frees the model (Engine._close); a
    # restart before it ends waits SHUTDOWN_TIMEOUT and may answer 409: wait for the thread
    await asyncio.get_running_loop().run_in_executor(None, broken._thread.join, 60)
    code, answer = await api.post("generate", {"prompt": "hi", "max_new_tokens": 3})
    assert code == 503 and answer["error"]["message"] == (
        "engine failed: engine loop failed: ZeroDivisionError: division by zero (POST "
        "fineinfer/api/engine/restart starts it again)"
    )
    code, restarted = await api.post("engine/restart")
    assert code == 200 and restarted["state"] == "loading" and restarted["restarts"] == 1
    status = await api.ready()
    assert host.engine is not broken and status["adapters"] == ["herb"]  # saved as it stopped
    events = await api.generate({"prompt": "hi", "max_new_tokens": 3})
    assert events[-1]["type"] == "done"
    code, again = await api.get(f"jobs/{job['id']}")
    assert again["state"] == "interrupted" and again["step"] >= 2
    assert (await api.post(f"jobs/{job['id']}/resume"))[0] == 200
    await api.until(f"jobs/{job['id']}", lambda j: j["state"] == "running")
    assert (await api.post(f"jobs/{job['id']}/cancel"))[0] == 200


async def test_a_restart_waits_a_few_seconds_for_a_stuck_engine_thread_then_says_so(
    ready_api, monkeypatch
):
    api, host = ready_api, ready_api.app.host
    engine, release, entered = host.engine, threading.Event(), threading.Event()
    real = engine.core.iterate

    def stuck():
        entered.set()
        release.wait(60)
        return real()

    monkeypatch.setattr(engine.core, "iterate", stuck)
    pending = asyncio.ensure_future(api.generate({"prompt": "hi", "max_new_tokens": 3}))
    while not entered.is_set():  # its request woke the engine thread, which is stuck from here
        await asyncio.sleep(0.01)
    code, answer = await api.post("engine/restart")
    assert code == 409 and answer["error"]["message"] == (
        "the engine thread did not stop within 2 s (it is inside a long operation); try again, "
        "or restart the server"
    )
    events = await asyncio.wait_for(pending, 5)  # its request was answered, not left hanging
    assert events[-1]["type"] == "error"
    assert events[-1]["message"].startswith("engine is shutting down")
    release.set()
    await asyncio.get_running_loop().run_in_executor(None, engine._thread.join, 30)
    assert not engine.alive  # the old thread has ended: the next restart finds it stopped
    code, restarted = await api.post("engine/restart")
    assert code == 200 and restarted["restarts"] == 1
    await api.ready()
    assert (await api.generate({"prompt": "hi", "max_new_tokens": 3}))[-1]["type"] == "done"
