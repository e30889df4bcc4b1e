"""`make gpu-check`: on a CUDA machine, the tests marked `gpu` and short runs of the decode,
train, coserve and offload benchmarks, printed as one table with the GPU's name (each run's
output in benchmarks/out/gpu_check/). Under 8 minutes on one GPU. Without CUDA it says so,
lists what it would run, and exits 0 claiming nothing.

    python benchmarks/gpu_check.py [--list]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, table  # noqa: E402

ROOT = Path(__file__).parent.parent
PY = sys.executable
COSERVE = "--duration 15 --rounds 1 --policies deferred,immediate"
OFFLOAD = "--rounds 2 --duration 10 --windows 1 --skip-rss"
RUNS = [  # (name, command, timeout in seconds): at most 7 minutes in all
    ("tests marked gpu", [PY, "-m", "pytest", "-q", "-rs", "-m", "gpu", "tests"], 150),
    ("decode (quick)", [PY, "benchmarks/decode.py", "--quick"], 60),
    ("train", [PY, "benchmarks/train.py", "--steps", "2", "--rounds", "1"], 60),
    ("coserve", [PY, "benchmarks/coserve.py", *COSERVE.split()], 60),
    ("offload", [PY, "benchmarks/offload.py", *OFFLOAD.split()], 90),
]


def gpu_tests() -> list[str]:
    out = subprocess.run(
        [PY, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "tests"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return [line for line in out.stdout.splitlines() if "::" in line]


def as_text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:90] if lines else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true", help="only list what it runs")
    args = ap.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    if not cuda or args.list:
        if not cuda:
            print("no CUDA device here (torch.cuda.is_available() is False): nothing was run")
        print("\non a CUDA machine `make gpu-check` runs these tests:")
        for test in gpu_tests():
            print(f"  {test}")
        print("\nand these benchmark runs (short flags):")
        for name, cmd, limit in RUNS[1:]:
            print(f"  {name:16s} {' '.join(Path(c).name if c == PY else c for c in cmd)}"
                  f"  (at most {limit} s)")  # fmt: skip
        return
    name = torch.cuda.get_device_name()
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    print(f"GPU: {name}, {memory:.0f} GiB, torch {torch.__version__}", flush=True)
    folder = OUT / "gpu_check"
    folder.mkdir(parents=True, exist_ok=True)
    rows, failed = [], 0
    for what, cmd, limit in RUNS:
        start = time.perf_counter()
        try:
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
            status = "ok" if out.returncode == 0 else f"FAILED ({out.returncode})"
            text = out.stdout + out.stderr
            summary = last_line(out.stdout if status == "ok" else text)
        except subprocess.TimeoutExpired as e:
            text = "".join(as_text(t) for t in (e.stdout, e.stderr))
            status, summary = f"TIMEOUT ({limit} s)", last_line(text)
        failed += status != "ok"
        (folder / f"{what.split()[0]}.txt").write_text(text)
        rows.append([what, status, time.perf_counter() - start, summary])
        print(f"  {what}: {status}", flush=True)
    print(f"\ngpu-check on {name}\n")
    print(table(["run", "status", "seconds", "last line of its output"], rows))
    print(f"outputs: {folder}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
