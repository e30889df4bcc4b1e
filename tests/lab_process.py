"""A real JupyterLab in a subprocess with the fineinfer extension, everything under one folder.

Used by the browser test and by docs/screenshot.py; no pytest in here.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from fineinfer_jupyter.kernel.demo import Server, free_port, wait_ready


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

    def wait_ready(self, timeout: float) -> None:
        """Until the extension says "ready"; RuntimeError when JupyterLab exits, the model
        fails to load or `timeout` passes (the same wait as `make demo`'s)."""
        wait_ready(Server(self.url, self.token, self.proc, self.log), timeout)

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
