"""One run at a time per output, so two runs never do the same GPU work.

Committed output needs no lock (chunks are created if absent and never rewritten, :mod:`pipeline.sink`); but two
runs planning from the same state would process the same videos, and one run's clean-up of uncommitted files would
delete those of a run still writing. So a run holds ``<output.path>/_locks/<name>.json`` from planning to its last
commit (``with RunLock.for_output(...) as lock``; ``lock.check()`` before a commit raises :class:`LockLost` if
another run took it over). It is created if absent (of racing runs one wins, the others get :class:`LockHeld`
naming the holder), rewritten by a heartbeat every ``stale_after_s / 4`` while it is still ours, taken over on
its version (:func:`pipeline.storage.replace_if`: one winner) when its holder is dead (a process gone on this
host, or a heartbeat older than ``stale_after_s``), and deleted at the end.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from pipeline import storage

log = logging.getLogger(__name__)


class LockHeld(RuntimeError):
    """Another live run holds the lock."""


class LockLost(RuntimeError):
    """This run's lock was taken over by another run (this one looked dead to it)."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (also when another user owns it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(holder: dict) -> str:
    beat = holder.get("heartbeat_at")
    ago = f"{time.time() - beat:.0f}s ago" if isinstance(beat, (int, float)) else "never"
    return (f"run {holder.get('run_id') or '?'} on host {holder.get('host', '?')} pid {holder.get('pid', '?')}, "
            f"started {holder.get('started_at', '?')}, last heartbeat {ago}")


class RunLock:
    """The lock object at ``uri`` (see the module docstring). One ``acquire`` per instance."""

    def __init__(self, uri: str, s3_cfg=None, stale_after_s: float = 900.0, run_id: str = ""):
        if stale_after_s <= 0:
            raise ValueError("stale_after_s must be > 0")
        self.uri, self.s3, self.stale_after_s, self.run_id = uri, s3_cfg, stale_after_s, run_id
        self.token = uuid.uuid4().hex
        self.took_over: dict | None = None  #: the dead holder this run replaced, if any
        self._started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._version: str | None = None
        self._lost: str | None = None  #: who holds it now, once it is no longer ours
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)

    @classmethod
    def for_output(cls, output_path: str, name: str, s3_cfg=None, stale_after_s: float = 900.0,
                   run_id: str = "") -> RunLock:
        """The lock ``<output_path>/_locks/<name>.json`` (``name``: one plain file name, e.g. a run id)."""
        if not name or "/" in name or "\\" in name or set(name) <= {"."}:
            raise ValueError(f"lock name {name!r} must be one file name")
        return cls(f"{output_path.rstrip('/')}/_locks/{name}.json", s3_cfg, stale_after_s, run_id)

    def _body(self) -> bytes:
        return json.dumps({"token": self.token, "run_id": self.run_id, "host": socket.gethostname(),
                           "pid": os.getpid(), "started_at": self._started, "heartbeat_at": time.time()}).encode()

    def _holder(self) -> tuple[dict, str] | None:
        """The current lock's content (``{}`` when unreadable: half-written by a killed run) and version."""
        cur = storage.read_versioned(self.uri, self.s3)
        if cur is None:
            return None
        try:
            data = json.loads(cur[0])
        except ValueError:
            data = None
        return (data if isinstance(data, dict) else {}), cur[1]

    def _dead(self, holder: dict) -> str | None:
        """Why the holder is dead, or None when it may be alive."""
        beat, pid = holder.get("heartbeat_at"), holder.get("pid")
        if not isinstance(beat, (int, float)):
            return "the lock is unreadable"
        if time.time() - beat > self.stale_after_s:
            return f"its last heartbeat was {time.time() - beat:.0f}s ago (stale after {self.stale_after_s:g}s)"
        if holder.get("host") == socket.gethostname() and isinstance(pid, int) and pid != os.getpid() \
                and not pid_alive(pid):
            return f"its process {pid} on this host is gone"
        return None

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`LockHeld`; starts the heartbeat."""
        for _ in range(5):
            version = storage.put_if_absent(self.uri, self._body(), self.s3)
            cur = None if version else self._holder()
            if cur and cur[0].get("token") == self.token:  # our create, retried after its response was lost
                version = cur[1]
            elif cur:
                holder, reason = cur[0], self._dead(cur[0])
                if reason is None:
                    raise LockHeld(
                        f"{self.uri} is held by {describe(holder)}: only one run may write this output at a time. "
                        f"Wait for it to finish; a run that died loses the lock {self.stale_after_s:g}s after its "
                        f"last heartbeat (output.lock_stale_s), or delete {self.uri} if you are sure it is dead.")
                version = storage.replace_if(self.uri, self._body(), cur[1], self.s3)
                if version:
                    log.warning("took over the lock %s from %s: %s", self.uri, describe(holder), reason)
                    self.took_over = holder
            if version:  # else: released or taken over between our create and our read: try again
                self._version = version
                self._thread.start()
                log.info("lock %s taken", self.uri)
                return self
        raise LockHeld(f"{self.uri}: another run keeps taking this lock; try again")

    def _beat(self) -> None:
        while not self._stop.wait(max(self.stale_after_s / 4, 0.05)):
            try:
                version = storage.replace_if(self.uri, self._body(), self._version, self.s3)
            except Exception:  # noqa: BLE001 - a failed beat is retried next interval; staleness is generous
                log.warning("lock %s: heartbeat failed", self.uri, exc_info=True)
                continue
            if version is None:
                self._mark_lost()
                log.error("lock %s is no longer ours (now: %s)", self.uri, self._lost)
                return
            self._version = version

    def _mark_lost(self) -> None:
        cur = self._holder()
        self._lost = describe(cur[0]) if cur else "nobody (the lock was deleted)"

    def check(self) -> None:
        """Raise :class:`LockLost` if another run has taken the lock over."""
        if self._lost is None:
            cur = self._holder()
            if cur is None or cur[0].get("token") != self.token:
                self._mark_lost()
        if self._lost is not None:
            raise LockLost(f"{self.uri} was taken over by {self._lost} while this run was going; "
                           "not committing (the other run owns the output now)")

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still ours (raises :class:`LockLost` if not)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        if self._lost is None and storage.replace_if(self.uri, None, self._version, self.s3) is not None:
            log.info("lock %s released", self.uri)
            return
        self.check()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.release()
        except LockLost:
            if exc_type is None:
                raise
            log.error("lock %s was lost while the run was failing", self.uri)
