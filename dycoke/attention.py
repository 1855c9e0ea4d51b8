"""DyCoke dynamic pruning inside the LLM's attention, through transformers' attention-function registry.

:func:`install` registers :func:`dycoke_attention` under the name ``"dycoke_sdpa"`` and switches ONE
model instance's decoder to it (a per-instance adapter; no modeling file is copied). Without a
:class:`DecodeContext` in the call's kwargs the function is exactly transformers' SDPA attention, so
the patched model still behaves like the original (prefill, ``generate``).

With a context and a single query per row (a decode step) it:

* layer ``L - 1``: computes the attention probabilities explicitly (one query per row: a tiny
  ``[B, H, S]`` matrix, no prefill maps), uses them for the output AND hands the head-averaged vector
  to :func:`dycoke.pruning.select_visual`, which leaves a ``[B, 1, 1, S]`` bias in the context;
* layers ``>= L``: attend with that bias (unselected visual positions at ``-inf``);
* other layers: plain masked SDPA, or on CUDA the split-K kernel of :mod:`dycoke.decode_attention`
  (``DecodeContext.use_kernel``), which reads each row's slots only up to its length; with ``members`` set, its
  cascade form, which reads a prefix shared by several rows (the tasks of one video) once for all of them.

With ``dycoke_grouped_mask`` in the kwargs (the engine's batched suffix prefill: several tokens per row over
the cache) it attends with the query heads of a group stacked, so K and V are never repeated per head.

Grouped-query attention is handled by viewing the ``H`` query heads as ``H_kv`` groups of ``G``
queries, so K and V are read once and never repeated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dycoke.decode_attention import cascade_attention, decode_attention
from dycoke.pruning import PruneState, keep_to_bias, select_visual

ATTN_NAME = "dycoke_sdpa"


@dataclass
class DecodeContext:
    """Run-time state of one decode batch (never part of the configuration).

    Attributes:
        bias: ``[B, 1, 1, S]`` additive mask for the step (padding and unwritten slots at -inf).
        dp_layer: L, or 0 when dynamic pruning is off.
        prune_ratio / threshold: P and the similarity threshold.
        start / length: ``[B]`` visual span per row in cache slots (newline excluded from ``length``).
        state: per-row :class:`PruneState`.
        dp_bias: ``[B, 1, 1, S]`` bias for layers ``>= L``, written at layer ``L - 1`` each step.
        visual_attended: ``[B]`` visual positions attended by layers ``>= L`` at the last step.
        use_kernel: attend with :func:`dycoke.decode_attention.decode_attention` instead of SDPA.
        lengths: ``[B]`` slots each row may read this step (``pos + 1``), set by the step when ``use_kernel``.
        shared / members: with ``use_kernel``, ``[B]`` shared-prefix slots per row and ``[B, M]`` each group's rows
            (:func:`dycoke.decode_attention.cascade_attention`), set by the step; None: no shared reads.
    """

    bias: torch.Tensor
    dp_layer: int
    prune_ratio: float
    threshold: float
    start: torch.Tensor
    length: torch.Tensor
    state: PruneState
    dp_bias: torch.Tensor | None = None
    visual_attended: torch.Tensor = field(default=None)  # type: ignore[assignment]
    use_kernel: bool = False
    lengths: torch.Tensor | None = None
    shared: torch.Tensor | None = None
    members: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.visual_attended is None:
            self.visual_attended = self.length  # without pruning every visual token is attended


def _sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def dycoke_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention function with transformers' signature; returns ``([B, q, H, d], None)``."""
    ctx: DecodeContext | None = kwargs.pop("dycoke_ctx", None)
    grouped_mask: torch.Tensor | None = kwargs.pop("dycoke_grouped_mask", None)
    if grouped_mask is not None:
        return _grouped_chunk_attention(query, key, value, grouped_mask, scaling)
    if ctx is None or query.shape[2] != 1:
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    bsz, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    q = query.view(bsz, kv_heads, heads // kv_heads, dim)  # [B, H_kv, G, d]
    layer = module.layer_idx
    mask = ctx.bias
    if ctx.dp_layer:
        if layer == ctx.dp_layer - 1:
            scores = torch.matmul(q, key.transpose(-1, -2)) * scaling + mask
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32)  # [B, H_kv, G, S]
            out = torch.matmul(probs.to(value.dtype), value)
            decision = select_visual(probs.view(bsz, heads, -1), ctx.start, ctx.length, ctx.state,
                                     ctx.prune_ratio, ctx.threshold)
            ctx.dp_bias = mask + keep_to_bias(decision.keep, mask.dtype)
            ctx.visual_attended = decision.visual_attended
            return out.reshape(bsz, 1, heads, dim), None
        if layer >= ctx.dp_layer:
            mask = ctx.dp_bias
    if ctx.use_kernel and ctx.members is not None:
        out = cascade_attention(q, key, value, mask, ctx.lengths, ctx.shared, ctx.members, scaling)
    elif ctx.use_kernel:
        out = decode_attention(q, key, value, mask, ctx.lengths, scaling)
    else:
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(bsz, 1, heads, dim), None


def grouped_mask(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, 1, q, S]`` chunk mask -> ``[B, 1, G * q, S]`` for :func:`_grouped_chunk_attention` (built once per
    forward by the caller, shared by every layer)."""
    return mask.repeat(1, 1, groups, 1)


def _grouped_chunk_attention(query, key, value, mask, scaling):
    """A multi-token chunk (``query [B, H, q, d]``) over a cache with ``H_kv < H`` heads, without repeating K and
    V per query head: the ``G = H / H_kv`` query heads of a group are stacked along the query axis
    (``[B, H_kv, G*q, d]``), ``mask`` is the caller's ``[B, 1, G*q, S]`` (:func:`grouped_mask`). Returns
    ``([B, q, H, d], None)``."""
    bsz, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(bsz, kv_heads, heads // kv_heads * q_len, dim)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(bsz, heads, q_len, dim).transpose(1, 2), None


def install(language_model) -> None:
    """Route one decoder stack's attention through :func:`dycoke_attention` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, dycoke_attention)
    cfg = language_model.config
    if getattr(cfg, "_attn_implementation", None) == ATTN_NAME:
        return
    if hasattr(language_model, "set_attn_implementation"):
        language_model.set_attn_implementation(ATTN_NAME)
    else:
        cfg._attn_implementation = ATTN_NAME
