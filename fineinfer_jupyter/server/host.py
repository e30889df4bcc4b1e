"""The engine inside the server: created off the tornado loop, called through threads.

Nothing here touches torch on the loop: the engine module is imported and the Engine built in
a worker thread (the model then loads in the engine's own thread), blocking engine calls run in
a small thread pool, and engine events reach the loop through `call_soon_threadsafe`. The host
rebuilds the Engine on request (restart), and stopping never waits long for it (SIGTERM).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor, Future
from functools import partial

from .. import __version__
from .errors import ApiError, dumps, engine_errors

EVENTS_INTERVAL = 0.5  # seconds between two pushes on the events WebSocket
SHUTDOWN_TIMEOUT = 2.0  # seconds the engine thread gets to stop (at SIGTERM, on restart)


class EngineHost:
    def __init__(self, config: dict, *, root_dir: str, log: logging.Logger):
        self.config = config  # EngineConfig fields
        self.root_dir = root_dir  # the server's root directory: every path must lie under it
        self.log = log
        self.engine = None
        self.error: str | None = None  # the engine could not be created at all
        self.pool = DaemonPool(8, "fineinfer-call")
        self.sockets: set = set()  # open events WebSockets (anything with .send(text))
        self._creating: asyncio.Task | None = None
        self._pushing: asyncio.Task | None = None
        self._restarting: asyncio.Lock | None = None
        self._closed = False
        self.restarts = 0  # engines rebuilt by restart()
        self.started = time.time()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start creating the engine (once); the model then loads in the engine's thread."""
        if self._creating is None and not self._closed:
            self._creating = asyncio.get_running_loop().create_task(self._create())

    async def _create(self) -> None:
        try:
            engine = await asyncio.get_running_loop().run_in_executor(self.pool, self._new)
        except Exception as e:
            self.log.exception("fineinfer: could not start the engine")
            self.error = f"{type(e).__name__}: {e}"
            return
        if self._closed:  # stopped while it was being built
            await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
            return
        self.engine = engine

    def _new(self):
        from ..engine import Engine, EngineConfig

        return Engine(EngineConfig(**self.config), wait=False)

    async def close(self) -> None:
        """Shut the engine down and free the model (stop_extension, on SIGTERM)."""
        self._closed = True
        for socket in list(self.sockets):
            socket.close()
        self.sockets.clear()
        if self._pushing is not None:
            self._pushing.cancel()
        if self._creating is not None:
            await asyncio.gather(self._creating, return_exceptions=True)
        if self.engine is not None:
            start = time.monotonic()
            await asyncio.get_running_loop().run_in_executor(
                None, self.engine.shutdown, SHUTDOWN_TIMEOUT
            )
            self.log.info("fineinfer: engine stopped in %.1f s", time.monotonic() - start)
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def restart(self) -> dict:
        """A new Engine in place of the current one (after it failed, or to start over): the
        old one shuts down (its running job checkpoints and is interrupted, requests in flight
        get an error), the model loads again, and the status (loading) is answered at once.
        409 when the old engine thread does not stop (stuck in an operation)."""
        if self._closed:
            raise ApiError(503, "the server is stopping")
        self._restarting = self._restarting or asyncio.Lock()
        async with self._restarting:
            if self._creating is not None:
                await asyncio.gather(self._creating, return_exceptions=True)
            old = self.engine
            if old is not None:
                loop = asyncio.get_running_loop()
                if not await loop.run_in_executor(None, old.shutdown, SHUTDOWN_TIMEOUT):
                    raise ApiError(
                        409,
                        f"the engine thread did not stop within {SHUTDOWN_TIMEOUT:g} s (it is "
                        "inside a long operation); try again, or restart the server",
                    )
            self.log.info("fineinfer: restarting the engine")
            self.engine, self.error, self._creating = None, None, None
            self.restarts += 1
            self.start()
            return self.status()

    # -- what handlers call -------------------------------------------------------------------

    @property
    def state(self) -> str:
        if self.engine is not None:
            return self.engine.state
        return "error" if self.error else "loading"

    def status(self) -> dict:
        self.start()
        if self.engine is not None:
            status = self.engine.status()
        else:
            status = {
                "state": self.state,
                "progress": None if self.error else "starting the engine",
                "error": self.error,
                "model": None,
                "policy": self.config["policy"],
                "slo": None,
                "threads": None,
                "adapters": [],
                "requests": {"waiting": 0, "running": 0},
            }
        return {**status, "restarts": self.restarts, "version": __version__}

    def require(self):
        """The engine, for a request that needs the model; 503 until the model is ready."""
        self.start()
        engine = self.engine
        if engine is not None and engine.state == "ready":
            return engine
        if engine is None and not self.error:
            raise ApiError(503, "model is loading: starting the engine")
        if engine is not None and engine.state == "error" and engine.was_ready:
            raise ApiError(
                503,
                f"engine failed: {engine.error} (POST fineinfer/api/engine/restart starts it "
                "again)",
            )
        if engine is None or engine.state == "error":
            raise ApiError(503, f"model failed to load: {self.error or engine.error}")
        if engine.state == "loading":
            raise ApiError(503, f"model is loading: {engine.progress}")
        raise ApiError(503, f"engine is {engine.state}")

    async def run(self, fn: Callable, *args, conflict=False, data_field="data", **kwargs):
        """Call a blocking engine method in a worker thread; its errors become ApiErrors."""
        call = partial(fn, *args, **kwargs)
        with engine_errors(conflict=conflict, data_field=data_field):
            return await asyncio.get_running_loop().run_in_executor(self.pool, call)

    async def generate(self, engine, req, callback: Callable[[dict], None]):
        """Queue a validated GenerateRequest; returns its RequestStream, whose events reach
        `callback` in the engine thread. (In a worker thread: the engine tokenizes the prompt
        under a lock that a job's dataset building may hold for a while.) Defaults and ranges
        are the engine's: what a request leaves out, the engine fills in."""
        slo = {"ttft": req.ttft, "tpot": req.tpot}
        return await self.run(
            engine.generate,
            req.prompt,
            adapter=req.adapter,
            slo=slo,
            callback=callback,
            **req.sampling,
        )

    def redact(self, message: str) -> str:
        """`message` without the server's own absolute paths: the data directory is shown as
        <data_dir>, paths under the root directory relative to it."""
        names = []
        if self.engine is not None:
            data_dir = os.path.abspath(self.engine.config.data_dir)
            names += [(os.path.realpath(data_dir), "<data_dir>"), (data_dir, "<data_dir>")]
        root = os.path.abspath(self.root_dir)
        names += [(os.path.realpath(root), "<root>"), (root, "<root>")]
        for path, name in sorted(names, key=lambda p: -len(p[0])):
            path = path.rstrip(os.sep)
            if not path:  # a root of "/" stays as it is
                continue
            inside = "" if name == "<root>" else name + os.sep
            pattern = re.escape(path) + r"(/|(?![\w.-]))"  # the whole path, not a prefix of a name
            message = re.sub(pattern, partial(_shown_path, inside, name), message)
        return message

    # -- the events WebSocket -----------------------------------------------------------------

    def subscribe(self, socket) -> None:
        self.start()
        self.sockets.add(socket)
        if self._pushing is None or self._pushing.done():
            self._pushing = asyncio.get_running_loop().create_task(self._push())

    def unsubscribe(self, socket) -> None:
        self.sockets.discard(socket)

    async def _push(self) -> None:
        """Metrics to every socket about twice a second; jobs whenever a fresh list is in.

        One task for all sockets: each snapshot is taken once. The jobs list comes from the
        engine thread (up to one engine step away), so it is fetched alongside, not awaited.
        """
        loop = asyncio.get_running_loop()
        jobs: asyncio.Future | None = None
        while self.sockets:
            tick = loop.time()
            engine = self.engine
            if jobs is None and engine is not None and engine.state == "ready":
                jobs = loop.run_in_executor(self.pool, engine.jobs)
            if jobs is not None:
                await asyncio.wait([jobs], timeout=EVENTS_INTERVAL)
            messages = []
            if engine is not None:
                messages.append({"type": "metrics", "data": engine.metrics_snapshot()})
            if jobs is not None and jobs.done():
                if jobs.exception() is None:
                    messages.append({"type": "jobs", "data": jobs.result()})
                jobs = None
            for socket in list(self.sockets):
                for message in messages:
                    socket.send(message["type"], dumps(message))
            await asyncio.sleep(max(0.0, EVENTS_INTERVAL - (loop.time() - tick)))


def _shown_path(inside: str, name: str, match: re.Match) -> str:
    return inside if match.group(1) else name


class EventQueue:
    """A request's engine events, delivered in the engine thread, read on the tornado loop
    (the events of `requests` requests, for an OpenAI answer with several choices)."""

    def __init__(self, requests: int = 1):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[dict] = asyncio.Queue()
        self.open = requests  # requests whose final event has not been read

    def put(self, event: dict) -> None:  # engine thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass

    async def batches(self) -> AsyncIterator[list[dict]]:
        """Lists of the events that are in (at least one), ending with the last final event."""
        while self.open:
            batch = [await self.queue.get()]
            while not self.queue.empty() and batch[-1]["type"] == "delta":
                batch.append(self.queue.get_nowait())
            self.open -= batch[-1]["type"] != "delta"
            yield batch


class DaemonPool(Executor):
    """A fixed pool of daemon threads. ThreadPoolExecutor's threads are joined when the process
    exits, so one call stuck in a long operation (a data set being tokenized, an engine call)
    would keep a server that was told to stop alive; these are not waited for."""

    def __init__(self, workers: int, name: str):
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        for i in range(workers):
            threading.Thread(target=self._run, name=f"{name}_{i}", daemon=True).start()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        if self._closed:
            raise RuntimeError("cannot schedule new calls after shutdown")
        future: Future = Future()
        self._work.put((future, fn, args, kwargs))
        return future

    def _run(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                self._work.put(None)  # the next thread ends too
                return
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:
                future.set_exception(e)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._closed = True
        if cancel_futures:
            while True:
                try:
                    item = self._work.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        self._work.put(None)
