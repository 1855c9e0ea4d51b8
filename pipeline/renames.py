"""Fields renamed since an earlier release: one table, one mechanism.

A job file, ``--set`` override or flag that uses an old name still works: :func:`apply_renames` moves the value
to its new place and logs a warning naming it (``dycoke.holitom_tau is now compression.holitom.tau``).
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import TypeAdapter, ValidationError

from pipeline.sections import ConfigurationError

log = logging.getLogger(__name__)

_DROP = object()
_MODEL_STAGES = ("encode", "generate", "fused")


def _method_if_disabled(value: Any, old: dict, target: str) -> Any:
    return _DROP if TypeAdapter(bool).validate_python(value) else "none"


def _pool_range(value: Any, old: dict, target: str) -> list:
    return [old.get(f"stages.{target.split('.')[0]}_actors") or 1, value]


#: old dotted name -> (new dotted names, conversion(old value, every old field, target) or None), applied in order
RENAMES: dict[str, tuple[tuple[str, ...], Any]] = {
    "dycoke.ttm_method": (("compression.method",), None),
    "dycoke.ttm_enabled": (("compression.method",), _method_if_disabled),  # false -> none
    "dycoke.prune_ratio_k": (("compression.dycoke.k",), None),
    "dycoke.ttm_mode": (("compression.dycoke.ttm_mode",), None),
    "dycoke.tokens_per_frame": (("compression.tokens_per_frame",), None),
    **{f"dycoke.dp_{n}": ((f"compression.dp.{n}",), None) for n in ("enabled", "layer", "prune_ratio", "threshold")},
    **{f"dycoke.holitom_{n}": ((f"compression.holitom.{n}",), None) for n in ("retain_ratio", "tau", "max_window", "k", "beta")},
    "stages.mode": (("mode",), None),
    **{f"stages.{s}_batch_size": ((f"{s}.batch_size",), None) for s in ("decode", *_MODEL_STAGES)},
    "stages.decode_num_cpus": (("decode.num_cpus",), None),
    "stages.decode_memory_gb": (("decode.memory",), lambda v, old, target: f"{v}GiB"),
    "stages.decode_max_tasks": (("decode.concurrency",), None),
    **{f"stages.{s}_actors": ((f"{s}.concurrency",), None) for s in _MODEL_STAGES},
    "stages.max_actors": (tuple(f"{s}.concurrency" for s in _MODEL_STAGES), _pool_range),
    "stages.gpus_per_actor": (tuple(f"{s}.num_gpus" for s in _MODEL_STAGES), None),
    "stages.actor_num_cpus": (tuple(f"{s}.num_cpus" for s in _MODEL_STAGES), None),
    "stages.engine_max_batch_size": (("generate.engine_max_batch_size", "fused.engine_max_batch_size"), None),
    "stages.actor_concurrency": (("generate.max_concurrent_batches", "fused.max_concurrent_batches"), None),
}
NEW_PLACES: dict[str, tuple[str, ...]] = {old: targets for old, (targets, _) in RENAMES.items()}


def set_dotted(data: dict, dotted: str, value: Any) -> dict:
    """Set ``a.b.c`` in a nested dict, creating sections as needed; returns ``data``."""
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        if node.get(p) is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            raise ConfigurationError(f"{dotted}: {p} is not a section")
        node = node[p]
    node[leaf] = value
    return data


def leaves(data: dict, prefix: str = ""):
    """``(dotted name, value)`` of every leaf of a nested dict (an empty dict is a leaf; keys may be dotted)."""
    for k, v in data.items():
        if isinstance(v, dict) and v:
            yield from leaves(v, f"{prefix}{k}.")
        else:
            yield prefix + k, v


def nested(flat: dict[str, Any]) -> dict:
    """The nested dict of ``{dotted name: value}``."""
    out: dict = {}
    for dotted, value in flat.items():
        set_dotted(out, dotted, value)
    return out


def apply_renames(data: dict, source: str, moved: dict[str, str] | None = None) -> dict[str, Any]:
    """``{dotted name: value}`` of ``data``'s leaves, every old name moved to its new place (:data:`RENAMES`) with
    a warning naming that place; ``moved`` collects new name -> old name (error messages name both). A field given
    under both names in one source is an error."""
    given = dict(leaves(data))
    out = {k: v for k, v in given.items() if k not in RENAMES and not (k in ("dycoke", "stages") and v == {})}
    for old, (targets, convert) in RENAMES.items():
        if old not in given:
            continue
        log.warning("%s: %s is now %s (the old name still works in this release)", source, old, " and ".join(targets))
        for target in targets:
            if target in given:
                raise ConfigurationError(f"{source}: {old} and {target} are both set; keep only {target}")
            try:
                value = convert(given[old], given, target) if convert else given[old]
            except ValidationError as exc:
                raise ConfigurationError(f"invalid configuration ({source}):\n  {old}: {exc.errors()[0]['msg']}") from None
            if value is not _DROP:
                out[target] = value
                if moved is not None:
                    moved[target] = old
    return out
