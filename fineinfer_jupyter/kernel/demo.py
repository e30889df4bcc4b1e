"""Run notebooks/demo.ipynb headless against a real jupyter_server (`make demo`).

    python -m fineinfer_jupyter.kernel.demo [--model default] [--max-steps N] [--out PATH]

Starts `python -m jupyter_server` with the extension in a subprocess, waits until the model is
ready, executes the notebook with nbclient in a kernel that knows the server
(FINEINFER_SERVER_URL, FINEINFER_TOKEN), writes the executed copy and stops the server.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .client import FineInferClient, FineInferError

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


@dataclass
class Server:
    url: str
    token: str
    process: subprocess.Popen
    log: Path

    @property
    def env(self) -> dict:
        """What a kernel needs to find this server."""
        return {"FINEINFER_SERVER_URL": self.url, "FINEINFER_TOKEN": self.token}

    def client(self) -> FineInferClient:
        return FineInferClient(self.url, self.token)


@contextmanager
def serve(root_dir, *, model="default", data_dir=None, options=(), timeout=600.0):
    """A jupyter_server with the extension, in a subprocess, ready to answer; stopped at exit."""
    with tempfile.TemporaryDirectory(prefix="fineinfer-server-") as scratch:
        scratch = Path(scratch)
        token = secrets.token_hex(16)
        command = [
            sys.executable,
            "-m",
            "jupyter_server",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={free_port()}",
            f"--ServerApp.token={token}",
            f"--ServerApp.root_dir={Path(root_dir).resolve()}",
            "--ServerApp.jpserver_extensions={'fineinfer_jupyter': True}",
            f"--FineInferApp.model={model}",
            f"--FineInferApp.data_dir={data_dir or scratch / 'data'}",
            *options,
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            command.append("--allow-root")
        env = {k: v for k, v in os.environ.items() if not k.startswith("FINEINFER_")}
        env["JUPYTER_RUNTIME_DIR"] = str(scratch / "runtime")  # where its URL file is written
        log = scratch / "server.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
            )
        try:
            url = _wait_for_url(process, scratch / "runtime", log, timeout)
            server = Server(url, token, process, log)
            wait_ready(server, timeout)
            yield server
        finally:
            _stop(process)


def _die_with_parent() -> None:
    """In the child, on Linux: SIGTERM when the thread that started it dies, so a killed test
    run or demo leaves no server behind (start it from a long-lived thread)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_url(process, runtime: Path, log: Path, timeout: float) -> str:
    info = runtime / f"jpserver-{process.pid}.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"jupyter_server exited ({process.returncode}):\n{log_tail(log)}")
        if info.is_file():
            try:
                return json.loads(info.read_text())["url"]
            except (ValueError, KeyError):
                pass  # still being written
        time.sleep(0.1)
    raise RuntimeError(f"jupyter_server did not start in {timeout:g} s:\n{log_tail(log)}")


def wait_ready(server: Server, timeout: float) -> None:
    """Until the extension says "ready"; RuntimeError (with the log's tail) when the process
    exits, the model fails to load or `timeout` passes."""
    client = FineInferClient(server.url, server.token, timeout=10)
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"jupyter_server exited:\n{log_tail(server.log)}")
        try:
            state = client.status()
        except FineInferError as e:  # the extension's routes may not be up yet
            state = {"state": "loading", "error": e.message}
        if state["state"] == "ready":
            return
        if state["state"] == "error":
            raise RuntimeError(
                f"model failed to load: {state.get('error')}\n{log_tail(server.log)}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"model not ready after {timeout:g} s: {state}\n{log_tail(server.log)}"
            )
        time.sleep(0.2)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def log_tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def execute(notebook, out, *, server: Server, parameters: dict | None = None, timeout=900):
    """Execute `notebook` in its own folder with a kernel that knows `server`; write `out`."""
    import nbformat
    from nbclient import NotebookClient

    notebook = Path(notebook).resolve()
    nb = nbformat.read(notebook, as_version=4)
    inject_parameters(nb, parameters or {})
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        coalesce_streams=True,  # one stdout output per cell, however often it flushed
        resources={"metadata": {"path": str(notebook.parent)}},
    )
    try:
        client.execute(env={**os.environ, **server.env})
    finally:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out)
    return nb


def inject_parameters(nb, parameters: dict) -> None:
    """Papermill's convention: a cell tagged "injected-parameters" after the "parameters" cell."""
    if not parameters:
        return
    import nbformat

    source = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    nb.cells.insert(tagged[0] + 1 if tagged else 0, cell)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fineinfer_jupyter.kernel.demo")
    parser.add_argument("--model", default="default", help="'default', 'tiny' or a model path")
    parser.add_argument("--max-steps", type=int, help="training steps (the notebook's MAX_STEPS)")
    parser.add_argument("--notebook", type=Path, default=NOTEBOOKS / "demo.ipynb")
    parser.add_argument("--out", type=Path, default=NOTEBOOKS / "out" / "demo.executed.ipynb")
    parser.add_argument("--data-dir", help="adapters and jobs (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per cell")
    args = parser.parse_args(argv)
    if not args.notebook.is_file():
        parser.error(f"no notebook at {args.notebook}")
    try:
        import ipykernel  # noqa: F401
        import nbclient  # noqa: F401
    except ImportError as e:
        parser.error(f"needs {e.name}: pip install nbclient nbformat ipykernel")
    parameters = {} if args.max_steps is None else {"MAX_STEPS": args.max_steps}
    started, executing = time.monotonic(), False
    print(f"demo: starting jupyter_server with model {args.model!r}…", file=sys.stderr)
    try:
        with serve(args.notebook.parent, model=args.model, data_dir=args.data_dir) as server:
            ready = time.monotonic() - started
            print(
                f"demo: {server.url} ready after {ready:.0f} s; running the notebook…",
                file=sys.stderr,
            )
            executing = True
            execute(
                args.notebook, args.out, server=server, parameters=parameters, timeout=args.timeout
            )
    except Exception as e:
        print(f"demo: failed: {type(e).__name__}: {str(e).strip()[:2000]}", file=sys.stderr)
        if executing:
            print(f"demo: the partly executed notebook is at {args.out}", file=sys.stderr)
        return 1
    print(f"demo: done in {time.monotonic() - started:.0f} s")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
