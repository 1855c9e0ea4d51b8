"""Decoding inside a model actor (``decode.where: actor``): NVDEC sessions and CPU decoder processes side by side.

Contract::

    ActorDecoder(decode_cfg, frame_size)(rows) -> rows     # the decode stage's rows, in order

Rows the decode stage only fetched (``data`` set) get ``frames`` (``uint8 [F, S, S, 3]``: a CUDA tensor from NVDEC,
an array from the CPU) and the stage's other fields, or its error fields; other rows pass unchanged.

One queue, two kinds of decoder, shared by the actor's calls in flight (each call's rows enter it together, so
calls finish in the order they came). ``decode.actor_threads`` NVDEC sessions (when the actor can use NVDEC; each on its
own CUDA stream, frames stay on the GPU) and ``decode.actor_cpu_workers`` CPU decoder processes take the rows in
order: a row goes to a free NVDEC session, else to the CPUs. NVDEC alone decodes about 2-3.5 videos/s of 60 s 720p
H.264 per GPU (``bench/README.md``), less than one GPU's model stage takes, so on GPU nodes the CPUs the decode
stage no longer uses (it only fetches) decode the rest. A video NVDEC cannot decode goes to the CPUs. CPU decoding
is isolated as in the decode stage (``decode.isolation``: the pool of :mod:`pipeline.decode`, here with
``actor_cpu_workers`` processes), so a hang or a crash is an error row, not a dead actor. Without NVDEC the CPU
workers decode everything (at least one).

The CPU workers are not Ray resources of the actor: reserve them with the model stage's ``num_cpus`` (``fused`` or
``encode``) where the cluster's CPUs are shared with other work.
"""

from __future__ import annotations

import concurrent.futures
import io
import logging
import threading
import time
from collections.abc import Callable

from pipeline.decode import decode_bytes, decoded_fields, isolated, pool_workers, quiet_decord
from pipeline.frames import Decoded, decode_video
from pipeline.schema import STATUS_OK

log = logging.getLogger(__name__)


class ActorDecoder:
    """See the module docstring. ``frame_size``: the model's, when ``decode.frame_size`` is unset; ``decoder``:
    :func:`pipeline.frames.decode_video`'s signature, for the CPU path (a test hook, as in the decode stage)."""

    def __init__(self, decode, frame_size: int, decoder: Callable = decode_video):
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
        self.threads = concurrent.futures.ThreadPoolExecutor(sessions + max(1, self.cpu_workers),
                                                             thread_name_prefix="decode")
        self.counts = {"nvdec": 0, "cpu": 0}  # videos decoded by each kind (logs, benchmarks)
        self._lock, self._submit = threading.Lock(), threading.Lock()
        if decode.isolation == "none":
            quiet_decord()
        else:
            pool_workers(max(1, self.cpu_workers))

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

    def _nvdec(self, data: bytes, uri: str) -> Decoded:
        import torch

        stream = torch.cuda.Stream()  # one per video: its kernels overlap the engine's and other sessions'
        with torch.cuda.stream(stream):
            dec = decode_video(io.BytesIO(data), self.cfg, uri, data[:4096], backends=("nvdec",))
        stream.synchronize()
        return dec

    def decode_one(self, row: dict) -> dict:
        if row.get("status") != STATUS_OK or row.get("data") is None:
            return row
        out = {k: v for k, v in row.items() if k != "data"}
        data, uri = bytes(row["data"]), row["video_uri"]
        # a free NVDEC session first; with no CPU workers, wait for one
        if self.sessions is not None and self.sessions.acquire(blocking=self.cpu_workers == 0):
            try:
                t0 = time.perf_counter()
                fields = decoded_fields(self._nvdec(data, uri), host=False)
                self._count("nvdec")
                return {**out, **fields, "decode_s": time.perf_counter() - t0}
            except Exception as exc:  # noqa: BLE001 - the CPU backends decide this video
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
