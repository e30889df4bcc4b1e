"""The JupyterLab sidebar in a real browser: Debian's Chromium driven by Python playwright
against a real JupyterLab (a subprocess) running the extension on the tiny model.

Needs /usr/bin/chromium (`make test` installs it). Without it the test fails instead of
skipping: a browser test that silently does not run proves nothing.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

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
START_TIMEOUT = 60.0  # JupyterLab up and the tiny model loaded
UI_TIMEOUT_MS = 30_000  # any one thing the page must show
RECORDS = [
    {"prompt": f"Which herb grows in bed {i}?", "completion": f" Moonveil Thistle number {i}."}
    for i in range(16)
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A JupyterLab subprocess and JSON calls to its fineinfer API."""

    def __init__(self, url: str, token: str, proc: subprocess.Popen, log: Path):
        self.url, self.token, self.proc, self.log = url, token, proc, log

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
        """Until /api/status answers and /fineinfer/api/status says "ready"; fails fast when
        the process exits or the model fails to load."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(
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
                    pytest.fail(f"the model failed to load: {answer}\n" + self.log_tail())
            time.sleep(0.2)
        pytest.fail(f"JupyterLab not ready after {timeout:.0f} s ({last}):\n" + self.log_tail())


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the server frees the model), then SIGKILL to its process group if it hangs."""
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


@pytest.fixture
def lab(tmp_path_factory, request):
    """A real JupyterLab with the extension on the tiny model, everything under a tmp dir."""
    base = tmp_path_factory.mktemp("lab")
    dirs = {n: base / n for n in ("root", "fineinfer", "workspaces", "settings", "runtime")}
    for d in dirs.values():
        d.mkdir()
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
        "--FineInferApp.model=tiny",
        f"--FineInferApp.data_dir={dirs['fineinfer']}",
        f"--LabApp.workspaces_dir={dirs['workspaces']}",
        f"--LabApp.user_settings_dir={dirs['settings']}",  # not the user's own settings
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
    request.addfinalizer(lambda: stop(proc))
    lab = Lab(f"http://127.0.0.1:{port}/", token, proc, log)
    lab.wait_ready(START_TIMEOUT)
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
    lab: Lab = request.getfixturevalue("lab")
    from playwright.sync_api import expect, sync_playwright

    status, job = lab.call(
        "POST",
        "fineinfer/api/jobs",
        {
            "adapter": "herb",
            "records": RECORDS,
            "params": {"max_steps": 100_000, "batch_size": 1, "micro_batch_size": 1},
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
            finally:
                shot = tmp_path / "sidebar.png"
                page.screenshot(path=str(shot))
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000, "the screenshot is (nearly) empty"
    assert not [e for e in page_errors if "fineinfer" in e.lower()], page_errors
