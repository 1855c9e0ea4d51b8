"""Fields renamed since an earlier release: one table, one mechanism.

A job file, ``--set`` override or flag that uses an old name still works: :func:`apply_renames` moves the value
to its new place and logs a warning naming it (``dycoke.holitom_tau is now compression.holitom.tau``).
``--print-config`` prints the new form.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from pydantic import TypeAdapter, ValidationError

from pipeline.sections import ConfigurationError

log = logging.getLogger(__name__)

_DROP = object()
_MODEL_STAGES = ("encode", "generate", "fused")


def _method_if_disabled(value: Any, old: dict) -> Any:
    return "none" if not TypeAdapter(bool).validate_python(value) else _DROP


def _pool_range(value: Any, old: dict, stage: str) -> Any:
    return [old.get(f"{stage}_actors") or 1, value]


#: old dotted name -> (new dotted name(s), value conversion(old value, old section) or None). Applied in this order.
RENAMES: dict[str, tuple[tuple[str, ...], Any]] = {
    "dycoke.ttm_method": (("compression.method",), None),
    "dycoke.ttm_enabled": (("compression.method",), _method_if_disabled),  # false -> none
    "dycoke.prune_ratio_k": (("compression.dycoke.k",), None),
    "dycoke.ttm_mode": (("compression.dycoke.ttm_mode",), None),
    "dycoke.tokens_per_frame": (("compression.tokens_per_frame",), None),
    **{f"dycoke.dp_{n}": ((f"compression.dp.{n}",), None) for n in ("enabled", "layer", "prune_ratio", "threshold")},
    **{f"dycoke.holitom_{n}": ((f"compression.holitom.{n}",), None) for n in ("retain_ratio", "tau", "max_window", "k", "beta")},
    "stages.mode": (("mode",), None),
    **{f"stages.{s}_batch_size": ((f"{s}.batch_size",), None) for s in ("decode", "encode", "generate", "fused")},
    "stages.decode_num_cpus": (("decode.num_cpus",), None),
    "stages.decode_memory_gb": (("decode.memory",), lambda v, old: f"{v}GiB"),
    "stages.decode_max_tasks": (("decode.concurrency",), None),
    **{f"stages.{s}_actors": ((f"{s}.concurrency",), None) for s in _MODEL_STAGES},
    **{f"stages.max_actors@{s}": ((f"{s}.concurrency",), lambda v, old, s=s: _pool_range(v, old, s)) for s in _MODEL_STAGES},
    "stages.gpus_per_actor": (tuple(f"{s}.num_gpus" for s in _MODEL_STAGES), None),
    "stages.actor_num_cpus": (tuple(f"{s}.num_cpus" for s in _MODEL_STAGES), None),
    "stages.engine_max_batch_size": (("generate.engine_max_batch_size", "fused.engine_max_batch_size"), None),
    "stages.actor_concurrency": (("generate.max_concurrent_batches", "fused.max_concurrent_batches"), None),
}
#: old dotted name -> every new place it moves to
NEW_PLACES: dict[str, list[str]] = {}
for _key, (_targets, _) in RENAMES.items():
    NEW_PLACES.setdefault(_key.split("@")[0], []).extend(_targets)


#: sections of an earlier release that exist no more (their fields all moved)
LEGACY_SECTIONS = ("dycoke", "stages")


def _has(data: dict, dotted: str) -> bool:
    *parents, leaf = dotted.split(".")
    for p in parents:
        data = data.get(p)
        if not isinstance(data, dict):
            return False
    return leaf in data


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
    """``(dotted name, value)`` of every leaf of a nested dict (an empty dict is a leaf)."""
    for k, v in data.items():
        if isinstance(v, dict) and v:
            yield from leaves(v, f"{prefix}{k}.")
        else:
            yield prefix + k, v


def apply_renames(data: dict, source: str, moved: dict[str, str] | None = None) -> dict:
    """``data`` with every field of an earlier release moved to its new place (:data:`RENAMES`), each logged as a
    warning naming the new place; ``moved`` collects new name -> old name (error messages name both). A field given
    under both names in one source is an error."""
    original, data = data, copy.deepcopy(data)
    for key, (targets, convert) in RENAMES.items():
        old_name = key.split("@")[0]
        section, name = old_name.split(".")
        old = original.get(section)
        if not isinstance(old, dict) or name not in old:
            continue
        data[section].pop(name, None)
        if not key.endswith(("@generate", "@fused")):  # once per old name
            log.warning("%s: %s is now %s (the old name still works in this release)", source, old_name,
                        " and ".join(NEW_PLACES[old_name]))
        try:
            value = convert(old[name], old) if convert else old[name]
        except ValidationError as exc:
            raise ConfigurationError(f"invalid configuration ({source}):\n  {old_name}: {exc.errors()[0]['msg']}") from None
        for target in targets:
            if _has(original, target):
                raise ConfigurationError(f"{source}: {old_name} and {target} are both set; keep only {target}")
            if value is not _DROP:
                set_dotted(data, target, value)
                if moved is not None:
                    moved[target] = old_name
    for section in LEGACY_SECTIONS:
        if data.get(section) == {}:
            del data[section]
    return data
