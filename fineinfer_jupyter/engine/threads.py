"""How many threads the engine's math uses, and how OpenMP threads wait for work, so that a
busy neighbour slows the engine in proportion to the cores it takes (docs/design.md, "Sharing
the machine").

A parallel region ends when its slowest thread does. torch's OpenMP threads spin while they
wait (libgomp: 300,000 turns): when another program holds one of the cores, a region waits
for a thread the OS has descheduled while its partner spins on the other core, and a LoRA
micro-step takes 10-80x longer. Sleeping at once costs ~2x on a quiet machine (a wake-up per
region); a short spin (GOMP_SPINCOUNT=1000) costs nothing measurable there and behaves like
sleeping under load (docs/benchmarks.md, "Sharing the cores"). OpenMP reads this once, when
its runtime starts with `import torch`, so `set_wait_policy()` runs before that: from the
engine package's first lines and the server extension's load hook. No torch import here.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

# libgomp (torch's Linux wheels): spin 1000 turns, then sleep; LLVM's / Intel's OpenMP: sleep
WAIT = {"GOMP_SPINCOUNT": "1000", "KMP_BLOCKTIME": "0"}
WAITING = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "KMP_LIBRARY")
THREADS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

_waiting: dict | None = None  # what set_wait_policy() found and did, once per process


def set_wait_policy() -> dict:
    """Make OpenMP threads spin only briefly before they sleep, unless the user chose a policy
    or torch has already started (then say so). Safe to call again: the first call decides."""
    global _waiting
    if _waiting is None:
        own = {k: os.environ[k] for k in WAITING if k in os.environ}
        if own == WAIT:  # a process that set it started this one (a kernel, a terminal)
            _waiting = {
                "policy": "short spin, then sleep",
                "note": "GOMP_SPINCOUNT=1000 and KMP_BLOCKTIME=0 inherited from the process "
                "that started this one",
            }
        elif own:
            policy = ", ".join(f"{k}={v}" for k, v in own.items())
            _waiting = {"policy": policy, "note": f"kept your {policy}"}
        elif "torch" in sys.modules:
            _waiting = {
                "policy": "OpenMP default (long spin)",
                "note": "torch was imported before fineinfer_jupyter.engine, so OpenMP threads "
                "spin while they wait and a busy neighbour can slow the engine ten-fold: import "
                "fineinfer_jupyter.engine first, or set GOMP_SPINCOUNT=1000 in the environment "
                "that starts Python",
            }
        else:
            os.environ.update(WAIT)
            _waiting = {
                "policy": "short spin, then sleep",
                "note": "GOMP_SPINCOUNT=1000 and KMP_BLOCKTIME=0 set before torch started "
                "(processes started from here inherit them)",
            }
    return _waiting


def usable_cores() -> int:
    """Physical cores this process may run on: its CPU affinity, hyper-threads of one core
    counted once, capped by a cgroup CPU quota (containers)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count())
    cores = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, min(len(cores), cgroup_quota() or len(cores)))


def cgroup_quota(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """The cgroup v2 CPU quota in whole cores (rounded up), or None without one."""
    try:
        quota, period = cpu_max.read_text().split()
        return math.ceil(int(quota) / int(period))
    except (OSError, ValueError):  # no cgroup v2, or "max" (no quota)
        return None


def env_threads() -> int | None:
    """The thread count the user gave OpenMP or MKL in the environment (as torch reads it)."""
    for name in THREADS:
        try:
            n = int(os.environ.get(name, "").split(",")[0])
        except ValueError:
            continue
        if n >= 1:
            return n
    return None


_chosen: dict | None = None  # the last configure_threads() choice, for status()


def configure_threads(setting: int | None) -> dict:
    """Set torch's intra-op thread count at engine build, in the engine's thread (the count is
    that thread's, and the default for threads started later): `setting` if given, else the
    user's OMP_NUM_THREADS / MKL_NUM_THREADS, else the usable cores."""
    global _chosen
    import torch

    if setting is not None:
        threads, source = setting, "setting"
    elif env_threads() is not None:
        threads, source = env_threads(), "environment"
    else:
        threads, source = usable_cores(), "default"
    torch.set_num_threads(threads)
    waiting = set_wait_policy()
    _chosen = {
        "intra_op": torch.get_num_threads(),
        "source": source,
        "wait_policy": waiting["policy"],
        "note": waiting["note"],
    }
    return current()


def current() -> dict | None:
    """The choice as status() shows it (None before an engine was built)."""
    return dict(_chosen) if _chosen is not None else None
