"""The JupyterLab sidebar in a real browser: Debian's Chromium driven by Python playwright
against a real JupyterLab (a subprocess) running the extension on the tiny model.

Needs /usr/bin/chromium (`make test` installs it). Without it the test fails instead of
skipping: a browser test that silently does not run proves nothing.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from conftest import make_adapter

from fineinfer_jupyter.launch import CHROMIUM, CHROMIUM_ARGS, JupyterProcess

pytestmark = [pytest.mark.browser, pytest.mark.realtime]

START_TIMEOUT = 60.0  # JupyterLab up and the tiny model loaded
UI_TIMEOUT_MS = 30_000  # any one thing the page must show
RECORDS = [
    {"prompt": f"Which herb grows in bed {i}?", "completion": f" Moonveil Thistle number {i}."}
    for i in range(16)
]


@pytest.fixture
def lab(tmp_path_factory, request):
    """A real JupyterLab with the extension on the tiny model, everything under a tmp dir."""
    lab = JupyterProcess(app="jupyterlab", model="tiny", base=tmp_path_factory.mktemp("lab"))
    request.addfinalizer(lab.stop)
    lab.start()
    try:
        lab.wait_ready(START_TIMEOUT)
    except RuntimeError as e:  # exited, failed to load, or too slow
        pytest.fail(str(e))
    return lab


def step_of(text: str) -> int:
    """The step in the sidebar's "12 / 100000"."""
    match = re.match(r"\s*(\d+)\s*/", text)
    assert match, f"no step in {text!r}"
    return int(match.group(1))


def require_chromium() -> str:
    """Debian's Chromium and playwright; without them the test fails (it does not skip)."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(
            f"chromium not installed: {CHROMIUM} is missing. The browser test needs Debian's "
            "Chromium (`make browser`, or `apt-get install chromium`); it does not skip."
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as e:
        pytest.fail(f"Python playwright is not installed ({e}): pip install -e '.[test]'")
    return CHROMIUM


@pytest.mark.timeout(180)
def test_sidebar_shows_the_model_and_a_running_job_and_stops_it(request, tmp_path):
    chromium = require_chromium()  # a failure, before JupyterLab starts
    lab: JupyterProcess = request.getfixturevalue("lab")
    from playwright.sync_api import expect, sync_playwright

    status, job = lab.call(
        "POST",
        "fineinfer/api/jobs",
        {
            "adapter": "herb",
            "records": RECORDS,
            "params": {
                "max_steps": 100_000,
                "batch_size": 1,
                "micro_batch_size": 1,
                "val_fraction": 0.25,  # a validation loss for the card to show
                "eval_every": 1,
            },
        },
    )
    assert status == 201, (status, job)
    job_id = job["id"]

    page_errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 850})
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            try:
                page.goto(f"{lab.url}lab?token={lab.token}", timeout=UI_TIMEOUT_MS)
                tab = page.locator('.jp-SideBar [data-id="fineinfer-sidebar"]')
                tab.wait_for(state="visible")
                panel = page.locator("#fineinfer-sidebar")
                if not panel.is_visible():
                    tab.click()
                expect(panel).to_be_visible()

                expect(panel.get_by_test_id("fi-model-name")).to_have_text("tiny")
                expect(panel.get_by_test_id("fi-state")).to_have_text("ready")
                expect(panel.get_by_test_id("fi-offload-off")).to_have_text(
                    "Offload: none, every layer on the device"
                )
                _, engine_status = lab.call("GET", "fineinfer/api/status")
                info = engine_status["model"]
                device = panel.get_by_test_id("fi-device")
                expect(device).to_have_text(
                    re.compile(rf"^{info['device']} · {info['dtype']} · \d+ params")
                )
                expect(device).to_have_attribute("title", info["dtype_reason"])
                assert info["dtype_reason"], info  # why this dtype: never an empty tooltip

                card = panel.get_by_test_id(f"fi-job-{job_id}")
                state = card.get_by_test_id("fi-job-state")
                step = card.get_by_test_id("fi-job-step")
                expect(state).to_have_text("running")
                expect(step).to_have_text(re.compile(r"^\s*\d+\s*/\s*100000\s*$"))
                first = step_of(step.inner_text())
                deadline = time.monotonic() + UI_TIMEOUT_MS / 1000
                second = first
                while second <= first and time.monotonic() < deadline:
                    page.wait_for_timeout(250)  # polling the text, not a fixed wait
                    second = step_of(step.inner_text())
                assert second > first, f"the job's step stayed at {first} in the sidebar"

                card.get_by_test_id("fi-job-stop").click()
                expect(state).to_have_text("stopped")
                expect(card.get_by_test_id("fi-job-resume")).to_be_enabled()
                expect(panel.get_by_test_id("fi-action-error")).to_have_count(0)
                adapter = panel.get_by_test_id("fi-adapter-herb")
                expect(adapter).to_be_visible()
                expect(adapter.get_by_text("training", exact=True)).to_have_count(0)
                status, answer = lab.call("GET", f"fineinfer/api/jobs/{job_id}")
                assert (status, answer["state"]) == (200, "stopped"), (status, answer)
                assert answer["eval_loss"] is not None, answer
                expect(card.get_by_test_id("fi-job-eval-loss")).to_have_text(
                    f"{answer['eval_loss']:.3f}"
                )

                # The same prompt twice: the second reuses the first's KV (prefix cache).
                prompt = " ".join(f"herb{i}" for i in range(40))
                for _ in range(2):
                    status, body = lab.call(
                        "POST",
                        "fineinfer/v1/completions",
                        {"model": "base", "prompt": prompt, "max_tokens": 2},
                        timeout=60,
                    )
                    assert status == 200, (status, body)
                cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]
                assert cached >= 16, body["usage"]
                _, metrics = lab.call("GET", "fineinfer/api/metrics")
                saved = metrics["prefix_cache"]["tokens_saved"]
                assert saved >= cached, metrics["prefix_cache"]
                rate = round(100 * metrics["prefix_cache"]["hit_rate"])
                expect(panel.get_by_test_id("fi-prefix-cache")).to_have_text(
                    re.compile(rf"^Prefix cache: .+ · hit rate {rate}% · {saved} tokens saved$")
                )

                adapter.get_by_test_id("fi-adapter-export").click()
                adapter.get_by_test_id("fi-export-gguf").click()
                result = adapter.get_by_test_id("fi-export-result")
                home = Path(engine_status["model"]["data_dir"])  # <data_dir>/<model>-<hash>
                assert home.parent == lab.data_dir
                gguf = home / "exports" / "herb" / "herb.gguf"
                expect(result.get_by_test_id("fi-export-path")).to_have_text(str(gguf))
                expect(result.get_by_test_id("fi-export-commands")).to_have_text(
                    f"llama-cli -m BASE.gguf --lora {gguf}  # BASE.gguf: the base model"
                )
                assert gguf.read_bytes()[:4] == b"GGUF"

                make_adapter(lab.root_dir / "wide", seed=1, r=600)  # vLLM takes ranks up to 512
                status, _ = lab.call(
                    "POST", "fineinfer/api/adapters", {"name": "wide", "path": "wide"}
                )
                assert status == 201
                wide = panel.get_by_test_id("fi-adapter-wide")
                wide.get_by_test_id("fi-adapter-export").click()
                wide.get_by_test_id("fi-export-vllm").click()
                expect(wide.get_by_test_id("fi-export-error")).to_have_text(
                    "r: vLLM takes ranks up to 512; this adapter has r=600"
                )
                expect(result).to_be_visible()  # the other row keeps its result
            finally:
                shot = tmp_path / "sidebar.png"
                page.screenshot(path=str(shot))
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000, "the screenshot is (nearly) empty"
    assert not [e for e in page_errors if "fineinfer" in e.lower()], page_errors
