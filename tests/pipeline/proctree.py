"""Watch this test process's descendants (a local Ray started with ``ray.init`` lives there): find them by
process title (Ray sets ``ray::<actor or task name>``), kill one on cue, and sample memory.

``ProcessWatcher`` polls every ``interval`` seconds in a daemon thread:

* ``kill_when(match, delay, unless)``: the first process whose title contains ``match`` (and not ``unless``) is
  SIGKILLed ``delay`` seconds after it is first seen with that title (its pid and title are recorded in ``killed``);
* ``peak_rss_total`` / ``peak_rss_max``: the largest sum of RSS over the driver and all its descendants,
  and the largest single process RSS, in bytes (RSS counts shared pages of the object store in every
  process that touched them, so the sum over-estimates).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field

import psutil


def title(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


@dataclass
class _KillOrder:
    match: str
    delay: float
    unless: str | None = None
    first_seen: dict[int, float] = field(default_factory=dict)
    done: bool = False


class ProcessWatcher:
    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.me = psutil.Process(os.getpid())
        self.orders: list[_KillOrder] = []
        self.killed: list[tuple[int, str, float]] = []  # (pid, title, time.monotonic())
        self.titles_seen: dict[int, set[str]] = {}
        self.peak_rss_total = 0
        self.peak_rss_max = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def kill_when(self, match: str, delay: float = 0.0, unless: str | None = None) -> None:
        self.orders.append(_KillOrder(match, delay, unless))

    def pids_with(self, match: str) -> set[int]:
        return {pid for pid, ts in self.titles_seen.items() if any(match in t for t in ts)}

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            total = 0
            procs = [self.me, *self.me.children(recursive=True)]
            for p in procs:
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                self.peak_rss_max = max(self.peak_rss_max, rss)
                t = title(p)
                self.titles_seen.setdefault(p.pid, set()).add(t)
                for order in self.orders:
                    if order.done or order.match not in t or (order.unless and order.unless in t):
                        continue
                    seen = order.first_seen.setdefault(p.pid, now)
                    if now - seen >= order.delay:
                        try:
                            os.kill(p.pid, signal.SIGKILL)
                        except ProcessLookupError:
                            continue
                        order.done = True
                        self.killed.append((p.pid, t, now))
            self.peak_rss_total = max(self.peak_rss_total, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> ProcessWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
