"""DyCoke: training-free visual-token compression for video LLMs (temporal merging + dynamic KV pruning).

This package depends on torch and transformers only. Public API::

    from dycoke import DyCokeConfig, temporal_merge, holitom_merge, select_visual, PruneState
"""

from dycoke.config import ConfigError, DyCokeConfig
from dycoke.holitom import holitom_merge
from dycoke.pruning import PruneDecision, PruneState, candidate_mask, keep_budget, keep_to_bias, select_visual
from dycoke.ttm import MergeResult, frame_plan, keep_count, output_length, temporal_merge

__all__ = [
    "ConfigError",
    "DyCokeConfig",
    "MergeResult",
    "PruneDecision",
    "PruneState",
    "candidate_mask",
    "frame_plan",
    "holitom_merge",
    "keep_budget",
    "keep_count",
    "keep_to_bias",
    "output_length",
    "select_visual",
    "temporal_merge",
]
