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
import time
from pathlib import Path

import psutil

# libgomp (torch's Linux wheels): spin 1000 turns, then sleep; LLVM's / Intel's OpenMP: sleep
WAIT = {"GOMP_SPINCOUNT": "1000", "KMP_BLOCKTIME": "0"}
WAITING = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "KMP_LIBRARY")
THREADS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
SYS_CPU = Path("/sys/devices/system/cpu")  # each CPU's topology: hyper-threads of one core
CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # a cgroup v2 CPU quota (containers)

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
        siblings = SYS_CPU / f"cpu{cpu}" / "topology" / "thread_siblings_list"
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, min(len(cores), cgroup_quota() or len(cores)))


def cgroup_quota(cpu_max: Path | None = None) -> int | None:
    """The cgroup v2 CPU quota in whole cores (rounded up), or None without one."""
    try:
        quota, period = (cpu_max or CPU_MAX).read_text().split()
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
_follower: LoadFollower | None = None  # the default count follows the machine's load


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
    global _follower
    _follower = LoadFollower.for_this_machine(threads) if source == "default" else None
    _chosen = {
        "intra_op": torch.get_num_threads(),
        "source": source,
        "wait_policy": waiting["policy"],
        "note": waiting["note"],
        "follows_load": _follower is not None,
    }
    return current()


def follow_load() -> None:
    """Between two iterations, in the thread that runs the engine's math: with the default
    count, use the cores other programs left (LoadFollower). Cheap when nothing is due."""
    if _follower is None or _chosen is None:
        return
    changed = _follower.poll()
    _chosen["others_busy"] = round(_follower.others, 2)
    if changed is not None:
        import torch

        torch.set_num_threads(changed)
        _chosen["intra_op"] = torch.get_num_threads()


class LoadFollower:
    """How many threads to use when other programs keep some cores busy. A parallel region
    ends when its slowest thread does: with two threads on two cores and a neighbour holding
    one of them, every region waits for the thread that shares the neighbour's core, and one
    thread ran a micro-step up to ~1.8x faster (docs/benchmarks.md, "Sharing the cores").

    Every `interval` seconds: the cores busy on the machine (psutil.cpu_times) minus this process's
    own CPU time (os.times) is what the others use; the count becomes the cores they leave,
    at least one, at most `cores`. A new count is taken when two readings in a row agree."""

    def __init__(
        self,
        cores: int,
        cpus: int,
        *,
        interval: float = 1.0,
        busy=None,  # () -> seconds all CPUs were busy since boot
        own=None,  # () -> seconds of CPU this process used
        clock=time.monotonic,
    ):
        self.cores, self.cpus, self.interval = cores, cpus, interval
        self.busy, self.own, self.clock = busy or machine_busy_seconds, own or own_seconds, clock
        self.threads = cores
        self.others = 0.0  # cores other programs kept busy over the last interval
        self.pending: int | None = None  # a count seen once, taken if the next reading agrees
        self.last = self._sample()

    @classmethod
    def for_this_machine(cls, cores: int) -> LoadFollower | None:
        """None when the machine's CPU counters do not cover exactly the CPUs this process runs
        on (a container limited to some of the host's CPUs, or by a quota): there the load
        they show is not the load on our cores."""
        if cls.why_not() is not None:
            return None
        try:  # (its first reading fails where the counters do)
            return cls(cores, len(psutil.cpu_times(percpu=True)))
        except (OSError, ValueError, AttributeError, psutil.Error):
            return None

    @staticmethod
    def why_not() -> str | None:
        """Why the machine's load says nothing about our cores here, or None."""
        try:
            listed = set(range(len(psutil.cpu_times(percpu=True))))
        except (OSError, AttributeError, psutil.Error) as e:
            return f"no per-CPU counters ({e})"
        mine = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else listed
        if listed != mine:
            return f"the machine has {len(listed)} CPUs, this process may use {sorted(mine)}"
        if cgroup_quota() is not None:
            return f"a cgroup CPU quota applies ({CPU_MAX}: {CPU_MAX.read_text().strip()})"
        return None

    def _sample(self) -> tuple[float, float, float]:
        return self.clock(), self.busy(), self.own()

    def poll(self) -> int | None:
        """The new thread count when it changed, else None."""
        t0, busy0, own0 = self.last
        if self.clock() - t0 < self.interval:
            return None
        self.last = t1, busy1, own1 = self._sample()
        self.others = max(0.0, (busy1 - busy0) - (own1 - own0)) / max(t1 - t0, 1e-9)
        free = self.cores * (1 - min(self.others, self.cpus) / self.cpus)
        want = max(1, min(self.cores, round(free)))
        if want == self.threads:
            self.pending = None
            return None
        if want != self.pending:
            self.pending = want
            return None
        self.threads, self.pending = want, None
        return want


def machine_busy_seconds() -> float:
    """Seconds all CPUs were busy since boot (not idle, not waiting for I/O; guest time is
    counted in user)."""
    t = psutil.cpu_times()
    return t.user + t.system + sum(getattr(t, k, 0.0) for k in ("nice", "irq", "softirq", "steal"))


def own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def current() -> dict | None:
    """The choice as status() shows it (None before an engine was built)."""
    return dict(_chosen) if _chosen is not None else None
