"""Run notebooks/demo.ipynb headless against a real jupyter_server (`make demo`).

    python -m fineinfer_jupyter.demo [--model default] [--max-steps N] [--out PATH]

Starts a jupyter_server with the extension in a subprocess (fineinfer_jupyter.launch), waits
until the model is ready, executes the notebook with nbclient in a kernel that knows the server
(FINEINFER_SERVER_URL, FINEINFER_TOKEN), writes the executed copy and stops the server.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .launch import JupyterProcess

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(notebook, out, *, server: JupyterProcess, parameters: dict | None = None, timeout=900):
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
    parser = argparse.ArgumentParser(prog="python -m fineinfer_jupyter.demo")
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
        with JupyterProcess(
            args.notebook.parent, model=args.model, data_dir=args.data_dir
        ) as server:
            server.wait_ready(600)
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
