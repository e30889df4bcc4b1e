"""%fineinfer line magic and %%generate cell magic (`%load_ext fineinfer_jupyter`).

Every error a user can cause (bad arguments, no server, unknown adapter, model loading, ...)
is a FineInferError and prints as one line, "fineinfer: <message>", from `_run`.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.display import display

from .args import HELP, HelpShown, column_map, compared, parse_generate, parse_line, train_params
from .client import ACTIVE_STATES, FineInferClient, FineInferError
from .render import (
    compare_bundle,
    eval_lines,
    export_lines,
    footer,
    job_export_lines,
    job_line,
    length_note,
    status_lines,
    table,
)

UPDATE_EVERY = 0.05  # seconds between display updates while an answer streams


@magics_class
class FineInferMagics(Magics):
    def __init__(self, shell):
        super().__init__(shell)
        self._client: FineInferClient | None = None
        self.widgets: list = []  # job widgets and dashboards, newest last

    @property
    def client(self) -> FineInferClient:
        if self._client is None:
            self._client = FineInferClient()
        return self._client

    @line_magic
    def fineinfer(self, line: str):
        """Fine-tune and manage adapters; `%fineinfer help` lists the commands."""
        self._run(self._command, line)

    @cell_magic
    def generate(self, line: str, cell: str):
        """Answer the cell's prompt, streaming; see `%fineinfer help`."""
        self._run(lambda: self._generate(*parse_generate(line, cell)))

    def _run(self, action, *args) -> None:
        try:
            action(*args)
        except FineInferError as e:
            message = " ".join(str(e.message).split("\n"))
            print(f"fineinfer: {message}", file=sys.stderr, flush=True)
        except HelpShown:
            pass
        except KeyboardInterrupt:
            print("fineinfer: interrupted", file=sys.stderr, flush=True)

    # -- %fineinfer commands --------------------------------------------------------------------

    def _command(self, line: str) -> None:
        args = parse_line(line)
        getattr(self, f"_{args.command.replace('-', '_')}")(args)

    def _help(self, args) -> None:
        print(HELP)

    def _status(self, args) -> None:
        print("\n".join(status_lines(self.client.status(), self.client.url)))

    def _connect(self, args) -> None:
        client = FineInferClient(args.url, args.token)
        status = client.status()
        self._client = client
        print(f"connected to {client.url} (model {status['state']})")

    def _tune(self, args) -> None:
        params = train_params(args)
        job = self.client.tune(args.name, **self._data(args), columns=column_map(args), **params)
        examples = f" on {job['examples']} examples" if job.get("examples") else ""
        print(
            f"{job['id']}: training {job['adapter']!r}{examples}, {job['total_steps']} steps"
            + length_note(job)
        )
        self._show_job(job)

    def _eval(self, args) -> None:
        result = self.client.evaluate(
            args.name,
            **self._data(args),
            columns=column_map(args),
            compare=compared(args),
            limit=args.limit,
            max_new_tokens=args.max_new_tokens,
        )
        print("\n".join(eval_lines(result)))

    def _data(self, args) -> dict:
        """{"data": path} or {"records": a variable's value}: --records names a variable;
        --data a file or folder if there is one, else a variable of that name."""
        command = args.command
        if args.records is not None:
            if args.records not in self.shell.user_ns:
                raise FineInferError(f"{command}: --records: no variable named {args.records!r}")
            return {"records": self._rows(args.records)}
        if args.data is None:
            return {}
        if Path(args.data).expanduser().exists() or not args.data.isidentifier():
            return {"data": args.data}
        if args.data not in self.shell.user_ns:
            raise FineInferError(
                f"{command}: --data: no file or folder and no variable named {args.data!r}"
            )
        return {"records": self._rows(args.data)}

    def _rows(self, name: str) -> list[dict]:
        from .tables import records_of

        return records_of(self.shell.user_ns[name], name)

    def _restart(self, args) -> None:
        self.client.restart()
        print("restarting the engine: loading the model again…", flush=True)
        status = self.client.wait_ready(timeout=args.timeout)
        print(status_lines(status, self.client.url)[0].replace(": ready", ": ready again"))

    def _show_job(self, job: dict) -> None:
        from .widgets import JobWidget

        widget = JobWidget(self.client, job)
        display(widget.box)
        self.widgets.append(widget.start())

    def _jobs(self, args) -> None:
        rows = [
            (j["id"], j["adapter"], j["state"], f"{j['step']}/{j['total_steps']}", _g(j["loss"]))
            for j in self.client.jobs()
        ]
        print(table(("job", "adapter", "state", "step", "loss"), rows) if rows else "no jobs")

    def _adapters(self, args) -> None:
        rows = [
            (a["name"], a.get("step", ""), a.get("r", ""), "yes" if a.get("training") else "")
            for a in self.client.adapters()
        ]
        print(table(("adapter", "step", "r", "training"), rows) if rows else "no adapters")

    def _wait(self, args) -> None:
        try:
            job = self.client.wait(args.job, timeout=args.timeout)
        except KeyboardInterrupt:
            raise FineInferError(
                f"wait: interrupted; {args.job} keeps training (%fineinfer stop {args.job})"
            ) from None
        if job["state"] == "failed":
            raise FineInferError(job_line(job))
        print(job_line(job))

    def _stop(self, args) -> None:
        print(job_line(self.client.stop(self.client.find_job(args.job)["id"])))

    def _cancel(self, args) -> None:
        print(job_line(self.client.cancel(self.client.find_job(args.job)["id"])))

    def _resume(self, args) -> None:
        job = self.client.resume(self.client.find_job(args.job)["id"])
        print(job_line(job))
        if job["state"] in ACTIVE_STATES:
            self._show_job(job)

    def _load(self, args) -> None:
        adapter = self.client.load_adapter(args.name, args.path)
        print(f"loaded adapter {adapter['name']!r} from {adapter.get('path', args.path)}")

    def _save(self, args) -> None:
        saved = self.client.save_adapter(args.name, args.path)
        print(f"saved adapter {args.name!r} to {saved.get('saved_to', args.path)}")

    def _export(self, args) -> None:
        print("\n".join(export_lines(self.client.export_adapter(args.name, args.to, args.path))))

    def _export_job(self, args) -> None:
        result = self.client.export_job(args.job, args.path, processes=args.processes)
        print("\n".join(job_export_lines(result)))

    def _delete(self, args) -> None:
        self.client.delete_adapter(args.name)
        print(f"deleted adapter {args.name!r}")

    def _dashboard(self, args) -> None:
        from .widgets import Dashboard

        dashboard = Dashboard(self.client)
        display(dashboard.box)
        self.widgets.append(dashboard.start())

    # -- %%generate -------------------------------------------------------------------------------

    def _generate(self, adapters: list[str | None], request: dict) -> None:
        if len(adapters) == 1:
            return self._stream(adapters[0], request)
        answers = {name: {"text": "", "done": None, "error": None} for name in adapters}
        opened = {name: threading.Event() for name in adapters}
        stop = threading.Event()

        def ask(name: str) -> None:
            answer = answers[name]
            try:
                events = self.client.generate(adapter=name, **request)
            except FineInferError as e:
                answer["error"] = e
                return
            finally:
                opened[name].set()
            try:
                for event in events:
                    if stop.is_set():
                        break
                    if event["type"] == "delta":
                        answer["text"] += event["text"]
                    else:
                        answer["done"] = event
            except FineInferError as e:
                answer["error"] = e
            finally:
                events.close()

        threads = [threading.Thread(target=ask, args=(n,), daemon=True) for n in adapters]
        for thread in threads:
            thread.start()
        try:
            while not all(e.wait(0.05) for e in opened.values()):
                pass
            refused = [a["error"] for a in answers.values() if a["error"] is not None]
            if refused:
                raise refused[0]
            handle = self._display(compare_bundle(answers))
            try:
                while any(t.is_alive() for t in threads):
                    for thread in threads:
                        thread.join(0.1)
                    if handle is not None:
                        handle.update(compare_bundle(answers), raw=True)
            finally:
                if handle is None:
                    print(compare_bundle(answers)["text/plain"])
                else:
                    handle.update(compare_bundle(answers), raw=True)
        finally:
            stop.set()
        for name, answer in answers.items():
            if answer["error"] is not None:
                print(f"fineinfer: {name}: {answer['error'].message}", file=sys.stderr)
            else:
                print(footer(answer["done"], name))

    def _stream(self, adapter: str | None, request: dict) -> None:
        events = self.client.generate(adapter=adapter, **request)
        text, done, last = "", None, 0.0
        handle = self._display({"text/plain": "…"})
        try:
            for event in events:
                if event["type"] != "delta":
                    done = event
                elif handle is None:  # a terminal: print as it comes
                    print(event["text"], end="", flush=True)
                else:
                    text += event["text"]
                    if time.monotonic() - last >= UPDATE_EVERY:
                        handle.update({"text/plain": text}, raw=True)
                        last = time.monotonic()
        finally:
            events.close()
            if handle is None:
                print()
            else:
                handle.update({"text/plain": text}, raw=True)
        print(footer(done, adapter))

    def _display(self, bundle: dict):
        """A display the answer can replace as it grows; None outside a kernel (IPython in a
        terminal prints every update in full)."""
        if getattr(self.shell, "kernel", None) is None:
            return None
        return display(bundle, raw=True, display_id=True)


def _g(v) -> str:
    return "" if v is None else f"{v:.4g}"


def load_ipython_extension(ipython) -> None:
    ipython.register_magics(FineInferMagics)
