"""notebooks/demo.ipynb end to end: nbclient, a real jupyter_server, the tiny model, few steps."""

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from fineinfer_jupyter.demo import execute

pytest_plugins = ["kernel_fixtures"]

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(240)
ANSWER_FOOTER = re.compile(r"\[(base|herb) · \d+ tokens · TTFT [\d.]+ s · .*finish: \w+\]")


def outputs(cell) -> tuple[str, str, list[dict]]:
    """(stdout, stderr, display data) of one executed cell."""
    streams = {"stdout": "", "stderr": ""}
    data = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            streams[out["name"]] += out["text"]
        elif out["output_type"] in ("display_data", "execute_result"):
            data.append(out["data"])
        elif out["output_type"] == "error":
            pytest.fail(f"{out['ename']}: {out['evalue']} in\n{cell.source}")
    return streams["stdout"], streams["stderr"], data


def cell(nb, start: str):
    return next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith(start))


def test_demo_notebook_runs_end_to_end(fineinfer_server, server_root, tmp_path):
    out = tmp_path / "demo.executed.ipynb"
    parameters = {"MAX_STEPS": 8}
    nb = execute(
        server_root / "demo.ipynb", out, server=fineinfer_server, parameters=parameters, timeout=60
    )
    assert nbformat.read(out, as_version=4).cells[2].source == "MAX_STEPS = 8"
    for c in nb.cells:
        if c.cell_type == "code":
            assert outputs(c)[1] == "", c.source  # no "fineinfer: ..." error line anywhere
    stdout, _, shown = outputs(cell(nb, "%fineinfer tune"))
    assert "training 'herb' on 275 examples, 8 steps" in stdout  # 31 held out (--val-fraction)
    assert "application/vnd.jupyter.widget-view+json" in shown[0]  # the live job widget
    for question in ("How can I recognise", "In one sentence"):
        stdout, _, shown = outputs(next(c for c in nb.cells if question in c.source))
        assert shown[-1]["text/plain"].strip() and ANSWER_FOOTER.fullmatch(stdout.strip())
    stdout, _, _ = outputs(cell(nb, "%fineinfer wait"))
    assert re.match(
        r"herb \(job-\d+\): done · step 8/8 · loss [\d.]+ · validation loss [\d.]+"
        r"( · loss still falling: more steps may help)?\n",
        stdout,
    )
    stdout, _, shown = outputs(cell(nb, "%%generate --compare"))
    answers = re.fullmatch(r"── base ──\n(.*)\n\n── herb ──\n(.*)", shown[-1]["text/plain"], re.S)
    assert answers and answers.group(2).strip()
    assert [ANSWER_FOOTER.fullmatch(line).group(1) for line in stdout.splitlines()] == [
        "base",
        "herb",
    ]
    stdout, _, _ = outputs(cell(nb, "%fineinfer eval"))
    lines = stdout.splitlines()  # base beside the adapter, on the held-out notes
    assert re.fullmatch(r"herb on 8 examples \(held out by job-\d+\):", lines[0])
    assert [line.split()[0] for line in lines[2:4]] == ["herb", "base"]
    assert all(
        re.fullmatch(r"(herb|base)\s+[\d.]+\s+[\d.e+]+\s+\d/8 .*", x.strip()) for x in lines[2:4]
    )
    assert stdout.count("  reference  ") == 3 and stdout.count("  herb       ") == 3
    stdout, _, _ = outputs(cell(nb, "from fineinfer_jupyter.kernel import FineInferClient"))
    assert stdout.splitlines()[-1].startswith("notes: Moonveil Thistle grows")


def test_make_demo_entry_point_writes_the_executed_notebook(tmp_path):
    out = tmp_path / "out" / "demo.executed.ipynb"
    command = [sys.executable, "-m", "fineinfer_jupyter.demo", "--model", "tiny"]
    command += ["--max-steps", "3", "--out", str(out), "--data-dir", str(tmp_path / "data")]
    command += ["--timeout", "60"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=200, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith(f"wrote {out}")
    nb = nbformat.read(out, as_version=4)
    waited = cell(nb, "%fineinfer wait")
    assert "done · step 3/3" in outputs(waited)[0]
