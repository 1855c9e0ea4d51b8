"""Triton kernels of :mod:`dycoke.decode_attention` (imported only where Triton is installed; see that module for
the contracts). One program owns one (row or group leader, KV head, chunk) and keeps a running softmax over its
K/V tiles (:func:`online_update`)."""

import triton
import triton.language as tl


@triton.jit
def online_update(q, k, v, bias, m_i, l_i, acc, scale, FP32: tl.constexpr):
    """One K/V tile into a running softmax: q [R, D], k/v [N, D], bias [R, N] -> (m_i, l_i, acc). fp32
    inputs use exact fp32 products (Triton's default for fp32 is TF32)."""
    if FP32:
        scores = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        scores = tl.dot(q, tl.trans(k))
    scores = scores * scale + bias
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(scores - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if FP32:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def load_tile(k_base, v_base, n_idx, valid, d_idx, stride_ks, stride_vs):
    """K and V at slots ``n_idx`` (``[N, D]`` each; slots not ``valid`` read as 0)."""
    k = tl.load(k_base + n_idx[:, None] * stride_ks + d_idx[None, :], mask=valid[:, None], other=0.0)
    v = tl.load(v_base + n_idx[:, None] * stride_vs + d_idx[None, :], mask=valid[:, None], other=0.0)
    return k, v


@triton.jit
def split_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, start_ptr, len_ptr, o_ptr, lse_ptr, scale,
                 stride_qb, stride_qh, stride_qg,
                 stride_kb, stride_kh, stride_ks,
                 stride_vb, stride_vh, stride_vs,
                 stride_bb,
                 stride_ob, stride_oh, stride_os, stride_og,
                 chunk, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                 FP32: tl.constexpr, HAS_START: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    n = tl.load(len_ptr + b)
    lo = s * chunk
    if HAS_START:  # the row's own slots begin after its shared prefix
        lo += tl.load(start_ptr + b)
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
        k, v = load_tile(k_base, v_base, n_idx, valid, d_idx, stride_ks, stride_vs)
        bias = tl.load(bias_ptr + b * stride_bb + n_idx, mask=valid, other=float("-inf")).to(tl.float32)
        m_i, l_i, acc = online_update(q, k, v, bias[None, :], m_i, l_i, acc, scale, FP32)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(l_i))
    o_off = b * stride_ob + h * stride_oh + s * stride_os
    tl.store(o_ptr + o_off + g_idx[:, None] * stride_og + d_idx[None, :], out, mask=g_idx[:, None] < G)
    tl.store(lse_ptr + ((b * tl.num_programs(1) + h) * tl.num_programs(2) + s) * G_PAD + g_idx, lse)


@triton.jit
def shared_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, plen_ptr, len_ptr, mem_ptr, o_ptr, lse_ptr, scale,
                  stride_qb, stride_qh, stride_qg,
                  stride_kb, stride_kh, stride_ks,
                  stride_vb, stride_vh, stride_vs,
                  stride_bb,
                  stride_ob, stride_oh, stride_os, stride_og,
                  stride_lb, stride_lh, stride_ls,
                  chunk, M: tl.constexpr, G: tl.constexpr, MG_PAD: tl.constexpr, D: tl.constexpr,
                  BLOCK_N: tl.constexpr, FP32: tl.constexpr, OWN: tl.constexpr):
    r = tl.program_id(0)  # a group's leader row (other rows' programs read nothing)
    h = tl.program_id(1)
    s = tl.program_id(2)
    j = tl.arange(0, MG_PAD)  # query j: member j // G, head j % G
    mem = tl.load(mem_ptr + r * M + j // G, mask=j < M * G, other=-1)
    live = mem >= 0
    row = tl.where(live, mem, 0)
    d_idx = tl.arange(0, D)
    q = tl.load(q_ptr + row[:, None] * stride_qb + h * stride_qh + (j % G)[:, None] * stride_qg + d_idx[None, :],
                mask=live[:, None], other=0.0)
    lo = s * chunk
    hi = tl.minimum(lo + chunk, tl.load(plen_ptr + r))
    hi = tl.where(tl.load(mem_ptr + r * M) >= 0, hi, lo)
    m_i = tl.full([MG_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([MG_PAD], tl.float32)
    acc = tl.zeros([MG_PAD, D], tl.float32)
    k_base = k_ptr + r * stride_kb + h * stride_kh
    v_base = v_ptr + r * stride_vb + h * stride_vh
    for start in range(lo, hi, BLOCK_N):
        n_idx = start + tl.arange(0, BLOCK_N)
        valid = n_idx < hi
        k, v = load_tile(k_base, v_base, n_idx, valid, d_idx, stride_ks, stride_vs)
        bias = tl.load(bias_ptr + row[:, None] * stride_bb + n_idx[None, :], mask=live[:, None] & valid[None, :],
                       other=float("-inf")).to(tl.float32)  # each member's own mask (DyCoke's pruning)
        m_i, l_i, acc = online_update(q, k, v, bias, m_i, l_i, acc, scale, FP32)
    if OWN:  # one chunk: each member's own slots [prefix, length) here too, so the result is final
        for mm in tl.static_range(M):
            own = tl.load(mem_ptr + r * M + mm)
            own_row = tl.where(own >= 0, own, 0)
            own_lo = tl.load(plen_ptr + own_row)
            own_hi = tl.where(own >= 0, tl.load(len_ptr + own_row), own_lo)
            mine = live & (j // G == mm)
            for start in range(own_lo, own_hi, BLOCK_N):
                n_idx = start + tl.arange(0, BLOCK_N)
                valid = n_idx < own_hi
                k, v = load_tile(k_ptr + own_row * stride_kb + h * stride_kh, v_ptr + own_row * stride_vb + h * stride_vh,
                                 n_idx, valid, d_idx, stride_ks, stride_vs)
                bias = tl.load(bias_ptr + own_row * stride_bb + n_idx, mask=valid, other=float("-inf")).to(tl.float32)
                bias = tl.where(mine[:, None], bias[None, :], float("-inf"))  # other members' queries skip it
                m_i, l_i, acc = online_update(q, k, v, bias, m_i, l_i, acc, scale, FP32)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(l_i))
    o_off = row * stride_ob + h * stride_oh + s * stride_os + (j % G) * stride_og
    tl.store(o_ptr + o_off[:, None] + d_idx[None, :], out.to(o_ptr.dtype.element_ty), mask=live[:, None])
    if not OWN:
        tl.store(lse_ptr + row * stride_lb + h * stride_lh + s * stride_ls + j % G, lse, mask=live)
