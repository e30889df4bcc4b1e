"""A load test: 100 streaming clients over loopback against a real server while a job trains,
and the engine is restarted twice under that load."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections import Counter

import psutil
import pytest
from server_fixtures import post_streamed
from test_training import RECORDS
from tornado.simple_httpclient import SimpleAsyncHTTPClient

from fineinfer_jupyter.launch import JupyterProcess

pytestmark = [pytest.mark.timeout(300), pytest.mark.realtime]
CLIENTS = 100
WARM_UP = 10.0  # seconds of load before the reference RSS
LOAD = 35.0  # seconds clients keep sending (warm-up included)
RESTARTS = (15.0, 25.0)  # seconds into the load when the engine is restarted
REQUEST_TIMEOUT = 60.0  # a request that takes longer hangs


class Load:
    def __init__(self, server: JupyterProcess):
        self.server = server
        self.client = SimpleAsyncHTTPClient(force_instance=True, max_clients=CLIENTS)
        self.outcomes: Counter[str] = Counter()
        self.steady: Counter[str] = Counter()  # outcomes of requests sent with no restart near
        self.restarting = False
        self.restarts_begun = 0  # a request that spans a whole restart is not "calm" either
        self.ready_seconds: list[float] = []  # from each restart to ready
        self.answered: Counter[int] = Counter()  # requests each client got through
        self.tokens = 0

    async def one(self, rng: random.Random) -> str:
        """One streamed request: NDJSON generate (base or the training adapter) or an OpenAI
        chat completion streamed as server-sent events."""
        n = rng.randint(4, 24)
        if rng.random() < 0.2:
            path = "fineinfer/v1/chat/completions"
            body = {"model": rng.choice(["base", "herb"]), "max_tokens": n, "stream": True,
                    "messages": [{"role": "user", "content": rng.choice(RECORDS)["prompt"]}]}  # fmt: skip
        else:
            path = "fineinfer/api/generate"
            body = {"prompt": rng.choice(RECORDS)["prompt"], "max_new_tokens": n,
                    "adapter": rng.choice([None, None, None, "herb"])}  # fmt: skip
        response, chunks = await post_streamed(
            self.client, self.server.url + path, self.server.token, body, timeout=REQUEST_TIMEOUT
        )
        text = b"".join(chunks).decode()
        if response.code == 599:
            return "hang" if "Timeout" in str(response.error) else "connection"
        if response.code != 200:
            assert json.loads(text)["error"]["message"], text  # an explicit JSON error
            return f"http {response.code}"
        if path.endswith("generate"):
            final = json.loads(text.splitlines()[-1])
            self.tokens += len(final.get("token_ids", []))
            return "done" if final["type"] == "done" else "error event"
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        ended = events[-1] == "[DONE]" and "error" not in json.loads(events[-2])
        return "done" if ended else "error event"

    async def call(self, method: str, path: str) -> tuple[int, dict]:
        response = await self.client.fetch(
            self.server.url + path,
            method=method,
            body=b"" if method == "POST" else None,
            headers={"Authorization": f"token {self.server.token}"},
            request_timeout=REQUEST_TIMEOUT,
            raise_error=False,
        )
        return response.code, json.loads(response.body) if response.body else {}

    async def restart(self, job_id: str) -> None:
        """Restart the engine, wait for it, and resume the job it interrupted."""
        self.restarting, start = True, time.monotonic()
        self.restarts_begun += 1
        before = (await self.call("GET", f"fineinfer/api/jobs/{job_id}"))[1]
        code, status = await self.call("POST", "fineinfer/api/engine/restart")
        assert code == 200, status
        while (await self.call("GET", "fineinfer/api/status"))[1]["state"] != "ready":
            await asyncio.sleep(0.2)
        self.ready_seconds.append(round(time.monotonic() - start, 1))
        after = (await self.call("GET", f"fineinfer/api/jobs/{job_id}"))[1]
        assert after["state"] == "interrupted" and after["step"] >= before["step"], (before, after)
        code, job = await self.call("POST", f"fineinfer/api/jobs/{job_id}/resume")
        assert code == 200 and job["state"] == "queued", job
        self.restarting = False

    async def client_loop(self, i: int, until: float) -> None:
        rng = random.Random(i)
        while time.monotonic() < until:
            calm, begun = not self.restarting, self.restarts_begun
            outcome = await self.one(rng)
            calm = calm and not self.restarting and begun == self.restarts_begun
            self.outcomes[outcome] += 1
            if calm:
                self.steady[outcome] += 1
            self.answered[i] += 1
            if outcome in ("http 429", "http 503"):
                await asyncio.sleep(1.0)  # Retry-After: 1


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


async def sample_rss(pid: int, seconds: float = 2.0) -> float:
    values = []
    for _ in range(5):
        values.append(rss(pid))
        await asyncio.sleep(seconds / 5)
    return statistics.median(values)


def test_100_streaming_clients_while_a_job_trains_all_answered_and_memory_flat(tmp_path):
    with JupyterProcess(tmp_path / "root", model="tiny", base=tmp_path / "server") as server:
        server.wait_ready(120)
        status, job = server.call("POST", "fineinfer/api/jobs", {
            "adapter": "herb", "records": RECORDS * 8,
            "params": {"r": 8, "batch_size": 4, "micro_batch_size": 2, "max_steps": 100_000,
                       "max_length": 64, "checkpoint_every": 20}})  # fmt: skip
        assert status == 201, job
        deadline = time.monotonic() + 60
        while server.call("GET", f"fineinfer/api/jobs/{job['id']}")[1]["step"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        figures = asyncio.run(run_load(server, job["id"]))
        status, after = server.call("GET", f"fineinfer/api/jobs/{job['id']}")
        assert status == 200 and after["state"] == "running" and after["step"] > 1
        status = server.call("GET", "fineinfer/api/status")[1]
        assert status["state"] == "ready" and status["restarts"] == len(RESTARTS)
    outcomes = figures["outcomes"]
    print("load:", json.dumps({**figures, "job_steps": after["step"]}))
    assert set(outcomes) <= {"done", "http 429", "http 503", "error event"}, outcomes  # explicit
    assert figures["fewest_per_client"] >= 2  # nobody starved
    steady = figures["steady"]  # away from the restarts, every request is answered in full
    assert set(steady) == {"done"} and steady["done"] >= CLIENTS, figures
    growth = (figures["rss_end"] - figures["rss_warm"]) / figures["rss_warm"]
    assert abs(growth) <= 0.10, figures


async def run_load(server: JupyterProcess, job_id: str) -> dict:
    load = Load(server)
    start = time.monotonic()
    clients = [asyncio.ensure_future(load.client_loop(i, start + LOAD)) for i in range(CLIENTS)]
    await asyncio.sleep(WARM_UP)
    rss_warm = await sample_rss(server.process.pid)
    for at in RESTARTS:
        await asyncio.sleep(max(0.0, start + at - time.monotonic()))
        await load.restart(job_id)
    await asyncio.wait_for(asyncio.gather(*clients), LOAD + REQUEST_TIMEOUT + 30)
    rss_end = await sample_rss(server.process.pid)
    load.client.close()
    return {
        "clients": CLIENTS,
        "seconds": round(time.monotonic() - start, 1),
        "requests": sum(load.outcomes.values()),
        "outcomes": dict(load.outcomes),
        "steady": dict(load.steady),
        "ready_after_restart_s": load.ready_seconds,
        "tokens": load.tokens,
        "fewest_per_client": min(load.answered[i] for i in range(CLIENTS)),
        "restarts": len(RESTARTS),
        "rss_warm": rss_warm,
        "rss_end": rss_end,
    }
