"""fineinfer_jupyter.launch: a real jupyter_server subprocess, started, waited for and stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from fineinfer_jupyter.launch import JupyterProcess

pytestmark = [pytest.mark.timeout(120), pytest.mark.realtime]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pids, timeout: float = 30.0) -> list[int]:
    """The pids still alive after `timeout` seconds (none, when all went)."""
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_a_server_that_cannot_start_raises_with_the_log_tail_and_leaves_nothing(tmp_path):
    server = JupyterProcess(tmp_path, model="tiny")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", server.port))  # taken before it starts; it may not pick another
        busy.listen()
        with server, pytest.raises(RuntimeError) as failed:
            server.wait_ready(60)
    message = str(failed.value)
    assert message.startswith(f"jupyter_server on {server.url}: exited (1)\n")
    assert f"The port {server.port} is already in use" in message  # from the server's log
    assert server.process.returncode == 1
    assert not server.base.exists()  # its temporary folder went with it


def test_a_model_that_fails_to_load_raises_with_the_engine_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with JupyterProcess(tmp_path, model=str(missing), base=tmp_path / "base") as server:
        with pytest.raises(RuntimeError) as failed:
            server.wait_ready(60)
        assert server.process.poll() is None  # the server itself is fine
    first = str(failed.value).splitlines()[0]
    assert first.startswith(f"jupyter_server on {server.url}: model failed to load: ")
    assert str(missing) in first
    assert (tmp_path / "base" / "jupyter_server.log").stat().st_size > 0  # a given base stays


def test_ready_server_answers_authenticated_calls_and_stop_leaves_no_process(tmp_path):
    server = JupyterProcess(tmp_path / "root", model="tiny", data_dir=tmp_path / "data")
    with server:
        status = server.wait_ready(60)
        assert (status["state"], status["model"]["name"]) == ("ready", "tiny")
        assert server.env == {"FINEINFER_SERVER_URL": server.url, "FINEINFER_TOKEN": server.token}
        created, kernel = server.call("POST", "api/kernels", {"name": "python3"}, timeout=60)
        assert created == 201 and kernel["id"], (created, kernel)
        assert server.call("GET", "fineinfer/api/jobs") == (200, {"jobs": []})
        server.token = "wrong"
        assert server.call("GET", "fineinfer/api/status")[0] == 403
        family = psutil.Process(server.process.pid).children(recursive=True)
        pids = [server.process.pid] + [p.pid for p in family]
        assert len(pids) >= 2  # the server and its kernel (a session of its own)
    assert server.process.returncode == 0  # SIGTERM: a clean shutdown
    assert wait_gone(pids, timeout=10) == []
    server.stop()  # a second stop does nothing
    assert not server.base.exists()


SCRIPT = """
import sys, time
from fineinfer_jupyter.launch import JupyterProcess
server = JupyterProcess(sys.argv[1], model="tiny", base=sys.argv[2]).start()
print(server.process.pid, flush=True)
server.wait_ready(60)
print("ready", flush=True)
time.sleep(600)
"""


def test_a_killed_parent_takes_its_server_with_it(tmp_path):
    parent = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "root"), str(tmp_path / "base")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pid = int(parent.stdout.readline())
        assert parent.stdout.readline() == "ready\n"
        assert alive(pid)
        os.kill(parent.pid, signal.SIGKILL)  # no finally, no atexit: only the kernel's signal
        parent.wait()
        assert wait_gone([pid]) == [], "the server outlived its parent"
    finally:
        parent.kill()
        parent.wait()
