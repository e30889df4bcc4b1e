"""Make docs/images/sidebar.png: JupyterLab with the FineInfer sidebar open next to a notebook
whose %%generate cell answered while the herb adapter trains.

    .venv/bin/python docs/screenshot.py [--model default] [--out docs/images/sidebar.png]
    .venv/bin/python docs/screenshot.py --offload disk --memory-budget 212860416 \
        --out docs/images/sidebar-offload.png   # half the default model's layers on disk

A real JupyterLab (the default model, everything under a temporary folder), Debian's
Chromium driven by playwright, the notebook run through the Run menu as a user would.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import nbformat

from fineinfer_jupyter.launch import CHROMIUM, CHROMIUM_ARGS, JupyterProcess

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

CELLS = [
    "%load_ext fineinfer_jupyter\n%fineinfer tune herb --data data/herbology.jsonl --epochs 2",
    "%%generate --max-new-tokens 60\nIn two sentences: what should I plant in a shady herb bed?",
]


def write_notebook(root: Path) -> str:
    (root / "data").mkdir()
    shutil.copy(REPO / "notebooks" / "data" / "herbology.jsonl", root / "data")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in CELLS]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, root / "herbology.ipynb")
    return "herbology.ipynb"


def quiet_settings(settings: Path) -> None:
    """No "get notified about Jupyter news?" toast and no "Select Kernel" dialog (it comes up
    when the kernel specs load after the notebook opens) over the picture."""
    for plugin, values in [
        ("apputils-extension/notification", {"fetchNews": "false"}),
        ("notebook-extension/tracker", {"autoStartDefaultKernel": True}),
    ]:
        path = settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


def wait_for_connected_kernel(lab: JupyterProcess, timeout: float = 120) -> None:
    """Until the notebook's kernel is idle with the page connected to it: "Run All Cells" sent
    before then can be lost (the first WebSocket to a new kernel may fail and reconnect)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, kernels = lab.call("GET", "api/kernels")
        if status == 200 and any(
            k["execution_state"] == "idle" and k["connections"] > 0 for k in kernels
        ):
            return
        time.sleep(0.25)
    raise RuntimeError(f"no connected kernel after {timeout:g} s:\n{lab.log_tail()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", type=Path, default=HERE / "images" / "sidebar.png")
    parser.add_argument("--offload", choices=("none", "cpu", "disk"), default="none")
    parser.add_argument("--memory-budget", type=int, help="bytes of layers kept resident")
    args = parser.parse_args()
    options = [f"--FineInferApp.offload={args.offload}"]
    if args.memory_budget is not None:
        options.append(f"--FineInferApp.memory_budget={args.memory_budget}")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=180_000)  # the default model answers while it trains

    lab = JupyterProcess(app="jupyterlab", model=args.model, options=options)  # a temp folder
    quiet_settings(lab.settings_dir)
    with lab:
        lab.wait_ready(300)
        notebook = write_notebook(lab.root_dir)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 820})
            page.set_default_timeout(120_000)
            page.goto(f"{lab.url}lab/tree/{notebook}?token={lab.token}")
            page.locator(".jp-Notebook .jp-Cell").first.wait_for()
            page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for()
            wait_for_connected_kernel(lab)
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
            outputs = page.locator(".jp-Notebook .jp-OutputArea-output")
            expect(outputs.filter(has_text="finish:")).to_have_count(1)
            page.locator('.jp-SideBar [data-id="fineinfer-sidebar"]').click()
            panel = page.locator("#fineinfer-sidebar")
            expect(panel.get_by_test_id("fi-state")).to_have_text("ready")
            expect(panel.get_by_test_id("fi-job-state").first).to_have_text("running")
            page.wait_for_timeout(4000)  # a few points on the charts
            if args.offload != "none":  # the traffic chart in view
                panel.get_by_test_id("fi-chart-offload_bytes_per_s").scroll_into_view_if_needed()
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out))
            browser.close()
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
