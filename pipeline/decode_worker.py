"""Decoder isolation: fetch + decode each video in a long-lived subprocess, so that a video which hangs
or crashes the decoder becomes an error row instead of a stalled or dead Ray worker.

Contract (parent side, :class:`IsolatedDecoder`)::

    IsolatedDecoder(settings).decode_one(row) -> dict     # the row DecodeStage.decode_in_process returns

* The child (``python -m pipeline.decode_worker``, started lazily on the first video, ``PYTHONPATH`` taken
  from this process's ``sys.path``) runs ``DecodeStage(settings with isolation="none").decode_in_process``
  and stays up for the next videos: its start-up (interpreter, numpy, pyarrow, decord) is paid once per
  child, under its own limit (:data:`STARTUP_TIMEOUT_S`), not against a video's ``timeout_s``.
* No answer within ``settings.timeout_s`` (fetch + decode + transfer): the child is SIGKILLed and reaped,
  and the row is ``decode_timeout`` (the message names the URI and ``decode.timeout_s=<value> exceeded``).
* The child dies (EOF on its pipe): the row is ``decoder_crashed`` naming the signal (``SIGSEGV``) or the
  exit code.
* After either, the next video starts a fresh child. Other rows of the batch are unaffected.
* :func:`shared_decoder` keeps one :class:`IsolatedDecoder` per settings per process, because Ray reuses
  worker processes for tasks and :class:`~pipeline.decode.DecodeStage` is built per batch.
* A child never outlives its parent: :meth:`IsolatedDecoder.close`, garbage collection and interpreter
  exit (``weakref.finalize``, which runs at exit) kill it; the child itself exits on EOF on its stdin
  (the parent's end closes when the parent dies, however it dies), when its parent process changes (a
  watchdog thread polls ``os.getppid()`` every :data:`WATCHDOG_S` s, for a child busy in a decode), and,
  as a last resort when no Python thread can run, by ``SIGALRM`` (default action: terminate) set to
  ``timeout_s`` + :data:`ALARM_GRACE_S` around each video.

Protocol: a message is a 16-byte header (big-endian pickle length, raw length), the pickle, then that many
raw bytes. Parent -> child: ``settings``, then one ``row`` (input columns) per video. Child -> parent:
``("ready", pid)``, then per video ``("row", dict without frames)`` with the frames as the raw part, or
``("error", text)``. Pickle is acceptable because both ends are this code: a parent and its own child over
anonymous pipes. The child keeps a duplicate of its original stdout for the protocol and points fd 1 at
fd 2, so anything ffmpeg, decord or Python prints goes to stderr and can never corrupt the stream.

Nothing is left in the temp folder when the parent, the child or both are killed (a Ray worker and its
decoder die together when Ray stops): the child spools large S3 objects to anonymous files
(:mod:`pipeline.fetch`, ``O_TMPFILE``) and no folder is made for it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

from pipeline.decode import DecodeSettings, DecodeStage, _list
from pipeline.schema import STATUS_ERROR

log = logging.getLogger("pipeline.decode_worker")  # not __name__: the child runs as __main__

STARTUP_TIMEOUT_S = 120.0  # interpreter + imports + decord, once per child
WATCHDOG_S = 1.0  # how often a child checks that its parent is alive
ALARM_GRACE_S = 30  # the child's own hard stop comes this long after the parent's timeout
CLOSE_WAIT_S = 2.0  # close(): how long an idle child gets to exit on EOF before SIGKILL
MAX_SHARED = 4  # distinct settings with a live child per process (oldest closed first)
_PARENT_ENV = "PIPELINE_DECODE_WORKER_PARENT"
_HEADER = struct.Struct(">QQ")  # pickle length, raw payload length
_PIPE_BYTES = 1 << 20  # F_SETPIPE_SZ for the frames pipe (fewer wake-ups per video); best effort
_F_SETPIPE_SZ = 1031  # Linux fcntl


# ------------------------------------------------------------------------------------------------ framing


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _send(fd: int, obj: Any, raw: bytes | None = None) -> None:
    """``obj`` pickled, then ``raw`` as is (the frames: pickling 14 MB of bytes costs ~8 ms, the raw write none)."""
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    _write_all(fd, _HEADER.pack(len(payload), len(raw or b"")) + payload)
    if raw:
        _write_all(fd, raw)


def _read_exact(fd: int, n: int, deadline: float | None) -> bytearray | None:
    """``n`` bytes from ``fd``; None on EOF; ``TimeoutError`` past ``deadline`` (``time.monotonic``)."""
    buf = bytearray(n)
    view = memoryview(buf)
    pos = 0
    poller = None
    if deadline is not None:
        poller = select.poll()  # poll, not select: a Ray worker's fds can be above FD_SETSIZE
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    while pos < n:
        if poller is not None:
            remaining = deadline - time.monotonic()  # type: ignore[operator]
            if remaining <= 0:
                raise TimeoutError
            if not poller.poll(math.ceil(min(remaining, 3600.0) * 1000)):
                continue  # woke up without data: re-check the deadline
        got = os.readv(fd, [view[pos:]])
        if got == 0:
            return None
        pos += got
    return buf


def _recv(fd: int, deadline: float | None = None) -> tuple[Any, bytearray | None]:
    """One message ``(obj, raw or None)``; ``EOFError`` when the other end is gone, ``TimeoutError`` past
    ``deadline``."""
    header = _read_exact(fd, _HEADER.size, deadline)
    if header is None:
        raise EOFError
    size, raw_size = _HEADER.unpack(header)
    payload = _read_exact(fd, size, deadline)
    raw = _read_exact(fd, raw_size, deadline) if raw_size else None
    if payload is None or (raw_size and raw is None):
        raise EOFError
    return pickle.loads(payload), raw


# ------------------------------------------------------------------------------------------------ parent


def _pythonpath() -> str:
    """This process's ``sys.path`` as ``PYTHONPATH``, so the child imports the same package versions."""
    seen: list[str] = []
    for p in sys.path:
        entry = p if p else os.getcwd()
        if isinstance(entry, str) and entry not in seen:
            seen.append(entry)
    return os.pathsep.join(seen)


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "no exit status"
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


class _Child:
    """One child process and its pipes; :meth:`kill` is safe to call any number of times."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.owner = os.getpid()
        assert proc.stdin is not None and proc.stdout is not None
        self.to_child = proc.stdin.fileno()
        self.from_child = proc.stdout.fileno()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, graceful: bool = False) -> int | None:
        """Stop the child (EOF first if ``graceful``, SIGKILL otherwise or if it lingers), reap it, remove its
        returns its exit status. Does nothing in a forked copy of the owning process."""
        if os.getpid() != self.owner:
            return None
        proc = self.proc
        if proc.poll() is None and graceful:
            _close_quietly(proc.stdin)
            try:
                proc.wait(CLOSE_WAIT_S)
            except subprocess.TimeoutExpired:
                log.warning("decode worker %d did not exit on EOF within %.0fs; killing it", proc.pid, CLOSE_WAIT_S)
        if proc.poll() is None:
            try:
                proc.kill()
            except ProcessLookupError:
                log.debug("decode worker %d already gone", proc.pid)
        rc = proc.wait()
        _close_quietly(proc.stdin)
        _close_quietly(proc.stdout)
        return rc


def _close_quietly(f) -> None:
    if f is None:
        return
    try:
        f.close()
    except OSError as exc:  # e.g. EPIPE flushing a pipe whose reader died
        log.debug("closing a decode worker pipe: %s", exc)


class _Holder:
    """The current child (replaced on restart); what the finalizer of an :class:`IsolatedDecoder` kills."""

    def __init__(self) -> None:
        self.child: _Child | None = None

    def stop(self, graceful: bool = False) -> None:
        child, self.child = self.child, None
        if child is not None:
            child.kill(graceful=graceful)


class WorkerStartError(RuntimeError):
    """The decoder subprocess could not be started or did not report ready."""


class IsolatedDecoder:
    """``decode_one(row) -> row`` through a decoder subprocess (see the module docstring)."""

    def __init__(self, settings: DecodeSettings, startup_timeout_s: float = STARTUP_TIMEOUT_S):
        self.settings = settings
        self.startup_timeout_s = startup_timeout_s
        self.starts = 0  # children started so far (1 + restarts after timeouts and crashes)
        self._holder = _Holder()
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, self._holder.stop)  # on GC and at interpreter exit

    @property
    def pid(self) -> int | None:
        """The live child's pid (None before the first video and after a timeout or crash)."""
        child = self._holder.child
        return child.pid if child is not None and child.alive() else None

    def close(self) -> None:
        """Stop the child (it exits on EOF; SIGKILL if it does not within :data:`CLOSE_WAIT_S`)."""
        with self._lock:
            self._holder.stop(graceful=True)

    def __enter__(self) -> IsolatedDecoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Start the child now (otherwise the first video does); raises :class:`WorkerStartError`."""
        with self._lock:
            self._ensure_child()

    def _ensure_child(self) -> _Child:
        child = self._holder.child
        if child is not None and child.owner != os.getpid():  # forked copy: that child is our parent's
            self._holder.child = child = None
        if child is not None and child.alive():
            return child
        if child is not None:
            rc = child.kill()
            log.warning("decode worker %d died while idle (%s); starting a new one", child.pid, _describe_exit(rc))
            self._holder.child = None
        return self._start()

    def _start(self) -> _Child:
        t0 = time.monotonic()
        env = dict(os.environ)
        env["PYTHONPATH"] = _pythonpath()
        env[_PARENT_ENV] = str(os.getpid())
        try:
            proc = subprocess.Popen([sys.executable, "-m", "pipeline.decode_worker"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, env=env, close_fds=True, bufsize=0)
        except OSError as exc:
            raise WorkerStartError(f"cannot start {sys.executable} -m pipeline.decode_worker: {exc}") from exc
        child = _Child(proc)
        self._holder.child = child
        self.starts += 1
        try:
            import fcntl

            fcntl.fcntl(child.from_child, _F_SETPIPE_SZ, _PIPE_BYTES)
        except (ImportError, OSError) as exc:
            log.debug("pipe size unchanged: %s", exc)
        try:
            _send(child.to_child, dataclasses.replace(self.settings, isolation="none"))
            (kind, value), _ = _recv(child.from_child, time.monotonic() + self.startup_timeout_s)
        except (EOFError, OSError, TimeoutError) as exc:
            self._holder.child = None
            rc = child.kill()
            why = f"not ready within {self.startup_timeout_s:g}s" if isinstance(exc, TimeoutError) else _describe_exit(rc)
            raise WorkerStartError(f"decode worker did not start ({why}); see its stderr") from exc
        if kind != "ready":
            self._holder.child = None
            child.kill()
            raise WorkerStartError(f"decode worker did not start: {value}")
        log.info("decode worker %d ready in %.2fs", child.pid, time.monotonic() - t0)
        return child

    def decode_one(self, row: Mapping[str, Any]) -> dict:
        """Fetch + decode ``row`` in the child; always returns a row (error rows for timeouts and crashes)."""
        request = {"video_id": row["video_id"], "video_uri": row["video_uri"], "questions": _list(row.get("questions"))}
        uri = request["video_uri"]
        timeout = float(self.settings.timeout_s)
        with self._lock:
            try:
                child = self._ensure_child()
            except WorkerStartError as exc:
                log.error("video %s: %s", request["video_id"], exc)
                return _error_row(request, "decoder_crashed", f"{uri}: {exc}", 0.0)
            t0 = time.monotonic()
            try:
                _send(child.to_child, request)
                (kind, value), frames = _recv(child.from_child, t0 + timeout)
            except TimeoutError:  # (a subclass of OSError: caught first)
                elapsed = time.monotonic() - t0
                self._holder.stop()
                log.warning("video %s: decode_timeout after %.1fs; killed decode worker %d", request["video_id"],
                            elapsed, child.pid)
                return _error_row(request, "decode_timeout", f"{uri}: fetch + decode did not finish in "
                                  f"{elapsed:.1f}s (decode.timeout_s={timeout:g} exceeded); decoder process killed", elapsed)
            except (EOFError, OSError) as exc:  # EOF, or EPIPE writing to a child that is already gone
                elapsed = time.monotonic() - t0
                self._holder.child = None
                how = _describe_exit(child.kill())
                log.warning("video %s: decoder_crashed (%s, %s) after %.1fs", request["video_id"], how,
                            type(exc).__name__, elapsed)
                return _error_row(request, "decoder_crashed", f"{uri}: the decoder process died ({how}) on this "
                                  "video; a new one is started for the next video", elapsed)
            except Exception as exc:  # noqa: BLE001 - an unreadable answer: the stream is out of step, restart
                self._holder.stop()
                log.exception("video %s: bad answer from decode worker %d", request["video_id"], child.pid)
                return _error_row(request, "internal", f"{uri}: bad answer from the decode worker: "
                                  f"{type(exc).__name__}: {exc}", time.monotonic() - t0)
        if kind == "row":
            if frames is not None:
                value["frames"] = bytes(frames)  # one 1 ms copy keeps the row's type what decode_in_process gives
            return value
        return _error_row(request, "internal", f"{uri}: decode worker: {value}", time.monotonic() - t0)


def _error_row(request: dict, error_type: str, message: str, elapsed: float) -> dict:
    return {**request, "status": STATUS_ERROR, "error_type": error_type, "error_message": message, "fetch_s": elapsed}


_SHARED: dict[DecodeSettings, IsolatedDecoder] = {}
_SHARED_LOCK = threading.Lock()


def shared_decoder(settings: DecodeSettings) -> IsolatedDecoder:
    """This process's :class:`IsolatedDecoder` for ``settings`` (created on first use, then reused)."""
    with _SHARED_LOCK:
        dec = _SHARED.get(settings)
        if dec is None:
            while len(_SHARED) >= MAX_SHARED:
                _SHARED.pop(next(iter(_SHARED))).close()
            dec = _SHARED[settings] = IsolatedDecoder(settings)
        return dec


def close_shared() -> None:
    """Stop every shared decoder's child (tests; at exit this happens anyway)."""
    with _SHARED_LOCK:
        decoders = list(_SHARED.values())
        _SHARED.clear()
    for dec in decoders:
        dec.close()


# ------------------------------------------------------------------------------------------------ child


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(0)  # parent gone (reparented); nobody will read our answer
        time.sleep(WATCHDOG_S)


def main() -> int:
    """The child: read settings, then answer one row per request until EOF on stdin."""
    proto = os.dup(1)  # the protocol stream (not inherited by anything the decoder might start)
    os.dup2(2, 1)  # fd 1 -> stderr: stray output of ffmpeg / decord / print() never reaches the protocol
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"decode-worker[{os.getpid()}] %(levelname)s %(name)s: %(message)s")
    parent = int(os.environ.get(_PARENT_ENV) or os.getppid())
    threading.Thread(target=_watch_parent, args=(parent,), name="parent-watchdog", daemon=True).start()
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    try:
        settings: DecodeSettings = _recv(0)[0]
        stage = DecodeStage(settings)
    except EOFError:
        return 0
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which makes it a start-up error
        log.exception("decode worker start-up failed")
        _send(proto, ("error", f"{type(exc).__name__}: {exc}"))
        return 1
    _send(proto, ("ready", os.getpid()))
    alarm_s = min(math.ceil(settings.timeout_s) + ALARM_GRACE_S, 2**31 - 1)
    while True:
        try:
            row = _recv(0)[0]
        except EOFError:  # parent closed us or died
            return 0
        signal.alarm(alarm_s)
        frames: bytes | None = None
        try:
            out = stage.decode_in_process(row)
            frames = out.pop("frames", None)
            answer: tuple[str, Any] = ("row", out)
        except Exception as exc:  # noqa: BLE001 - decode_in_process makes rows of failures; this is a bad request
            log.exception("decode worker: request failed")
            answer = ("error", f"{type(exc).__name__}: {exc}")
        finally:
            signal.alarm(0)
        _send(proto, answer, frames)


if __name__ == "__main__":
    sys.exit(main())
