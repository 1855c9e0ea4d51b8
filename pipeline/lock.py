"""One run at a time per output folder: a lock object with a heartbeat, local or on S3.

Two runs writing the same folder at once would each plan from what the other has not finished (resume
planning, nightly's list of new videos) and write the same rows twice. A run therefore holds a lock
object while it plans and writes::

    with RunLock.for_output(output_path, "_locks/<name>.json", s3_settings, stale_after_s=900) as lock:
        ...                    # plan and write
        lock.check()           # before committing: raises LockLost if another run took the lock over

* **Create-if-absent.** Local: ``open(O_CREAT | O_EXCL)``. S3: ``PutObject`` with ``If-None-Match: *``
  (S3 conditional writes): exactly one of two racing runs gets it; the other raises :class:`LockHeld`
  naming the holder (host, pid, run, start time, last heartbeat).
* **Heartbeat.** A daemon thread rewrites the lock's ``heartbeat_at`` every ``stale_after_s / 4`` seconds.
* **Stale locks** (a killed run never releases its lock) are taken over: when the heartbeat is older
  than ``stale_after_s``, or at once when the holder ran on this host and its pid is gone (a driver
  killed and re-run on the same node resumes without waiting).
* **Compare-and-swap.** Take-over, heartbeat and release change the lock only if it is still the
  version that was read (S3: ``If-Match`` on the ETag for ``PutObject`` and ``DeleteObject``; local:
  the content hash, checked under ``flock``), so of two runs taking over at once exactly one wins, and a
  run that lost the lock can neither refresh nor delete its successor's.
* **Release** deletes the lock if it is still ours. If another run took it over meanwhile (this one
  stalled longer than ``stale_after_s``), :meth:`RunLock.check` and :meth:`RunLock.release` raise
  :class:`LockLost` so the run does not commit.

The lock lives under the output path (``_locks/``), outside any run folder: Ray Data's OVERWRITE clears a
run folder when it starts writing, and readers only read ``*.parquet``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipeline import s3

log = logging.getLogger(__name__)

LOCK_DIR = "_locks"


class LockHeld(RuntimeError):
    """Another live run holds the lock."""


class LockLost(RuntimeError):
    """This run's lock was taken over by another run (this one looked dead to it)."""


def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


# ------------------------------------------------------------------------------------------------ stores


class _LocalStore:
    """A lock file; every change is compare-and-swap on its content hash, under ``flock`` of a sidecar file
    (a local output is written from one host, where ``flock`` is exact)."""

    def __init__(self, path: str):
        self.path = Path(os.path.abspath(os.path.expanduser(path)))
        self.uri = str(self.path)

    @contextlib.contextmanager
    def _mutex(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f".{self.path.name}.mutex"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _read(self) -> tuple[bytes, str] | None:
        try:
            body = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return body, hashlib.sha256(body).hexdigest()

    def _write(self, body: bytes) -> str:
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}")
        tmp.write_bytes(body)
        os.replace(tmp, self.path)
        return hashlib.sha256(body).hexdigest()

    def read(self) -> tuple[bytes, str] | None:
        with self._mutex():
            return self._read()

    def create(self, body: bytes) -> str | None:
        with self._mutex():
            return None if self.path.exists() else self._write(body)

    def replace(self, body: bytes, version: str) -> str | None:
        with self._mutex():
            cur = self._read()
            return self._write(body) if cur is not None and cur[1] == version else None

    def delete(self, version: str) -> bool:
        with self._mutex():
            cur = self._read()
            if cur is None or cur[1] != version:
                return False
            self.path.unlink()
            return True


class _S3Store:
    """A lock object; every change is conditional on its ETag (S3 conditional writes and deletes)."""

    _LOST = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404", "NotFound")

    def __init__(self, uri: str, settings: s3.S3Settings):
        self.uri = uri
        self.bucket, self.key = s3.split_uri(uri)
        self.settings = settings

    def _put(self, body: bytes, **condition) -> str | None:
        try:
            resp = s3.client(self.settings).put_object(Bucket=self.bucket, Key=self.key, Body=body,
                                                       ContentType="application/json", **condition)
        except Exception as exc:
            if s3.error_code(exc) in self._LOST:  # someone else's create or change won
                return None
            raise
        return resp["ETag"]

    def read(self) -> tuple[bytes, str] | None:
        try:
            resp = s3.client(self.settings).get_object(Bucket=self.bucket, Key=self.key)
        except Exception as exc:
            if s3.error_code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        return resp["Body"].read(), resp["ETag"]

    def create(self, body: bytes) -> str | None:
        return self._put(body, IfNoneMatch="*")

    def replace(self, body: bytes, version: str) -> str | None:
        return self._put(body, IfMatch=version)

    def delete(self, version: str) -> bool:
        try:
            s3.client(self.settings).delete_object(Bucket=self.bucket, Key=self.key, IfMatch=version)
        except Exception as exc:
            if s3.error_code(exc) in self._LOST:
                return False
            raise
        return True


# ------------------------------------------------------------------------------------------------ the lock


@dataclass
class RunLock:
    """A lock object at ``uri`` (see the module docstring). Not re-entrant; one ``acquire`` per instance."""

    uri: str
    settings: s3.S3Settings = field(default_factory=s3.S3Settings)
    stale_after_s: float = 900.0
    run_id: str = ""
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    took_over: dict | None = None  #: the stale holder this run replaced, if any

    def __post_init__(self) -> None:
        if self.stale_after_s <= 0:
            raise ValueError("stale_after_s must be > 0")
        self._store = _S3Store(self.uri, self.settings) if s3.is_s3(self.uri) else _LocalStore(self.uri)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._version: str | None = None
        self._lost: str | None = None
        self._started = _now()

    @classmethod
    def for_output(cls, output_path: str, name: str, settings: s3.S3Settings, stale_after_s: float = 900.0,
                   run_id: str = "") -> RunLock:
        """The lock ``<output_path>/_locks/<name>.json`` (``name``: one plain file name, e.g. a run id)."""
        if not name or "/" in name or "\\" in name or set(name) <= {"."}:
            raise ValueError(f"lock name {name!r} must be one file name")
        return cls(f"{output_path.rstrip('/')}/{LOCK_DIR}/{name}.json", settings, stale_after_s, run_id)

    # -------------------------------------------------------------------------------------------- body

    def _body(self) -> bytes:
        return json.dumps({
            "token": self.token, "run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
            "started_at": _iso(self._started), "heartbeat_at": _now(), "stale_after_s": self.stale_after_s,
        }).encode()

    def _holder(self) -> tuple[dict, str] | None:
        """The current lock's content and version, or None when there is no lock."""
        cur = self._store.read()
        if cur is None:
            return None
        raw, version = cur
        try:
            data = json.loads(raw)
        except ValueError:
            data = {}  # unreadable (half-written by a killed run on a local disk): treated as stale below
        return (data if isinstance(data, dict) else {}), version

    def _stale_reason(self, holder: dict) -> str | None:
        beat = holder.get("heartbeat_at")
        if not isinstance(beat, (int, float)):
            return "the lock is unreadable"
        age = _now() - beat
        if age > self.stale_after_s:
            return f"its last heartbeat was {age:.0f}s ago (stale after {self.stale_after_s:g}s)"
        pid = holder.get("pid")
        if holder.get("host") == socket.gethostname() and isinstance(pid, int) and pid != os.getpid() \
                and not _pid_alive(pid):
            return f"its process {pid} on this host is gone"
        return None

    def describe(self, holder: dict) -> str:
        beat = holder.get("heartbeat_at")
        ago = f"{_now() - beat:.0f}s ago" if isinstance(beat, (int, float)) else "never"
        return (f"run {holder.get('run_id') or '?'} on host {holder.get('host', '?')} pid {holder.get('pid', '?')}, "
                f"started {holder.get('started_at', '?')}, last heartbeat {ago}")

    # -------------------------------------------------------------------------------------------- protocol

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`LockHeld`; starts the heartbeat."""
        for _ in range(5):
            version = self._store.create(self._body())
            if version is not None:
                return self._taken(version)
            cur = self._holder()
            if cur is None:
                continue  # released between our create and our read: try again
            holder, stale_version = cur
            reason = self._stale_reason(holder)
            if reason is None:
                raise LockHeld(
                    f"{self._store.uri} is held by {self.describe(holder)}: only one run may write this output "
                    f"at a time. Wait for it to finish; a run that died loses the lock {self.stale_after_s:g}s "
                    f"after its last heartbeat (output.lock_stale_s), or delete {self._store.uri} if you are sure "
                    "it is dead."
                )
            # compare-and-swap on the stale version: of several runs taking over at once, exactly one wins
            version = self._store.replace(self._body(), stale_version)
            if version is not None:
                log.warning("took over the lock %s from %s: %s", self._store.uri, self.describe(holder), reason)
                self.took_over = holder
                return self._taken(version)
        raise LockHeld(f"{self._store.uri}: another run keeps taking this lock; try again")

    def _taken(self, version: str) -> RunLock:
        self._version = version
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        log.info("lock %s taken", self._store.uri)
        return self

    def _mark_lost(self) -> None:
        cur = self._holder()
        self._lost = self.describe(cur[0]) if cur else "nobody (the lock was deleted)"

    def check(self) -> None:
        """Raise :class:`LockLost` if another run has taken the lock over (call before committing)."""
        if self._lost is None:
            cur = self._holder()
            if cur is None or cur[0].get("token") != self.token:
                self._mark_lost()
        if self._lost is not None:
            raise LockLost(f"{self._store.uri} was taken over by {self._lost} while this run was going; "
                           "not committing (the other run owns the output now)")

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still ours (raises :class:`LockLost` if not)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._lost is None and self._store.delete(self._version):
            log.info("lock %s released", self._store.uri)
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
            log.error("lock %s was lost while the run was failing", self._store.uri)

    # -------------------------------------------------------------------------------------------- heartbeat

    def _beat(self) -> None:
        interval = max(self.stale_after_s / 4, 0.05)
        while not self._stop.wait(interval):
            try:
                version = self._store.replace(self._body(), self._version)  # only while the lock is ours
            except Exception:  # noqa: BLE001 - a failed beat is retried next interval; staleness is generous
                log.warning("lock %s: heartbeat failed", self._store.uri, exc_info=True)
                continue
            if version is None:
                self._mark_lost()
                log.error("lock %s is no longer ours (now: %s)", self._store.uri, self._lost)
                return
            self._version = version
