"""The output contract (DESIGN 6): the ONE Parquet schema, its row builders, and the error types.

One row per (video, task). A video that could not be processed still yields one row per task, with
``status="error"``, an ``error_type`` from :data:`ERROR_TYPES` and a human-readable ``error_message``.

Columns:

=====================  ==========================  ===========================================================
run_id                 string                      the run (names the output folder)
video_id               string                      manifest value, else ``sha1(video_uri)[:16]``
video_uri              string                      s3://... or a local path
video_etag             string, null                S3 ETag (quotes stripped) or ``mtime-size`` for local files
video_bytes            int64, null                 size of the video file
duration_s             float64, null               end of the last frame on the stream's own timestamps (from 0)
num_frames             int32, null                 frames sampled and given to the model (F)
frame_timestamps_s     list<float64>, null         presentation time of each sampled frame, in [0, duration_s]
task_id                string                      ``caption``, ``qa:<i>``, ``vq:<i>`` (manifest), ``mcq:<i>`` or MCQ id
task_type              string                      caption | qa | mcq
prompt                 string                      the user text given to the model (options included for mcq)
answer                 string, null                generated text
choice                 string, null                mcq only: the option letter parsed from the answer (null if none)
visual_tokens_full     int32, null                 F x T, visual tokens before compression
visual_tokens_prefill  int32, null                 visual tokens in the prefill (after TTM; the newline is not counted)
visual_tokens_attended float64, null               mean visual tokens attended per decode step (after DP)
prompt_tokens          int32, null                 prefill length (text + visual)
output_tokens          int32, null                 generated tokens
model_id               string, null                checkpoint id
compression            string                      method + its exact settings, dp, T: {"method": "dycoke"|"holitom"|"none",
                                                   "<method>": {...}, "dp": {...}, "tokens_per_frame": T}, compact key-sorted JSON
timings                struct<fetch_s, decode_s,   seconds. fetch_s, decode_s: this video's. encode_s: the video's
                       encode_s, prefill_s,        share of its encode batch. prefill_s: the prefill of the engine
                       generate_s: float64>        batch this task ran in. generate_s: the task's share of its
                                                   generate call (so sums over rows are stage busy time)
status                 string                      ok | error
error_type             string, null                one of ERROR_TYPES
error_message          string, null
processed_at           timestamp[us, UTC]          when the row was produced
=====================  ==========================  ===========================================================
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa

TIMINGS_TYPE = pa.struct(
    [
        pa.field("fetch_s", pa.float64()),
        pa.field("decode_s", pa.float64()),
        pa.field("encode_s", pa.float64()),
        pa.field("prefill_s", pa.float64()),
        pa.field("generate_s", pa.float64()),
    ]
)

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("video_uri", pa.string(), nullable=False),
        pa.field("video_etag", pa.string()),
        pa.field("video_bytes", pa.int64()),
        pa.field("duration_s", pa.float64()),
        pa.field("num_frames", pa.int32()),
        pa.field("frame_timestamps_s", pa.list_(pa.float64())),
        pa.field("task_id", pa.string(), nullable=False),
        pa.field("task_type", pa.string(), nullable=False),
        pa.field("prompt", pa.string()),
        pa.field("answer", pa.string()),
        pa.field("choice", pa.string()),
        pa.field("visual_tokens_full", pa.int32()),
        pa.field("visual_tokens_prefill", pa.int32()),
        pa.field("visual_tokens_attended", pa.float64()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("output_tokens", pa.int32()),
        pa.field("model_id", pa.string()),
        pa.field("compression", pa.string()),
        pa.field("timings", TIMINGS_TYPE),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_type", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("processed_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    metadata={"dycoke_pipeline.schema_version": "1"},
)

OUTPUT_COLUMNS = OUTPUT_SCHEMA.names

STATUS_OK = "ok"
STATUS_ERROR = "error"
TASK_TYPES = ("caption", "qa", "mcq")

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

_DECODED_EXTRA = [
    pa.field("video_etag", pa.string()), pa.field("video_bytes", pa.int64()), pa.field("duration_s", pa.float64()),
    pa.field("num_frames", pa.int32()), pa.field("frame_timestamps_s", pa.list_(pa.float64())),
    pa.field("frames", pa.large_binary()), pa.field("frames_shape", pa.list_(pa.int64())),
    pa.field("fetch_s", pa.float64()), pa.field("decode_s", pa.float64()), pa.field("status", pa.string()),
    pa.field("error_type", pa.string()), pa.field("error_message", pa.string()),
]  # fmt: skip
DECODED_SCHEMA = pa.schema(list(VIDEO_SCHEMA) + _DECODED_EXTRA)
ENCODED_SCHEMA = pa.schema(
    [f for f in DECODED_SCHEMA if f.name not in ("frames", "frames_shape")]
    + [pa.field("visual", pa.large_binary()), pa.field("visual_tokens_full", pa.int32()),
       pa.field("visual_tokens_prefill", pa.int32()), pa.field("encode_s", pa.float64()), pa.field("model_id", pa.string())]
)  # fmt: skip


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def timings(fetch_s=None, decode_s=None, encode_s=None, prefill_s=None, generate_s=None) -> dict:
    return {"fetch_s": fetch_s, "decode_s": decode_s, "encode_s": encode_s, "prefill_s": prefill_s, "generate_s": generate_s}


def output_row(video: Mapping[str, Any], task: Any, *, run_id: str, compression: str, **values: Any) -> dict:
    """One output row for ``video`` (a decoded/encoded video row) and ``task`` (a :class:`pipeline.tasks.Task`).

    ``values`` sets the generation columns (answer, choice, prompt_tokens, ...); status defaults to ok
    unless the video row is an error row.
    """
    row = {name: None for name in OUTPUT_COLUMNS}
    for name in ("video_id", "video_uri", "video_etag", "video_bytes", "duration_s", "num_frames",
                 "frame_timestamps_s", "visual_tokens_full", "visual_tokens_prefill", "model_id",
                 "status", "error_type", "error_message"):  # fmt: skip
        if name in video:
            row[name] = _plain(video[name])
    row.update(
        run_id=run_id,
        task_id=task.task_id,
        task_type=task.task_type,
        prompt=task.prompt,
        compression=compression,
        timings=timings(video.get("fetch_s"), video.get("decode_s"), video.get("encode_s")),
        processed_at=utc_now(),
    )
    row["status"] = row["status"] or STATUS_OK
    t = values.pop("timings", None)
    if t:
        row["timings"].update({k: v for k, v in t.items() if v is not None})
    row.update(values)
    if row["status"] == STATUS_OK:
        row["error_type"] = row["error_message"] = None
    return row


def error_output_row(video: Mapping[str, Any], task: Any, *, run_id: str, compression: str,
                     error_type: str, error_message: str) -> dict:
    """An error row (the video failed earlier, or this task failed)."""
    return output_row(video, task, run_id=run_id, compression=compression, status=STATUS_ERROR,
                      error_type=error_type, error_message=error_message)


def _plain(value: Any) -> Any:
    """numpy scalars/arrays -> Python values (pyarrow accepts both, but lists of numpy floats are slow)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def rows_to_table(rows: Iterable[Mapping[str, Any]], schema: pa.Schema = OUTPUT_SCHEMA) -> pa.Table:
    """Rows (dicts) -> a table with exactly ``schema`` (missing keys are null, extra keys are an error)."""
    rows = list(rows)
    names = set(schema.names)
    for r in rows:
        extra = set(r) - names
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
    if isinstance(batch, pa.Table):
        names = batch.column_names
    elif isinstance(batch, Mapping):
        names = list(batch)
    elif batch:
        names = list(batch[0])
    else:
        return
    missing = [c for c in columns if c not in names]
    if missing:
        raise StageInputError(f"{stage}: input batch lacks column(s) {', '.join(missing)} (it has: {', '.join(names)}); "
                              f"the stage before {stage} must produce them")
