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
device); all per-token work is batched tensor operations: one normalisation of every frame, one
product-sum per strided run of (pruned, reference) frame pairs, one ``topk``, one row gather.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

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


def _progressions(pruned: list[int], refs: list[int]) -> tuple[tuple[int, int, int, int], ...]:
    """Split pruned frames into runs ``(first, step, count, delta)``: frames ``first + j * step``
    (``j < count``), each pruned against the frame ``delta`` before it, so that each run's frames and
    reference frames are two strided views of the input (no gather copies)."""
    by_delta: dict[int, list[int]] = {}
    for f, r in zip(pruned, refs):
        by_delta.setdefault(f - r, []).append(f)
    runs = []
    for delta, frames in sorted(by_delta.items()):
        first, step, count = frames[0], 1, 1
        for f in frames[1:]:
            if count == 1:
                step, count = f - first, 2
            elif f - first == step * count:
                count += 1
            else:
                runs.append((first, step, count, delta))
                first, step, count = f, 1, 1
        runs.append((first, step, count, delta))
    return tuple(runs)


@lru_cache(maxsize=256)
def _layout(num_frames: int, tokens_per_frame: int, keep: int, mode: str):
    """Host-side layout: which frames are pruned, against what, and where their tokens land.

    Returns ``(runs, pruned, whole_src, whole_dst, pruned_dst, frame_sizes, n_out)``: ``runs`` are the
    strided runs of pruned frames (:func:`_progressions`), ``pruned`` their frames in run order (the
    order of the similarity rows), ``whole_src``/``whole_dst`` map every token of a whole frame to its
    output slot and ``pruned_dst[j]`` is the first output slot of ``pruned[j]``.
    """
    plan = frame_plan(num_frames, mode)
    frames = [f for f, r in enumerate(plan) if r >= 0]
    runs = _progressions(frames, [plan[f] for f in frames])
    pruned = [first + j * step for first, step, count, _ in runs for j in range(count)]
    assert sorted(pruned) == frames and all(plan[first + j * step] == first + j * step - delta
                                            for first, step, count, delta in runs for j in range(count))
    whole_src, whole_dst, sizes, starts = [], [], [], []
    cursor = 0
    for f, r in enumerate(plan):
        starts.append(cursor)
        if r < 0:
            whole_src.extend(range(f * tokens_per_frame, (f + 1) * tokens_per_frame))
            whole_dst.extend(range(cursor, cursor + tokens_per_frame))
            sizes.append(tokens_per_frame)
        else:
            sizes.append(keep)
        cursor += sizes[-1]
    pruned_dst = [starts[f] for f in pruned]
    return runs, tuple(pruned), tuple(whole_src), tuple(whole_dst), tuple(pruned_dst), tuple(sizes), cursor


@dataclass(frozen=True)
class _DeviceLayout:
    """The index tensors of :func:`_layout`, built once per (layout, device) and never mutated."""

    base_index: torch.Tensor  # [n_out] int64: whole-frame sources in place, 0 in pruned slots
    offsets: torch.Tensor  # [1, P, 1] int64: f * T of each pruned frame (run order)
    pruned_slots: torch.Tensor  # [P * keep] int64: output slots of the pruned frames' tokens


@lru_cache(maxsize=256)
def _device_layout(num_frames: int, tokens_per_frame: int, keep: int, mode: str, device: torch.device) -> _DeviceLayout:
    """Device copies of the layout, cached so a call does no host-to-device copy (each such copy of a
    pageable host buffer blocks the host until the device has caught up)."""
    _runs, pruned, whole_src, whole_dst, pruned_dst, _sizes, n_out = _layout(num_frames, tokens_per_frame, keep, mode)
    # Plain tensors even when first called under inference_mode (they may later index autograd inputs).
    with torch.inference_mode(False), torch.no_grad():
        base = torch.zeros(n_out, dtype=torch.long)
        if whole_src:
            base[torch.tensor(whole_dst, dtype=torch.long)] = torch.tensor(whole_src, dtype=torch.long)
        pf = torch.tensor(pruned, dtype=torch.long)
        slots = (torch.tensor(pruned_dst, dtype=torch.long).view(-1, 1) + torch.arange(keep)).flatten()
        return _DeviceLayout(
            base_index=base.to(device),
            offsets=(pf * tokens_per_frame).view(1, -1, 1).to(device),
            pruned_slots=slots.to(device),
        )


def _similarities(x: torch.Tensor, runs: tuple[tuple[int, int, int, int], ...], eps: float = 1e-8) -> torch.Tensor:
    """``[B, P, T]`` cosine similarity of each pruned frame (run order) with its reference frame.

    Bit for bit what ``F.cosine_similarity(x[:, pruned], x[:, refs], dim=-1)`` returns (the same
    norm, clamp, divide, multiply and sum, in the input dtype), but every frame is normalised once
    and the pairs are strided views, so nothing is gathered: about half the memory traffic.
    """
    norm = torch.linalg.vector_norm(x, 2, dim=-1, keepdim=True).clamp_min_(eps)
    xn = x / norm
    sims = []
    for first, step, count, delta in runs:
        last = first + step * (count - 1)
        sims.append((xn[:, first : last + 1 : step] * xn[:, first - delta : last - delta + 1 : step]).sum(dim=-1))
    return sims[0] if len(sims) == 1 else torch.cat(sims, dim=1)


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
    layout = _layout(n_frames, t, keep, mode)
    runs, sizes, n_out = layout[0], layout[5], layout[6]
    lay = _device_layout(n_frames, t, keep, mode, x.device)

    index = lay.base_index.expand(b, n_out).clone()
    if runs and keep > 0:
        sim = _similarities(x, runs)  # [B, P, T]
        sel = sim.topk(keep, dim=-1, largest=False).indices  # ascending similarity, as the reference
        if mode == "complete":
            sel = sel.sort(dim=-1).values  # raster order
        index[:, lay.pruned_slots] = (sel + lay.offsets).flatten(1)
    # One row gather over the flattened batch (faster on GPU than gather with an expanded index).
    rows = index if b == 1 else index + (torch.arange(b, device=x.device) * (n_frames * t)).view(b, 1)
    tokens = x.reshape(b * n_frames * t, d).index_select(0, rows.flatten()).view(b, n_out, d)
    if squeeze:
        tokens, index = tokens[0], index[0]
    return MergeResult(tokens=tokens, index=index, frame_sizes=sizes)
