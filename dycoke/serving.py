"""An engine that never drains between callers: one background thread owns the device and the engine.

:class:`EngineLoop` runs :meth:`dycoke.engine.Engine.step` on its own thread for as long as anything is
queued or decoding. Any number of caller threads hand it work and wait on a
:class:`concurrent.futures.Future`:

* :meth:`EngineLoop.submit` adds requests to the running engine (continuous batching: they take rows as
  rows free up, next to the requests of other callers) and resolves with their results in order;
* :meth:`EngineLoop.call` runs a function on the engine thread between two engine steps (GPU work such as
  vision encoding), so every kernel launch and CUDA-graph capture happens on one thread.

This is how a Ray actor with several concurrent calls (``max_concurrency > 1``) keeps one engine full: a
call waits on its own future while the engine decodes everyone's rows. A failed engine step fails the
futures of every request then in the engine (their callers decide what to retry) and the loop carries on.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

log = logging.getLogger(__name__)

_STOP = object()


class EngineLoop:
    """Owns ``engine`` on a daemon thread; thread-safe :meth:`submit` and :meth:`call`."""

    def __init__(self, engine, name: str = "engine-loop"):
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._pending: list[tuple[Any, Future]] = []  # (handle, future) of submitted, unfinished work
        self._closed = False
        self._threads = torch.get_num_threads()  # the creator's CPU thread setting (per thread in OpenMP)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, requests: list) -> Future:
        """Queue ``requests``; the future resolves to their :class:`~dycoke.scheduling.Result` list."""
        return self._put("submit", requests)

    def call(self, fn: Callable[..., Any], *args, **kwargs) -> Future:
        """Run ``fn(*args, **kwargs)`` on the engine thread at the next step boundary."""
        return self._put("call", (fn, args, kwargs))

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the thread after the work already queued (idempotent)."""
        if not self._closed:
            self._closed = True
            self._inbox.put(_STOP)
            self._thread.join(timeout)

    def _put(self, kind: str, payload) -> Future:
        if self._closed:
            raise RuntimeError("the engine loop is closed")
        fut: Future = Future()
        self._inbox.put((kind, payload, fut))
        return fut

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        torch.set_num_threads(self._threads)
        with torch.inference_mode():
            while True:
                busy = self.engine.has_work()
                try:
                    item = self._inbox.get(block=not busy)
                except queue.Empty:
                    item = None
                while item is not None:
                    if item is _STOP:
                        self._fail_pending(RuntimeError("the engine loop was closed"))
                        return
                    self._handle(*item)
                    try:
                        item = self._inbox.get_nowait()
                    except queue.Empty:
                        item = None
                if self.engine.has_work():
                    try:
                        self.engine.step()
                    except Exception as exc:  # noqa: BLE001 - every caller in the engine gets the error
                        log.exception("engine step failed; failing %d in-flight submissions", len(self._pending))
                        self._fail_pending(exc)
                self._resolve()

    def _handle(self, kind: str, payload, fut: Future) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            if kind == "call":
                fn, args, kwargs = payload
                fut.set_result(fn(*args, **kwargs))
            else:
                self._pending.append((self.engine.add(payload), fut))
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            fut.set_exception(exc)

    def _resolve(self) -> None:
        still = []
        for handle, fut in self._pending:
            if handle.done:
                fut.set_result(list(handle.results))
            else:
                still.append((handle, fut))
        self._pending = still

    def _fail_pending(self, exc: BaseException) -> None:
        for _, fut in self._pending:
            fut.set_exception(exc)
        self._pending = []
