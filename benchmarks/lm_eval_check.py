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
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(Path(__file__).parent), str(REPO)]
from common import OUT, save_bar_plot, table  # noqa: E402

from fineinfer_jupyter.launch import JupyterProcess  # noqa: E402

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks" / "fineinfer_facts"
TASK_NAMES = {"fineinfer_facts_mc": "acc,none", "fineinfer_facts_gen": "exact_match,strip"}


def call(server: JupyterProcess, method: str, path: str, body=None):
    status, answer = server.call(method, path, body, timeout=60)
    if status >= 400:
        raise SystemExit(f"{method} {path}: {status} {answer}")
    return answer


def tokenizer_folder(status: dict, workdir: Path) -> str:
    """A folder lm-eval's Hugging Face tokenizer loads: the model's own, or the tiny one's."""
    path = status["model"]["path"]
    if path and (Path(path) / "tokenizer_config.json").is_file():
        return path
    from fineinfer_jupyter.engine.models import load_model

    folder = workdir / "tokenizer"
    load_model("tiny").tokenizer.save_pretrained(folder)
    return str(folder)


def lm_eval(python: str, server: JupyterProcess, model: str, tokenizer: str, out: Path) -> dict:
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
    samples = max(out.rglob("samples_fineinfer_facts_gen_*.jsonl"), key=os.path.getmtime)
    answers = [json.loads(line) for line in samples.read_text().splitlines()]
    answers = {a["doc"]["question"]: a["filtered_resps"][0] for a in answers}
    return {**scores, "seconds": time.monotonic() - start, "answers": answers}


def train(server: JupyterProcess, adapter: str, steps: int, lr: float) -> dict:
    records = []
    for line in (TASKS / "facts.jsonl").read_text().splitlines():
        fact = json.loads(line)
        records.append({"text": f"Question: {fact['question']}\nAnswer: {fact['answer']}."})
    params = {"max_steps": steps, "learning_rate": lr, "batch_size": 4, "r": 16, "seed": 0}
    job = call(server, "POST", "fineinfer/api/jobs", {"adapter": adapter, "records": records,
                                                      "params": params})  # fmt: skip
    while job["state"] in ("queued", "running"):
        time.sleep(2)
        job = call(server, "GET", f"fineinfer/api/jobs/{job['id']}")
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
    os.environ["PYTHONPATH"] = os.pathsep.join(  # the server runs this checkout's code
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    server = JupyterProcess(model=args.model).start()
    workdir = server.base
    try:
        status = server.wait_ready(600)
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
