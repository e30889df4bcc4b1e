"""The benchmarks' CPU meter (benchmarks/common.py, CpuMeter): who used the cores in a window."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
from common import CpuMeter  # noqa: E402

WORK = 0.3  # CPU seconds each busy member spends: their own clocks, not the machine's speed
SPIN = f"import time\nwhile time.process_time() < {WORK}:\n    pass\ntime.sleep(30)\n"


def spin_thread(go: threading.Event, done: threading.Event, ids: dict, end: threading.Event):
    ids["busy"] = threading.get_native_id()
    go.wait()  # the meter has started
    start = time.thread_time()
    while time.thread_time() - start < WORK:
        pass
    done.set()
    end.wait()  # alive until the meter has stopped: a thread gone by then counts nothing


@pytest.mark.realtime  # (a child process and threads spinning against the clock)
def test_cpu_meter_counts_a_busy_thread_a_busy_process_and_not_a_sleeper():
    sleeper_ready, stop_sleeper, ids = threading.Event(), threading.Event(), {}

    def sleeper():
        ids["sleeper"] = threading.get_native_id()
        sleeper_ready.set()
        stop_sleeper.wait()

    s = threading.Thread(target=sleeper)
    s.start()
    sleeper_ready.wait()
    child = subprocess.Popen([sys.executable, "-c", SPIN])
    try:
        go, busy_done = threading.Event(), threading.Event()
        t = threading.Thread(target=spin_thread, args=(go, busy_done, ids, stop_sleeper))
        began = time.monotonic()
        t.start()
        while "busy" not in ids:
            time.sleep(0.001)
        meter = CpuMeter(
            {
                "busy": [(os.getpid(), ids["busy"])],
                "sleeper": [(os.getpid(), ids["sleeper"])],
                "child": [(child.pid, None)],
                "gone": [(2**22 + 1, None)],  # no such process: counts nothing, no error
            }
        ).start()
        go.set()
        busy_done.wait()
        p = psutil.Process(child.pid)
        # the child's spin, by its own clock (the kernel's count of it, in ticks, may read a
        # little less than the child's own process_time)
        while sum(p.cpu_times()[:2]) < WORK - 0.05:
            time.sleep(0.01)
        cores = meter.stop()
        wall = time.monotonic() - began
    finally:
        child.kill()
        child.wait()
        stop_sleeper.set()
        s.join()
        t.join()
    # the meter's span is inside `wall`: the thread's whole work (it began after the meter;
    # the kernel counts CPU time in ticks, hence the slack) over it, in cores; the child's
    # start-up and some of its spin may come before the meter, so only some of it; no member
    # more than one core
    assert WORK - 0.05 <= cores["busy"] * wall and cores["busy"] <= 1.05
    assert cores["child"] * wall > 0.05 and cores["child"] <= 1.05
    assert cores["sleeper"] * wall < 0.02
    assert cores["gone"] == 0.0


def test_an_engine_windows_groups_are_its_worker_and_engine_threads(tmp_path):
    import coserve

    from fineinfer_jupyter.engine import Engine, EngineConfig

    config = EngineConfig(model="tiny", data_dir=tmp_path, policy="deferred", train_thread="on")
    with Engine(config) as engine:
        engine.wait_ready()
        groups = coserve.cpu_groups(engine, [4242])
        me = os.getpid()
        tasks = {int(t) for t in os.listdir(f"/proc/{me}/task")}
        (train,), (serve,) = groups["train"], groups["serve"]
        assert train[0] == serve[0] == me and train[1] != serve[1]
        assert {train[1], serve[1]} <= tasks
        assert groups["process"] == [(me, None)] and groups["neighbour"] == [(4242, None)]
        cores = CpuMeter(groups).start().stop()
        assert set(cores) == {"train", "serve", "process", "neighbour"}


@pytest.mark.realtime  # (a thread spinning against the clock)
def test_an_engine_windows_watch_names_the_busiest_thread_and_the_workers_state(tmp_path):
    import coserve

    from fineinfer_jupyter.engine import Engine, EngineConfig

    config = EngineConfig(model="tiny", data_dir=tmp_path, policy="deferred", train_thread="on")
    with Engine(config) as engine:
        engine.wait_ready()
        go, done, end, ids = threading.Event(), threading.Event(), threading.Event(), {}
        spinner = threading.Thread(target=spin_thread, args=(go, done, ids, end), name="spin")
        spinner.start()
        began = time.monotonic()
        watch = coserve.Watch(engine, every=0.01).start()
        go.set()
        done.wait()
        while len(watch.samples) < 3:  # (a sample or more after the spin, whatever the load)
            time.sleep(0.01)
        seen = watch.stop(time.monotonic() - began)
        end.set()
        spinner.join()
    # the spinner's WORK CPU seconds over the span; no job: the worker had no run in flight,
    # and the engine thread was never kept off a CPU
    busiest = next(iter(seen["top_threads"]))
    assert busiest == f"spin/{ids['busy']}", seen
    cores, kernel = seen["top_threads"][busiest]
    assert cores > 0 and 0 <= kernel <= cores
    assert (seen["worker_busy"], seen["engine_kept"], seen["others_kept"]) == (0.0, 0.0, 0)
    assert (seen["second_stream_units"], seen["passes_apart"]) == (0, 0)
    assert sum(seen["intra_op"].values()) == len(watch.samples)


@pytest.mark.skipif(
    not (hasattr(os, "sched_setaffinity") and os.path.isdir("/proc/self/task")),
    reason="schedstat and CPU affinity: Linux",
)
@pytest.mark.realtime  # (two processes spinning on one CPU)
def test_cpu_meter_counts_the_time_two_spinners_on_one_cpu_wait_for_it():
    # two processes held to one CPU, each spinning WORK of its own CPU time: each waits ready
    # to run while the other runs; a sleeper does not wait
    cpu = min(os.sched_getaffinity(0))
    code = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\n" + SPIN
    sleeper = subprocess.Popen([sys.executable, "-c", "import time\ntime.sleep(30)"])
    spinners = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
    try:
        groups = {f"s{i}": [(p.pid, None)] for i, p in enumerate(spinners)}
        meter = CpuMeter({**groups, "sleeper": [(sleeper.pid, None)]}).start()
        began = time.monotonic()
        for p in spinners:
            while sum(psutil.Process(p.pid).cpu_times()[:2]) < WORK - 0.05:
                time.sleep(0.01)
        meter.stop()
        wall = time.monotonic() - began
    finally:
        for p in [*spinners, sleeper]:
            p.kill()
            p.wait()
    waited = meter.waited
    assert waited is not None
    # the second to finish waited while the first ran, at least a good part of it; the first
    # waited for the second too, unless it spun before the second had started (start-up)
    assert max(waited["s0"], waited["s1"]) * wall > WORK / 3, waited
    assert waited["sleeper"] * wall < 0.02
