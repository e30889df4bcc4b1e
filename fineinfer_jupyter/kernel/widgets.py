"""Live ipywidgets: a training job's progress and the engine dashboard.

Each widget polls the server from a daemon thread (trait updates from a thread reach the
frontend in ipykernel), so it keeps moving while other cells run, and stops polling when the
job ends or the widget is closed.
"""

from __future__ import annotations

import html
import math
import threading
import time

import ipywidgets as w

from .client import ACTIVE_STATES, FineInferClient, FineInferError
from .render import STILL_FALLING

BAR_STYLE = {"running": "info", "done": "success", "failed": "danger"}


class _Poller:
    """Calls fetch() every `interval` seconds in a thread and hands the result to render()."""

    interval = 1.0
    box: w.Widget

    def __init__(self, client: FineInferClient):
        self.client = client
        self._stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="fineinfer-poll")

    def start(self):
        self.thread.start()
        return self

    def close(self) -> None:
        self._stopped.set()
        self.box.close()

    @property
    def polling(self) -> bool:
        return self.thread.is_alive()

    def _ipython_display_(self):
        from IPython.display import display

        display(self.box)

    def _loop(self) -> None:
        delay = 0.0
        while not self._stopped.wait(delay) and self.box.comm is not None:
            delay = self.interval
            try:
                data = self.fetch()
                self.render(data)
            except FineInferError as e:
                self.show_error(e.message)
                if e.status == 404:
                    return
                delay = max(delay, 2.0)
                continue
            except Exception as e:  # keep the widget alive whatever one poll does
                self.show_error(f"{type(e).__name__}: {e}")
                continue
            if self.finished(data):
                return

    def finished(self, data: dict) -> bool:
        return False


class JobWidget(_Poller):
    """Progress bar, step, loss sparkline, samples/s, ETA and state of one training job."""

    interval = 0.5

    def __init__(self, client: FineInferClient, job: dict):
        super().__init__(client)
        self.job = job
        self.header = w.HTML()
        self.bar = w.FloatProgress(min=0, max=1, layout=w.Layout(width="260px"))
        self.stats = w.HTML()
        self.spark = w.HTML()
        self.box = w.VBox([self.header, w.HBox([self.bar, self.stats]), self.spark])
        self.render(job)

    def fetch(self) -> dict:
        return self.client.job(self.job["id"])

    def finished(self, job: dict) -> bool:
        return job["state"] not in ACTIVE_STATES

    def render(self, job: dict) -> None:
        self.job = job
        total = job.get("total_steps") or 1
        self.header.value = (
            f"<b>{_e(job['adapter'])}</b> · {_e(job['id'])} · <b>{_e(job['state'])}</b>"
        )
        self.bar.max, self.bar.value = total, min(job.get("step") or 0, total)
        self.bar.bar_style = BAR_STYLE.get(job["state"], "warning")
        parts = [
            f"step {job.get('step', 0)}/{total}",
            f"loss {_num(job.get('loss'))}",
            f"{_num(job.get('samples_per_s'))} samples/s",
        ]
        if job.get("estimating"):  # no optimizer step measured yet
            parts[-1] = "estimating speed and ETA"
        elif job["state"] in ACTIVE_STATES:
            parts.append(f"ETA {_secs(job.get('eta_s'))}")
        if job.get("eval_loss") is not None:
            parts.append(f"validation loss {_num(job['eval_loss'])}")
        if job.get("loss_falling"):
            parts.append(f"<b>{STILL_FALLING}</b>")
        if job.get("error"):
            parts.append(f"<span style='color:#c00'>{_e(job['error'])}</span>")
        self.stats.value = "&nbsp;" + " · ".join(parts)
        losses = [p[1] for p in job.get("loss_history") or []]
        evals = [p[1] for p in job.get("eval_history") or []]
        lines = [f"loss {sparkline(losses, width=240)}"] if len(losses) > 1 else []
        if len(evals) > 1:
            lines.append(f"validation loss {sparkline(evals, width=240)}")
        self.spark.value = " &nbsp; ".join(lines)

    def show_error(self, message: str) -> None:
        self.stats.value = f"&nbsp;<span style='color:#c00'>{_e(message)}</span>"


class Dashboard(_Poller):
    """Engine state, what it runs now, deferral, throughput, SLOs, offload and memory, polled ~1 s."""

    def __init__(self, client: FineInferClient):
        super().__init__(client)
        self.header = w.HTML("<b>fineinfer</b> · connecting…")
        self.bar = w.FloatProgress(min=0, max=1, description="training", layout={"width": "360px"})
        self.body = w.HTML()
        self.error = w.HTML()
        close = w.Button(description="close", layout=w.Layout(width="70px"))
        close.on_click(lambda _: self.close())
        self.box = w.VBox([w.HBox([self.header, close]), self.bar, self.body, self.error])

    def fetch(self) -> dict:
        return self.client.metrics()

    def show_error(self, message: str) -> None:
        self.error.value = f"<span style='color:#c00'>{_e(message)}</span>"

    def render(self, m: dict) -> None:
        now, series = m.get("iteration") or {}, m.get("series") or {}
        train, inf, req = m.get("training") or {}, m.get("inference") or {}, m.get("requests") or {}
        since = time.time() - now["started"] if now.get("started") else None
        self.header.value = (
            f"<b>fineinfer</b> · {_e(m.get('state', '?'))} · now: <b>{_e(now.get('kind', '?'))}</b>"
            + (f" ({_secs(since)})" if since is not None and since >= 0 else "")
        )
        total = train.get("total_steps") or 0
        self.bar.max, self.bar.value = max(total, 1), min(train.get("step") or 0, max(total, 1))
        self.bar.description = f"{train['job']}" if train.get("job") else "training"
        slo = inf.get("slo") or {}
        share = m.get("share") or {}
        memory = m.get("memory") or {}
        offload = m.get("offload") or {}
        rows = [
            ("waiting / running", f"{req.get('waiting', 0)} / {req.get('running', 0)}", None),
            ("deferral slack", _slack((m.get("slack") or {}).get("min")), series.get("slack")),
            (
                "inference",
                f"{_num(inf.get('tokens_per_s'))} tokens/s",
                series.get("inference_tokens_per_s"),
            ),
            (
                "TTFT p50 / p99",
                f"{_secs(inf.get('ttft_p50'))} / {_secs(inf.get('ttft_p99'))}",
                None,
            ),
            (
                "SLO attainment",
                f"TTFT {_pct(slo.get('ttft'))} · TPOT {_pct(slo.get('tpot'))}",
                None,
            ),
            (
                "training",
                f"{_num(train.get('samples_per_s'))} samples/s"
                + (f" · step {train.get('step')}/{total}" if train.get("job") else ""),
                series.get("train_samples_per_s"),
            ),
            ("loss", _num(train.get("loss")), series.get("loss")),
            _offload_row(offload, series.get("offload_bytes_per_s")),
            _prefix_row(m.get("prefix_cache") or {}),
            (
                "memory",
                f"{_bytes(memory.get('rss_bytes'))} RAM · {_bytes(memory.get('device_bytes'))} device",
                None,
            ),
            ("time share", " · ".join(f"{k} {_pct(v)}" for k, v in share.items()) or "–", None),
        ]
        cells = "".join(
            f"<tr><td style='padding-right:1em'>{label}</td><td style='padding-right:1em'>{value}"
            f"</td><td>{sparkline(points) if points else ''}</td></tr>"
            for label, value, points in rows
        )
        self.body.value = f"<table style='font-size:12px'>{cells}</table>"
        self.error.value = ""


def _prefix_row(prefix: dict) -> tuple:
    """The prefix cache: its bytes against its budget, hit rate and prompt tokens saved."""
    if not prefix.get("budget_bytes"):
        return ("prefix cache", "off", None)
    value = (
        f"{_bytes(prefix.get('bytes'))} of {_bytes(prefix.get('budget_bytes'))} · "
        f"hit rate {_pct(prefix.get('hit_rate'))} · {prefix.get('tokens_saved', 0)} tokens saved"
    )
    return ("prefix cache", value, None)


def _offload_row(offload: dict, points) -> tuple:
    if not offload.get("enabled"):
        return ("offload", "none: every layer on the device", None)
    where = {"cpu": "host memory", "disk": "disk"}.get(offload.get("mode"), offload.get("mode"))
    value = (
        f"{_bytes(offload.get('bytes_per_s'))}/s from {_e(where)} · "
        f"{offload.get('layers', 0)} layers · {_bytes(offload.get('bytes_total'))} fetched, "
        f"{_bytes(offload.get('shared_bytes'))} shared"
    )
    return ("offload", value, points)


def sparkline(values, *, width: int = 120, height: int = 20) -> str:
    """A tiny inline SVG line of the finite numbers in `values`."""
    ys = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if len(ys) < 2:
        return ""
    lo, hi = min(ys), max(ys)
    span = (hi - lo) or 1.0
    step = width / (len(ys) - 1)
    points = " ".join(
        f"{i * step:.1f},{height - 1 - (y - lo) / span * (height - 2):.1f}"
        for i, y in enumerate(ys)
    )
    return (
        f"<svg width='{width}' height='{height}' style='vertical-align:middle'>"
        f"<polyline points='{points}' fill='none' stroke='#1976d2' stroke-width='1.5'/></svg>"
    )


def _e(text) -> str:
    return html.escape(str(text))


def _num(v) -> str:
    if v is None:
        return "–"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"


def _secs(v) -> str:
    if v is None:
        return "–"
    if v < 60:
        return f"{v:.2g} s" if v < 10 else f"{v:.0f} s"
    return f"{int(v // 60)} min {int(v % 60)} s"


def _slack(v) -> str:
    if v is None:
        return "nothing waiting"
    return f"{_secs(v)} left" if v >= 0 else f"{_secs(-v)} late"


def _bytes(v) -> str:
    if v is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(v) < 1024 or unit == "GB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return ""
