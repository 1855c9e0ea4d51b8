"""Model stages: encode (vision tower + compression), generate (the DyCoke engine), and both fused.

Plain callables, Ray-free: the checkpoint is loaded in ``__init__``; ``__call__(batch)`` (a ``pyarrow.Table``, a dict
of columns or a list of rows) returns a ``pyarrow.Table``. A failing batch is retried video by video, and failures
become rows with ``status="error"``; nothing here raises for bad data.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.actor_decode import actor_decoder
from pipeline.decode import frames_from_row, rows_of
from pipeline.schema import (  # noqa: F401 - StageInputError: part of this module's API
    ENCODED_SCHEMA,
    OUTPUT_SCHEMA,
    STATUS_ERROR,
    STATUS_OK,
    StageInputError,
    error_output_row,
    output_row,
    require_columns,
    rows_to_table,
)
from pipeline.tasks import NO_TASK, Task, parse_choice, row_tasks

log = logging.getLogger(__name__)

#: Videos per vision-tower call. The tower keeps every layer's activations of the batch (32 frames x 729
#: patches x 1152 x 27 layers: ~1.4 GiB per video in bf16), so a 32-video call at once would hold ~46 GiB
#: next to the engine's KV cache; 8 at a time is as fast and leaves that memory to the engine.
ENCODE_CHUNK = 8


class Stage:
    """A model stage: ``__call__(batch)`` checks the first batch against ``input_columns``, then :meth:`process`."""

    input_columns: tuple[str, ...] = ()
    _checked = False

    def __call__(self, batch) -> pa.Table:
        if not self._checked:
            require_columns(batch, self.input_columns, type(self).__name__)
            self._checked = True
        return self.process(batch)

    def process(self, batch) -> pa.Table:
        raise NotImplementedError


def load_llm(cfg, section=None):
    """Load ``cfg.model`` (copying an s3:// prefix to the node cache first). On CPU, torch uses as many threads as
    the stage ``section`` reserves CPUs."""
    import torch

    from dycoke.llava import VideoLLM

    m = cfg.model
    if section is not None and section.num_gpus == 0:
        torch.set_num_threads(max(1, int(section.num_cpus)))
    device = "cuda" if m.device == "auto" and torch.cuda.is_available() else "cpu" if m.device == "auto" else m.device
    dtype = ("bfloat16" if device == "cuda" else "float32") if m.dtype == "auto" else m.dtype
    path = storage.local_copy(m.source, m.cache_dir, cfg.s3)
    t0 = time.perf_counter()
    llm = VideoLLM.load(path, dtype=dtype, device=device, attn_implementation=m.attn_implementation,
                        trust_remote_code=m.trust_remote_code)
    log.info("loaded %s on %s (%s) in %.1fs", m.source, device, dtype, time.perf_counter() - t0)
    return llm


# ------------------------------------------------------------------------------------------------ transport


def pack_visual(vis) -> bytes:
    """:class:`dycoke.llava.VisualTokens` -> ``.npz`` bytes (no pickle)."""
    d = vis.to_numpy_dict()
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in d.items()})
    return buf.getvalue()


def unpack_visual(blob: bytes, device="cpu"):
    from dycoke.llava import VisualTokens

    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    d["dtype"] = str(d["dtype"])
    for k in ("num_full", "num_kept", "num_frames"):
        d[k] = int(d[k])
    return VisualTokens.from_numpy_dict(d, device)


# ------------------------------------------------------------------------------------------------ encode


def _tensor(frames):
    """Frames as a tensor, without a copy (arrays are often read-only views of the batch, and are only read)."""
    import torch

    if isinstance(frames, torch.Tensor):
        return frames
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(frames)


class EncodeStage(Stage):
    """``decoded rows -> encoded rows``: preprocessing, vision tower, projector, pooling, compression
    (``cfg.compression``: DyCoke TTM, HoliTom or none).

    Input: :data:`pipeline.schema.DECODED_SCHEMA`. Output: :data:`pipeline.schema.ENCODED_SCHEMA` (the
    frames are dropped; ``visual`` holds the compressed tokens, far smaller than the frames).
    """

    input_columns = ("video_id", "frames", "frames_shape", "status")
    output_columns = tuple(ENCODED_SCHEMA.names)

    def __init__(self, cfg, llm=None, frame_size: int | None = None, decoder=None):
        """``cfg``: the :class:`pipeline.config.PipelineConfig`; ``llm``: an already loaded model to share;
        ``frame_size``: the model's input side as the run read it; ``decoder``: an :class:`ActorDecoder` made already."""
        self.model_id = cfg.model.source
        self.decoder = decoder or actor_decoder(cfg, frame_size)  # made before the model loads when it can be
        self.llm = llm if llm is not None else load_llm(cfg, cfg.encode)
        self.dycoke = cfg.compression.to_dycoke(tokens_per_frame=getattr(self.llm, "tokens_per_frame", None))
        self.decoder = self.decoder or actor_decoder(cfg, self.llm.image_size)

    def _encode(self, frames: list) -> list:
        import torch

        tensors = [_tensor(f) for f in frames]
        for t in tensors:
            if t.is_cuda:  # decoded on another CUDA stream (ActorDecoder): keep its memory until this stream is done
                t.record_stream(torch.cuda.current_stream(t.device))
        return self.llm.encode(tensors, self.dycoke)

    def decode_rows(self, rows: list[dict]) -> list[dict]:
        """The rows with frames: decoded here when the decode stage only fetched them (``decode.where: actor``).
        On a GPU, frames still on the host are copied once into pinned memory here, in the calling thread, so
        that the engine thread's copy to the device is asynchronous (it never waits for the queued kernels)."""
        import torch

        rows = self.decoder(rows) if self.decoder is not None else rows
        if self.llm.device.type != "cuda":
            return rows
        return [{**r, "frames": _tensor(frames_from_row(r)).pin_memory()} if r.get("status") == STATUS_OK
                and not isinstance(r.get("frames"), torch.Tensor) else r for r in rows]

    def encode_rows(self, rows: list[dict], pack: bool = True) -> list[dict]:
        """Encode the ``ok`` rows, :data:`ENCODE_CHUNK` videos per vision-tower call (a failing call is retried video
        by video). ``pack``: ``visual`` as ``.npz`` bytes (to send to another actor); False keeps the
        :class:`~dycoke.llava.VisualTokens` on the device (fused stage: no round trip)."""
        ok = [i for i, r in enumerate(rows) if r.get("status") == STATUS_OK]
        done: dict[int, Any] = {}  # row -> VisualTokens, or the error message
        t0 = time.perf_counter()
        for chunk in (ok[c : c + ENCODE_CHUNK] for c in range(0, len(ok), ENCODE_CHUNK)):
            try:
                done.update(zip(chunk, self._encode([frames_from_row(rows[i]) for i in chunk])))
            except Exception as exc:  # noqa: BLE001 - isolate the failing video(s) below
                log.warning("encode of a batch of %d failed (%s); retrying one by one", len(chunk), exc)
                for i in chunk:
                    try:
                        done[i] = self._encode([frames_from_row(rows[i])])[0]
                    except Exception as exc1:  # noqa: BLE001 - becomes an error row
                        done[i] = f"{type(exc1).__name__}: {exc1}"
                        log.warning("encode failed for %s: %s", rows[i]["video_id"], exc1)
        share = (time.perf_counter() - t0) / max(1, len(ok))
        out = []
        for i, r in enumerate(rows):
            row = {**{k: r.get(k) for k in ENCODED_SCHEMA.names if k in r}, "model_id": self.model_id}
            v = done.get(i)
            if isinstance(v, str):
                row.update(status=STATUS_ERROR, error_type="encode_failed", error_message=v, encode_s=share)
            elif v is not None:
                row.update(visual=pack_visual(v) if pack else v, visual_tokens_full=int(v.num_full),
                           visual_tokens_prefill=int(v.num_kept), encode_s=share)
            out.append(row)
        return out

    def process(self, batch) -> pa.Table:
        return pa.Table.from_pylist(self.encode_rows(self.decode_rows(rows_of(batch))), schema=ENCODED_SCHEMA)


# ------------------------------------------------------------------------------------------------ generate


class GenerateStage(Stage):
    """``encoded rows -> output rows``: every task of every video, generated in one engine call.

    Output: :data:`pipeline.schema.OUTPUT_SCHEMA`, one row per (video, task); error videos give one
    error row per task; MCQ answers are parsed into ``choice``.
    """

    input_columns = ("video_id", "video_uri", "questions", "visual", "status")
    output_columns = tuple(OUTPUT_SCHEMA.names)

    def __init__(self, cfg, llm=None, section=None):
        """``cfg``: the :class:`pipeline.config.PipelineConfig`; ``section``: the stage section whose engine settings
        apply (default ``cfg.generate``; the fused stage passes ``cfg.fused``); ``llm``: a loaded model to share."""
        from dycoke.engine import Engine
        from dycoke.serving import EngineLoop

        section = section or cfg.generate
        self.run_id, self.tasks = cfg.effective_run_id(), cfg.tasks
        self.llm = llm if llm is not None else load_llm(cfg, section)
        tokens_per_frame = getattr(self.llm, "tokens_per_frame", None)
        self.dycoke = cfg.compression.to_dycoke(tokens_per_frame=tokens_per_frame)
        self.compression = cfg.compression.record(tokens_per_frame=self.dycoke.tokens_per_frame)
        self.engine = Engine(self.llm, self.dycoke, max_batch_size=section.engine_max_batch_size)
        # One thread owns the device: concurrent actor calls add their requests to the running engine.
        self.loop = EngineLoop(self.engine)

    def _requests(self, video: Mapping[str, Any], tasks: Sequence[Task]):
        from dycoke.engine import GenerationSettings, Request

        visual = video["visual"]
        if isinstance(visual, (bytes, bytearray, memoryview, pa.Buffer)):  # from an encode actor; in-actor tokens as they are
            visual = unpack_visual(visual)  # host tensor: the engine thread moves it to the device, once per video
        t = self.tasks
        return [Request(request_id=f"{video['video_id']}:{task.task_id}", visual=visual, question=task.prompt,
                        settings=GenerationSettings(max_new_tokens=task.max_new_tokens, temperature=t.temperature, top_p=t.top_p))
                for task in tasks]

    def _generate(self, requests: list, videos: list[str]) -> list:
        """Results of ``requests`` (of ``videos``), generated next to whatever other calls have in the engine; on a
        failure each video's requests are retried on their own (a failing video gets its exception as results)."""
        try:
            return self.loop.submit(requests).result()
        except Exception as exc:  # noqa: BLE001 - retry per video to isolate the failure
            log.warning("generate for %d requests failed (%s); retrying video by video", len(requests), exc)
        by_video: dict[str, list[int]] = {}
        for k, video_id in enumerate(videos):
            by_video.setdefault(video_id, []).append(k)
        results: list = [None] * len(requests)
        for ks in by_video.values():
            try:
                for k, res in zip(ks, self.loop.submit([requests[k] for k in ks]).result()):
                    results[k] = res
            except Exception as exc:  # noqa: BLE001 - becomes error rows
                for k in ks:
                    results[k] = exc
        return results

    def generate_rows(self, rows: list[dict]) -> list[dict]:
        run_id, comp = self.run_id, self.compression

        def error(video, task, error_type: str, message: str) -> dict:
            return error_output_row(video, task, run_id=run_id, compression=comp, error_type=error_type,
                                    error_message=message)

        out: list[dict] = []
        items: list[tuple[dict, Task, Any]] = []
        for video in rows:
            tasks = row_tasks(self.tasks, video.get("questions"))
            if video.get("status") != STATUS_OK:  # the video's own error, also when no task applies to it
                out += [error(video, t, video.get("error_type") or "internal", video.get("error_message") or "unknown error")
                        for t in tasks]
            elif tasks == [NO_TASK]:
                out.append(error(video, NO_TASK, "no_tasks", "no task applies to this video"))
            else:
                try:
                    items += [(video, t, r) for t, r in zip(tasks, self._requests(video, tasks))]
                except Exception as exc:  # noqa: BLE001 - a damaged visual blob becomes error rows
                    out += [error(video, t, "internal", f"cannot read visual tokens: {exc}") for t in tasks]
        if not items:
            return out
        t0 = time.perf_counter()
        results = self._generate([req for _, _, req in items], [video["video_id"] for video, _, _ in items])
        share = (time.perf_counter() - t0) / len(items)
        for (video, task, _), res in zip(items, results):
            if isinstance(res, Exception):
                out.append(error(video, task, "generate_failed", f"{type(res).__name__}: {res}"))
            elif res.finish_reason == "error" or res.error:
                out.append(error(video, task, generate_error_type(res.error or "generation failed"),
                                 res.error or "generation failed"))
            else:
                out.append(output_row(
                    video, task, run_id=run_id, compression=comp,
                    answer=res.text, choice=parse_choice(res.text, task.options) if task.is_mcq else None,
                    visual_tokens_prefill=int(res.visual_tokens), visual_tokens_attended=float(res.visual_tokens_attended),
                    prompt_tokens=int(res.prompt_tokens), output_tokens=int(res.output_tokens),
                    timings={"prefill_s": float(res.prefill_s), "generate_s": share},
                ))
        return out

    def process(self, batch) -> pa.Table:
        return rows_to_table(self.generate_rows(rows_of(batch)))


def generate_error_type(message: str) -> str:
    """``prompt_too_long`` when the engine refused a request for exceeding the context, else ``generate_failed``."""
    return "prompt_too_long" if "context" in message.lower() else "generate_failed"


class FusedStage(Stage):
    """``decoded rows -> output rows``: encode and generate in one actor sharing one loaded model.

    Thread-safe: an actor may run several calls at once; each call's videos are encoded on the engine
    thread and their tasks join the running engine, so the device never waits for a call to drain.
    """

    input_columns = ("video_id", "video_uri", "questions", "frames", "frames_shape", "status")
    output_columns = GenerateStage.output_columns

    def __init__(self, cfg, llm=None, frame_size: int | None = None):
        decoder = actor_decoder(cfg, frame_size)
        llm = llm if llm is not None else load_llm(cfg, cfg.fused)
        self.encode = EncodeStage(cfg, llm=llm, decoder=decoder)
        self.generate = GenerateStage(cfg, llm=llm, section=cfg.fused)

    def process(self, batch) -> pa.Table:
        # Encoding runs on the engine's thread between decode steps (one thread launches all GPU work).
        rows = self.encode.decode_rows(rows_of(batch))  # in this calling thread, while the engine runs
        encoded = self.generate.loop.call(self.encode.encode_rows, rows, pack=False).result()
        return rows_to_table(self.generate.generate_rows(encoded))

