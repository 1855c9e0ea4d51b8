"""The output contract (DESIGN 6): the ONE Parquet schema, its row builders, and the error types.

One row per (video, task). A video that could not be processed still yields one row per task, with
``status="error"``, an ``error_type`` from :data:`ERROR_TYPES` and a human-readable ``error_message``.
Each column's meaning is given next to its field below.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa

#: seconds. fetch_s, decode_s: this video's; encode_s: its share of its encode batch; prefill_s: the prefill of the
#: engine batch the task ran in; generate_s: the task's share of its generate call (sums over rows are busy time)
TIMINGS_TYPE = pa.struct([pa.field(n, pa.float64()) for n in ("fetch_s", "decode_s", "encode_s", "prefill_s", "generate_s")])

OUTPUT_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),  # the run (names the output folder)
    pa.field("video_id", pa.string(), nullable=False),  # manifest value, else sha1(video_uri)[:16]
    pa.field("video_uri", pa.string(), nullable=False),  # s3://... or a local path
    pa.field("video_etag", pa.string()),  # S3 ETag (quotes stripped) or mtime-size for local files
    pa.field("video_bytes", pa.int64()),  # size of the video file
    pa.field("duration_s", pa.float64()),  # end of the last frame on the stream's own timestamps (from 0)
    pa.field("num_frames", pa.int32()),  # frames sampled and given to the model (F)
    pa.field("frame_timestamps_s", pa.list_(pa.float64())),  # presentation time of each frame, in [0, duration_s]
    pa.field("task_id", pa.string(), nullable=False),  # caption, qa:<i>, vq:<i> (manifest), mcq:<i> or an MCQ id
    pa.field("task_type", pa.string(), nullable=False),  # caption | qa | mcq
    pa.field("prompt", pa.string()),  # the user text given to the model (options included for mcq)
    pa.field("answer", pa.string()),  # generated text
    pa.field("choice", pa.string()),  # mcq only: the option letter parsed from the answer (null if none)
    pa.field("visual_tokens_full", pa.int32()),  # F x T, visual tokens before compression
    pa.field("visual_tokens_prefill", pa.int32()),  # visual tokens in the prefill (after TTM; newline not counted)
    pa.field("visual_tokens_attended", pa.float64()),  # mean visual tokens attended per decode step (after DP)
    pa.field("prompt_tokens", pa.int32()),  # prefill length (text + visual)
    pa.field("output_tokens", pa.int32()),  # generated tokens
    pa.field("model_id", pa.string()),  # checkpoint id
    # method + its exact settings, dp, T: {"method": "dycoke"|"holitom"|"none", "<method>": {...}, "dp": {...},
    # "tokens_per_frame": T}, compact key-sorted JSON
    pa.field("compression", pa.string()),
    pa.field("timings", TIMINGS_TYPE),
    pa.field("status", pa.string(), nullable=False),  # ok | error
    pa.field("error_type", pa.string()),  # one of ERROR_TYPES
    pa.field("error_message", pa.string()),
    pa.field("processed_at", pa.timestamp("us", tz="UTC"), nullable=False),  # when the row was produced
], metadata={"dycoke_pipeline.schema_version": "1"})  # fmt: skip

STATUS_OK = "ok"
STATUS_ERROR = "error"

#: error_type values and what they mean.
ERROR_TYPES = {
    "invalid_uri": "the video_uri is malformed (no bucket or key, or a scheme other than s3:// and file://)",
    "not_found": "the object or file does not exist (also: deleted between listing and download)",
    "access_denied": "the object may not be read with these credentials (denied, or the credentials were rejected)",
    "fetch_failed": "the bytes could not be fetched (network, throttling after all retries)",
    "too_large": "the file is larger than decode.max_video_bytes",
    "not_a_video": "the bytes are not a known media container",
    "corrupt_video": "a media container that cannot be opened or read to the end (truncated, damaged)",
    "no_video_stream": "a media file without a video stream (audio only, also audio with cover art)",
    "unsupported_codec": "a video stream in a codec no available decoder can decode (the message names the codec)",
    "too_few_frames": "fewer decodable frames than decode.min_frames",
    "decode_failed": "the decoder failed on sampled frames",
    "decode_timeout": "fetch + decode took longer than decode.timeout_s; the decoder process was killed (isolation: process)",
    "decoder_crashed": "the decoder process died on this video (a signal such as SIGSEGV, or an exit code; isolation: process)",
    "encode_failed": "the vision encoder failed on this video",
    "prompt_too_long": "the prompt (text + visual tokens + max_new_tokens) is longer than the model context",
    "generate_failed": "generation failed for this task",
    "no_tasks": "no task applies to this video",
    "internal": "an unexpected error in the pipeline",
}

# Columns carried between stages (not written). Frames travel as raw bytes plus a shape, visual
# tokens as an .npz blob: plain binary columns, so no tensor extension types are involved.
VIDEO_SCHEMA = pa.schema([
    pa.field("video_id", pa.string()), pa.field("video_uri", pa.string()), pa.field("questions", pa.list_(pa.string())),
])  # fmt: skip
DECODED_SCHEMA = pa.schema(list(VIDEO_SCHEMA) + [
    pa.field("video_etag", pa.string()), pa.field("video_bytes", pa.int64()), pa.field("duration_s", pa.float64()),
    pa.field("num_frames", pa.int32()), pa.field("frame_timestamps_s", pa.list_(pa.float64())),
    pa.field("frames", pa.large_binary()), pa.field("frames_shape", pa.list_(pa.int64())),
    pa.field("fetch_s", pa.float64()), pa.field("decode_s", pa.float64()), pa.field("status", pa.string()),
    pa.field("error_type", pa.string()), pa.field("error_message", pa.string()),
])  # fmt: skip
ENCODED_SCHEMA = pa.schema(
    [f for f in DECODED_SCHEMA if f.name not in ("frames", "frames_shape")]
    + [pa.field("visual", pa.large_binary()), pa.field("visual_tokens_full", pa.int32()),
       pa.field("visual_tokens_prefill", pa.int32()), pa.field("encode_s", pa.float64()), pa.field("model_id", pa.string())]
)  # fmt: skip

#: the columns an output row copies from its video row
_FROM_VIDEO = ("video_id", "video_uri", "video_etag", "video_bytes", "duration_s", "num_frames", "frame_timestamps_s",
               "visual_tokens_full", "visual_tokens_prefill", "model_id", "status", "error_type", "error_message")


def output_row(video: Mapping[str, Any], task: Any, *, run_id: str, compression: str, **values: Any) -> dict:
    """One output row for ``video`` (a decoded/encoded video row) and ``task`` (a :class:`pipeline.tasks.Task`).

    ``values`` sets the generation columns (answer, choice, prompt_tokens, ...; ``timings`` is merged into the
    video's timings); status defaults to ok unless the video row is an error row."""
    row = dict.fromkeys(OUTPUT_SCHEMA.names)
    # numpy scalars/arrays -> Python values (pyarrow accepts both, but lists of numpy floats are slow)
    row.update({k: v.tolist() if hasattr(v, "tolist") else v for k, v in video.items() if k in _FROM_VIDEO})
    timings = dict.fromkeys(TIMINGS_TYPE.names) | {n: video.get(n) for n in ("fetch_s", "decode_s", "encode_s")}
    timings.update({k: v for k, v in (values.pop("timings", None) or {}).items() if v is not None})
    row.update(run_id=run_id, task_id=task.task_id, task_type=task.task_type, prompt=task.prompt, timings=timings,
               compression=compression, processed_at=_dt.datetime.now(_dt.timezone.utc), status=row["status"] or STATUS_OK)
    row.update(values)
    if row["status"] == STATUS_OK:
        row["error_type"] = row["error_message"] = None
    return row


def error_output_row(video: Mapping[str, Any], task: Any, *, run_id: str, compression: str,
                     error_type: str, error_message: str) -> dict:
    """An error row (the video failed earlier, or this task failed)."""
    return output_row(video, task, run_id=run_id, compression=compression, status=STATUS_ERROR,
                      error_type=error_type, error_message=error_message)


def rows_to_table(rows: Iterable[Mapping[str, Any]], schema: pa.Schema = OUTPUT_SCHEMA) -> pa.Table:
    """Rows (dicts) -> a table with exactly ``schema`` (missing keys are null, extra keys are an error)."""
    rows = list(rows)
    extra = set().union(*rows) - set(schema.names)
    if extra:
        raise ValueError(f"row has columns outside the schema: {sorted(extra)}")
    return pa.Table.from_pylist(rows, schema=schema)


def check_table(table: pa.Table) -> None:
    """Raise if ``table`` does not have exactly the output schema (metadata aside)."""
    if not table.schema.equals(OUTPUT_SCHEMA, check_metadata=False):
        raise ValueError(f"schema mismatch:\n{table.schema}\n!=\n{OUTPUT_SCHEMA}")


class StageInputError(ValueError):
    """A stage got a batch without the columns it needs: the graph is wired wrong (not bad data)."""


def require_columns(batch, columns: Sequence[str], stage: str) -> None:
    """Raise :class:`StageInputError` naming ``stage`` and the missing columns when ``batch`` (a table, a dict of
    columns or a list of row dicts; an empty list passes) lacks any of ``columns``."""
    if isinstance(batch, list):
        if not batch:
            return
        batch = batch[0]
    names = batch.column_names if isinstance(batch, pa.Table) else list(batch)
    missing = [c for c in columns if c not in names]
    if missing:
        raise StageInputError(f"{stage}: input batch lacks column(s) {', '.join(missing)} (it has: {', '.join(names)}); "
                              f"the stage before {stage} must produce them")
