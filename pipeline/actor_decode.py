"""Decoding inside a model actor (``decode.where: actor``): NVDEC sessions and CPU decoder processes side by side.

Contract::

    ActorDecoder(decode_cfg, frame_size)(rows) -> rows     # the decode stage's rows, in order
    actor_decoder(job_cfg, frame_size) -> ActorDecoder | None   # a model stage's, with decode.where: actor

Rows the decode stage only fetched (``data`` set) get ``frames`` (``uint8 [F, S, S, 3]``: a CUDA tensor from NVDEC,
an array from the CPU) and the stage's other fields, or its error fields; other rows pass unchanged.

One queue, two kinds of decoder, shared by the actor's calls in flight (each call's rows enter it together, so
calls finish in the order they came). ``decode.actor_threads`` NVDEC sessions (when the actor can use NVDEC) and
``decode.actor_cpu_workers`` CPU decoder processes take the rows in order: a row goes to a free NVDEC session, else to
the CPUs. A video NVDEC cannot decode goes to the CPUs.

Each NVDEC session is a process of its own (a pebble pool, spawned, isolated like the CPU workers). As threads of
the actor the sessions stopped scaling at 4 (2.6 videos/s at 4, 2.3 at 7 on 60 s 720p H.264): PyNvVideoCodec holds
the GIL while it decodes. A process has its own CUDA context, and the GPU time-slices between contexts, so each
session does little on the GPU: NVDEC decodes into device memory, each target's surface is copied once, the targets
come to host memory in one transfer per video and are converted on the session's CPU (``nvdec_host``: with swscale,
as the CPU backends, so 8-bit 4:2:0 videos get the CPU backends' pixels); a host array goes back (14 MB per video).
Beside a GPU-bound thread of the actor, 7 / 10 such sessions decoded 3.2 / 3.6 videos/s; NVDEC's own host-memory
mode, which copies every decoded frame to the host, 2.2 / 2.3 (whole benchmark runs, start-up included:
``bench/README.md``). ``threads=True`` keeps the in-process sessions (frames stay on the GPU), for the benchmark's
comparison.

CPU decoding is isolated as in the decode stage (``decode.isolation``: the pool of :mod:`pipeline.decode`, here with
``actor_cpu_workers`` processes), so a hang or a crash is an error row, not a dead actor. Without NVDEC the CPU
workers decode everything (at least one).

The CPU workers are not Ray resources of the actor: reserve them with the model stage's ``num_cpus`` (``fused`` or
``encode``) where the cluster's CPUs are shared with other work.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from pipeline.decode import (
    decode_bytes,
    decoded_fields,
    decoder_pool,
    isolated,
    pool_workers,
    process_pool,
    quiet_decord,
)
from pipeline.frames import Decoded, decode_video
from pipeline.media import VideoError
from pipeline.schema import STATUS_OK

log = logging.getLogger(__name__)


def _nvdec(data: bytes, cfg, uri: str) -> Decoded:
    """NVDEC on this thread's own CUDA stream (its kernels overlap other work on the GPU); frames on the GPU."""
    import torch

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        dec = decode_video(io.BytesIO(data), cfg, uri, data[:4096], backends=("nvdec",))
    stream.synchronize()
    return dec


def nvdec_to_host(data: bytes, cfg, uri: str, backend: str = "nvdec_host") -> dict:
    """In an NVDEC session process: row fields with the frames as a host array, the targets converted on this
    process's CPU (``nvdec_host``: the module docstring says why; ``nvdec``: converted on the GPU, then copied, for the
    benchmark's comparison). Any failure is raised (pebble sends it back): the caller gives the video to the CPUs."""
    import torch

    torch.set_num_threads(1)  # one video per process at a time; the actor's other CPUs decode too
    t0 = time.perf_counter()
    try:
        dec = decode_video(io.BytesIO(data), cfg, uri, data[:4096], backends=(backend,))
        if not isinstance(dec.frames, np.ndarray):  # a CUDA tensor (``nvdec``): the actor gets host arrays only
            dec = dataclasses.replace(dec, frames=dec.frames.cpu().numpy())
    except VideoError:
        raise  # it pickles: the actor logs its type and reason
    except Exception as exc:  # noqa: BLE001 - anything else crosses as a plain error: an exception that does not
        # unpickle (a library's own type) breaks the whole session pool, and every video in it falls to the CPUs
        raise RuntimeError(f"{type(exc).__name__}: {exc}") from None
    return {**decoded_fields(dec, host=False), "decode_s": time.perf_counter() - t0}


def warm_session() -> None:
    """In an NVDEC session process, before its first video: import the decoders and create the CUDA context (a
    decoder made and dropped), so the first call's videos do not wait for it."""
    from pipeline.nvdec import open_decoder

    open_decoder("h264")


def _warm(pool, fn: Callable, n: int, what: str) -> None:
    """Start ``pool``'s processes now (pebble starts them on the first task) with ``n`` calls of ``fn``; a failure is
    logged (the videos then find out for themselves)."""
    def report(future) -> None:
        if future.exception() is not None:
            log.warning("%s warm-up failed: %s", what, future.exception())

    for _ in range(n):
        pool.schedule(fn).add_done_callback(report)


class ActorDecoder:
    """See the module docstring. ``frame_size``: the model's, when ``decode.frame_size`` is unset; ``decoder``:
    :func:`pipeline.frames.decode_video`'s signature, for the CPU path (a test hook, as in the decode stage)."""

    def __init__(self, decode, frame_size: int, decoder: Callable = decode_video, threads: bool = False,
                 session_backend: str = "nvdec_host"):
        from pipeline import nvdec

        self.cfg = decode.model_copy(update={"frame_size": int(decode.frame_size or frame_size)})
        self.decoder = decoder
        gpu = decode.backend in ("auto", "nvdec") and nvdec.available()
        if decode.backend == "nvdec" and not gpu:
            log.warning("decode.backend is nvdec but NVDEC is not usable here (PyNvVideoCodec or a CUDA GPU missing): "
                        "this actor decodes on its CPUs")
        self.cpu_cfg = self.cfg.model_copy(update={"backend": "auto"}) if decode.backend == "nvdec" else self.cfg
        sessions = decode.actor_threads if gpu else 0
        self.cpu_workers = decode.actor_cpu_workers if gpu else max(1, decode.actor_cpu_workers)
        self.sessions = threading.BoundedSemaphore(sessions) if sessions else None
        self.n_sessions, self.in_threads, self._nvdec_pool = sessions, threads, None
        self.session_backend = session_backend  # nvdec: the sessions convert on the GPU (benchmark comparison)
        self.threads = concurrent.futures.ThreadPoolExecutor(sessions + max(1, self.cpu_workers),
                                                             thread_name_prefix="decode")
        self.counts = {"nvdec": 0, "cpu": 0}  # videos decoded by each kind (logs, benchmarks)
        self._lock, self._submit = threading.Lock(), threading.Lock()
        if decode.isolation == "none":
            quiet_decord()
        else:
            pool_workers(max(1, self.cpu_workers))
        # start the decoder processes while the actor loads its model: in a 7B job their start-up (spawn, imports,
        # NVDEC's CUDA context) had made the first calls take 48-56 s
        if sessions and not threads:
            _warm(self._session_pool(), warm_session, sessions, "NVDEC session")
        if decode.isolation != "none":
            _warm(decoder_pool(), quiet_decord, max(1, self.cpu_workers), "CPU decoder")

    def __call__(self, rows: list[dict]) -> list[dict]:
        t0 = time.perf_counter()
        with self._submit:  # calls in flight at once queue their rows whole: the first call is done first
            futures = [self.threads.submit(self.decode_one, r) for r in rows]
        out = [f.result() for f in futures]
        log.info("decoded a call of %d rows in %.1fs (videos so far: %d by NVDEC, %d on the CPUs)", len(rows),
                 time.perf_counter() - t0, self.counts["nvdec"], self.counts["cpu"])
        return out

    def _count(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] += 1

    def _nvdec(self, data: bytes, uri: str) -> dict:
        """Row fields decoded by an NVDEC session; raises when NVDEC did not decode the video."""
        if self.in_threads:
            return decoded_fields(_nvdec(data, self.cfg, uri), host=False)
        return self._session_pool().schedule(nvdec_to_host, args=(data, self.cfg, uri, self.session_backend),
                                             timeout=self.cfg.timeout_s).result()

    def _session_pool(self):
        """The NVDEC session processes (a new pool if the last one broke)."""
        with self._lock:
            if self._nvdec_pool is None or not self._nvdec_pool.active:
                self._nvdec_pool = process_pool(self.n_sessions)
            return self._nvdec_pool

    def close(self) -> None:
        """Stop the NVDEC session processes and the threads (the CPU pool is :mod:`pipeline.decode`'s)."""
        self.threads.shutdown()
        if self._nvdec_pool is not None:
            self._nvdec_pool.stop()
            self._nvdec_pool.join()

    def decode_one(self, row: dict) -> dict:
        if row.get("status") != STATUS_OK or row.get("data") is None:
            return row
        out = {k: v for k, v in row.items() if k != "data"}
        data, uri = bytes(row["data"]), row["video_uri"]
        # a free NVDEC session first; with no CPU workers, wait for one
        if self.sessions is not None and self.sessions.acquire(blocking=self.cpu_workers == 0):
            try:
                t0 = time.perf_counter()
                fields = self._nvdec(data, uri)
                self._count("nvdec")
                return {**out, **fields, "decode_s": time.perf_counter() - t0}
            except Exception as exc:  # noqa: BLE001 - the CPU backends decide this video (a hang or crash too)
                log.info("video %s: NVDEC did not decode it (%s); decoding it on the CPU", row["video_id"], exc)
            finally:
                self.sessions.release()
        self._count("cpu")
        args = (data, self.cpu_cfg, uri, row["video_id"], self.decoder)
        if self.cfg.isolation == "none":
            return {**out, **decode_bytes(*args)}
        fields = isolated(decode_bytes, args, row["video_id"], uri, self.cfg.timeout_s)
        fields.pop("fetch_s", None)
        return {**out, **fields}


def actor_decoder(cfg, frame_size: int | None = None) -> ActorDecoder | None:
    """A model actor's decoder for the job config ``cfg`` with ``decode.where: actor`` (else None), at ``decode.
    frame_size`` or ``frame_size`` (None while neither is known). The model stages make it before loading their model
    when the run's frame size is known, so the decoder processes start meanwhile, else after, from the model's."""
    size = cfg.decode.frame_size or frame_size
    return ActorDecoder(cfg.decode, size) if cfg.decode.where == "actor" and size else None
