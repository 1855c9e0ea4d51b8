"""Shared configuration test data: a job file of the earlier release and its new form, and the leaf fields."""

from __future__ import annotations

from pydantic import BaseModel

from pipeline.config import PipelineConfig


def leaf_fields(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> dict[str, str]:
    """dotted name -> description of every leaf field."""
    out = {}
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(leaf_fields(ann, f"{prefix}{name}."))
        else:
            out[prefix + name] = info.description
    return out


# A job file of the earlier release: every renamed field, non-default values.
OLD_FILE = """\
input: {local_dir: v}
output: {path: o}
model: {source: m}
dycoke: {ttm_enabled: true, ttm_method: holitom, prune_ratio_k: 0.5, ttm_mode: complete, tokens_per_frame: 196, dp_enabled: false,
         dp_layer: 2, dp_prune_ratio: 0.8, dp_threshold: 0.8, holitom_retain_ratio: 0.1, holitom_tau: 0.65,
         holitom_max_window: 16, holitom_k: 5, holitom_beta: 0.5}
stages: {mode: split, decode_batch_size: 3, decode_num_cpus: 0.5, decode_memory_gb: 0.25, decode_max_tasks: 6,
         encode_batch_size: 5, encode_actors: 2, generate_batch_size: 16, generate_actors: 3, fused_batch_size: 7,
         fused_actors: 2, max_actors: 4, gpus_per_actor: 1, actor_num_cpus: 2, engine_max_batch_size: 64,
         actor_concurrency: 2}
"""

NEW_FILE = """\
input: {local_dir: v}
output: {path: o}
model: {source: m}
compression:
  method: holitom
  dycoke: {k: 0.5, ttm_mode: complete}
  holitom: {retain_ratio: 0.1, tau: 0.65, max_window: 16, k: 5, beta: 0.5}
  dp: {enabled: false, layer: 2, prune_ratio: 0.8, threshold: 0.8}
  tokens_per_frame: 196
mode: split
decode: {batch_size: 3, num_cpus: 0.5, memory: 0.25GiB, concurrency: 6}
encode: {batch_size: 5, concurrency: [2, 4], num_gpus: 1, num_cpus: 2}
generate: {batch_size: 16, concurrency: [3, 4], num_gpus: 1, num_cpus: 2, engine_max_batch_size: 64, max_concurrent_batches: 2}
fused: {batch_size: 7, concurrency: [2, 4], num_gpus: 1, num_cpus: 2, engine_max_batch_size: 64, max_concurrent_batches: 2}
"""
