"""The magics in a real ipykernel against a real jupyter_server with the extension (tiny model)."""

import os
import re
import time

import pytest

from fineinfer_jupyter.engine import threads

pytest_plugins = ["kernel_fixtures"]

pytestmark = pytest.mark.timeout(120)

FOOTER = re.compile(
    r"\[(?P<adapter>[\w-]+) · \d+ tokens · TTFT [\d.]+ s · [\d.]+ tokens/s · "
    r"(not deferred|deferred [\d.]+ s)( · \d+ prompt tokens cached)?( · prefilled in \d+ chunks)?"
    r"( · late: [^\]]+)? · finish: \w+\]"
)
SMALL = [{"prompt": "Color of moonveil?", "completion": "Silver blue."}]
CHAT = [{"role": "user", "content": "Where grows glimmerroot?"}]


def widget_views(run):
    return [
        c for c in run.of("display_data") if "application/vnd.jupyter.widget-view+json" in c["data"]
    ]


@pytest.fixture(scope="module")
def trained(kernel, fineinfer_server):
    """A small adapter trained through the magics: tune, then wait."""
    run = kernel.run("%fineinfer tune cmp --data data/small.jsonl --max-steps 6 --lr 0.02 --rank 8")
    assert "training 'cmp' on 4 examples, 6 steps" in run.stdout, run.stderr
    wait = kernel.run("%fineinfer wait cmp --timeout 60")
    assert re.fullmatch(r"cmp \(job-\d+\): done · step 6/6 · loss [\d.]+\n", wait.stdout)
    return "cmp"


def test_status_after_load_ext_shows_the_model(kernel, fineinfer_server):
    run = kernel.run("%fineinfer status")
    assert f"at {fineinfer_server.url}: ready" in run.stdout
    assert "model tiny · cpu · float32" in run.stdout and run.stderr == ""
    # the server is a fresh process with this one's environment: a short spin unless we chose
    # another policy (conftest imports the engine first, which sets the short spin here too)
    own = {k: os.environ[k] for k in threads.WAITING if k in os.environ}
    chosen = ", ".join(f"{k}={v}" for k, v in own.items()) if own != threads.WAIT else ""
    waiting = f" · OpenMP waiting: {chosen or 'short spin, then sleep'}\n"
    n = threads.env_threads()
    if n:
        assert f"threads {n} (environment){waiting}" in run.stdout
    elif threads.LoadFollower.for_this_machine(1) is None:
        assert f"threads {threads.usable_cores()} (default){waiting}" in run.stdout
    else:  # the cores the other programs (this test's own among them) leave it
        shown = re.search(
            r"threads (\d+) \(default, fewer while other programs are busy\)", run.stdout
        )
        assert shown and 1 <= int(shown.group(1)) <= threads.usable_cores(), run.stdout
        assert waiting in run.stdout


@pytest.mark.realtime
def test_tune_returns_at_once_and_its_widget_updates_while_other_cells_run(kernel, client):
    try:
        run = kernel.run(
            "%fineinfer tune long --data data/herbology.jsonl --max-steps 5000 --batch-size 2"
        )
        job = client.find_job("long")
        assert job["state"] in ("queued", "running") and job["step"] < 5000
        assert re.match(r"job-\d+: training 'long' on 306 examples, 5000 steps", run.stdout)
        assert len(widget_views(run)) == 1
        later = kernel.run(  # another cell, until the widget's bar moved twice (it polls)
            "import time\n"
            "bar = get_ipython().magics_manager.registry['FineInferMagics'].widgets[-1].bar\n"
            "seen, start = {bar.value}, time.time()\n"
            "while len(seen) < 3 and time.time() - start < 60:\n"
            "    time.sleep(0.05)\n"
            "    seen.add(bar.value)"
        )
        steps = [v for v in later.widget_updates("value") if isinstance(v, (int, float))]
        assert len(steps) >= 2 and steps == sorted(steps) and steps[-1] > steps[0]
        stopped = kernel.run("%fineinfer stop long").stdout
        assert re.fullmatch(
            rf"long \({job['id']}\): stopped · step \d+/5000 · loss [\d.]+\n", stopped
        )
        resumed = kernel.run(f"%fineinfer resume {job['id']}")
        assert re.match(r"long \(job-\d+\): (running|queued) · step \d+/5000", resumed.stdout)
        assert len(widget_views(resumed)) == 1
        cancelled = kernel.run("%fineinfer cancel long").stdout
        assert cancelled.startswith(f"long ({job['id']}): cancelled · step ")
        done = kernel.run(
            "m = get_ipython().magics_manager.registry['FineInferMagics']\n"
            "m.widgets[-1].thread.join(5); print(m.widgets[-1].polling)"
        )
        assert done.stdout == "False\n"  # the widget stopped polling with the job
    finally:
        job = client.find_job("long")
        if job["state"] in ("queued", "running", "stopped"):
            client.cancel(job["id"])


def test_generate_streams_the_answer_into_one_updating_display(kernel, client):
    run = kernel.run("%%generate --max-new-tokens 400 --ttft 10\nWhere grows glimmerroot?")
    (shown,) = run.of("display_data")
    display_id = shown["transient"]["display_id"]
    updates = [
        c for c in run.of("update_display_data") if c["transient"]["display_id"] == display_id
    ]
    texts = [c["data"]["text/plain"] for c in updates]
    expected = client.complete(messages=CHAT, max_new_tokens=400)
    assert texts[-1] == expected["text"] and expected["usage"]["completion_tokens"] > 100
    growing = [t for i, t in enumerate(texts) if i == 0 or t != texts[i - 1]]
    assert len(growing) >= 2, "the answer arrived in one piece"
    assert all(expected["text"].startswith(t) for t in growing)
    assert FOOTER.fullmatch(run.stdout.strip()).group("adapter") == "base"


def test_generate_raw_sends_the_cell_as_a_plain_prompt(kernel, client):
    run = kernel.run("%%generate --raw --max-new-tokens 12 --seed 3 --temperature 0.8\nOnce upon")
    text = run.of("update_display_data")[-1]["data"]["text/plain"]
    expected = client.complete("Once upon", max_new_tokens=12, seed=3, temperature=0.8)
    assert text == expected["text"]


def test_generate_compare_answers_once_per_adapter_side_by_side(kernel, client, trained):
    run = kernel.run(
        f"%%generate --compare base,{trained} --max-new-tokens 40\nWhere grows glimmerroot?"
    )
    final = run.of("update_display_data")[-1]["data"]
    base = client.complete(messages=CHAT, max_new_tokens=40)["text"]
    tuned = client.complete(messages=CHAT, adapter=trained, max_new_tokens=40)["text"]
    assert base != tuned
    assert final["text/plain"] == f"── base ──\n{base}\n\n── {trained} ──\n{tuned}"
    assert final["text/html"].count("<th") == 2
    footers = [FOOTER.fullmatch(line).group("adapter") for line in run.stdout.splitlines()]
    assert footers == ["base", trained] and run.stderr == ""


def test_jobs_and_adapters_list_what_the_server_has(kernel, trained):
    jobs = kernel.run("%fineinfer jobs").stdout.splitlines()
    assert jobs[0].split() == ["job", "adapter", "state", "step", "loss"]
    assert any(line.split()[1:4] == [trained, "done", "6/6"] for line in jobs[1:])
    adapters = kernel.run("%fineinfer adapters").stdout.splitlines()
    assert any(line.split()[:3] == [trained, "6", "8"] for line in adapters[1:])


def test_save_load_and_delete_adapters_with_paths_relative_to_the_notebook(
    kernel, trained, server_root
):
    saved = kernel.run(f"%fineinfer save {trained} saved/{trained}")
    assert saved.stdout == f"saved adapter {trained!r} to {server_root / 'saved' / trained}\n"
    loaded = kernel.run(f"%fineinfer load copy saved/{trained}").stdout
    assert loaded.startswith("loaded adapter 'copy' from ")
    assert "copy" in kernel.run("%fineinfer status").stdout.splitlines()[-1]
    assert kernel.run("%fineinfer delete copy").stdout == "deleted adapter 'copy'\n"
    assert "copy" not in kernel.run("%fineinfer adapters").stdout


@pytest.mark.realtime
def test_dashboard_polls_while_other_cells_run_and_stops_when_closed(kernel, client):
    job = client.tune("dash", records=SMALL * 8, max_steps=100_000, batch_size=1)
    try:
        run = kernel.run("%fineinfer dashboard")
        assert len(widget_views(run)) == 1 and run.stderr == ""
        later = kernel.run(  # another cell, until the dashboard changed twice (it polls)
            "import time\n"
            "body = get_ipython().magics_manager.registry['FineInferMagics'].widgets[-1].body\n"
            "seen, start = {body.value}, time.time()\n"
            "while len(seen) < 3 and time.time() - start < 60:\n"
            "    time.sleep(0.05)\n"
            "    seen.add(body.value)"
        )
        bodies = [v for v in later.widget_updates("value") if isinstance(v, str) and "<table" in v]
        assert len(bodies) >= 2 and len(set(bodies)) == len(bodies)
        assert "tokens/s" in bodies[-1] and "samples/s · step " in bodies[-1]
        closed = kernel.run(
            "d = get_ipython().magics_manager.registry['FineInferMagics'].widgets[-1]\n"
            "d.close(); d.thread.join(5); print(d.polling)"
        )
        assert closed.stdout == "False\n"
    finally:
        client.cancel(job["id"])


@pytest.mark.parametrize(
    "code, message",
    [
        ("%%generate --adapter nope\nHi", "adapter: no adapter named 'nope' (known: "),
        ("%%generate --compare base,nope\nHi", "adapter: no adapter named 'nope'"),
        ("%fineinfer tune x --data /etc/hostname", "data: '/etc/hostname' is outside the server's"),
        ("%fineinfer tune x --data data/missing.jsonl", "missing.jsonl': no such file"),
        ("%fineinfer tune x --data data/small.jsonl --lr 5", "learning_rate: must be in (0, 1]"),
        ("%fineinfer tune train --data data/small.jsonl", "adapter: 'train' is a reserved name"),
        ("%fineinfer tune x --data data/small.jsonl --max-steps ten", "invalid int value: 'ten'"),
        ("%fineinfer stop nojob", "job: no job or adapter named 'nojob'"),
        ("%fineinfer wait nojob", "job: no job or adapter named 'nojob'"),
        ("%fineinfer delete nope", "adapter: no adapter named 'nope'"),
        ("%fineinfer frobnicate", "unknown command 'frobnicate' (try %fineinfer help)"),
        (
            "%fineinfer connect http://127.0.0.1:9/",
            "cannot reach the server at http://127.0.0.1:9/",
        ),
    ],
)
def test_user_errors_print_one_line_in_the_cell(kernel, code, message):
    run = kernel.run(code)
    assert run.stderr.startswith("fineinfer: ") and message in run.stderr, run.stderr
    assert run.stderr.count("\n") == 1 and not run.errors and run.stdout == ""


def test_a_kernel_without_a_server_says_so_in_one_line(new_kernel, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FINEINFER_", "JUPYTERHUB_"))}
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path)  # no runtime files: no running server
    k = new_kernel(env, cwd=tmp_path)
    t = time.monotonic()
    run = k.run("%load_ext fineinfer_jupyter\n%fineinfer status")
    assert run.stderr.startswith("fineinfer: no Jupyter server found: set FINEINFER_SERVER_URL")
    assert run.stderr.count("\n") == 1 and not run.errors and time.monotonic() - t < 10
