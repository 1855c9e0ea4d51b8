"""Decode stage (CPU): fetch a video (:mod:`pipeline.fetch`), decode its sampled frames
(:func:`pipeline.frames.decode_video`), emit one row per video. Plain callable; Ray-free.

Contract::

    DecodeStage(decode_cfg, s3_cfg=None)(batch) -> pyarrow.Table      # DECODED_SCHEMA, one row per input row

``decode_cfg`` is the :class:`pipeline.config.DecodeConfig` as it is (with ``frame_size`` set: the run fills it
from the model), ``s3_cfg`` the :class:`pipeline.config.S3Config` (None: defaults). Every failure becomes an
error row (``status="error"``, an ``error_type`` from :data:`pipeline.schema.ERROR_TYPES`) and the batch
carries on.

Isolation (``decode.isolation``, default ``process``): each video is fetched and decoded in a worker process of
a `pebble <https://pypi.org/project/Pebble/>`_ ``ProcessPool`` (one worker, one pool per process, reused by
every batch and stage this process runs), scheduled with ``timeout=decode.timeout_s``:

* no answer within ``timeout_s`` (fetch + decode, counted from when the worker takes the video): pebble kills
  the worker and the row is ``decode_timeout`` (the message names the URI and ``decode.timeout_s=<v> exceeded``);
* the worker dies (segfault, abort, exit): ``decoder_crashed`` naming the signal or exit code;
* the pool starts a fresh worker for the next video; other rows are unaffected.

The worker never outlives this process: it is started with ``spawn`` (no copy of a threaded Ray worker), asks
the kernel for ``SIGKILL`` when its parent dies (``PR_SET_PDEATHSIG``, Linux), takes ``SIGTERM`` with the
default action (a decoder hung in C code holding the GIL still dies at once), and the pool is stopped and joined
at exit. ``none`` decodes in the calling process, unprotected (in-process mocks such as moto's ``mock_aws``).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.fetch import Fetched, fetch
from pipeline.frames import decode_video
from pipeline.media import VideoError
from pipeline.schema import DECODED_SCHEMA, STATUS_ERROR, STATUS_OK, require_columns

__all__ = ["DecodeStage", "close_pool", "decode_batch", "decode_row", "frames_from_row", "stage_kwargs"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ one video


def decode_row(row: Mapping[str, Any], cfg, s3_cfg=None, decoder: Callable = decode_video) -> dict:
    """Fetch and decode one video in this process; always returns a row (an error row for any failure).

    ``decoder`` has :func:`pipeline.frames.decode_video`'s signature (a test hook: a decoder that really crashes
    or hangs; deliberately not a config field, so a configuration file cannot choose code to run)."""
    uri = row["video_uri"]
    out: dict[str, Any] = {"video_id": row["video_id"], "video_uri": uri, "questions": _list(row.get("questions"))}
    t0 = time.perf_counter()
    fetched: Fetched | None = None
    try:
        fetched = fetch(uri, cfg, s3_cfg, etag=row.get("video_etag"))
        out.update(video_bytes=fetched.size, video_etag=fetched.etag)
        t1 = time.perf_counter()
        out["fetch_s"] = t1 - t0
        dec = decoder(fetched.source(), cfg, uri, fetched.head())
        out.update(
            frames=dec.frames.tobytes(), frames_shape=list(dec.frames.shape), num_frames=int(dec.frames.shape[0]),
            frame_timestamps_s=dec.timestamps, duration_s=dec.duration_s, decode_s=time.perf_counter() - t1,
            status=STATUS_OK,
        )
    except VideoError as exc:
        out.update(status=STATUS_ERROR, error_type=exc.error_type, error_message=exc.message)
        log.warning("video %s: %s: %s", row["video_id"], exc.error_type, exc.message)
    except Exception as exc:  # noqa: BLE001 - any other failure must still become a row
        out.update(status=STATUS_ERROR, error_type="internal", error_message=f"{type(exc).__name__}: {exc}")
        log.exception("video %s: unexpected decode failure", row["video_id"])
    finally:
        if fetched is not None:
            fetched.cleanup()
    out.setdefault("fetch_s", time.perf_counter() - t0)
    return out


# ------------------------------------------------------------------------------------------------ isolation


_POOL = None
_POOL_LOCK = threading.Lock()


def _worker_init(parent: int) -> None:
    """In each pool worker: die with the parent, die at once on SIGTERM, keep decoder chatter quiet."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError) as exc:
        log.debug("PR_SET_PDEATHSIG unavailable: %s", exc)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _quiet_decord()


def _quiet_decord() -> None:
    """ffmpeg's own messages for broken files go quiet; each failure is reported in its row instead."""
    try:
        import decord
    except ImportError:  # decord is only the fallback backend; without it there is nothing to quiet
        log.debug("decord is not installed")
        return
    decord.logging.set_level(decord.logging.QUIET)


def _pool():
    """This process's decoder pool (started on first use; a broken one is replaced)."""
    global _POOL
    from pebble import ProcessPool

    with _POOL_LOCK:
        if _POOL is None or not _POOL.active:
            _POOL = ProcessPool(max_workers=1, initializer=_worker_init, initargs=(os.getpid(),),
                                context=multiprocessing.get_context("spawn"))
        return _POOL


def close_pool() -> None:
    """Stop this process's decoder pool and reap its worker (at exit this happens anyway)."""
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None:
        pool.stop()
        pool.join()


atexit.register(close_pool)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit status"
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def decode_isolated(row: Mapping[str, Any], cfg, s3_cfg=None, decoder: Callable = decode_video) -> dict:
    """:func:`decode_row` in the pool's worker, with the timeout and crash handling of the module docstring."""
    from pebble import ProcessExpired

    request = {"video_id": row["video_id"], "video_uri": row["video_uri"], "questions": _list(row.get("questions")),
               "video_etag": row.get("video_etag")}
    uri = request["video_uri"]
    t0 = time.monotonic()
    try:
        return _pool().schedule(decode_row, args=(request, cfg, s3_cfg, decoder), timeout=cfg.timeout_s).result()
    except concurrent.futures.TimeoutError:
        elapsed = time.monotonic() - t0
        log.warning("video %s: decode_timeout after %.1fs; decoder process killed", request["video_id"], elapsed)
        return _error_row(request, "decode_timeout", f"{uri}: fetch + decode did not finish in {elapsed:.1f}s "
                          f"(decode.timeout_s={cfg.timeout_s:g} exceeded); decoder process killed", elapsed)
    except ProcessExpired as exc:
        elapsed = time.monotonic() - t0
        how = _describe_exit(exc.exitcode)
        log.warning("video %s: decoder_crashed (%s) after %.1fs", request["video_id"], how, elapsed)
        return _error_row(request, "decoder_crashed", f"{uri}: the decoder process died ({how}) on this video; "
                          "a new one is started for the next video", elapsed)
    except Exception as exc:  # noqa: BLE001 - the pool broke (a worker that cannot start) or a row that cannot be sent
        close_pool()
        log.exception("video %s: decoder pool failure", request["video_id"])
        return _error_row(request, "decoder_crashed", f"{uri}: the decoder process failed: {type(exc).__name__}: {exc}",
                          time.monotonic() - t0)


def _error_row(request: dict, error_type: str, message: str, elapsed: float) -> dict:
    out = {k: v for k, v in request.items() if k != "video_etag"}
    return {**out, "status": STATUS_ERROR, "error_type": error_type, "error_message": message, "fetch_s": elapsed}


# ------------------------------------------------------------------------------------------------ stage


class DecodeStage:
    """``video rows -> decoded rows`` (one out per one in); see the module docstring.

    Input columns: ``video_id, video_uri, questions`` (and ``video_etag`` when the listing had it). Output:
    :data:`pipeline.schema.DECODED_SCHEMA` (frames as raw bytes + ``frames_shape``, timestamps, sizes, timings,
    status and errors)."""

    input_columns = ("video_id", "video_uri", "questions")
    output_columns = tuple(DECODED_SCHEMA.names)

    def __init__(self, decode, s3=None, decoder: Callable = decode_video):
        if not decode.frame_size:
            raise ValueError("DecodeStage needs decode.frame_size (the run fills it from the model's preprocessor config)")
        self.cfg, self.s3, self.decoder = decode, s3, decoder
        if decode.isolation == "none":
            _quiet_decord()

    def decode_one(self, row: Mapping[str, Any]) -> dict:
        """Fetch and decode one video; always returns a row (an error row for any failure)."""
        if self.cfg.isolation == "process":
            return decode_isolated(row, self.cfg, self.s3, self.decoder)
        return decode_row(row, self.cfg, self.s3, self.decoder)

    def __call__(self, batch) -> pa.Table:
        return pa.Table.from_pylist([self.decode_one(r) for r in rows_of(batch)], schema=DECODED_SCHEMA)


def stage_kwargs(cfg, frame_size: int) -> dict:
    """The keyword arguments of :func:`decode_batch` for a run (what the graph passes to the decode tasks)."""
    return {"decode": cfg.decode.model_copy(update={"frame_size": int(frame_size)}), "s3": cfg.s3}


def decode_batch(batch: pa.Table, decode, s3=None, decoder: Callable = decode_video) -> pa.Table:
    """Ray task body for the decode stage (a function, so it runs as stateless CPU tasks); checks its input columns."""
    require_columns(batch, DecodeStage.input_columns, "DecodeStage")
    return DecodeStage(decode, s3, decoder)(batch)


# ------------------------------------------------------------------------------------------------ rows


def rows_of(batch) -> list[dict]:
    """The rows of a batch as dicts; binary columns (frames, visual tokens) of a ``pyarrow.Table`` come as
    zero-copy ``pyarrow.Buffer`` slices of the table instead of per-row ``bytes`` copies (a 32-video batch
    holds ~450 MB of frames: copying it would hold the GIL while the engine thread wants to launch work)."""
    if isinstance(batch, pa.Table):
        return _table_rows(batch)
    if isinstance(batch, Mapping):
        keys = list(batch)
        n = len(batch[keys[0]]) if keys else 0
        return [{k: batch[k][i] for k in keys} for i in range(n)]
    return list(batch)




def _table_rows(batch: pa.Table) -> list[dict]:
    binary = [f.name for f in batch.schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
    rows = batch.drop_columns(binary).to_pylist()
    for name in binary:
        i = 0
        for chunk in batch.column(name).chunks:
            offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64 if pa.types.is_large_binary(chunk.type) else np.int32)
            offsets = offsets[chunk.offset : chunk.offset + len(chunk) + 1]
            data = chunk.buffers()[2] or pa.py_buffer(b"")  # no data buffer when every value is empty
            nulls = chunk.is_null().to_numpy(zero_copy_only=False)
            for k in range(len(chunk)):
                rows[i][name] = None if nulls[k] else data.slice(int(offsets[k]), int(offsets[k + 1] - offsets[k]))
                i += 1
    return rows


def _list(value) -> list | None:
    if value is None:
        return None
    return [str(v) for v in list(value)]


def frames_from_row(row: Mapping[str, Any]) -> np.ndarray:
    """The ``[F, S, S, 3]`` uint8 frames of a decoded row (a view on its bytes)."""
    shape = tuple(int(s) for s in row["frames_shape"])
    return np.frombuffer(row["frames"], dtype=np.uint8).reshape(shape)
