"""DyCoke dynamic pruning (DP) of the KV cache during decoding, as pure tensor functions.

At every decode step the single query's attention at layer ``L - 1`` (softmax over all cached
positions, averaged over heads) scores the visual positions. Sequence ``b``'s visual span starts at
cache position ``start[b]`` and holds ``length[b]`` visual tokens (the newline embedding that follows
the span is *not* counted). Candidates are the first ``length - 1`` visual positions; the last visual
token, the newline and every non-visual position are always attended.

For each sequence independently:

* the candidate attention vector is compared (cosine) with that sequence's vector from its previous
  step; if there is no previous vector or the similarity is below ``threshold``, the step keeps the
  top ``int((length - 1) * (1 - P))`` candidates by attention and masks the rest;
* otherwise the step attends to the full cache;
* the current vector always becomes the new previous vector.

Nothing is evicted and positions never change: the result is a keep mask over cache positions,
applied by layers ``>= L`` as an additive ``-inf`` bias. Everything is batched and stays on the
device (no host synchronisation), so it can run inside a captured CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PruneState:
    """Per-sequence run-time state carried between decode steps.

    Attributes:
        prev: ``[B, S]`` float32, the previous step's candidate attention (zero outside candidates).
        has_prev: ``[B]`` bool, whether ``prev`` holds a vector for that sequence.
    """

    prev: torch.Tensor
    has_prev: torch.Tensor

    @classmethod
    def empty(cls, batch: int, positions: int, device: torch.device | str | None = None) -> PruneState:
        return cls(
            prev=torch.zeros(batch, positions, dtype=torch.float32, device=device),
            has_prev=torch.zeros(batch, dtype=torch.bool, device=device),
        )

    def gather_rows_(self, index: torch.Tensor) -> None:
        """Rows ``index`` move to rows ``[0, len(index))``, in place (batch compaction)."""
        m = index.numel()
        self.prev[:m].copy_(self.prev.index_select(0, index))
        self.has_prev[:m].copy_(self.has_prev.index_select(0, index))

    def prefix(self, m: int) -> PruneState:
        """The state of rows ``[0, m)`` (views)."""
        return PruneState(self.prev[:m], self.has_prev[:m])

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Forget history (for all sequences, or for the rows of ``rows`` [B] bool)."""
        if rows is None:
            self.has_prev.zero_()
            self.prev.zero_()
        else:
            self.has_prev.masked_fill_(rows, False)
            self.prev.masked_fill_(rows.unsqueeze(-1), 0.0)


@dataclass
class PruneDecision:
    """Result of one policy step.

    Attributes:
        keep: ``[B, S]`` bool; positions that layers ``>= L`` may attend to.
        pruned: ``[B]`` bool; whether this step pruned (False means full attention).
        visual_attended: ``[B]`` int64; visual positions (span incl. its last token) attended this step.
    """

    keep: torch.Tensor
    pruned: torch.Tensor
    visual_attended: torch.Tensor


def keep_budget(length: torch.Tensor, prune_ratio: float) -> torch.Tensor:
    """``int((length - 1) * (1 - P))`` per sequence, with Python's float64 truncation. ``[B]`` int64."""
    cand = (length - 1).clamp(min=0).to(torch.float64)
    return (cand * (1.0 - prune_ratio)).floor().to(torch.long)


def candidate_mask(start: torch.Tensor, length: torch.Tensor, positions: int) -> torch.Tensor:
    """``[B, S]`` bool: the first ``length - 1`` visual positions of each sequence."""
    pos = torch.arange(positions, device=start.device).unsqueeze(0)
    return (pos >= start.unsqueeze(1)) & (pos < (start + length - 1).unsqueeze(1))


def select_visual(
    attn: torch.Tensor,
    start: torch.Tensor,
    length: torch.Tensor,
    state: PruneState,
    prune_ratio: float,
    threshold: float = 0.9,
) -> PruneDecision:
    """One DP policy step for a batch of sequences; updates ``state`` in place.

    Args:
        attn: ``[B, H, S]`` attention probabilities of the current query over the cache at layer
            ``L - 1``, or ``[B, S]`` already averaged over heads. Entries beyond a sequence's cache are
            expected to be zero.
        start: ``[B]`` int64, cache position of each sequence's first visual token.
        length: ``[B]`` int64, visual tokens in each span (newline excluded); 0 for no visual input.
        state: the per-sequence :class:`PruneState` (``[B, S]``); mutated.
        prune_ratio: P in ``[0, 1)``.
        threshold: similarity at or above which the step attends to the full cache.
    """
    scores = attn.float().mean(dim=1) if attn.dim() == 3 else attn.float()
    bsz, positions = scores.shape
    cand = candidate_mask(start, length, positions)
    vec = scores * cand
    sim = F.cosine_similarity(vec, state.prev, dim=-1, eps=1e-12)
    pruned = ~state.has_prev | (sim < threshold)
    pruned &= length > 1

    # Rank candidates by attention without leaving the device: rank[b, s] = place of s in a descending sort.
    ranked = torch.where(cand, scores, torch.full_like(scores, -1.0))
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(positions, device=scores.device).expand(bsz, -1))
    budget = keep_budget(length, prune_ratio)
    selected = rank < budget.unsqueeze(1)
    keep = ~cand | selected | ~pruned.unsqueeze(1)

    state.prev.copy_(vec)
    state.has_prev.fill_(True)
    visual = torch.where(pruned, budget + 1, length.clamp(min=0))
    return PruneDecision(keep=keep, pruned=pruned, visual_attended=visual)


def keep_to_bias(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, S]`` bool keep mask to an additive attention bias ``[B, 1, 1, S]`` (0 or -inf)."""
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    bias.masked_fill_(~keep, float("-inf"))
    return bias[:, None, None, :]
