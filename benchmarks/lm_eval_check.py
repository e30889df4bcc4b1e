"""lm-evaluation-harness against a real server: base model vs a freshly trained adapter.

Starts `jupyter server` with fineinfer (the default model, or --model tiny), runs lm-eval's
`local-completions` on two tasks of invented facts (benchmarks/lm_eval_tasks/fineinfer_facts:
a multiple-choice task, scored with echo + logprobs, and a generation task), trains an adapter
on those facts through the REST API, runs them again on the adapter, and prints a table
(saved to benchmarks/out/lm_eval_check.json and .png). Not part of `make test`.

    pip install -e '.[eval]'    # lm-eval; or any Python with lm-eval: --lm-eval-python PATH
    python benchmarks/lm_eval_check.py [--model tiny] [--steps 40]

lm-eval only talks HTTP to the server, so it may live in another environment.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, save_bar_plot, table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = Path(__file__).resolve().parent / "lm_eval_tasks" / "fineinfer_facts"
TASK_NAMES = {"fineinfer_facts_mc": "acc,none", "fineinfer_facts_gen": "exact_match,strip"}


class Server:
    """`jupyter server` with fineinfer in a subprocess, and JSON calls to it."""

    def __init__(self, model: str, workdir: Path):
        self.token = secrets.token_hex(16)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.log = open(workdir / "server.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyter_server",
                "--no-browser",
                f"--port={self.port}",
                f"--IdentityProvider.token={self.token}",
                f"--ServerApp.root_dir={workdir}",
                "--allow-root",  # (a container's root user)
                "--ServerApp.jpserver_extensions={'fineinfer_jupyter': True}",
                f"--FineInferApp.model={model}",
                f"--FineInferApp.data_dir={workdir / 'data'}",
            ],  # fmt: skip
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def call(self, method: str, path: str, body=None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"null")

    def ready(self, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited; see {self.log.name}")
            try:
                status = self.call("GET", "fineinfer/api/status")
                if status["state"] == "ready":
                    return status
                if status["state"] == "error":
                    raise RuntimeError(status["error"])
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(1)
        raise TimeoutError("the model did not load")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def tokenizer_folder(status: dict, workdir: Path) -> str:
    """A folder lm-eval's Hugging Face tokenizer loads: the model's own, or the tiny one's."""
    path = status["model"]["path"]
    if path and (Path(path) / "tokenizer_config.json").is_file():
        return path
    from fineinfer_jupyter.engine.models import load_model

    folder = workdir / "tokenizer"
    load_model("tiny").tokenizer.save_pretrained(folder)
    return str(folder)


def lm_eval(python: str, server: Server, model: str, tokenizer: str, out: Path) -> dict:
    """lm-eval's local-completions on the two tasks; {task: score}."""
    args = ",".join([
        f"model={model}",
        f"base_url={server.url}fineinfer/v1/completions",
        f"tokenizer={tokenizer}",
        "tokenizer_backend=huggingface",
        "tokenized_requests=True",
        "num_concurrent=1",
        "max_retries=1",
        "timeout=300",
    ])  # fmt: skip
    command = [
        python, "-m", "lm_eval", "--model", "local-completions", "--model_args", args,
        "--tasks", ",".join(TASK_NAMES), "--include_path", str(TASKS), "--batch_size", "4",
        "--output_path", str(out), "--log_samples",
    ]  # fmt: skip
    env = {**os.environ, "OPENAI_API_KEY": server.token, "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    start = time.monotonic()
    done = subprocess.run(command, cwd=TASKS, env=env, capture_output=True, text=True)
    print(done.stdout[-3000:])
    if done.returncode != 0:
        print(done.stderr[-5000:], file=sys.stderr)
        raise SystemExit(f"lm-eval failed on {model}")
    results = json.loads(max(out.rglob("results_*.json"), key=os.path.getmtime).read_text())
    scores = {task: results["results"][task][metric] for task, metric in TASK_NAMES.items()}
    return {**scores, "seconds": time.monotonic() - start}


def train(server: Server, adapter: str, steps: int, lr: float) -> dict:
    records = []
    for line in (TASKS / "facts.jsonl").read_text().splitlines():
        fact = json.loads(line)
        records.append({"text": f"Question: {fact['question']}\nAnswer: {fact['answer']}."})
    params = {"max_steps": steps, "learning_rate": lr, "batch_size": 4, "r": 16, "seed": 0}
    job = server.call("POST", "fineinfer/api/jobs", {"adapter": adapter, "records": records,
                                                     "params": params})  # fmt: skip
    while job["state"] in ("queued", "running"):
        time.sleep(2)
        job = server.call("GET", f"fineinfer/api/jobs/{job['id']}")
    if job["state"] != "done":
        raise SystemExit(f"training {job['state']}: {job['error']}")
    return job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help='"default", "tiny" or a model path')
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of the adapter")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lm-eval-python", default=sys.executable,
                        help="a Python with lm-eval installed (default: this one)")  # fmt: skip
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="fineinfer-lm-eval-"))
    server = Server(args.model, workdir)
    try:
        status = server.ready()
        tokenizer = tokenizer_folder(status, workdir)
        name = status["model"]["name"]
        print(f"model {name} ready; tokenizer {tokenizer}; work in {workdir}")
        results = {
            "base": lm_eval(args.lm_eval_python, server, "base", tokenizer, workdir / "base")
        }
        start = time.monotonic()
        job = train(server, "facts", args.steps, args.lr)
        trained = time.monotonic() - start
        print(f"trained 'facts': {job['step']} steps in {trained:.0f} s, loss {job['loss']:.3f}")
        results["facts"] = lm_eval(args.lm_eval_python, server, "facts", tokenizer, workdir / "ad")
    finally:
        server.stop()
    rows = [[task, results["base"][task], results["facts"][task]] for task in TASK_NAMES]
    print(f"\nlm-eval local-completions, model {name}, adapter 'facts' ({args.steps} steps):")
    print(table(["task", "base", "adapter facts"], rows))
    print(f"lm-eval seconds: base {results['base']['seconds']:.0f}, "
          f"adapter {results['facts']['seconds']:.0f}; training {trained:.0f} s "
          "(a shared 2-core machine: times are noisy)")  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    report = {"model": name, "steps": args.steps, "lr": args.lr, "train_seconds": trained,
              "final_loss": job["loss"], "results": results}  # fmt: skip
    (OUT / "lm_eval_check.json").write_text(json.dumps(report, indent=2))
    labels = [
        f"{t.removeprefix('fineinfer_facts_')} {m}" for t in TASK_NAMES for m in ("base", "facts")
    ]
    values = [100 * results[m][t] for t in TASK_NAMES for m in ("base", "facts")]
    save_bar_plot(OUT / "lm_eval_check.png", labels, values, title=f"lm-eval on {name}",
                  ylabel="score (%)")  # fmt: skip


if __name__ == "__main__":
    main()
