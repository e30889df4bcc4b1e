"""FineInferClient and the magics' error lines against a fake HTTP server (no model, fast)."""

import json
import threading

import pytest
from IPython.core.interactiveshell import InteractiveShell

from fineinfer_jupyter.kernel import client as client_module
from fineinfer_jupyter.kernel.client import FineInferClient, FineInferError, api_root, discover

pytest_plugins = ["kernel_fixtures"]


def error(status: int, message: str, type_: str, field=None) -> tuple[int, dict]:
    return status, {"error": {"message": message, "type": type_, "field": field}}


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in ("FINEINFER_SERVER_URL", "FINEINFER_TOKEN", "JUPYTERHUB_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("JUPYTERHUB_SERVICE_URL", raising=False)
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))  # no running servers
    return monkeypatch


def test_discover_prefers_published_env_then_hub_then_parent_server(clean_env):
    servers = [
        {"pid": 111, "url": "http://127.0.0.1:8001/", "token": "t1"},
        {"pid": 222, "url": "http://127.0.0.1:8002/lab-base/", "token": "t2"},
    ]
    clean_env.setattr("jupyter_server.serverapp.list_running_servers", lambda: iter(servers))
    clean_env.setattr(client_module.os, "getppid", lambda: 222)
    assert discover() == ("http://127.0.0.1:8002/lab-base/", "t2")
    clean_env.setenv("JUPYTERHUB_API_TOKEN", "hub")
    clean_env.setenv("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:9000/user/ada/")
    assert discover() == ("http://127.0.0.1:9000/user/ada/", "hub")
    clean_env.setenv("FINEINFER_SERVER_URL", "http://127.0.0.1:8888/")
    clean_env.setenv("FINEINFER_TOKEN", "secret")
    assert discover() == ("http://127.0.0.1:8888/", "secret")


def test_discover_without_a_server_says_how_to_connect(clean_env):
    with pytest.raises(FineInferError, match="no Jupyter server found: set FINEINFER_SERVER_URL"):
        discover()


@pytest.mark.parametrize(
    "url",
    [
        "http://h:1/base",
        "http://h:1/base/",
        "http://h:1/base/fineinfer",
        "http://h:1/base/fineinfer/api/",
    ],
)
def test_api_root_accepts_a_server_or_an_extension_url(url):
    assert api_root(url) == "http://h:1/base/fineinfer/api/"


def test_requests_carry_the_token_and_skip_environment_proxies(fake_server, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # nothing listens there
    fake_server.routes[("GET", "status")] = (200, {"state": "ready"})
    assert FineInferClient(fake_server.url, "s3cret").status() == {"state": "ready"}
    assert fake_server.requests[0][2]["Authorization"] == "token s3cret"


def test_http_errors_carry_status_type_field_and_the_servers_message(fake_server):
    fake_server.routes[("POST", "jobs")] = error(
        400,
        "params.learning_rate: must be in (0, 1]",
        "invalid_request_error",
        "params.learning_rate",
    )
    client = FineInferClient(fake_server.url, "")
    with pytest.raises(FineInferError) as e:
        client.tune("herb", "data.jsonl", learning_rate=5.0)
    assert (e.value.status, e.value.type, e.value.field) == (
        400,
        "invalid_request_error",
        "params.learning_rate",
    )
    assert str(e.value) == "params.learning_rate: must be in (0, 1]"
    with pytest.raises(FineInferError, match="server extension enabled") as e:
        client.metrics()  # no such route: an HTML 404
    assert e.value.status == 404


def test_unreachable_server_is_one_error_not_a_urllib_traceback():
    with pytest.raises(FineInferError, match=r"^cannot reach the server at http://127.0.0.1:9/"):
        FineInferClient("http://127.0.0.1:9/", "").status()


def test_tune_sends_an_absolute_data_path_and_train_params(fake_server, tmp_path, monkeypatch):
    fake_server.routes[("POST", "jobs")] = (201, {"id": "job-1"})
    monkeypatch.chdir(tmp_path)
    FineInferClient(fake_server.url, "").tune("herb", "data/x.jsonl", max_steps=3, r=4)
    body = fake_server.requests[-1][3]
    assert body == {
        "adapter": "herb",
        "data": str(tmp_path / "data" / "x.jsonl"),
        "params": {"max_steps": 3, "r": 4},
    }
    FineInferClient(fake_server.url, "").tune("herb", [{"prompt": "a", "completion": "b"}])
    assert fake_server.requests[-1][3] == {
        "adapter": "herb",
        "records": [{"prompt": "a", "completion": "b"}],
    }


def test_generate_yields_each_event_as_its_line_arrives(fake_server):
    first_read = threading.Event()

    def stream(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "application/x-ndjson")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()

        def chunk(event):
            data = (json.dumps(event) + "\n").encode()
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            handler.wfile.flush()

        chunk({"type": "delta", "text": "Par"})
        assert first_read.wait(10), "the client waited for the whole answer"
        chunk({"type": "delta", "text": "is"})
        chunk({"type": "done", "finish_reason": "eos", "usage": {}, "stats": {}})
        handler.wfile.write(b"0\r\n\r\n")

    fake_server.routes[("POST", "generate")] = stream
    events = FineInferClient(fake_server.url, "").generate("Capital?", max_new_tokens=5)
    assert next(events) == {"type": "delta", "text": "Par"}
    first_read.set()
    assert [e["type"] for e in events] == ["delta", "done"]
    assert fake_server.requests[-1][3] == {"prompt": "Capital?", "max_new_tokens": 5}


def test_error_event_in_the_stream_raises(fake_server):
    lines = b'{"type": "delta", "text": "a"}\n{"type": "error", "message": "engine shut down"}\n'
    fake_server.routes[("POST", "generate")] = lambda h: h.reply(200, lines, "application/x-ndjson")
    events = FineInferClient(fake_server.url, "").generate("x")
    assert next(events)["text"] == "a"
    with pytest.raises(FineInferError, match="engine shut down"):
        next(events)


def test_find_job_takes_an_id_or_the_newest_job_of_an_adapter(fake_server):
    jobs = [
        {"id": "job-1", "adapter": "herb", "created": 1.0},
        {"id": "job-2", "adapter": "herb", "created": 2.0},
        {"id": "job-3", "adapter": "mint", "created": 3.0},
    ]
    fake_server.routes[("GET", "jobs")] = (200, {"jobs": jobs})
    client = FineInferClient(fake_server.url, "")
    assert client.find_job("job-1")["id"] == "job-1"
    assert client.find_job("herb")["id"] == "job-2"
    with pytest.raises(FineInferError, match="no job or adapter named 'sage'") as e:
        client.find_job("sage")
    assert e.value.status == 404


@pytest.fixture
def shell(fake_server, capsys):
    """An in-process IPython with the extension, connected to the fake server."""
    fake_server.routes[("GET", "status")] = (200, {"state": "loading", "progress": "converting"})
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "fineinfer_jupyter")
    ip.run_line_magic("fineinfer", f"connect {fake_server.url}")
    capsys.readouterr()
    yield ip
    ip.magics_manager.registry["FineInferMagics"]._client = None


LOADING = error(503, "model is loading: converting default model (step 2/3)", "model_loading")


@pytest.mark.parametrize(
    "line, cell, expected",
    [
        ("jobs", None, "model is loading: converting default model (step 2/3)"),
        ("tune herb --data d.jsonl", None, "model is loading: converting default model"),
        ("", "Hello", "model is loading: converting default model"),
        ("", "\n  \n", "generate: the cell is empty; write the prompt in the cell"),
        ("--raw --system 'be brief'", "Hi", "generate: --system needs the chat template"),
        ("--adapter a --compare base,a", "Hi", "generate: use --adapter or --compare, not both"),
        ("--max-new-tokens many", "Hi", "argument --max-new-tokens: invalid int value: 'many'"),
        ("", None, "missing command (try %fineinfer help)"),
        ("bogus", None, "unknown command 'bogus' (try %fineinfer help)"),
        ("tune herb", None, "tune: one of the arguments --data --records is required"),
        ("tune herb --data d --epochs x", None, "tune: argument --epochs: invalid float value"),
        ("tune herb --records nothing", None, "tune: --records: no variable named 'nothing'"),
        ("stop", None, "stop: the following arguments are required: NAME_OR_ID"),
        ("export", None, "export: the following arguments are required: name"),
        ("export herb a.gguf b.gguf", None, "unrecognized arguments: b.gguf"),
        ("status 'unclosed", None, "cannot parse the arguments: No closing quotation"),
    ],
)
def test_user_errors_print_one_line(shell, fake_server, capsys, line, cell, expected):
    for route in (("GET", "jobs"), ("POST", "jobs"), ("POST", "generate")):
        fake_server.routes[route] = LOADING
    if cell is None:
        shell.run_line_magic("fineinfer", line)
    else:
        shell.run_cell_magic("generate", line, cell)
    out, err = capsys.readouterr()
    assert err.startswith("fineinfer: ") and expected in err, err
    assert err.count("\n") == 1 and "Traceback" not in out + err


def test_help_prints_usage_without_system_exit(shell, capsys):
    shell.run_line_magic("fineinfer", "help")
    assert "%fineinfer tune NAME --data PATH" in capsys.readouterr().out
    shell.run_line_magic("fineinfer", "tune -h")
    out, err = capsys.readouterr()
    assert out.startswith("usage: %fineinfer tune") and err == ""


def test_status_shows_a_loading_model_as_state_not_error(shell, capsys):
    shell.run_line_magic("fineinfer", "status")
    out, err = capsys.readouterr()
    assert ": loading (converting)" in out and err == ""


def test_generate_in_a_terminal_prints_the_answer_then_the_footer(shell, fake_server, capsys):
    done = {
        "type": "done",
        "finish_reason": "eos",
        "usage": {"prompt_tokens": 5, "completion_tokens": 2},
        "stats": {"ttft": 0.31, "tokens_per_s": 12.5, "deferred": 0.2},
    }
    lines = [{"type": "delta", "text": "Par"}, {"type": "delta", "text": "is"}, done]
    ndjson = "".join(json.dumps(e) + "\n" for e in lines).encode()
    fake_server.routes[("POST", "generate")] = lambda h: h.reply(
        200, ndjson, "application/x-ndjson"
    )
    shell.run_cell_magic("generate", "--adapter herb --max-new-tokens 9 --system 'Be brief.'", "Hi")
    out, err = capsys.readouterr()
    footer = "[herb · 2 tokens · TTFT 0.31 s · 12.5 tokens/s · deferred 0.20 s · finish: eos]"
    assert (out, err) == (f"Paris\n{footer}\n", "")
    assert fake_server.requests[-1][3] == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
        ],
        "adapter": "herb",
        "max_new_tokens": 9,
    }
    shell.run_cell_magic("generate", "--compare base,herb", "Hi")
    out, err = capsys.readouterr()
    assert out.startswith("── base ──\nParis\n\n── herb ──\nParis\n[base · 2 tokens") and err == ""


def test_widgets_render_the_documented_shapes_and_empty_values():
    from fineinfer_jupyter.kernel.widgets import Dashboard, JobWidget, sparkline

    client = FineInferClient("http://127.0.0.1:9/", "")
    idle = {
        "state": "ready",
        "iteration": {"kind": "idle", "started": None},
        "slack": {"min": None},
    }
    busy = {
        **idle,
        "iteration": {"kind": "train", "started": 1.0},
        "slack": {"min": -0.5},
        "requests": {"waiting": 2, "running": 1},
        "inference": {"tokens_per_s": 20.1, "slo": {"ttft": 1.0, "tpot": 0.98}},
        "training": {
            "job": "job-1",
            "samples_per_s": 1.0,
            "loss": 1.9,
            "step": 12,
            "total_steps": 100,
        },
        "offload": {"bytes_per_s": 0, "bytes_total": 0},
        "memory": {"rss_bytes": 900_000_000, "device_bytes": 0},
        "series": {"loss": [2.5, 2.4, None, 1.9], "slack": []},
    }
    dashboard = Dashboard(client)
    dashboard.render(idle)
    assert (
        "nothing waiting" in dashboard.body.value and "now: <b>idle</b>" in dashboard.header.value
    )
    dashboard.render(busy)
    body = dashboard.body.value
    assert "0.5 s late" in body and "TTFT 100% · TPOT 98%" in body and "858.3 MB RAM" in body
    assert "1 samples/s · step 12/100" in body and body.count("<svg") == 1
    assert (dashboard.bar.value, dashboard.bar.max, dashboard.bar.description) == (12, 100, "job-1")
    job = {"id": "job-1", "adapter": "herb", "state": "running", "step": 3, "total_steps": 10}
    widget = JobWidget(client, {**job, "loss": 2.0, "loss_history": [[1, 2.5], [2, 2.0]]})
    assert "step 3/10 · loss 2 · – samples/s · ETA –" in widget.stats.value
    assert widget.bar.value == 3 and "<svg" in widget.spark.value
    widget.render({**job, "estimating": True})  # no optimizer step measured yet
    assert "step 3/10 · loss – · estimating speed and ETA" in widget.stats.value
    assert sparkline([1.0]) == "" and sparkline([float("nan"), 1.0, 2.0]).count(" ") > 2


def test_job_widget_shows_validation_loss_and_says_when_the_loss_is_still_falling():
    from fineinfer_jupyter.kernel.render import job_line
    from fineinfer_jupyter.kernel.widgets import JobWidget

    client = FineInferClient("http://127.0.0.1:9/", "")
    job = {"id": "job-1", "adapter": "herb", "state": "done", "step": 8, "total_steps": 8,
           "loss": 1.0, "loss_history": [[i, 3.0 - 0.25 * i] for i in range(1, 9)],
           "eval_loss": 1.5, "eval_history": [[4, 2.0], [8, 1.5]], "loss_falling": True}  # fmt: skip
    widget = JobWidget(client, job)
    assert "validation loss 1.5" in widget.stats.value
    assert "<b>loss still falling: more steps may help</b>" in widget.stats.value
    assert widget.spark.value.count("<svg") == 2 and "validation loss <svg" in widget.spark.value
    assert job_line(job) == (
        "herb (job-1): done · step 8/8 · loss 1 · validation loss 1.5 · "
        "loss still falling: more steps may help"
    )
    widget.render({**job, "loss_falling": False, "eval_history": [], "eval_loss": None})
    assert "falling" not in widget.stats.value and "validation" not in widget.stats.value


def test_tune_and_evaluate_send_a_dataframe_as_records_with_columns(fake_server):
    import pandas as pd

    fake_server.routes[("POST", "jobs")] = (201, {"id": "job-1"})
    fake_server.routes[("POST", "adapters/herb/eval")] = (200, {"adapter": "herb"})
    frame = pd.DataFrame({"q": ["a", "b"], "a": ["x", "y"]})
    client = FineInferClient(fake_server.url, "")
    client.tune("herb", frame, columns={"prompt": "q", "completion": "a"}, max_steps=2)
    rows = [{"q": "a", "a": "x"}, {"q": "b", "a": "y"}]
    assert fake_server.requests[-1][3] == {
        "adapter": "herb",
        "records": rows,
        "columns": {"prompt": "q", "completion": "a"},
        "params": {"max_steps": 2},
    }
    assert client.evaluate("herb", records=frame, compare=[], limit=2) == {"adapter": "herb"}
    assert fake_server.requests[-1][3] == {"records": rows, "compare": [], "limit": 2}
    fake_server.routes[("POST", "engine/restart")] = (200, {"state": "loading"})
    assert client.restart() == {"state": "loading"}
