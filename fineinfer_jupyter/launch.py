"""A Jupyter server or JupyterLab with the fineinfer extension, in a subprocess.

Used by `make demo` (fineinfer_jupyter.demo), the kernel, notebook and browser tests and
docs/screenshot.py. Standard library only; it talks to the server over HTTP.

    with JupyterProcess(root_dir, model="tiny") as server:
        server.wait_ready(120)
        status, body = server.call("GET", "fineinfer/api/status")
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

APPS = ("jupyter_server", "jupyterlab")


class JupyterProcess:
    """`python -m <app>` on a free loopback port with a fresh token, the extension enabled, and
    its runtime dir, log, data dir (unless given) and, for JupyterLab, settings and workspaces
    under `base` (a temporary folder, removed at stop, when not given)."""

    def __init__(
        self,
        root_dir=None,
        *,
        app: str = "jupyter_server",
        model: str = "default",
        data_dir=None,
        base=None,
        options=(),
    ):
        if app not in APPS:
            raise ValueError(f"app must be one of {APPS}, not {app!r}")
        self.app, self.model, self.options = app, model, list(options)
        self._owns_base = base is None
        self.base = Path(base or tempfile.mkdtemp(prefix="fineinfer-jupyter-")).resolve()
        self.root_dir = Path(root_dir or self.base / "root").resolve()
        self.data_dir = Path(data_dir or self.base / "data").resolve()
        self.runtime_dir = self.base / "runtime"
        self.settings_dir = self.base / "settings"  # JupyterLab's, not the user's own
        self.log = self.base / f"{app}.log"
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}/"
        self.process: subprocess.Popen | None = None
        self._stopped = False

    @property
    def env(self) -> dict:
        """What a kernel or client needs to find this server."""
        return {"FINEINFER_SERVER_URL": self.url, "FINEINFER_TOKEN": self.token}

    def command(self) -> list[str]:
        command = [
            sys.executable,
            "-m",
            self.app,
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",  # the URL is known before it starts
            f"--ServerApp.token={self.token}",
            f"--ServerApp.root_dir={self.root_dir}",
            "--ServerApp.jpserver_extensions={'fineinfer_jupyter': True}",
            f"--FineInferApp.model={self.model}",
            f"--FineInferApp.data_dir={self.data_dir}",
        ]
        if self.app == "jupyterlab":
            command += [
                f"--LabApp.user_settings_dir={self.settings_dir}",
                f"--LabApp.workspaces_dir={self.base / 'workspaces'}",
            ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            command.append("--allow-root")
        return command + self.options

    def start(self) -> JupyterProcess:
        """Start the process and return at once (see wait_ready)."""
        if self.process is not None:
            raise RuntimeError(f"{self.app} was already started")
        for folder in (self.root_dir, self.runtime_dir):
            folder.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in self.env}  # another server's
        env["JUPYTER_RUNTIME_DIR"] = str(self.runtime_dir)  # where its URL file goes
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.base,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # stop() can kill all it started
                preexec_fn=_die_with_parent(),
            )
        return self

    def wait_ready(self, timeout: float = 600.0) -> dict:
        """The extension's status once it says "ready". RuntimeError, with the log's tail, when
        the process exits, the model fails to load or `timeout` seconds pass."""
        if self.process is None:
            raise RuntimeError(f"{self.app} was not started")
        url_file = self.runtime_dir / f"jpserver-{self.process.pid}.json"
        deadline = time.monotonic() + timeout
        state: dict = {"state": "starting"}
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(self._failure(f"exited ({self.process.returncode})"))
            if url_file.is_file():  # written once the server listens
                try:
                    status, answer = self.call("GET", "fineinfer/api/status")
                except OSError as e:
                    status, answer = None, {"error": str(e)}
                if status == 200 and answer["state"] == "ready":
                    return answer
                if status == 200 and answer["state"] == "error":
                    raise RuntimeError(
                        self._failure(f"model failed to load: {answer.get('error')}")
                    )
                state = answer if status == 200 else {"state": "starting", "http": status}
            if time.monotonic() > deadline:
                raise RuntimeError(self._failure(f"not ready after {timeout:g} s: {state}"))
            time.sleep(0.2)

    def call(self, method: str, path: str, body=None, *, timeout: float = 10.0):
        """(status, JSON answer or None) of an authenticated request to `url + path`; an HTTP
        error status is returned, not raised (OSError when the server cannot be reached)."""
        request = urllib.request.Request(
            self.url + path.lstrip("/"),
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
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (the server frees the model and shuts its kernels down), then SIGKILL to its
        process group if it hangs or left anything behind; removes a temporary base."""
        stopped, self._stopped = self._stopped, True
        process = self.process
        if process is not None and not stopped:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass  # the group is gone already
            process.wait()
        if self._owns_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> JupyterProcess:
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _failure(self, what: str) -> str:
        return f"{self.app} on {self.url}: {what}\n{self.log_tail()}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent():
    """A preexec_fn that, on Linux, has the child get SIGTERM when the thread that started it
    dies, so a killed test run or demo leaves no server behind (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    return lambda: prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# The browser that drives JupyterLab in the browser test and docs/screenshot.py: Debian's
# Chromium (never playwright's download), with the flags this closed network needs.
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
