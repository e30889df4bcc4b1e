"""Threads that share the machine: the intra-op thread count and OpenMP's waiting policy."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from fineinfer_jupyter.engine import threads
from fineinfer_jupyter.engine.config import EngineConfig
from fineinfer_jupyter.engine.engine import Engine

pytestmark = [pytest.mark.timeout(120), pytest.mark.realtime]


@pytest.fixture(autouse=True)
def keep_torch_threads(monkeypatch):
    """torch's thread count is per process: put it back for the other tests."""
    for name in threads.THREADS:
        monkeypatch.delenv(name, raising=False)
    before, chosen, follower = torch.get_num_threads(), threads._chosen, threads._follower
    yield
    torch.set_num_threads(before)
    threads._chosen, threads._follower = chosen, follower


def test_the_setting_wins_then_the_environment_then_the_usable_cores(monkeypatch):
    waiting = threads.set_wait_policy()
    assert threads.configure_threads(1) == {
        "intra_op": 1,
        "source": "setting",
        "wait_policy": waiting["policy"],
        "note": waiting["note"],
        "follows_load": False,  # a count the user chose stays
    }
    assert torch.get_num_threads() == 1
    cores = threads.usable_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
    choice = threads.configure_threads(None)
    assert (choice["intra_op"], choice["source"]) == (cores, "default")
    assert torch.get_num_threads() == cores
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.configure_threads(None)["intra_op"] == 3
    assert (torch.get_num_threads(), threads.current()["source"]) == (3, "environment")
    monkeypatch.setenv("OMP_NUM_THREADS", "many")  # what torch ignores, we ignore
    assert threads.configure_threads(None)["source"] == "default"


def fake_machine(monkeypatch, tmp_path, cpus: int, *, quota: str = "max 100000") -> None:
    """`cpus` CPUs, two hyper-threads per core (cpu i and cpu i + cpus/2), all ours, with a
    cgroup's cpu.max of `quota`: sysfs, the affinity and the CPU counters, faked."""
    half = max(cpus // 2, 1)
    for cpu in range(cpus):
        topology = tmp_path / "sys" / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        core = cpu % half
        pair = sorted({core, core + half} & set(range(cpus)))
        (topology / "thread_siblings_list").write_text(",".join(map(str, pair)) + "\n")
    (tmp_path / "cpu.max").write_text(quota + "\n")
    monkeypatch.setattr(threads, "SYS_CPU", tmp_path / "sys")
    monkeypatch.setattr(threads, "CPU_MAX", tmp_path / "cpu.max")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    real = threads.psutil.cpu_times
    monkeypatch.setattr(
        threads.psutil, "cpu_times", lambda percpu=False: [real()] * cpus if percpu else real()
    )


def test_usable_cores_are_the_physical_cores_of_the_affinity_capped_by_the_cgroup_quota(
    monkeypatch, tmp_path
):
    fake_machine(monkeypatch, tmp_path, 8)  # 8 CPUs: 4 cores of two hyper-threads
    assert threads.usable_cores() == 4
    for quota, cores in (("150000 100000", 2), ("300000 100000", 3), ("900000 100000", 4)):
        threads.CPU_MAX.write_text(quota)  # 1.5 CPUs: 2 threads; more than the cores: 4
        assert threads.usable_cores() == cores, quota
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 4, 1})  # two cores' threads
    threads.CPU_MAX.write_text("max 100000")
    assert threads.usable_cores() == 2
    assert threads.cgroup_quota(tmp_path / "absent") is None


def test_load_following_is_off_under_a_quota_or_on_part_of_the_machine(monkeypatch, tmp_path):
    fake_machine(monkeypatch, tmp_path, 4)
    assert threads.LoadFollower.why_not() is None
    assert threads.LoadFollower.for_this_machine(2) is not None
    assert threads.configure_threads(None)["follows_load"] is True
    threads.CPU_MAX.write_text("200000 100000")  # a container's quota: the host's load
    assert threads.LoadFollower.why_not() == (
        f"a cgroup CPU quota applies ({threads.CPU_MAX}: 200000 100000)"
    )
    assert threads.LoadFollower.for_this_machine(2) is None
    choice = threads.configure_threads(None)
    assert (choice["intra_op"], choice["follows_load"]) == (2, False)
    threads.CPU_MAX.write_text("max 100000")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # 2 of the 4 CPUs
    assert threads.LoadFollower.why_not() == "the machine has 4 CPUs, this process may use [0, 1]"
    assert threads.configure_threads(None)["follows_load"] is False


def test_the_machine_busy_time_is_psutils_counters_without_idle_and_io_wait(monkeypatch):
    times = dict(user=10.0, nice=1.0, system=4.0, idle=50.0, iowait=7.0, irq=0.5, softirq=0.25,
                 steal=0.125, guest=3.0, guest_nice=0.0)  # fmt: skip
    monkeypatch.setattr(threads.psutil, "cpu_times", lambda: SimpleNamespace(**times))
    assert threads.machine_busy_seconds() == 10 + 1 + 4 + 0.5 + 0.25 + 0.125  # guest: in user


class FakeMachine:
    """The machine's and this process's CPU time as LoadFollower reads them, advanced by
    hand."""

    def __init__(self):
        self.now = self.busy = self.own = 0.0

    def run(self, seconds: float, *, ours: float, others: float) -> None:
        """`seconds` pass; this process keeps `ours` cores busy, other programs `others`."""
        self.now += seconds
        self.own += ours * seconds
        self.busy += (ours + others) * seconds

    def follower(self, cores: int = 2, cpus: int = 2) -> threads.LoadFollower:
        return threads.LoadFollower(
            cores, cpus, busy=lambda: self.busy, own=lambda: self.own, clock=lambda: self.now
        )


def test_the_default_count_follows_the_cores_other_programs_leave():
    m = FakeMachine()
    f = m.follower()
    m.run(0.5, ours=2, others=0)
    assert f.poll() is None and f.threads == 2  # not a second since the last reading
    m.run(0.5, ours=2, others=0)
    assert f.poll() is None and f.others == 0  # our own two busy cores are not "others"
    m.run(1.0, ours=1.4, others=0.6)  # a neighbour takes its share of a core
    assert f.poll() is None and f.threads == 2 and f.others == pytest.approx(0.6)
    m.run(1.0, ours=1.0, others=1.0)  # two readings in a row agree: one thread
    assert f.poll() == 1 and f.threads == 1
    m.run(1.0, ours=1.0, others=1.0)
    assert f.poll() is None and f.threads == 1
    m.run(1.0, ours=1.0, others=0.1)  # the neighbour ended; one reading is not enough
    assert f.poll() is None and f.threads == 1
    m.run(1.0, ours=1.0, others=1.0)  # it is back: the count stays
    assert f.poll() is None and f.threads == 1
    m.run(1.0, ours=1.0, others=0.2)
    m.run(0.0, ours=0, others=0)
    assert f.poll() is None
    m.run(1.0, ours=1.0, others=0.2)
    assert f.poll() == 2 and f.threads == 2
    m.run(1.0, ours=0.1, others=2.0)  # everything taken: still one thread, never none
    f.poll()
    m.run(1.0, ours=0.1, others=2.0)
    assert f.poll() == 1


def test_eight_cores_give_up_what_the_neighbours_take():
    m = FakeMachine()
    f = m.follower(cores=8, cpus=16)  # hyper-threads: 16 CPUs, 8 cores
    for _ in range(2):
        m.run(1.0, ours=8, others=4)  # 4 CPUs of 16 busy elsewhere: a quarter of the machine
        f.poll()
    assert f.threads == 6


def test_a_busy_neighbour_takes_the_engine_down_to_the_cores_it_leaves():
    """A real neighbour process on this machine: the default count drops below the cores."""
    choice = threads.configure_threads(None)
    if choice["intra_op"] < 2:
        pytest.skip(f"one usable core here: nothing to give up ({choice})")
    if not choice["follows_load"]:  # the quota path is tested with a fake machine above
        pytest.skip(f"the count does not follow the load here: {threads.LoadFollower.why_not()}")
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        deadline = time.monotonic() + 30
        while torch.get_num_threads() == choice["intra_op"] and time.monotonic() < deadline:
            time.sleep(0.2)
            threads.follow_load()
        status = threads.current()
        assert torch.get_num_threads() < choice["intra_op"], status
        assert status["intra_op"] == torch.get_num_threads() and status["others_busy"] >= 0.5
    finally:
        neighbour.kill()
        neighbour.wait()


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True, 2000])
def test_a_bad_threads_setting_is_refused(bad):
    with pytest.raises(ValueError, match=r"^threads: must be an integer in \[1, 1024\]"):
        EngineConfig(model="tiny", threads=bad)


def test_the_engine_uses_its_setting_and_status_shows_it(tmp_path):
    engine = Engine(EngineConfig(model="tiny", data_dir=tmp_path, threads=1), thread=False)
    try:
        status = engine.status()["threads"]
        assert (status["intra_op"], status["source"]) == (1, "setting")
        assert torch.get_num_threads() == 1
        assert status["wait_policy"] == threads.set_wait_policy()["policy"]
    finally:
        engine.shutdown()


CHILD = """
import json, os, sys
{first}
from fineinfer_jupyter.engine import Engine, EngineConfig
import torch
engine = Engine(EngineConfig(model="tiny", data_dir=sys.argv[1]), thread=False)
print(json.dumps({{
    "env": {{k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
            if k in os.environ}},
    "torch_threads": torch.get_num_threads(),
    "status": engine.status()["threads"],
    "cores": __import__("fineinfer_jupyter.engine.threads").engine.threads.usable_cores(),
    "follows": __import__("fineinfer_jupyter.engine.threads").engine.threads.LoadFollower
    .for_this_machine(1) is not None,
}}))
engine.shutdown()
"""


def child(tmp_path, *, first: str = "", **env) -> tuple[dict, str]:
    """A fresh Python that builds a tiny engine; its report, and how long OpenMP's threads
    spin before they sleep, as the runtime itself says when it starts (OMP_DISPLAY_ENV)."""
    clean = {k: v for k, v in os.environ.items() if k not in threads.WAITING + threads.THREADS}
    done = subprocess.run(
        [sys.executable, "-c", CHILD.format(first=first), str(tmp_path)],
        env={**clean, "OMP_DISPLAY_ENV": "VERBOSE", **env},
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stderr
    spin = re.search(r"GOMP_SPINCOUNT = '(\d+)'", done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1]), spin and int(spin.group(1))


def test_a_fresh_process_gets_a_short_spin_before_torch_starts(tmp_path):
    report, spin = child(tmp_path)
    assert report["env"] == {"GOMP_SPINCOUNT": "1000", "KMP_BLOCKTIME": "0"}
    assert spin == 1000  # the runtime took it
    assert report["torch_threads"] == report["cores"]
    assert report["status"].pop("follows_load") is report["follows"]
    assert report["status"] == {
        "intra_op": report["cores"],
        "source": "default",
        "wait_policy": "short spin, then sleep",
        "note": "GOMP_SPINCOUNT=1000 and KMP_BLOCKTIME=0 set before torch started "
        "(processes started from here inherit them)",
    }


def test_the_users_own_wait_policy_and_thread_count_are_kept(tmp_path):
    report, spin = child(tmp_path, OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1")
    assert report["env"] == {"OMP_WAIT_POLICY": "ACTIVE"}
    assert spin == 30_000_000_000  # libgomp's "spin for ever"
    assert report["torch_threads"] == 1
    assert report["status"] == {
        "intra_op": 1,
        "source": "environment",
        "wait_policy": "OMP_WAIT_POLICY=ACTIVE",
        "note": "kept your OMP_WAIT_POLICY=ACTIVE",
        "follows_load": False,
    }


def test_torch_imported_first_is_reported_and_nothing_is_set(tmp_path):
    report, spin = child(tmp_path, first="import torch")
    assert report["env"] == {}
    assert spin == 300_000  # libgomp's default
    assert report["status"]["wait_policy"] == "OpenMP default (long spin)"
    assert report["status"]["note"].startswith("torch was imported before fineinfer_jupyter")


def test_the_server_hook_sets_the_policy_without_importing_torch():
    code = (
        "import os, sys, fineinfer_jupyter\n"
        "fineinfer_jupyter._jupyter_server_extension_points()\n"
        "print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)"
    )
    clean = {k: v for k, v in os.environ.items() if k not in threads.WAITING}
    done = subprocess.run(
        [sys.executable, "-c", code], env=clean, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.split() == ["1000", "False"], done.stderr


def test_a_process_started_by_one_that_chose_inherits_the_choice(tmp_path):
    report, spin = child(tmp_path, GOMP_SPINCOUNT="1000", KMP_BLOCKTIME="0")
    assert spin == 1000
    assert report["status"]["wait_policy"] == "short spin, then sleep"
    assert report["status"]["note"].startswith("GOMP_SPINCOUNT=1000 and KMP_BLOCKTIME=0 inherited")
