"""A load test: 100 streaming clients over loopback against a real server while a job trains."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections import Counter

import psutil
import pytest
from test_training import RECORDS
from tornado.simple_httpclient import SimpleAsyncHTTPClient

from fineinfer_jupyter.launch import JupyterProcess

pytestmark = pytest.mark.timeout(300)
CLIENTS = 100
WARM_UP = 10.0  # seconds of load before the reference RSS
LOAD = 40.0  # seconds clients keep sending (warm-up included)
REQUEST_TIMEOUT = 60.0  # a request that takes longer hangs


class Load:
    def __init__(self, server: JupyterProcess):
        self.server = server
        self.client = SimpleAsyncHTTPClient(force_instance=True, max_clients=CLIENTS)
        self.outcomes: Counter[str] = Counter()
        self.answered: Counter[int] = Counter()  # requests each client got through
        self.tokens = 0

    async def one(self, rng: random.Random) -> None:
        """One streamed request: NDJSON generate (base or the training adapter) or an OpenAI
        chat completion streamed as server-sent events."""
        n = rng.randint(4, 24)
        chunks: list[bytes] = []
        if rng.random() < 0.2:
            path = "fineinfer/v1/chat/completions"
            body = {"model": rng.choice(["base", "herb"]), "max_tokens": n, "stream": True,
                    "messages": [{"role": "user", "content": rng.choice(RECORDS)["prompt"]}]}  # fmt: skip
        else:
            path = "fineinfer/api/generate"
            body = {"prompt": rng.choice(RECORDS)["prompt"], "max_new_tokens": n,
                    "adapter": rng.choice([None, None, None, "herb"])}  # fmt: skip
        response = await self.client.fetch(
            self.server.url + path,
            method="POST",
            body=json.dumps(body),
            headers={"Authorization": f"token {self.server.token}"},
            streaming_callback=chunks.append,
            request_timeout=REQUEST_TIMEOUT,
            raise_error=False,
        )
        text = b"".join(chunks).decode()
        if response.code == 599:
            self.outcomes["hang" if "Timeout" in str(response.error) else "connection"] += 1
        elif response.code != 200:
            self.outcomes[f"http {response.code}"] += 1  # an explicit JSON error
            assert json.loads(text)["error"]["message"], text
        elif path.endswith("generate"):
            final = json.loads(text.splitlines()[-1])
            self.outcomes[final["type"] if final["type"] == "done" else "error event"] += 1
            self.tokens += len(final.get("token_ids", []))
        else:
            events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
            ended = events[-1] == "[DONE]" and "error" not in json.loads(events[-2])
            self.outcomes["done" if ended else "error event"] += 1

    async def client_loop(self, i: int, until: float) -> None:
        rng = random.Random(i)
        while time.monotonic() < until:
            await self.one(rng)
            self.answered[i] += 1


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
        figures = asyncio.run(run_load(server))
        status, after = server.call("GET", f"fineinfer/api/jobs/{job['id']}")
        assert status == 200 and after["state"] == "running" and after["step"] > 1
        assert server.call("GET", "fineinfer/api/status")[1]["state"] == "ready"
    outcomes = figures["outcomes"]
    print("load:", json.dumps({**figures, "job_steps": after["step"]}))
    assert set(outcomes) <= {"done", "http 429", "http 503", "error event"}, outcomes
    assert figures["fewest_per_client"] >= 2  # nobody starved
    assert outcomes["done"] >= 0.95 * figures["requests"]  # nearly all answered in full
    growth = (figures["rss_end"] - figures["rss_warm"]) / figures["rss_warm"]
    assert abs(growth) <= 0.10, figures


async def run_load(server: JupyterProcess) -> dict:
    load = Load(server)
    start = time.monotonic()
    clients = [asyncio.ensure_future(load.client_loop(i, start + LOAD)) for i in range(CLIENTS)]
    await asyncio.sleep(WARM_UP)
    rss_warm = await sample_rss(server.process.pid)
    await asyncio.wait_for(asyncio.gather(*clients), LOAD + REQUEST_TIMEOUT + 30)
    rss_end = await sample_rss(server.process.pid)
    load.client.close()
    return {
        "clients": CLIENTS,
        "seconds": round(time.monotonic() - start, 1),
        "requests": sum(load.outcomes.values()),
        "outcomes": dict(load.outcomes),
        "tokens": load.tokens,
        "fewest_per_client": min(load.answered[i] for i in range(CLIENTS)),
        "rss_warm": rss_warm,
        "rss_end": rss_end,
    }
