"""FineInferClient: the fineinfer HTTP API from Python (notebooks, magics, widgets, scripts).

Standard library only. The server is found on its own (see `discover`) or given explicitly:

    client = FineInferClient()                      # inside a kernel the server started
    client = FineInferClient("http://127.0.0.1:8888/", token="...")
    for event in client.generate("Hello", max_new_tokens=20):
        print(event.get("text", ""), end="", flush=True)
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ACTIVE_STATES = ("queued", "running")
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


class FineInferError(Exception):
    """An error the server reported (status and JSON message) or that kept us from reaching it."""

    def __init__(self, message: str, *, status=None, type=None, field=None):
        super().__init__(message)
        self.message, self.status, self.type, self.field = message, status, type, field


def discover() -> tuple[str, str]:
    """(server URL, token) of the Jupyter server running this kernel.

    In order: FINEINFER_SERVER_URL + FINEINFER_TOKEN (the extension publishes them to the
    kernels it starts); JUPYTERHUB_SERVICE_URL + JUPYTERHUB_API_TOKEN (JupyterHub); the runtime
    file of the server whose pid is our parent's; the only running server (plain scripts).
    """
    env = os.environ
    if env.get("FINEINFER_SERVER_URL"):
        return env["FINEINFER_SERVER_URL"], env.get("FINEINFER_TOKEN", "")
    hub_token = env.get("JUPYTERHUB_API_TOKEN", "")
    if hub_token and env.get("JUPYTERHUB_SERVICE_URL"):
        return env["JUPYTERHUB_SERVICE_URL"], hub_token
    try:
        from jupyter_server.serverapp import list_running_servers

        servers = list(list_running_servers())
    except Exception:  # jupyter_server missing or an unreadable runtime dir
        servers = []
    mine = [s for s in servers if s.get("pid") == os.getppid()]
    if mine or len(servers) == 1:
        server = (mine or servers)[0]
        return server["url"], server.get("token") or hub_token
    raise FineInferError(
        "no Jupyter server found: set FINEINFER_SERVER_URL and FINEINFER_TOKEN, "
        "or pass url= and token= (%fineinfer connect URL --token TOKEN)"
    )


def api_root(url: str) -> str:
    """`<server>/fineinfer/api/` from a server URL (with or without /fineinfer or /fineinfer/api)."""
    url = url.rstrip("/")
    if url.endswith("/fineinfer/api"):
        url = url.removesuffix("/api")
    return url.removesuffix("/fineinfer") + "/fineinfer/api/"


class FineInferClient:
    """Methods mirror docs/api.md; every HTTP error raises FineInferError(status, message)."""

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 30):
        if url is None:
            url, found_token = discover()
            token = found_token if token is None else token
        self.url, self.token, self.timeout = url, token or "", timeout
        self.api = api_root(url)
        host = urllib.parse.urlsplit(self.api).hostname or ""
        # a proxy from the environment must not see requests to a local server
        handlers = [urllib.request.ProxyHandler({})] if host in LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self) -> str:
        return f"FineInferClient({self.url!r})"

    # -- REST ---------------------------------------------------------------------------------

    def status(self) -> dict:
        return self._json("GET", "status")

    def metrics(self) -> dict:
        return self._json("GET", "metrics")

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict] | None = None,
        adapter: str | None = None,
        timeout: float | None = None,
        **sampling,
    ) -> Iterator[dict]:
        """Send one request; returns an iterator over its events as they are produced:
        {"type": "delta", "text"} ... then {"type": "done", "finish_reason", "usage", "stats"}.

        `sampling` takes the GenerateRequest fields (max_new_tokens, temperature, top_p, top_k,
        repetition_penalty, seed, stop, ttft, tpot). HTTP errors raise FineInferError here, at
        the call; an {"type": "error"} event raises it while iterating. Closing the iterator
        early closes the connection, which cancels the request.
        """
        body = _request_body(prompt, messages, adapter, sampling)
        return _events(self._open("POST", "generate", body, timeout=timeout))

    def complete(self, prompt: str | None = None, **kwargs) -> dict:
        """The whole answer: the final event plus "text"."""
        parts, done = [], {}
        for event in self.generate(prompt, **kwargs):
            if event["type"] == "delta":
                parts.append(event["text"])
            else:
                done = event
        return {**done, "text": "".join(parts)}

    def jobs(self) -> list[dict]:
        return self._json("GET", "jobs")["jobs"]

    def job(self, job_id: str) -> dict:
        return self._json("GET", f"jobs/{_quote(job_id)}")

    def tune(
        self,
        adapter: str,
        data=None,
        *,
        records=None,
        columns: dict | None = None,
        **params,
    ) -> dict:
        """Start a LoRA fine-tuning job; returns the Job at once.

        `data` is a path (.jsonl, .txt, .json, .csv, .parquet or a datasets save_to_disk
        folder; relative paths resolve against the current directory, then go to the server
        absolute: the server reads the file, and refuses paths outside its root) or the data
        itself: a list of records, a pandas DataFrame, a datasets Dataset or DatasetDict, a
        pyarrow Table (sent as records, at most 16 MiB as JSON). `columns` names the columns
        that hold the parts of a record ({"prompt": "question", "completion": "answer"}, or
        "text" or "messages"). `params` are TrainParams fields (max_steps, r, ...).
        """
        body: dict = {"adapter": adapter, **_data_fields(data, records, columns)}
        if params:
            body["params"] = params
        return self._json("POST", "jobs", body)

    def evaluate(
        self,
        adapter: str,
        data=None,
        *,
        records=None,
        columns: dict | None = None,
        compare=("base",),
        limit: int | None = None,
        max_new_tokens: int | None = None,
        timeout: float | None = 600,
    ) -> dict:
        """Did it learn? Loss and perplexity of `adapter` and of the models in `compare` on
        `data` (as for tune) or, without data, on the examples its job held out
        (val_fraction); for question/answer data also the exact-match and contains rates of
        greedy answers, and a few rows side by side. Waits for the answer."""
        body: dict = {**_data_fields(data, records, columns), "compare": list(compare or [])}
        if limit is not None:
            body["limit"] = limit
        if max_new_tokens is not None:
            body["max_new_tokens"] = max_new_tokens
        path = f"adapters/{_quote(adapter)}/eval"
        with self._open("POST", path, body, timeout=timeout) as response:
            return json.loads(response.read())

    def restart(self) -> dict:
        """Shut the engine down and load the model again (the server keeps running); returns
        the status at once (loading: see wait_ready)."""
        return self._json("POST", "engine/restart")

    def stop(self, job_id: str) -> dict:
        return self._json("POST", f"jobs/{_quote(job_id)}/stop")

    def resume(self, job_id: str) -> dict:
        return self._json("POST", f"jobs/{_quote(job_id)}/resume")

    def cancel(self, job_id: str) -> dict:
        return self._json("POST", f"jobs/{_quote(job_id)}/cancel")

    def adapters(self) -> list[dict]:
        return self._json("GET", "adapters")["adapters"]

    def load_adapter(self, name: str, path: str | Path) -> dict:
        """Load a saved PEFT adapter folder (under the server root) as `name`."""
        return self._json("POST", "adapters", {"name": name, "path": _absolute(path)})

    def save_adapter(self, name: str, path: str | Path) -> dict:
        """Write adapter `name` in PEFT's format to the folder `path` (under the server root)."""
        return self._json("POST", f"adapters/{_quote(name)}/save", {"path": _absolute(path)})

    def export_adapter(self, name: str, to: str = "gguf", path: str | Path | None = None) -> dict:
        """Export adapter `name` for llama.cpp / Ollama (`to="gguf"`) or vLLM (`to="vllm"`), to
        `path` (under the server root) or the server's data directory; the result has "path",
        "files" and the "commands" that use it."""
        body = {"to": to} if path is None else {"to": to, "path": _absolute(path)}
        return self._json("POST", f"adapters/{_quote(name)}/export", body)

    def export_job(
        self, name_or_id: str, path: str | Path | None = None, *, processes: int | None = None
    ) -> dict:
        """Write a training job (by id, or the newest of an adapter) as a folder that trains
        the same adapter under accelerate or torchrun, to `path` (under the server root) or the
        server's data directory; the result has "path", "files" and the "commands"."""
        job = self.find_job(name_or_id)
        body = {} if path is None else {"path": _absolute(path)}
        if processes is not None:
            body["processes"] = processes
        return self._json("POST", f"jobs/{_quote(job['id'])}/export", body)

    def delete_adapter(self, name: str) -> None:
        self._json("DELETE", f"adapters/{_quote(name)}")

    # -- conveniences -------------------------------------------------------------------------

    def find_job(self, name_or_id: str) -> dict:
        """A job by id, else the newest job training the adapter of that name."""
        jobs = self.jobs()
        for job in jobs:
            if job["id"] == name_or_id:
                return job
        named = [j for j in jobs if j["adapter"] == name_or_id]
        if not named:
            known = ", ".join(f"{j['id']} ({j['adapter']})" for j in jobs) or "none"
            message = f"job: no job or adapter named {name_or_id!r} (jobs: {known})"
            raise FineInferError(message, status=404, type="not_found")
        return max(named, key=lambda j: (j.get("created") or 0, _job_number(j["id"])))

    def wait(self, name_or_id: str, *, timeout: float | None = None, poll: float = 0.5) -> dict:
        """Block until the job is no longer queued or running; returns it."""
        job = self.find_job(name_or_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        while job["state"] in ACTIVE_STATES:
            if deadline is not None and time.monotonic() >= deadline:
                raise FineInferError(f"wait: {job['id']} still {job['state']} after {timeout:g} s")
            time.sleep(poll)
            job = self.job(job["id"])
        return job

    def wait_ready(self, *, timeout: float = 600, poll: float = 0.5) -> dict:
        """Block until the model has loaded; returns the status."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if status["state"] == "ready":
                return status
            if status["state"] == "error":
                raise FineInferError(f"model failed to load: {status.get('error')}", status=503)
            if time.monotonic() >= deadline:
                raise FineInferError(f"model still loading after {timeout:g} s", status=503)
            time.sleep(poll)

    # -- HTTP ---------------------------------------------------------------------------------

    def _json(self, method: str, path: str, body: dict | None = None):
        with self._open(method, path, body, timeout=self.timeout) as response:
            raw = response.read()
        return json.loads(raw) if raw.strip() else None

    def _open(self, method: str, path: str, body: dict | None, *, timeout: float | None):
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"token {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.api + path, data, headers, method=method)
        try:
            return self._opener.open(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            raise _http_error(e, self.api + path) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise FineInferError(f"cannot reach the server at {self.url}: {reason}") from None


def _events(response) -> Iterator[dict]:
    """NDJSON, one event per line, read as the lines arrive."""
    try:
        for line in response:
            if not line.strip():
                continue
            event = json.loads(line)
            if event.get("type") == "error":
                raise FineInferError(event.get("message") or "generation failed")
            yield event
            if event.get("type") == "done":
                return
    finally:
        response.close()


def _http_error(e: urllib.error.HTTPError, url: str) -> FineInferError:
    try:
        payload = json.loads(e.read() or b"{}")
    except (ValueError, OSError):
        payload = {}
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return FineInferError(
            error["message"], status=e.code, type=error.get("type"), field=error.get("field")
        )
    if isinstance(payload, dict) and payload.get("message"):  # jupyter_server's own errors
        return FineInferError(f"HTTP {e.code}: {payload['message']}", status=e.code)
    if e.code == 404:
        message = f"{url} not found: is the fineinfer_jupyter server extension enabled?"
        return FineInferError(message, status=404, type="not_found")
    if e.code in (401, 403):
        return FineInferError(f"HTTP {e.code}: the server refused the token", status=e.code)
    return FineInferError(f"HTTP {e.code} {e.reason}", status=e.code)


def _request_body(prompt, messages, adapter, sampling) -> dict:
    if (prompt is None) == (messages is None):
        raise FineInferError("generate: pass either prompt or messages")
    body = {"prompt": prompt} if messages is None else {"messages": messages}
    if adapter is not None:
        body["adapter"] = adapter
    body.update({k: v for k, v in sampling.items() if v is not None})
    return body


def _data_fields(data, records, columns) -> dict:
    """ "data" (an absolute path) or "records" (rows of a table), and "columns"."""
    from .tables import records_of

    out: dict = {}
    if data is not None and not isinstance(data, (str, Path)):
        data, records = None, data
    if data is not None:
        out["data"] = _absolute(data)
    if records is not None:
        out["records"] = records_of(records, "records")
    if columns:
        out["columns"] = columns
    return out


def _absolute(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())


def _quote(part: str) -> str:
    return urllib.parse.quote(str(part), safe="")


def _job_number(job_id: str) -> int:
    tail = job_id.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0
