"""Text and HTML the magics print: status, tables, job lines, answer footers, side-by-side answers."""

from __future__ import annotations

import html


def status_lines(status: dict, url: str) -> list[str]:
    state = status.get("state", "?")
    lines = [f"fineinfer {status.get('version', '')} at {url}: {state}".replace("  ", " ")]
    if state == "loading" and status.get("progress"):
        lines[0] += f" ({status['progress']})"
    if status.get("error"):
        lines[0] += f": {status['error']}"
    model = status.get("model") or {}
    if model:
        size = f" · {model['parameters'] / 1e6:.1f}M parameters" if model.get("parameters") else ""
        if model.get("quantize") not in (None, "none"):
            size = f" · {model['quantize']}{size}"
        if model.get("weight_bytes"):
            size += f" · {model['weight_bytes'] / 2**20:.0f} MiB of weights"
        lines.append(
            f"model {model.get('name')} · {model.get('device')} · {model.get('dtype')}{size}"
            f" · policy {status.get('policy')}"
        )
        if str(model.get("dtype_reason", "")).startswith("auto: "):
            lines.append(f"dtype {model['dtype_reason']}")
        if model.get("decode_weights") in ("int8", "int4"):  # decodes' copies (int8rows.py)
            lines.append(f"decode weights {model.get('decode_weights_reason', 'int8')}")
    threads = status.get("threads")
    if threads:
        lines.append(
            f"threads {threads['intra_op']} ({threads['source']}"
            + (", fewer while other programs are busy" if threads.get("follows_load") else "")
            + ")"
            f" · OpenMP waiting: {threads['wait_policy']}"
        )
    rows = status.get("row_threads")  # (a bf16 model on a CPU: Runner.choose_row_threads)
    if rows:
        n = rows["threads"]
        lines.append(f"one-row products on {n} thread{'s' if n > 1 else ''}: {rows['reason']}")
    lines.append(f"adapters: {', '.join(status.get('adapters') or []) or 'none'}")
    lacking = (status.get("features") or {}).get("lacking") or {}
    for feature, why in lacking.items():
        lines.append(f"this model lacks {feature.replace('_', ' ')}: {why}")
    return lines


def table(header: tuple, rows: list[tuple]) -> str:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def job_line(job: dict) -> str:
    line = (
        f"{job['adapter']} ({job['id']}): {job['state']} · step {job['step']}/{job['total_steps']}"
    )
    if job.get("loss") is not None:
        line += f" · loss {job['loss']:.4g}"
    if job.get("eval_loss") is not None:
        line += f" · validation loss {job['eval_loss']:.4g}"
    if job.get("loss_falling"):
        line += f" · {STILL_FALLING}"
    if job.get("error"):
        line += f" · {job['error']}"
    return line


STILL_FALLING = "loss still falling: more steps may help"


def length_note(job: dict) -> str:
    """How the job's length was chosen, when the user did not choose it."""
    if not job.get("auto_length"):
        return ""
    epochs = job.get("epochs") or 0
    if epochs <= 1:
        return " (1 epoch)"
    return f" ({epochs:.3g} epochs: a small data set is seen several times; set --epochs or --max-steps)"


def eval_lines(result: dict) -> list[str]:
    """An evaluation: one row per model, then a few examples with every model's answer."""
    lines = [f"{result['adapter']} on {result['examples']} examples ({result['data']}):"]
    rows = []
    for m in result["models"]:
        rows.append(
            (
                m["model"],
                _g(m["loss"]),
                _g(m["perplexity"]),
                _rate(m["exact_match"], m["answers"]),
                _rate(m["contains"], m["answers"]),
            )
        )
    header = ("model", "loss", "perplexity", "exact match", "contains")
    lines += ["  " + r for r in table(header, rows).splitlines()]
    width = max((len(m["model"]) for m in result["models"]), default=4)
    width = max(width, len("reference"))
    for row in result["rows"]:
        lines += [
            "",
            _one_line(row["prompt"]),
            f"  {'reference'.ljust(width)}  {_one_line(row['reference'])}",
        ]
        lines += [f"  {n.ljust(width)}  {_one_line(a)}" for n, a in row["answers"].items()]
    return lines


def _g(v) -> str:
    return "–" if v is None else f"{v:.4g}"


def _rate(rate, n: int) -> str:
    return "–" if rate is None else f"{round(rate * n)}/{n} ({100 * rate:.0f}%)"


def _one_line(text: str, limit: int = 120) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def export_lines(result: dict) -> list[str]:
    """What an export wrote, and the commands that use it."""
    if result["format"] == "gguf":
        lines = [f"exported {result['adapter']!r} as a llama.cpp LoRA adapter:"]
        lines += [f"  {f}" for f in result["files"]]
    else:
        lines = [f"{result['adapter']!r} passes vLLM's LoRA checks; its PEFT folder:"]
        lines.append(f"  {result['path']}")
    return [*lines, "use it:", *(f"  {c}" for c in result["commands"])]


def job_export_lines(result: dict) -> list[str]:
    """Where an exported job went, and the commands that train it."""
    base = result["base_model"]
    return [
        f"exported {result['job']} ({result['adapter']!r}) for accelerate / torchrun:",
        f"  {result['path']}",
        f"  base model: {base['path']} (shape hash {base['shape_hash']})",
        f"train it ({result['processes']} processes; README.md there for several nodes):",
        *(f"  {c}" for c in result["commands"]),
    ]


def footer(done: dict | None, adapter: str | None) -> str:
    """One line under an answer: tokens, TTFT, tokens/s, deferral, finish reason."""
    name = adapter or "base"
    if not done:
        return f"[{name}] stopped before the end"
    tokens = (done.get("usage") or {}).get("completion_tokens")
    stats = done.get("stats") or {}
    parts = [name, f"{tokens} tokens"]
    if stats.get("ttft") is not None:
        parts.append(f"TTFT {stats['ttft']:.2f} s")
    if stats.get("tokens_per_s") is not None:
        parts.append(f"{stats['tokens_per_s']:.1f} tokens/s")
    deferred = stats.get("deferred") or 0.0
    parts.append(f"deferred {deferred:.2f} s" if deferred >= 0.005 else "not deferred")
    if stats.get("cached_tokens"):
        parts.append(f"{stats['cached_tokens']} prompt tokens cached")
    if (stats.get("prefill_chunks") or 0) > 1:
        parts.append(f"prefilled in {stats['prefill_chunks']} chunks")
    if stats.get("note"):
        parts.append(f"late: {stats['note']}")
    parts.append(f"finish: {done.get('finish_reason')}")
    return "[" + " · ".join(parts) + "]"


def compare_bundle(answers: dict) -> dict:
    """text/plain and text/html of several answers to one prompt, side by side."""
    plain = "\n\n".join(f"── {name} ──\n{_text(a)}" for name, a in answers.items())
    head = "".join(f"<th style='text-align:left'>{html.escape(n)}</th>" for n in answers)
    body = "".join(
        "<td style='vertical-align:top;text-align:left'>"
        f"<pre style='white-space:pre-wrap;margin:0'>{html.escape(_text(a))}</pre></td>"
        for a in answers.values()
    )
    width = f"{100 / max(1, len(answers)):.0f}%"
    cols = "".join(f"<col style='width:{width}'>" for _ in answers)
    return {
        "text/plain": plain,
        "text/html": f"<table style='width:100%;table-layout:fixed'>{cols}<tr>{head}</tr>"
        f"<tr>{body}</tr></table>",
    }


def _text(answer: dict) -> str:
    if answer.get("error") is not None:
        return f"(error: {answer['error'].message})"
    return answer["text"] or ("…" if answer.get("done") is None else "")
