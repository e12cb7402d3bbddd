"""The one thread that drives the engine while the HTTP handlers wait on queues.

Handlers (on the asyncio event loop) submit and abort requests through a thread-safe command queue; the loop
thread applies the commands between steps, steps the engine while anything is in flight and hands each request's
outputs to that request's asyncio queue. Nothing on the event loop ever waits on the device.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from typing import Any, Callable

from moejax.server.metrics import Metrics

logger = logging.getLogger("moejax.server")
EXPERT_WINDOW_S = 1.0  # expert counts reach the metrics (and the imbalance gauge's window) at most this often


class _Sink:
    def __init__(self, loop: asyncio.AbstractEventLoop, prompt_len: int):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.arrival = time.perf_counter()
        self.first_token: float | None = None
        self.prompt_len = prompt_len

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class EngineLoop:
    def __init__(self, llm, metrics: Metrics):
        self.llm = llm
        self.engine = llm.llm_engine
        self.metrics = metrics
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, _Sink] = {}
        self._ids = itertools.count()
        self._stopping = threading.Event()
        self._stats = dict(self.engine.stats)
        self._thread = threading.Thread(target=self._run, name="moejax-engine", daemon=True)
        self.error: BaseException | None = None
        self._last_flush = time.perf_counter()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort what is left and end the thread."""
        self._stopping.set()
        self._commands.put(("wake",))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    # -- called from the event loop ------------------------------------------------------------------------
    def submit(self, request_id: str, prompt_ids: list[int], params, prompt: str | None = None) -> asyncio.Queue:
        """Queue a request; its RequestOutputs (and an exception, if the engine refuses it) arrive on the
        returned queue, the last one with finished=True."""
        sink = _Sink(asyncio.get_running_loop(), len(prompt_ids))
        self._commands.put(("add", request_id, prompt_ids, params, prompt, sink))
        return sink.queue

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def call(self, fn: Callable[[], Any]) -> asyncio.Future:
        """Run fn on the engine thread between steps (device work that must not race the step)."""
        future = asyncio.get_running_loop().create_future()
        self._commands.put(("call", fn, future))
        return future

    # -- the engine thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                busy = self.engine.has_unfinished_requests()
                self._apply_commands(block=not busy)
                if self.engine.has_unfinished_requests():
                    self._deliver(self.engine.step())
                    self._update_gauges()
        except BaseException as e:  # the server answers 503 from now on; waiting handlers get the error
            self.error = e
            logger.exception("engine loop failed")
            for sink in self._sinks.values():
                sink.put(e)
        finally:
            for rid in list(self._sinks):
                self.engine.abort_request(rid)
                self._sinks.pop(rid).put(RuntimeError("server shutting down"))

    def _apply_commands(self, block: bool) -> None:
        while True:
            try:
                command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
            except queue.Empty:
                return
            block = False
            kind = command[0]
            if kind == "add":
                _, rid, ids, params, prompt, sink = command
                try:
                    self.engine.add_request(rid, ids, params, prompt=prompt)
                    self._sinks[rid] = sink
                    self.metrics.prompt_tokens.inc(len(ids))
                except ValueError as e:
                    sink.put(e)
            elif kind == "abort":
                rid = command[1]
                self.engine.abort_request(rid)
                if self._sinks.pop(rid, None) is not None:
                    self.metrics.requests.labels(finish_reason="abort").inc()
                self._update_gauges()
            elif kind == "call":
                _, fn, future = command
                try:
                    result, error = fn(), None
                except BaseException as e:  # handed to the waiting handler
                    result, error = None, e
                loop = future.get_loop()
                loop.call_soon_threadsafe(_settle, future, result, error)

    def _deliver(self, outputs) -> None:
        now = time.perf_counter()
        generated = self.engine.stats["generation_tokens"] - self._stats["generation_tokens"]
        self._stats = dict(self.engine.stats)
        if generated:
            self.metrics.generation_tokens.inc(generated)
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue
            if sink.first_token is None and any(o.token_ids for o in out.outputs):
                sink.first_token = now
                self.metrics.ttft.observe(now - sink.arrival)
            if out.finished:
                del self._sinks[out.request_id]
                self.metrics.e2e.observe(now - sink.arrival)
                tokens = max(len(o.token_ids) for o in out.outputs)
                if sink.first_token is not None and tokens > 1:
                    self.metrics.tpot.observe((now - sink.first_token) / (tokens - 1))
                for o in out.outputs:
                    self.metrics.requests.labels(finish_reason=o.finish_reason or "length").inc()
                self.metrics.prefix_cache(out.num_cached_tokens, sink.prompt_len)
            sink.put(out)

    def _update_gauges(self) -> None:
        scheduler = self.engine.scheduler
        self.metrics.running.set(len(scheduler.running))
        self.metrics.waiting.set(len(scheduler.waiting))
        self.metrics.kv_usage.set(self.engine.kv_cache_usage())
        now = time.perf_counter()
        if now - self._last_flush >= EXPERT_WINDOW_S or not self.engine.has_unfinished_requests():
            self._last_flush = now
            counts = self.engine.take_expert_counts()
            if counts is not None:
                self.metrics.experts(*counts)


def _settle(future: asyncio.Future, result, error) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
