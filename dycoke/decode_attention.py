"""Decode-step attention over the slot cache as one split-K Triton kernel (flash-decoding), CUDA only.

A decode step has one query per row and ``G = H / H_kv`` query heads per KV head. :func:`decode_attention`
computes, per row ``b`` and KV head ``h``::

    out[b, h, g] = softmax(q[b, h, g] . K[b, h, :n_b]^T * scale + bias[b, :n_b]) @ V[b, h, :n_b]

where ``n_b = lengths[b]`` (slots past it are never read) and ``bias`` is the step's additive mask (0 or
-inf; padding and DyCoke's pruned visual positions). Each program reads one ``BLOCK_N`` tile of K and V
once for all ``G`` query heads of its group (the same traffic as grouped SDPA) and the sequence is split
into ``splits`` chunks processed by separate programs, so a batch with few rows still fills the GPU; the
chunks' partial results are merged with their log-sum-exp (a few small torch ops).

:func:`cascade_attention` is the same attention for rows that share a prompt prefix (the tasks of one video:
system prompt, user header, visual span; copied on the device to every member row at admission). A group's
prefix slots are read ONCE, by one program that scores them for the queries of all its members (``M`` rows x
``G`` heads, each with its own mask, so DyCoke's per-row pruning still applies); each row's own slots (suffix
and generated tokens) are read by the split kernel from the row's prefix length on; the two partial results
merge by log-sum-exp. :func:`share_groups` lists each group's rows on the device.

Everything is shape-static and reads lengths from device tensors, so the functions can run inside a
captured CUDA graph. :func:`available` says whether the kernel can run for a tensor (CUDA and Triton);
callers fall back to ``torch.nn.functional.scaled_dot_product_attention`` otherwise.
"""

from __future__ import annotations

import functools

import torch

from dycoke.fused import triton_available


@functools.cache
def _kernels():
    from dycoke import decode_kernels

    return decode_kernels.split_kernel, decode_kernels.shared_kernel


def available(t: torch.Tensor, head_dim: int) -> bool:
    """Whether :func:`decode_attention` can run on ``t``'s device (CUDA with Triton installed, compute capability
    8.0 or newer for bf16 tensor-core dots) for heads of ``head_dim`` (a power of two, at least 16)."""
    if not t.is_cuda or head_dim < 16 or head_dim & (head_dim - 1):
        return False
    return torch.cuda.get_device_capability(t.device) >= (8, 0) and triton_available()


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, lengths: torch.Tensor,
                     scale: float, splits: int | None = None, block_n: int = 64, num_warps: int = 4,
                     num_stages: int = 2, start: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped single-query attention over a slot cache.

    Args:
        q: ``[B, H_kv, G, d]`` (one decode query per row, the ``G`` query heads of each KV head).
        k, v: ``[B, H_kv, S, d]`` cache buffers (last dim contiguous).
        bias: ``[B, S]`` additive mask (or any view whose last dim is contiguous, e.g. ``[B, 1, 1, S]``).
        lengths: ``[B]`` int, slots each row may read (``pos + 1``); slots at or past it are not read.
        scale: softmax scale.
        splits: sequence chunks per (row, KV head), each a separate program; None: enough for about four
            programs per SM (1 for a full batch).
        start: ``[B]`` int or None: each row reads slots ``[start, lengths)`` only.
    Returns ``[B, H_kv, G, d]`` in ``q``'s dtype. A row whose slots are all masked gets zeros.
    """
    part, lse = _split_partials(q, k, v, bias, lengths, scale, splits, block_n, num_warps, num_stages, start)
    return _merge(part, lse, q.dtype)


def cascade_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, lengths: torch.Tensor,
                      shared: torch.Tensor, members: torch.Tensor, scale: float, splits: int | None = None,
                      block_n: int = 64, num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """:func:`decode_attention` for rows whose first slots hold the same prefix, read once per group.

    Args (besides those of :func:`decode_attention`):
        shared: ``[B]`` int, slots ``[0, shared[b])`` of row ``b`` are its group's prefix (identical in every
            member row, so the group's leader row is read for all of them); 0 for a row that shares nothing.
        members: ``[B, M]`` int32 from :func:`share_groups`: a leader row's group (itself first, -1 padded),
            all -1 for the other rows. Every row must belong to exactly one leader's list.
    Returns ``[B, H_kv, G, d]``, the attention over slots ``[0, lengths)`` with each row's own ``bias``.
    """
    bsz, kv_heads, groups, dim = q.shape
    width = members.shape[1]
    slots = k.shape[2]
    bias2 = bias.reshape(bsz, slots)
    if splits is None:  # leaders are about a third of the rows: about eight programs per SM
        splits = max(1, min(16, 24 * _sm_count(q.device) // (bsz * kv_heads)))
    chunk = -(-slots // splits)
    chunk = -(-chunk // block_n) * block_n
    own = splits == 1  # one launch: each group's program also reads its members' own slots; no merge
    if own:
        part = torch.empty(bsz, kv_heads, 1, groups, dim, dtype=q.dtype, device=q.device)
        lse = part  # not written
    else:
        part = torch.empty(bsz, kv_heads, splits + 1, groups, dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(bsz, kv_heads, splits + 1, groups, dtype=torch.float32, device=q.device)
    _kernels()[1][(bsz, kv_heads, splits)](
        q, k, v, bias2, shared, lengths, members, part, lse, scale,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        bias2.stride(0),
        part.stride(0), part.stride(1), part.stride(2), part.stride(3),
        lse.stride(0), lse.stride(1), lse.stride(2),
        chunk, M=width, G=groups, MG_PAD=max(16, 1 << (width * groups - 1).bit_length()), D=dim, BLOCK_N=block_n,
        FP32=q.dtype == torch.float32, OWN=own, num_warps=num_warps, num_stages=num_stages)
    if own:
        return part[:, :, 0]
    part[:, :, splits:], lse[:, :, splits:] = _split_partials(q, k, v, bias, lengths, scale, 1, block_n, num_warps,
                                                              num_stages, shared)
    return _merge(part, lse, q.dtype)


def share_groups(group: torch.Tensor, width: int) -> torch.Tensor:
    """``group [B]`` int64 (rows with equal ids share a prefix; a row that shares nothing needs an id of its own)
    -> ``members [B, width]`` int32 for :func:`cascade_attention`: rows of equal id in runs of at most ``width``,
    each run listed (ascending rows) under its first row; -1 elsewhere. Device-only (sort, cummax, scatter)."""
    bsz = group.numel()
    order = torch.argsort(group, stable=True)
    ordered = group[order]
    pos = torch.arange(bsz, device=group.device)
    first = torch.ones(bsz, dtype=torch.bool, device=group.device)
    first[1:] = ordered[1:] != ordered[:-1]
    run_start = torch.cummax(torch.where(first, pos, torch.zeros_like(pos)), 0).values
    offset = pos - run_start
    leader = order[run_start + offset // width * width]
    members = torch.full((bsz, width), -1, dtype=torch.int32, device=group.device)
    members[leader, offset % width] = order.to(torch.int32)
    return members


def _split_partials(q, k, v, bias, lengths, scale, splits, block_n, num_warps, num_stages, start):
    """Per-chunk normalised outputs ``[B, H_kv, splits, G, d]`` (float32) and their log-sum-exps ``[B, H_kv, splits, G]``."""
    bsz, kv_heads, groups, dim = q.shape
    slots = k.shape[2]
    bias2 = bias.reshape(bsz, slots)
    g_pad = max(16, 1 << (groups - 1).bit_length())
    if splits is None:
        splits = max(1, min(16, 4 * _sm_count(q.device) // (bsz * kv_heads)))
    chunk = -(-slots // splits)
    chunk = -(-chunk // block_n) * block_n
    part = torch.empty(bsz, kv_heads, splits, groups, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(bsz, kv_heads, splits, g_pad, dtype=torch.float32, device=q.device)
    _kernels()[0][(bsz, kv_heads, splits)](
        q, k, v, bias2, lengths if start is None else start, lengths, part, lse, scale,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        bias2.stride(0),
        part.stride(0), part.stride(1), part.stride(2), part.stride(3),
        chunk, G=groups, G_PAD=g_pad, D=dim, BLOCK_N=block_n, FP32=q.dtype == torch.float32,
        HAS_START=start is not None, num_warps=num_warps, num_stages=num_stages)
    return part, lse[..., :groups]


def _merge(part: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Chunks' partial outputs ``[B, H_kv, C, G, d]`` with their log-sum-exps ``[B, H_kv, C, G]`` -> ``[B, H_kv, G, d]``."""
    if part.shape[2] == 1:  # one chunk: its normalised output is the answer (a full batch takes this path)
        return part[:, :, 0].to(dtype)
    top = lse.amax(dim=2, keepdim=True)
    weight = torch.exp(lse - torch.where(torch.isinf(top), torch.zeros_like(top), top))  # empty chunks weigh 0
    out = (part * weight.unsqueeze(-1)).sum(dim=2) / weight.sum(dim=2).clamp(min=1e-30).unsqueeze(-1)
    return out.to(dtype)
