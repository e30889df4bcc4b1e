"""A training job as a folder that trains the same adapter on many GPUs or nodes with the
field's tools (transformers' Trainer with PEFT, launched by accelerate or torchrun).

The folder (docs/design.md, "Beyond one machine"):

    job.json                 what train.py reads: the parameters, the base model (its folder and
                             shape hash), the pad token, the engine's own loss curve
    data/train.jsonl         the examples as the engine shaped them, {"input_ids", "labels"}
    data/val.jsonl           its held-out examples, if any
    data/<original>          the data the job was given (its file, or its inline records)
    base/                    a base model built in code ("tiny"), saved; others are referenced
    train.py                 engine/job_train.py
    accelerate_config.yaml   one node, `processes` processes (DDP)
    README.md                the commands for one node and for several
"""

from __future__ import annotations

import importlib.metadata
import json
import shlex
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import check
from .data import Dataset
from .storage import atomic_dir

TRAIN = Path(__file__).with_name("job_train.py")
MARKER = "job.json"  # a folder holding it (and train.py) is an earlier export: replaced
WRITTEN = {MARKER, "train.py", "accelerate_config.yaml", "README.md", "data", "base"}
PORT = 29500


@dataclass
class BaseModel:
    """The base model as the exported job names it."""

    name: str
    path: str | None  # its Hugging Face folder; None: built in code, saved with the job (base/)
    shape_hash: str  # models.shape_hash: train.py checks the model it loads against it
    dtype: str  # the engine's: "float32", "bfloat16", "float16"


def versions() -> dict:
    """The versions of the libraries train.py uses, as the engine has them."""
    found = {}
    for name in ("torch", "transformers", "peft", "accelerate"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def default_processes(batch_size: int) -> int:
    """The most processes, up to 8 (a node's GPUs), that split the effective batch evenly."""
    return max(k for k in (1, 2, 4, 8) if batch_size % k == 0)


def check_processes(processes: int, batch_size: int) -> None:
    fits = [k for k in range(1, batch_size + 1) if batch_size % k == 0]
    check(
        isinstance(processes, int) and not isinstance(processes, bool) and processes >= 1,
        "processes",
        "must be a positive integer",
    )
    check(
        batch_size % processes == 0,
        "processes",
        f"{processes} does not split the effective batch of {batch_size} examples evenly "
        f"(one of {', '.join(map(str, fits[:12]))})",
    )


def check_target(out: Path) -> None:
    """`out` is new, empty, or an earlier export holding only what an export writes (replaced
    whole); nothing else is replaced, a training run's output/ neither."""
    if not out.exists():
        return
    check(out.is_dir(), "path", f"{out.name} exists and is not a folder")
    earlier = (out / MARKER).is_file() and (out / "train.py").is_file()
    check(
        earlier or not any(out.iterdir()),
        "path",
        f"{out.name} exists and is not an exported job; give a new folder",
    )
    others = sorted(p.name for p in out.iterdir() if p.name not in WRITTEN)
    check(
        not others,
        "path",
        f"{out.name} holds {', '.join(others[:3])} besides an exported job; they would be "
        "deleted: give a new folder",
    )


def write(
    out: Path,
    job: dict,
    dataset: Dataset,
    base: BaseModel,
    *,
    processes: int,
    pad_id: int,
    original: Path | None,
    save_base=None,
    versions: dict | None = None,
) -> dict:
    """Write the job's folder at `out` (whole, or not at all). `job`: its record (Job.to_dict,
    with its whole loss_history). `save_base(folder)` writes the base model and its tokenizer
    when it has no folder of its own."""
    check_processes(processes, job["params"]["batch_size"])
    check_target(out)
    base_ref = base.path
    with atomic_dir(out) as tmp:
        data = tmp / "data"
        data.mkdir()
        _jsonl(data / "train.jsonl", dataset.train)
        if dataset.val:
            _jsonl(data / "val.jsonl", dataset.val)
        if original is not None and original.is_dir():  # a datasets save_to_disk folder
            shutil.copytree(original, data / "original")
        elif original is not None:
            shutil.copyfile(original, data / f"original{original.suffix}")
        if base.path is None:
            save_base(tmp / "base")
            base_ref = "base"
        spec = {
            "job": job["id"],
            "adapter": job["adapter"],
            "params": job["params"],
            "total_steps": job["total_steps"],
            "examples": len(dataset.train),
            "val_examples": len(dataset.val),
            "pad_token_id": pad_id,
            "base_model": {**asdict(base), "path": base_ref},
            "data": {
                "train": "data/train.jsonl",
                "val": "data/val.jsonl" if dataset.val else None,
                "original": f"data/original{original.suffix}" if original else None,
            },
            "engine": {
                "state": job["state"],
                "step": job["step"],
                "loss_history": job["loss_history"],
                "versions": versions or {},
            },
        }
        (tmp / MARKER).write_text(json.dumps(spec, indent=1))
        shutil.copyfile(TRAIN, tmp / "train.py")
        (tmp / "accelerate_config.yaml").write_text(accelerate_config(processes))
        (tmp / "README.md").write_text(readme(out, spec, processes))
    return {
        "job": job["id"],
        "adapter": job["adapter"],
        "path": str(out),
        "files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()),
        "processes": processes,
        "base_model": {
            **asdict(base),
            "path": str(out / base_ref) if base.path is None else base.path,
        },
        "commands": commands(out, processes),
    }


def _jsonl(path: Path, examples) -> None:
    with path.open("w") as f:
        for e in examples:
            f.write(json.dumps({"input_ids": e.input_ids, "labels": e.labels}) + "\n")


def accelerate_config(processes: int) -> str:
    """One machine, `processes` processes with DDP (`accelerate config` writes the same)."""
    return (
        "# accelerate launch --config_file accelerate_config.yaml train.py\n"
        "# several nodes: add --num_machines, --machine_rank, --main_process_ip (README.md);\n"
        "# FSDP or DeepSpeed: run `accelerate config` and launch with the file it writes\n"
        "compute_environment: LOCAL_MACHINE\n"
        "distributed_type: MULTI_GPU\n"
        "mixed_precision: 'no'\n"
        "num_machines: 1\n"
        "machine_rank: 0\n"
        f"num_processes: {processes}\n"
        "gpu_ids: all\n"
        "rdzv_backend: static\n"
        "same_network: true\n"
        "main_training_function: main\n"
        "use_cpu: false\n"
    )


def commands(out: Path, processes: int) -> list[str]:
    q = shlex.quote(str(out))
    return [
        f"cd {q}",
        f"accelerate launch --config_file accelerate_config.yaml --num_processes {processes} train.py",
        f"torchrun --nproc-per-node {processes} train.py",
        "# then: %fineinfer load NAME output/adapter (copied back under the Jupyter root)",
    ]


def readme(out: Path, spec: dict, processes: int) -> str:
    p, base = spec["params"], spec["base_model"]
    effective = p["batch_size"]
    fits = ", ".join(str(k) for k in range(1, effective + 1) if effective % k == 0)
    losses = spec["engine"]["loss_history"]
    curve = ", ".join(f"{s}: {v:.4f}" for s, v in losses[:5]) + (" ..." if len(losses) > 5 else "")
    versions = ", ".join(f"{k} {v}" for k, v in spec["engine"]["versions"].items())
    return f"""# {spec["adapter"]} ({spec["job"]}): the fineinfer job, for many GPUs or nodes

Written by `%fineinfer export-job`. `train.py` trains the same LoRA adapter as the engine's
job with transformers' Trainer and PEFT: the same {spec["examples"]} tokenized examples
(`data/train.jsonl`, chat template, masked prompts and max_length {p["max_length"]} applied) in
the same order, an effective batch of {effective} examples per optimizer step (the loss a mean
over its label tokens), r={p["r"]}, lora_alpha={p["lora_alpha"]}, target_modules
{p["target_modules"]!r}, lr {p["learning_rate"]} (cosine, {p["warmup_steps"]} warm-up steps),
weight decay {p["weight_decay"]}, gradient clipping {p["max_grad_norm"]}, seed {p["seed"]},
{spec["total_steps"]} optimizer steps. It needs torch, transformers, peft and accelerate
(the engine ran {versions or "its own"}), not fineinfer.

Base model: {base["name"]} at `{base["path"]}` ({base["dtype"]}, shape hash {base["shape_hash"]}).
On another machine, copy that folder too and pass `--base-model PATH`; train.py refuses a model
whose parameters' names and shapes differ.

The effective batch is split as micro-batch x accumulation x processes: run a number of
processes that divides {effective} ({fits}). `--micro-batch-size N` sets the examples per
forward on each process (the accumulation follows); the gradients, and the losses, stay the
engine's up to float rounding.

## One node, several GPUs

```bash
accelerate launch --config_file accelerate_config.yaml train.py          # {processes} processes
accelerate launch --config_file accelerate_config.yaml --num_processes 2 train.py
torchrun --nproc-per-node {processes} train.py
```

## Several nodes

On each of M nodes with G GPUs each (M x G must divide {effective}); RANK is 0 on the first:

```bash
accelerate launch --config_file accelerate_config.yaml --num_machines M --num_processes $((M*G)) \\
    --machine_rank RANK --main_process_ip FIRST_NODE_IP --main_process_port {PORT} train.py
torchrun --nnodes M --nproc-per-node G --node-rank RANK \\
    --master-addr FIRST_NODE_IP --master-port {PORT} train.py
```

With Slurm, the same lines inside `srun` with RANK=$SLURM_NODEID. FSDP or DeepSpeed: run
`accelerate config`, then `accelerate launch --config_file <its file> train.py`. Without GPUs
(a try-out): `torchrun --nproc-per-node 2 train.py` trains on CPU processes (gloo).

## Back into the notebook

The adapter is written to `output/adapter` (`--output DIR` for another place), a PEFT folder
with `fineinfer.json` naming the base model. Copy it under the Jupyter root and load it:

```
%fineinfer load {spec["adapter"]}_dist path/to/output/adapter
```

The engine checks it fits its base model (the shape hash, and every LoRA pair's shape).
`output/loss_history.json` has the loss of every step; the engine's own run had
{curve or "no steps yet"} (`job.json`, "engine").
"""
