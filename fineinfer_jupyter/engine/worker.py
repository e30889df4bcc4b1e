"""The training worker: a thread beside the engine thread that runs the compute of training
micro-steps (TrainingPass.run) on one intra-op thread, while the engine thread serves
(docs/design.md, "Threads" and "Sharing the machine").

On a small CPU, two threads each doing their own work on one core use the cores better than
one thread time-slicing inference and training on two OpenMP threads: a short parallel region
pays for waking the other thread. torch releases the GIL inside its ops, so a second Python
thread is enough. Only the pure compute runs here; everything else about a job (starting it,
a micro-step's examples, its end, the optimizer step, checkpoints) stays on the engine thread,
between two runs (Executor.collect), and anything on the engine thread that changes the model's
structure or a job's state waits for the run in flight first (`wait`, Executor.settle).

Whether it is used: `train_thread_choice` (EngineConfig.train_thread, shown in status).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_for

import torch

from .precision import MIN_HIDDEN

log = logging.getLogger("fineinfer")


class TrainWorker:
    """One thread, one run at a time: start(fn) hands it a run, take() (engine thread) gets
    the finished run's future. `wake` is called in the worker after each run (the engine
    thread may be asleep on its inbox with nothing else to do)."""

    def __init__(self, wake: Callable[[], None] | None = None, *, threads: int = 1):
        self.wake = wake
        # the worker's intra-op threads (the count is per OS thread); the engine thread changes
        # it between iterations (Executor._worker_threads), a run takes it up at its next unit
        self.threads = threads
        # set by the engine thread (Executor.execute, from SchedulerOutput.worker_hold; settle
        # and quiesce, before a job or the model changes): the run in flight stops after its
        # unit in progress, so that the engine thread gets every thread back, or goes on,
        # within a unit rather than a whole micro-step
        self.hold = False
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._future: Future | None = None  # the run handed over, until take()
        self._thread = threading.Thread(target=self._main, name="fineinfer-train", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """A run is in flight (not finished yet)."""
        return self._future is not None and not self._future.done()

    @property
    def native_id(self) -> int | None:
        """The worker's OS thread id (per-thread CPU time: benchmarks' CpuMeter)."""
        return self._thread.native_id

    @property
    def pending(self) -> bool:
        """A run was handed over and not taken back yet (finished or not)."""
        return self._future is not None

    def start(self, fn: Callable[[], object]) -> None:
        if self._future is not None:
            raise RuntimeError("the training worker has a run not taken back yet")
        self._future = Future()
        self._tasks.put((fn, self._future))

    def wait(self) -> None:
        """Until the run in flight (if any) has finished; its result stays for take()."""
        if self._future is not None:
            wait_for([self._future])

    def take(self) -> Future | None:
        """The run handed over, once finished (waits for it), and forget it."""
        self.wait()
        future, self._future = self._future, None
        return future

    def close(self, timeout: float = 30.0) -> None:
        self.wait()
        self._tasks.put(None)
        self._thread.join(timeout)

    def _main(self) -> None:
        torch.set_num_threads(self.threads)  # this thread's count only
        while True:
            task = self._tasks.get()
            if task is None:
                return
            fn, future = task
            try:
                future.set_result(fn())
            except BaseException as e:  # re-raised on the engine thread, at collection
                future.set_exception(e)
            if self.wake is not None:
                try:
                    self.wake()
                except Exception:
                    log.exception("training worker: waking the engine thread failed")


def last_cpu(tid: int) -> int | None:
    """The CPU this process's thread `tid` last ran on (Linux: /proc), or None."""
    try:
        with open(f"/proc/self/task/{tid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[36])  # field 39, "processor"
    except (OSError, ValueError, IndexError):
        return None


class Apart:
    """Every other pass the engine thread runs on one thread beside the worker's run, it keeps
    off the CPU the worker last ran on, until its next pass (docs/design.md, "Sharing the
    machine").

    The two threads share the GIL: each hands it to the other around every torch op, and Linux
    tends to wake a thread on the CPU of the thread that woke it. Left alone, serving's CPU came
    more out of the worker's core than out of a busy neighbour's (the worker ran 66-77% of the
    time it was ready to, the neighbour 74-83%). Kept off the worker's CPU on every pass, it
    came out of the neighbour's (67-76% against the worker's 73-86%); every other pass, out of
    both alike, as a separate server process's does (71-80% and 71-79%; docs/benchmarks.md,
    "Twentieth run"). The mask lasts until the next pass, through the engine thread's sleep
    between the two, as measured.

    Only a pass on one intra-op thread moves it (no OpenMP thread of the engine thread's starts
    inside it and inherits the mask); the engine thread is back on its CPUs before any other
    pass, once the worker's run is collected, and at shutdown (`restore`, from any thread). Off
    where the OS has no per-thread CPU affinity (not Linux) or the engine thread has one CPU."""

    on = True  # (benchmarks/apart.py's A/B turns it off)

    def __init__(self) -> None:
        self.supported = hasattr(os, "sched_setaffinity") and os.path.isdir("/proc/self/task")
        self.turn = False
        self.passes = 0  # passes kept off the worker's CPU (status)
        self._moved: tuple[int, set[int]] | None = None  # (thread id, the CPUs it had)

    def before_pass(self, worker_tid: int | None) -> None:
        """Before a pass of the calling thread (the engine thread) on one intra-op thread beside
        the worker's run: every other call off the CPU the worker last ran on, else back."""
        self.turn = not self.turn
        if not (self.turn and self.on and self.supported and worker_tid is not None):
            self.restore()
            return
        # its own mask (pid 0); never a moved one here: the call before put it back
        cpus = os.sched_getaffinity(0)
        cpu = last_cpu(worker_tid)
        try:
            if cpu not in cpus or len(cpus) < 2:
                raise OSError("nowhere else to go")
            os.sched_setaffinity(0, cpus - {cpu})
        except OSError:  # (or a CPU set changed under us: a container, taskset)
            self.restore()
            return
        self._moved = (threading.get_native_id(), cpus)
        self.passes += 1

    def restore(self) -> None:
        """The thread moved off the worker's CPU back on the CPUs it had (from any thread)."""
        if self._moved is None:
            return
        (tid, cpus), self._moved = self._moved, None
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:  # (the thread has ended)
            pass


def train_thread_choice(
    setting: str,
    *,
    device: str,
    offload: bool,
    threads: int,
    hidden: int,
    policy: str,
    dtype: torch.dtype,
) -> tuple[bool, str]:
    """(on, why) for EngineConfig.train_thread, given the engine's device, whether layers are
    offloaded, its intra-op threads, the model's hidden size, the policy and the base's dtype."""
    if setting == "off":
        return False, "off (setting): training time-sliced in the engine thread"
    if policy != "deferred":
        return False, f"off: policy {policy!r} time-slices training in the engine thread"
    if device != "cpu":
        return False, f"off: the model is on {device}; the worker is for CPU models"
    if offload:
        return False, "off: layers are offloaded (fetches belong to the engine thread)"
    if setting == "on":
        return True, "on (setting): training on its own thread, one intra-op thread"
    if threads < 2:
        return False, f"auto: off ({threads} intra-op thread: none to give training)"
    if hidden < MIN_HIDDEN:
        return False, f"auto: off (hidden size {hidden} < {MIN_HIDDEN}: per-op overheads rule)"
    if dtype == torch.float32:  # (docs/design.md, "The training worker")
        return False, (
            "auto: off (a float32 base: its inference on one thread beside the worker missed "
            "targets at medium load; time-sliced on every thread it does not)"
        )
    return True, (
        f"auto: on (CPU model {hidden} wide, {threads} threads: training on its own thread "
        "with one, inference on the rest)"
    )
