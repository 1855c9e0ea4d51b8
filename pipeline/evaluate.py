"""Accuracy / throughput of compression settings on a multiple-choice benchmark (VideoMME / MVBench style).

The evaluation manifest (``input.manifest``) has one row per question: ``video_uri``, ``question``, ``options``
(a list, or '|'-separated in CSV), ``answer`` (the correct letter), optional ``video_id``. Each setting of
:data:`PRESETS` runs the ordinary pipeline with each video's questions as its per-video prompts (``vq:<i>``, built
as ``tasks.mcq`` prompts are); a question whose video or answer failed, or whose answer names no option, counts as
wrong. Rows go to ``<output.path>/<run_id>-<setting>/``, the table to ``<output.path>/accuracy.parquet``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from pipeline import sink, storage
from pipeline.sources import SourceError, read_manifest_rows, video_id_for
from pipeline.tasks import LETTERS, mcq_prompt, parse_choice

log = logging.getLogger(__name__)

#: setting name -> ``compression`` fields (on top of the configured section): the method axis of issue 11 (off,
#: DyCoke K=0.7, HoliTom r = 0.10 / 0.15 / 0.25) and DyCoke K=0.5.
PRESETS: dict[str, dict] = {
    "off": {"method": "none", "dp": {"enabled": False}},
    **{f"dycoke-k{k}-p0.7": {"method": "dycoke", "dycoke": {"k": k}, "dp": {"enabled": True, "prune_ratio": 0.7}}
       for k in (0.7, 0.5)},
    # HoliTom's outer stages as its authors run LLaVA-OV-7B (tau 0.65 at r = 0.10), without DP
    **{f"holitom-r{r:.2f}": {"method": "holitom", "holitom": {"retain_ratio": r, "tau": 0.65 if r <= 0.10 else 0.8},
                             "dp": {"enabled": False}}
       for r in (0.10, 0.15, 0.25)},
}


def with_preset(compression, name: str):
    """``compression`` (a :class:`pipeline.config.CompressionConfig`) with preset ``name``'s fields set."""
    data = compression.model_dump()
    for key, value in PRESETS[name].items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    return type(compression).model_validate(data)


TABLE_SCHEMA = pa.schema([
    ("setting", pa.string()), ("compression", pa.string()), ("videos", pa.int64()), ("questions", pa.int64()),
    ("answered", pa.int64()), ("parsed", pa.int64()), ("correct", pa.int64()), ("accuracy", pa.float64()),
    ("wall_s", pa.float64()), ("videos_per_s", pa.float64()), ("questions_per_s", pa.float64()),
    ("mean_visual_tokens_prefill", pa.float64()), ("mean_visual_tokens_attended", pa.float64()),
])  # fmt: skip


@dataclass(frozen=True)
class Item:
    """One benchmark question, mapped to its pipeline task (``video_id``, ``task_id``)."""

    video_id: str
    video_uri: str
    task_id: str
    question: str
    options: tuple[str, ...]
    answer: str


def _options(value, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = json.loads(value) if value.strip().startswith("[") else [o.strip() for o in value.split("|")]
    if not isinstance(value, (list, tuple)) or len(value) < 2:
        raise SourceError(f"{where}: options must be a list of at least 2 strings")
    return tuple(str(o) for o in value)


def load_items(uri: str, settings=None) -> list[Item]:
    """The questions of an evaluation manifest; ``task_id`` is ``vq:<i>``, i counting per video."""
    per_video: Counter[str] = Counter()
    items = []
    for n, r in enumerate(read_manifest_rows(uri, settings), 1):
        where = f"evaluation manifest {uri} row {n}"
        if not r.get("video_uri") or not r.get("question") or not r.get("answer"):
            raise SourceError(f"{where}: video_uri, question and answer are required")
        video_uri = storage.resolve_relative(r["video_uri"], uri)
        options = _options(r.get("options"), where)
        answer = str(r["answer"]).strip().upper().rstrip(".")
        if answer not in LETTERS[: len(options)]:
            raise SourceError(f"{where}: answer {r['answer']!r} is not one of the option letters")
        vid = str(r.get("video_id") or video_id_for(video_uri))
        items.append(Item(vid, video_uri, f"vq:{per_video[vid]}", str(r["question"]), options, answer))
        per_video[vid] += 1
    if not items:
        raise SourceError(f"evaluation manifest {uri} has no rows")
    return items


def pipeline_manifest(items: list[Item], instruction: str, path: Path) -> Path:
    """A pipeline manifest (JSONL): one row per video, its MCQ prompts as per-video questions."""
    videos: dict[str, dict] = {}
    for it in items:
        v = videos.setdefault(it.video_id, {"video_id": it.video_id, "video_uri": it.video_uri, "questions": []})
        v["questions"].append(mcq_prompt(it.question, it.options, instruction))
    path.write_text("\n".join(json.dumps(v) for v in videos.values()) + "\n")
    return path


def score(setting: str, items: list[Item], rows: list[dict], wall_s: float, compression: str = "") -> dict:
    """One table row: counts, accuracy (correct / questions) and throughput for ``rows`` of one setting."""
    by_key = {(r["video_id"], r["task_id"]): r for r in rows}
    answered = parsed = correct = 0
    for it in items:
        r = by_key.get((it.video_id, it.task_id))
        if r is None or r["status"] != "ok":
            continue
        answered += 1
        choice = parse_choice(r["answer"], it.options)
        parsed += choice is not None
        correct += choice == it.answer
    videos = len({it.video_id for it in items})
    ok = [r for r in rows if r["status"] == "ok"]

    def mean(col):
        vals = [r[col] for r in ok if r.get(col) is not None]
        return sum(vals) / len(vals) if vals else None

    return {"setting": setting, "compression": compression, "videos": videos, "questions": len(items),
            "answered": answered, "parsed": parsed, "correct": correct,
            "accuracy": correct / len(items) if items else 0.0, "wall_s": wall_s,
            "videos_per_s": videos / wall_s if wall_s > 0 else None,
            "questions_per_s": len(items) / wall_s if wall_s > 0 else None,
            "mean_visual_tokens_prefill": mean("visual_tokens_prefill"),
            "mean_visual_tokens_attended": mean("visual_tokens_attended")}


def render(table: pa.Table) -> str:
    head = f"{'setting':<20}{'questions':>10}{'correct':>9}{'accuracy':>10}{'videos/s':>10}{'vis.tok':>9}{'attended':>10}"
    lines = [head, "-" * len(head)]
    for r in table.to_pylist():
        f = (lambda v, p: "-" if v is None else f"{v:.{p}f}")  # noqa: E731
        lines.append(f"{r['setting']:<20}{r['questions']:>10}{r['correct']:>9}{r['accuracy']:>10.3f}"
                     f"{f(r['videos_per_s'], 2):>10}{f(r['mean_visual_tokens_prefill'], 0):>9}"
                     f"{f(r['mean_visual_tokens_attended'], 1):>10}")
    return "\n".join(lines)


def evaluate(cfg, settings: list[str] | None = None) -> pa.Table:
    """Run every setting; return (and write to ``<output.path>/accuracy.parquet``) the table."""
    import pyarrow.parquet as pq

    from pipeline.run import init_ray, run

    presets = {name: PRESETS[name] for name in settings or PRESETS}
    items = load_items(cfg.input.manifest, cfg.s3)
    base_id = cfg.effective_run_id()
    out_rows = []
    with tempfile.TemporaryDirectory(prefix="eval-manifest-") as tmp:
        manifest = pipeline_manifest(items, cfg.tasks.mcq_instruction, Path(tmp) / "videos.jsonl")
        tasks = cfg.tasks.model_copy(update={"caption_prompt": None, "questions": [], "mcq": [],
                                             "use_manifest_questions": True,
                                             "max_new_tokens": cfg.tasks.mcq_max_new_tokens})
        init_ray(cfg)  # once, before the first setting's clock starts: every setting is timed alike
        for name, preset in presets.items():
            run_cfg = cfg.model_copy(update={
                "run_id": f"{base_id}-{name}", "tasks": tasks, "compression": with_preset(cfg.compression, name),
                # every setting is measured afresh (a resumed folder would report no work and no throughput)
                "output": cfg.output.model_copy(update={"on_existing": "overwrite"}),
                "input": cfg.input.model_copy(update={"manifest": str(manifest)})})
            result = run(run_cfg)
            rows = sink.read_committed(result.target, columns=["video_id", "task_id", "answer", "status",
                                                         "visual_tokens_prefill", "visual_tokens_attended"],
                                       s3_cfg=cfg.s3)
            out_rows.append(score(name, items, rows.to_pylist(), result.summary.wall_s,
                                  json.dumps(preset, sort_keys=True)))
            log.info("setting %s: %d/%d correct", name, out_rows[-1]["correct"], len(items))
    table = pa.Table.from_pylist(out_rows, schema=TABLE_SCHEMA)
    root = storage.resolve(cfg.output.path, cfg.s3)
    root.filesystem.create_dir(root.path, recursive=True)
    pq.write_table(table, f"{root.path}/accuracy.parquet", filesystem=root.filesystem)
    return table
