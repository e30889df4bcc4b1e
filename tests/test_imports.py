"""Imports go one way (docs/design.md, "The parts and their imports"): the engine never imports
Jupyter, tornado or IPython; the scheduler and the cost model are plain Python, without torch.
Each check runs in a fresh interpreter, so what other tests imported does not count."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import pytest

import fineinfer_jupyter.engine

ENGINE = sorted(
    f"fineinfer_jupyter.engine.{m.name}"
    for m in pkgutil.iter_modules(fineinfer_jupyter.engine.__path__)
)
NEVER_IN_ENGINE = ("jupyter_server", "tornado", "IPython", "ipykernel", "ipywidgets")


def imported_after(modules: list[str]) -> set[str]:
    """The top-level packages in sys.modules of a fresh Python after importing `modules`."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_the_engine_never_imports_jupyter_tornado_or_ipython():
    assert len(ENGINE) > 20 and "fineinfer_jupyter.engine.core" in ENGINE
    assert imported_after(ENGINE) & set(NEVER_IN_ENGINE) == set()


@pytest.mark.parametrize("module", ["scheduler", "costmodel"])
def test_the_scheduler_and_the_cost_model_never_import_torch(module):
    found = imported_after([f"fineinfer_jupyter.engine.{module}"])
    assert "fineinfer_jupyter" in found and "torch" not in found
