"""The one typed DyCoke configuration: defaults live here and nowhere else.

``DyCokeConfig`` holds only settings (immutable). Run-time state such as the previous
decode step's attention vector lives in :mod:`dycoke.pruning` state objects, never here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Literal

TTMMode = Literal["reference", "complete"]
_MODES = ("reference", "complete")
TTMMethod = Literal["dycoke", "holitom"]
_METHODS = ("dycoke", "holitom")


class ConfigError(ValueError):
    """A DyCoke setting is out of range or of the wrong type."""


@dataclass(frozen=True)
class DyCokeConfig:
    """DyCoke settings (DESIGN 4).

    Attributes:
        ttm_enabled: compress the visual tokens before the LLM (False = all ``F * T`` tokens).
        ttm_method: the pre-LLM compressor: ``"dycoke"`` (DyCoke TTM, DESIGN 4.2, settings ``prune_ratio_k``
            and ``ttm_mode``) or ``"holitom"`` (HoliTom's outer stages, DESIGN 4.6, settings ``holitom_*``).
        prune_ratio_k: K, the fraction of tokens DROPPED from each pruned frame; a pruned frame keeps
            ``int((1 - K) * tokens_per_frame)`` tokens.
        ttm_mode: ``"reference"`` reproduces the reference implementation token for token (order
            included); ``"complete"`` also prunes the last window and keeps raster order (DESIGN 4.3).
        tokens_per_frame: T, visual tokens per frame after pooling (196 for LLaVA-OneVision).
        dp_enabled: dynamic KV pruning during decoding.
        dp_layer: L; the attention of layer ``L - 1`` (0-based) selects the visual positions that
            layers ``L..`` attend to. Must be >= 1.
        dp_prune_ratio: P, the fraction of candidate visual positions NOT attended at a pruning step.
        dp_threshold: cosine similarity with the previous step's attention vector at or above which
            the step attends to the full cache.
        holitom_retain_ratio: r, the target fraction of visual tokens kept (paper: 0.10, 0.15, 0.25).
        holitom_tau: similarity above which a position is static between frames (paper: 0.8; 0.65 at r=0.10).
        holitom_max_window: longest temporal segment, in frames.
        holitom_k: DPC-KNN neighbourhood (capped at the number of centres).
        holitom_beta: weight of a cluster centre against the mean of its members.
    DP (decode-time pruning) applies on top of either method: the visual span is just shorter.
    """

    ttm_enabled: bool = True
    prune_ratio_k: float = 0.7
    ttm_mode: TTMMode = "reference"
    tokens_per_frame: int = 196
    dp_enabled: bool = True
    dp_layer: int = 3
    dp_prune_ratio: float = 0.7
    dp_threshold: float = 0.9
    ttm_method: TTMMethod = "dycoke"
    holitom_retain_ratio: float = 0.15
    holitom_tau: float = 0.8
    holitom_max_window: int = 1024
    holitom_k: int = 7
    holitom_beta: float = 0.6

    def __post_init__(self) -> None:
        problems = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("bool",) and not isinstance(value, bool):
                problems.append(f"{f.name} must be a bool, got {value!r}")
            if f.type == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
                problems.append(f"{f.name} must be a number, got {value!r}")
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                # 3.0 would pass a range check but break later as a layer index / tensor size.
                problems.append(f"{f.name} must be an integer, got {value!r}")
        if problems:
            raise ConfigError("invalid DyCoke config: " + "; ".join(problems))
        if not 0.0 <= self.prune_ratio_k < 1.0:
            problems.append(f"prune_ratio_k (K) must be in [0, 1), got {self.prune_ratio_k}")
        if self.ttm_mode not in _MODES:
            problems.append(f"ttm_mode must be one of {_MODES}, got {self.ttm_mode!r}")
        if int(self.tokens_per_frame) != self.tokens_per_frame or self.tokens_per_frame < 1:
            problems.append(f"tokens_per_frame must be a positive integer, got {self.tokens_per_frame}")
        if int(self.dp_layer) != self.dp_layer or self.dp_layer < 1:
            problems.append(f"dp_layer (L) must be an integer >= 1, got {self.dp_layer}")
        if not 0.0 <= self.dp_prune_ratio < 1.0:
            problems.append(f"dp_prune_ratio (P) must be in [0, 1), got {self.dp_prune_ratio}")
        if not -1.0 <= self.dp_threshold <= 1.0:
            problems.append(f"dp_threshold must be in [-1, 1], got {self.dp_threshold}")
        if self.ttm_method not in _METHODS:
            problems.append(f"ttm_method must be one of {_METHODS}, got {self.ttm_method!r}")
        if not 0.0 < self.holitom_retain_ratio <= 1.0:
            problems.append(f"holitom_retain_ratio (r) must be in (0, 1], got {self.holitom_retain_ratio}")
        if not -1.0 <= self.holitom_tau <= 1.0:
            problems.append(f"holitom_tau must be a cosine similarity in [-1, 1], got {self.holitom_tau}")
        if self.holitom_max_window < 1:
            problems.append(f"holitom_max_window must be an integer >= 1 (frames), got {self.holitom_max_window}")
        if self.holitom_k < 1:
            problems.append(f"holitom_k must be an integer >= 1, got {self.holitom_k}")
        if not 0.0 <= self.holitom_beta <= 1.0:
            problems.append(f"holitom_beta must be in [0, 1], got {self.holitom_beta}")
        if problems:
            raise ConfigError("invalid DyCoke config: " + "; ".join(problems))

    @classmethod
    def off(cls) -> DyCokeConfig:
        """No compression at all (the baseline)."""
        return cls(ttm_enabled=False, dp_enabled=False)

    @property
    def frame_keep(self) -> int:
        """Tokens a pruned frame keeps: ``int((1 - K) * T)`` (Python float truncation, as the reference)."""
        return int((1 - self.prune_ratio_k) * self.tokens_per_frame)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        """Exact settings as compact, key-sorted JSON (the ``compression`` output column)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
