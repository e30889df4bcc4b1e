"""A real JupyterLab in a subprocess with the fineinfer extension, everything under one folder.

Used by the browser test and by docs/screenshot.py; no pytest in here.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


class LabError(RuntimeError):
    """JupyterLab exited, did not come up in time, or its model failed to load."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A JupyterLab subprocess and JSON calls to its fineinfer API."""

    def __init__(self, url: str, token: str, proc: subprocess.Popen, log: Path, root: Path):
        self.url, self.token, self.proc, self.log, self.root = url, token, proc, log, root

    @classmethod
    def start(cls, base: Path, model: str, *extra: str) -> Lab:
        """Start JupyterLab on a free port with its root, runtime, settings and the engine's
        data directory under `base`; returns at once (see wait_ready)."""
        dirs = {n: base / n for n in ("root", "fineinfer", "workspaces", "settings", "runtime")}
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        port, token = free_port(), secrets.token_hex(16)
        command = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--allow-root",
            "--ServerApp.ip=127.0.0.1",
            f"--port={port}",
            "--ServerApp.port_retries=0",
            f"--ServerApp.token={token}",
            f"--ServerApp.root_dir={dirs['root']}",
            f"--FineInferApp.model={model}",
            f"--FineInferApp.data_dir={dirs['fineinfer']}",
            f"--LabApp.workspaces_dir={dirs['workspaces']}",
            f"--LabApp.user_settings_dir={dirs['settings']}",  # not the user's own settings
            *extra,
        ]
        env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(dirs["runtime"])}
        for name in ("FINEINFER_SERVER_URL", "FINEINFER_TOKEN"):
            env.pop(name, None)
        log = base / "jupyterlab.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                command,
                cwd=base,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(f"http://127.0.0.1:{port}/", token, proc, log, dirs["root"])

    def call(self, method: str, path: str, body=None, *, timeout=10.0):
        """(status, JSON answer or None) of an authenticated request; no status raises."""
        request = urllib.request.Request(
            self.url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, text = response.status, response.read()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read()
        try:
            return status, json.loads(text) if text else None
        except ValueError:
            return status, None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout: float) -> None:
        """Until /api/status answers and /fineinfer/api/status says "ready"; raises LabError
        at once when the process exits or the model fails to load."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LabError(
                    f"JupyterLab exited with {self.proc.returncode} while starting:\n"
                    + self.log_tail()
                )
            try:
                server, _ = self.call("GET", "api/status", timeout=2)
                status, answer = self.call("GET", "fineinfer/api/status", timeout=2)
            except (OSError, urllib.error.URLError) as e:  # not listening yet
                last = repr(e)
            else:
                state = (answer or {}).get("state")
                last = f"api/status {server}, fineinfer/api/status {status} {answer}"
                if server == 200 and status == 200 and state == "ready":
                    return
                if state == "error":
                    raise LabError(f"the model failed to load: {answer}\n" + self.log_tail())
            time.sleep(0.2)
        raise LabError(f"JupyterLab not ready after {timeout:.0f} s ({last}):\n" + self.log_tail())

    def stop(self) -> None:
        """SIGTERM (the server frees the model), then SIGKILL to its process group if it
        hangs."""
        proc = self.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything it started (its own session)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
