"""The decode stage (CPU tasks) and decoding inside a model actor. Plain callables; Ray-free.

Contract::

    DecodeStage(decode_cfg, s3_cfg=None)(batch) -> pyarrow.Table     # one row per input row
    pipeline.actor_decode.ActorDecoder(decode_cfg, frame_size)(rows) -> rows   # in a model actor, on the stage's rows

``decode_cfg``: the :class:`pipeline.config.DecodeConfig` (the stage needs ``frame_size``: the run fills it from
the model). Every failure becomes an error row (``status="error"``, an ``error_type`` from
:data:`pipeline.schema.ERROR_TYPES`) and the batch carries on.

Where decoding runs (``decode.where``; :func:`place` resolves ``auto`` once, on the driver):

* ``stage``: the stage fetches and decodes each video and ships its frames (:data:`pipeline.schema.DECODED_SCHEMA`).
* ``actor``: the stage fetches the bytes and checks the container (:func:`pipeline.frames.plan`: not a video, no
  video stream, too few frames are error rows there) and ships the bytes (:data:`FETCHED_SCHEMA`); the model actor
  (fused, or encode) decodes them with :class:`pipeline.actor_decode.ActorDecoder`: ``decode.actor_threads`` NVDEC
  session processes and ``decode.actor_cpu_workers`` CPU decoder processes, isolated as in the stage, take the videos
  from one queue. Videos larger than ``decode.in_memory_bytes`` are decoded by the stage, and so are all but
  ``decode.actor_share`` of the others (:func:`in_actor_share`): then the stage's CPUs and the actor's decoders
  (NVDEC) work at once, each on its share.
* ``auto``: ``actor`` when the model stage reserves GPUs and ``decode.backend`` is ``nvdec`` (NVDEC is opt-in: in the
  whole-job runs so far, decoding in the actor did not beat the stage's CPU decoding, see ``bench/README.md``);
  else ``stage``. Both give the same rows.

Isolation (``decode.isolation: process``, default): CPU decoding runs in a worker of this process's `pebble
<https://pypi.org/project/Pebble/>`_ ``ProcessPool`` (one worker; :func:`pool_workers` in a model actor) with
``timeout=decode.timeout_s``: no answer in time kills it
(``decode_timeout``, naming the URI and ``decode.timeout_s=<v> exceeded``), a worker that dies is
``decoder_crashed`` (naming the signal or exit code); the next video gets a fresh worker. Workers are spawned, get
``SIGKILL`` when their parent dies (``PR_SET_PDEATHSIG``) and default ``SIGTERM`` handling, and stop at exit.
``none``: in the calling process, unprotected (for in-process mocks such as moto's ``mock_aws``).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import hashlib
import io
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

from pipeline.fetch import fetch
from pipeline.frames import Decoded, decode_video, plan
from pipeline.media import VideoError
from pipeline.schema import DECODED_SCHEMA, STATUS_ERROR, STATUS_OK, require_columns

__all__ = ["FETCHED_SCHEMA", "DecodeStage", "close_pool", "decode_batch", "decode_row", "frames_from_row", "isolated",
           "decoder_pool", "in_actor_share", "place", "pool_workers", "process_pool", "rows_of", "stage_kwargs"]

log = logging.getLogger(__name__)

#: The decode stage's rows with ``decode.where: actor``: the video's bytes instead of frames.
FETCHED_SCHEMA = DECODED_SCHEMA.append(pa.field("data", pa.large_binary()))


def place(cfg):
    """``cfg`` with ``decode.where: auto`` resolved (see the module docstring); the graph calls it once."""
    d = cfg.decode
    if d.where != "auto":
        return cfg
    model = cfg.fused if cfg.resolved_mode == "fused" else cfg.encode
    if model.num_gpus > 0 and d.backend == "nvdec":
        return cfg.model_copy(update={"decode": d.model_copy(update={"where": "actor"})})
    return cfg  # decoded in the stage: every part reads an unresolved auto as stage


def _error(exc: Exception, video_id) -> dict:
    if isinstance(exc, VideoError):
        log.warning("video %s: %s: %s", video_id, exc.error_type, exc.message)
        return {"status": STATUS_ERROR, "error_type": exc.error_type, "error_message": exc.message}
    log.error("video %s: unexpected decode failure", video_id, exc_info=exc)
    return {"status": STATUS_ERROR, "error_type": "internal", "error_message": f"{type(exc).__name__}: {exc}"}


def decoded_fields(dec: Decoded, host: bool) -> dict:
    """The row fields of decoded frames: raw bytes + shape (``host``, to ship) or the array / tensor itself."""
    frames = dec.frames
    if host and not isinstance(frames, np.ndarray):
        frames = frames.cpu().numpy()
    return {"frames": frames.tobytes() if host else frames, "frames_shape": list(frames.shape),
            "num_frames": int(frames.shape[0]), "frame_timestamps_s": dec.timestamps, "duration_s": dec.duration_s,
            "status": STATUS_OK}


def _request(row: Mapping[str, Any]) -> dict:
    questions = row.get("questions")
    return {"video_id": row["video_id"], "video_uri": row["video_uri"],
            "questions": None if questions is None else [str(q) for q in questions]}


def in_actor_share(video_id, share: float) -> bool:
    """Whether ``video_id`` is one of the ``share`` of the videos the model actor decodes (``decode.actor_share``):
    a hash of the id (not Python's ``hash``, which differs between processes) as a fraction in ``[0, 1)``."""
    if share >= 1.0:
        return True
    digest = hashlib.blake2b(str(video_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < share


def decode_row(row: Mapping[str, Any], cfg, s3_cfg=None, decoder: Callable = decode_video) -> dict:
    """Fetch and decode (or, with ``where: actor``, fetch and check) one video in this process; always a row.

    ``decoder`` has :func:`pipeline.frames.decode_video`'s signature (a test hook: a decoder that really crashes
    or hangs; deliberately not a config field, so a configuration file cannot choose code to run)."""
    out = _request(row)
    t0 = time.perf_counter()
    fetched = None
    try:
        fetched = fetch(row["video_uri"], cfg, s3_cfg, etag=row.get("video_etag"))
        out.update(video_bytes=fetched.size, video_etag=fetched.etag, fetch_s=time.perf_counter() - t0)
        if cfg.where == "actor" and fetched.data is not None and in_actor_share(row["video_id"], cfg.actor_share):
            plan(fetched.source(), cfg, row["video_uri"], fetched.head())  # decoded by the model actor
            out.update(data=fetched.data, status=STATUS_OK)
        else:
            t1 = time.perf_counter()
            out.update(decoded_fields(decoder(fetched.source(), cfg, row["video_uri"], fetched.head()), host=True),
                       decode_s=time.perf_counter() - t1)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a row
        out.update(_error(exc, row["video_id"]))
    finally:
        if fetched is not None:
            fetched.cleanup()
    out.setdefault("fetch_s", time.perf_counter() - t0)
    return out


def decode_bytes(data: bytes, cfg, uri: str, video_id, decoder: Callable = decode_video) -> dict:
    """Decode fetched bytes (in an actor's decoder process, or in the actor); always returns row fields."""
    t0 = time.perf_counter()
    try:
        return {**decoded_fields(decoder(io.BytesIO(data), cfg, uri, data[:4096]), host=False),
                "decode_s": time.perf_counter() - t0}
    except Exception as exc:  # noqa: BLE001 - every failure becomes a row
        return _error(exc, video_id)


# ------------------------------------------------------------------------------------------------ isolation


_POOL = None
_POOL_LOCK = threading.Lock()
_POOL_WORKERS = 1  # decoder processes of this process's pool (a model actor decoding on its CPUs asks for more)


def _worker_init(parent: int) -> None:
    """In each pool worker: die with the parent, die at once on SIGTERM, keep decoder chatter quiet."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    quiet_decord()


def quiet_decord() -> None:
    """ffmpeg's own messages for broken files go quiet; each failure is reported in its row instead."""
    with contextlib.suppress(ImportError):  # decord is only the fallback backend
        import decord

        decord.logging.set_level(decord.logging.QUIET)


def decoder_pool():
    """This process's decoder pool (started on first use; a broken one is replaced)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or not _POOL.active:
            _POOL = process_pool(_POOL_WORKERS)
        return _POOL


def pool_workers(n: int) -> None:
    """Decode up to ``n`` videos at once in this process's pool (``n`` worker processes, started on first use)."""
    global _POOL_WORKERS
    if n != _POOL_WORKERS:
        close_pool()
        _POOL_WORKERS = n


def close_pool() -> None:
    """Stop this process's decoder pool and reap its worker (at exit this happens anyway)."""
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None:
        pool.stop()
        pool.join()


atexit.register(close_pool)


def process_pool(workers: int):
    """A pebble pool of ``workers`` decoder processes (spawned, started on first use), set up as this module's own."""
    from pebble import ProcessPool

    return ProcessPool(max_workers=workers, initializer=_worker_init, initargs=(os.getpid(),),
                       context=multiprocessing.get_context("spawn"))


def isolated(fn: Callable, args: tuple, video_id, uri: str, timeout_s: float, pool=None) -> dict:
    """``fn(*args)`` (row fields) in a worker of ``pool`` (default: this process's decoder pool); a timeout or a crash
    becomes error fields (module docstring)."""
    from pebble import ProcessExpired

    t0 = time.monotonic()
    try:
        return (pool or decoder_pool()).schedule(fn, args=args, timeout=timeout_s).result()
    except concurrent.futures.TimeoutError:
        error_type, message = "decode_timeout", (f"{uri}: did not finish in {time.monotonic() - t0:.1f}s (decode."
                                                 f"timeout_s={timeout_s:g} exceeded); decoder process killed")
    except ProcessExpired as exc:
        code = exc.exitcode or 0
        how = f"exit code {code}" if code >= 0 else signal.Signals(-code).name if -code in signal.valid_signals() \
            else f"signal {-code}"
        error_type, message = "decoder_crashed", (f"{uri}: the decoder process died ({how}) on this video; a new one "
                                                  "is started for the next video")
    except Exception as exc:  # noqa: BLE001 - the pool broke (a worker that cannot start) or a row that cannot be sent
        if pool is None:
            close_pool()
        log.exception("video %s: decoder pool failure", video_id)
        error_type, message = "decoder_crashed", f"{uri}: the decoder process failed: {type(exc).__name__}: {exc}"
    log.warning("video %s: %s after %.1fs", video_id, error_type, time.monotonic() - t0)
    return {"status": STATUS_ERROR, "error_type": error_type, "error_message": message, "fetch_s": time.monotonic() - t0}


# ------------------------------------------------------------------------------------------------ stage


class DecodeStage:
    """``video rows`` (``video_id, video_uri, questions``, ``video_etag`` when listed) ``-> decoded rows``, one per
    row: :data:`pipeline.schema.DECODED_SCHEMA` (frames as bytes + ``frames_shape``), or :data:`FETCHED_SCHEMA`."""

    input_columns = ("video_id", "video_uri", "questions")

    def __init__(self, decode, s3=None, decoder: Callable = decode_video):
        if not decode.frame_size:
            raise ValueError("DecodeStage needs decode.frame_size (the run fills it from the model's preprocessor config)")
        self.cfg, self.s3, self.decoder = decode, s3, decoder
        self.schema = FETCHED_SCHEMA if decode.where == "actor" else DECODED_SCHEMA
        if decode.isolation == "none":
            quiet_decord()

    def decode_one(self, row: Mapping[str, Any]) -> dict:
        """Fetch and decode one video; always returns a row (an error row for any failure)."""
        if self.cfg.isolation == "none":
            return decode_row(row, self.cfg, self.s3, self.decoder)
        request = {**_request(row), "video_etag": row.get("video_etag")}
        return {**_request(row), **isolated(decode_row, (request, self.cfg, self.s3, self.decoder), row["video_id"],
                                            row["video_uri"], self.cfg.timeout_s)}

    def __call__(self, batch) -> pa.Table:
        return pa.Table.from_pylist([self.decode_one(r) for r in rows_of(batch)], schema=self.schema)


def stage_kwargs(cfg, frame_size: int) -> dict:
    """The keyword arguments of :func:`decode_batch` for a run (what the graph passes to the decode tasks)."""
    return {"decode": cfg.decode.model_copy(update={"frame_size": int(frame_size)}), "s3": cfg.s3}


def decode_batch(batch: pa.Table, decode, s3=None, decoder: Callable = decode_video) -> pa.Table:
    """Ray task body for the decode stage (a function, so it runs as stateless CPU tasks); checks its input columns."""
    require_columns(batch, DecodeStage.input_columns, "DecodeStage")
    return DecodeStage(decode, s3, decoder)(batch)


def rows_of(batch) -> list[dict]:
    """The rows of a batch as dicts; binary columns of a ``pyarrow.Table`` as zero-copy ``pyarrow.Buffer`` slices
    (copying a batch's ~450 MB of frames would hold the GIL while the engine thread wants to launch work)."""
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


def frames_from_row(row: Mapping[str, Any]):
    """The ``[F, S, S, 3]`` uint8 frames of a decoded row: a view on its bytes, or the array / tensor an
    :class:`ActorDecoder` put there."""
    frames = row["frames"]
    if isinstance(frames, (bytes, bytearray, memoryview, pa.Buffer)):
        return np.frombuffer(frames, dtype=np.uint8).reshape(tuple(int(s) for s in row["frames_shape"]))
    return frames
