"""Decode-step attention over the slot cache as one split-K Triton kernel (flash-decoding), CUDA only.

A decode step has one query per row and ``G = H / H_kv`` query heads per KV head. :func:`decode_attention`
computes, per row ``b`` and KV head ``h``::

    out[b, h, g] = softmax(q[b, h, g] . K[b, h, :n_b]^T * scale + bias[b, :n_b]) @ V[b, h, :n_b]

where ``n_b = lengths[b]`` (slots past it are never read) and ``bias`` is the step's additive mask (0 or
-inf; padding and DyCoke's pruned visual positions). With an ``index`` instead of a bias, row ``b`` attends to
the slots ``index[b, :n_b]`` only (DyCoke's kept positions, :func:`kept_slots`) and the other slots are never
read: a step that prunes 70% of the visual tokens reads about a third of the KV bytes in layers ``>= L``. Each program reads one ``BLOCK_N`` tile of K and V
once for all ``G`` query heads of its group (the same traffic as grouped SDPA) and the sequence is split
into ``splits`` chunks processed by separate programs, so a batch with few rows still fills the GPU; the
chunks' partial results are merged with their log-sum-exp (a few small torch ops).

Everything is shape-static and reads lengths from a device tensor, so the function can run inside a
captured CUDA graph. :func:`available` says whether the kernel can run for a tensor (CUDA and Triton);
callers fall back to ``torch.nn.functional.scaled_dot_product_attention`` otherwise.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def split_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, idx_ptr, len_ptr, o_ptr, lse_ptr, scale,
                     stride_qb, stride_qh, stride_qg,
                     stride_kb, stride_kh, stride_ks,
                     stride_vb, stride_vh, stride_vs,
                     stride_bb,
                     stride_ob, stride_oh, stride_os, stride_og,
                     chunk, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                     FP32: tl.constexpr, INDEXED: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.program_id(2)
        n = tl.load(len_ptr + b)
        lo = s * chunk
        hi = tl.minimum(lo + chunk, n)
        g_idx = tl.arange(0, G_PAD)
        d_idx = tl.arange(0, D)
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + g_idx[:, None] * stride_qg + d_idx[None, :],
                    mask=g_idx[:, None] < G, other=0.0)
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        k_base = k_ptr + b * stride_kb + h * stride_kh
        v_base = v_ptr + b * stride_vb + h * stride_vh
        for start in range(lo, hi, BLOCK_N):
            n_idx = start + tl.arange(0, BLOCK_N)
            valid = n_idx < hi
            if INDEXED:  # the row's kept slots, listed in idx (stride_bb: its row stride); no bias to read
                slot = tl.load(idx_ptr + b * stride_bb + n_idx, mask=valid, other=0)
                bias = tl.where(valid, 0.0, float("-inf"))
            else:
                slot = n_idx
                bias = tl.load(bias_ptr + b * stride_bb + n_idx, mask=valid, other=float("-inf")).to(tl.float32)
            k = tl.load(k_base + slot[:, None] * stride_ks + d_idx[None, :], mask=valid[:, None], other=0.0)
            if FP32:  # exact fp32 products (Triton's default for fp32 is TF32)
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = scores * scale + bias[None, :]
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(scores - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + slot[:, None] * stride_vs + d_idx[None, :], mask=valid[:, None], other=0.0)
            if FP32:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(l_i))
        o_off = b * stride_ob + h * stride_oh + s * stride_os
        tl.store(o_ptr + o_off + g_idx[:, None] * stride_og + d_idx[None, :], out, mask=g_idx[:, None] < G)
        tl.store(lse_ptr + ((b * tl.num_programs(1) + h) * tl.num_programs(2) + s) * G_PAD + g_idx, lse)

    return split_kernel


def available(t: torch.Tensor, head_dim: int) -> bool:
    """Whether :func:`decode_attention` can run on ``t``'s device (CUDA with Triton installed, compute capability
    8.0 or newer for bf16 tensor-core dots) for heads of ``head_dim`` (a power of two, at least 16)."""
    if not t.is_cuda or head_dim < 16 or head_dim & (head_dim - 1):
        return False
    if torch.cuda.get_device_capability(t.device) < (8, 0):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def kept_slots(keep: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``keep [B, S]`` bool and ``lengths [B]`` -> ``(index [B, S] int32, count [B] int32)``: row ``b``'s kept slots
    below its length, ascending, in ``index[b, :count[b]]`` (the rest of the row is unspecified). Device-only
    (cumsum + scatter), so it can run inside a captured CUDA graph."""
    bsz, slots = keep.shape
    slot = torch.arange(slots, device=keep.device, dtype=torch.int32)
    kept = keep & (slot < lengths.unsqueeze(1))
    place = kept.cumsum(1, dtype=torch.int32) - 1
    target = torch.where(kept, place, slots).long()  # dropped slots all land in a spare last column
    index = torch.zeros(bsz, slots + 1, dtype=torch.int32, device=keep.device)
    index.scatter_(1, target, slot.expand(bsz, -1))
    return index[:, :slots], kept.sum(1, dtype=torch.int32)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                     lengths: torch.Tensor, scale: float, splits: int | None = None, block_n: int = 64,
                     num_warps: int = 4, num_stages: int = 2, index: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped single-query attention over a slot cache.

    Args:
        q: ``[B, H_kv, G, d]`` (one decode query per row, the ``G`` query heads of each KV head).
        k, v: ``[B, H_kv, S, d]`` cache buffers (last dim contiguous).
        bias: ``[B, S]`` additive mask (or any view whose last dim is contiguous, e.g. ``[B, 1, 1, S]``); None
            with ``index``.
        lengths: ``[B]`` int, slots each row may read (``pos + 1``); slots at or past it are not read. With
            ``index``: how many entries of the row's index to read.
        index: ``[B, S']`` int32 slot lists (last dim contiguous, :func:`kept_slots`), or None: slots ``[0, n_b)``.
        scale: softmax scale.
        splits: sequence chunks per (row, KV head), each a separate program; None: enough for about four
            programs per SM (1 for a full batch).
    Returns ``[B, H_kv, G, d]`` in ``q``'s dtype. A row whose slots are all masked gets zeros.
    """
    bsz, kv_heads, groups, dim = q.shape
    slots = k.shape[2]
    if index is None:
        bias2, idx = bias.reshape(bsz, slots), lengths  # idx unused
    else:
        bias2, idx = index, index  # the kernel reads the index row stride from stride_bb
    g_pad = max(16, 1 << (groups - 1).bit_length())
    if splits is None:
        splits = max(1, min(16, 4 * _sm_count(q.device) // (bsz * kv_heads)))
    chunk = -(-slots // splits)
    chunk = -(-chunk // block_n) * block_n
    part = torch.empty(bsz, kv_heads, splits, groups, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(bsz, kv_heads, splits, g_pad, dtype=torch.float32, device=q.device)
    _kernel()[(bsz, kv_heads, splits)](
        q, k, v, bias2, idx, lengths, part, lse, scale,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        bias2.stride(0),
        part.stride(0), part.stride(1), part.stride(2), part.stride(3),
        chunk, G=groups, G_PAD=g_pad, D=dim, BLOCK_N=block_n, FP32=q.dtype == torch.float32,
        INDEXED=index is not None, num_warps=num_warps,
        num_stages=num_stages)
    if splits == 1:  # one chunk: its normalised output is the answer (a full batch takes this path)
        return part[:, :, 0].to(q.dtype)
    lse = lse[..., :groups]  # [B, H_kv, splits, G]
    top = lse.amax(dim=2, keepdim=True)
    weight = torch.exp(lse - torch.where(torch.isinf(top), torch.zeros_like(top), top))  # empty chunks weigh 0
    out = (part * weight.unsqueeze(-1)).sum(dim=2) / weight.sum(dim=2).clamp(min=1e-30).unsqueeze(-1)
    return out.to(q.dtype)
