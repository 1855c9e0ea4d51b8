"""Temporal token merging (TTM), DyCoke's pre-LLM compression, as a pure tensor function.

Frames arrive as ``[F, T, D]`` (one video) or ``[B, F, T, D]`` (a batch of videos with the same F).
Each frame is either kept whole or *pruned against a reference frame*: it keeps the ``keep`` tokens
whose cosine similarity with the token at the same spatial position of the reference frame is lowest.

Window structure (DESIGN 4.2), for 4-frame windows ``[a, b, c, d]`` starting at ``i = 0, 4, 8, ...``:

* ``a`` whole; ``b`` pruned against ``a``; ``d`` pruned against ``c`` (stage 1, pairs);
* ``c`` pruned against ``a`` (stage 2), compared on the original features.

Modes:

``"reference"``
    Reproduces the reference implementation token for token: stage 2 runs only for windows with
    ``i < F - 4`` (so the last window's ``c`` stays whole) and a pruned frame's tokens are emitted in
    ascending similarity order (``topk(largest=False)``). Where the reference misbehaves we define:
    with odd F the trailing unpaired frame is kept whole (the reference silently drops it), and
    ``F <= 4`` simply has no stage 2 (the reference crashes). For even F > 4 the output is identical
    to the reference.
``"complete"``
    Every window's ``c`` that exists is pruned (the last window too) and each pruned frame keeps its
    tokens in raster order.

No frame is ever dropped: every frame contributes ``T`` or ``keep`` tokens. The frame structure
depends only on ``F``, ``T``, ``K`` and the mode, so it is computed once on the host and cached, with
its index tensors cached per device (a call copies nothing from the host and never blocks on the
device); all per-token work is batched tensor operations (one cosine similarity, one ``topk``, one
gather).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

MODES = ("reference", "complete")


@dataclass(frozen=True)
class MergeResult:
    """Output of :func:`temporal_merge`.

    Attributes:
        tokens: ``[N, D]`` or ``[B, N, D]``; same dtype and device as the input.
        index: ``[N]`` or ``[B, N]`` int64; the flat source position ``f * T + t`` of each output token,
            in output order, so ``tokens == frames.flatten(-3, -2)[..., index, :]``.
        frame_sizes: tokens kept per frame (length F), identical for every video in the batch.
    """

    tokens: torch.Tensor
    index: torch.Tensor
    frame_sizes: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[-2]


def keep_count(tokens_per_frame: int, prune_ratio: float) -> int:
    """Tokens a pruned frame keeps: ``int((1 - K) * T)``, Python float truncation as the reference."""
    return int((1 - prune_ratio) * tokens_per_frame)


@lru_cache(maxsize=256)
def frame_plan(num_frames: int, mode: str = "reference") -> tuple[int, ...]:
    """Reference frame of every frame: ``plan[f] == -1`` keeps frame f whole, else the frame it is pruned against."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if num_frames < 1:
        raise ValueError(f"need at least one frame, got {num_frames}")
    plan = [-1] * num_frames
    for f in range(1, num_frames, 2):  # stage 1: odd frames against their even partner
        plan[f] = f - 1
    for i in range(0, num_frames, 4):  # stage 2: the third frame of each window against the first
        c = i + 2
        if c >= num_frames:
            break
        if mode == "reference" and not i < num_frames - 4:
            continue
        plan[c] = i
    return tuple(plan)


def output_length(num_frames: int, tokens_per_frame: int, prune_ratio: float, mode: str = "reference") -> int:
    """Number of tokens :func:`temporal_merge` returns for one video."""
    keep = keep_count(tokens_per_frame, prune_ratio)
    return sum(tokens_per_frame if r < 0 else keep for r in frame_plan(num_frames, mode))


@lru_cache(maxsize=256)
def _layout(num_frames: int, tokens_per_frame: int, keep: int, mode: str):
    """Host-side layout: which frames are pruned, against what, and where their tokens land.

    Returns ``(pruned, refs, whole_src, whole_dst, pruned_dst, frame_sizes, n_out)`` where
    ``whole_src``/``whole_dst`` map every token of a whole frame to its output slot and
    ``pruned_dst[j]`` is the first output slot of the j-th pruned frame.
    """
    plan = frame_plan(num_frames, mode)
    pruned = [f for f, r in enumerate(plan) if r >= 0]
    refs = [plan[f] for f in pruned]
    whole_src, whole_dst, pruned_dst, sizes = [], [], [], []
    cursor = 0
    for f, r in enumerate(plan):
        if r < 0:
            whole_src.extend(range(f * tokens_per_frame, (f + 1) * tokens_per_frame))
            whole_dst.extend(range(cursor, cursor + tokens_per_frame))
            sizes.append(tokens_per_frame)
        else:
            pruned_dst.append(cursor)
            sizes.append(keep)
        cursor += sizes[-1]
    return tuple(pruned), tuple(refs), tuple(whole_src), tuple(whole_dst), tuple(pruned_dst), tuple(sizes), cursor


@dataclass(frozen=True)
class _DeviceLayout:
    """The index tensors of :func:`_layout`, built once per (layout, device) and never mutated."""

    base_index: torch.Tensor  # [n_out] int64: whole-frame sources in place, 0 in pruned slots
    pruned: torch.Tensor  # [P] int64 frame ids of pruned frames
    refs: torch.Tensor  # [P] int64 their reference frames
    offsets: torch.Tensor  # [1, P, 1] int64: f * T of each pruned frame
    pruned_slots: torch.Tensor  # [P * keep] int64: output slots of the pruned frames' tokens


@lru_cache(maxsize=256)
def _device_layout(num_frames: int, tokens_per_frame: int, keep: int, mode: str, device: torch.device) -> _DeviceLayout:
    """Device copies of the layout, cached so a call does no host-to-device copy (each such copy of a
    pageable host buffer blocks the host until the device has caught up)."""
    pruned, refs, whole_src, whole_dst, pruned_dst, _sizes, n_out = _layout(num_frames, tokens_per_frame, keep, mode)
    # Plain tensors even when first called under inference_mode (they may later index autograd inputs).
    with torch.inference_mode(False), torch.no_grad():
        base = torch.zeros(n_out, dtype=torch.long)
        if whole_src:
            base[torch.tensor(whole_dst, dtype=torch.long)] = torch.tensor(whole_src, dtype=torch.long)
        pf = torch.tensor(pruned, dtype=torch.long)
        slots = (torch.tensor(pruned_dst, dtype=torch.long).view(-1, 1) + torch.arange(keep)).flatten()
        return _DeviceLayout(
            base_index=base.to(device),
            pruned=pf.to(device),
            refs=torch.tensor(refs, dtype=torch.long).to(device),
            offsets=(pf * tokens_per_frame).view(1, -1, 1).to(device),
            pruned_slots=slots.to(device),
        )


def temporal_merge(frames: torch.Tensor, prune_ratio: float, mode: str = "reference") -> MergeResult:
    """Drop temporally redundant visual tokens (DyCoke TTM).

    Args:
        frames: ``[F, T, D]`` or ``[B, F, T, D]`` per-frame visual tokens (any float dtype, any device).
        prune_ratio: K in ``[0, 1)``: fraction of tokens dropped from each pruned frame.
        mode: ``"reference"`` or ``"complete"`` (see module docstring).

    Returns:
        :class:`MergeResult` with ``tokens`` ``[(B,) N, D]`` and ``index`` ``[(B,) N]``.
    """
    if frames.dim() not in (3, 4):
        raise ValueError(f"frames must be [F, T, D] or [B, F, T, D], got shape {tuple(frames.shape)}")
    if not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio}")
    squeeze = frames.dim() == 3
    x = frames.unsqueeze(0) if squeeze else frames
    b, n_frames, t, d = x.shape
    keep = keep_count(t, prune_ratio)
    sizes, n_out = _layout(n_frames, t, keep, mode)[5:]
    lay = _device_layout(n_frames, t, keep, mode, x.device)

    index = lay.base_index.expand(b, n_out).clone()
    if lay.pruned.numel() and keep > 0:
        # [B, P, T]: per-position similarity of each pruned frame with its reference frame.
        sim = F.cosine_similarity(x[:, lay.pruned], x[:, lay.refs], dim=-1)
        sel = sim.topk(keep, dim=-1, largest=False).indices  # ascending similarity, as the reference
        if mode == "complete":
            sel = sel.sort(dim=-1).values  # raster order
        index[:, lay.pruned_slots] = (sel + lay.offsets).flatten(1)
    tokens = x.flatten(1, 2).gather(1, index.unsqueeze(-1).expand(b, n_out, d))
    if squeeze:
        tokens, index = tokens[0], index[0]
    return MergeResult(tokens=tokens, index=index, frame_sizes=sizes)
