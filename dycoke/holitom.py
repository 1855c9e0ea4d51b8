"""HoliTom's outer stages (arXiv 2505.21334, DESIGN 4.6), batched over videos, as pure tensor functions.

Reimplemented from the description and from reading the authors' ``holitom/llava_arch.py`` (no code
copied). Per video, from pooled features ``X [F, T, D]`` and a saliency ``A [F, T]``:

1. ``S[f, t] = cos(X[f, t], X[f + 1, t])`` in fp32 (the authors L2-normalise, then take the cosine;
   so do we). A position is *static* across frames ``f..f+1`` iff ``S > tau`` (strict).
2. Dynamic programming over frames picks contiguous segments maximising the removable tokens; a
   segment ``[s, e]`` removes ``(positions static over all of it) * (e - s)``. For frame ``i`` the
   candidates are the singleton, then windows of length 2, 3, ... up to ``max_window`` inclusive, and a
   later candidate wins only if strictly better: ties keep the singleton, then the shortest window.
   Sums are exact integers (int64; the authors' fp32 is exact at these sizes).
3. ``r' = min(r / ((F*T - removed) / (F*T)), 1)`` in float64, operations in that order (correctly
   rounded division, never ``reciprocal * r``).
4. Per segment of length > 1: each static position's features are averaged over the segment's frames
   (raw features, summed in frame order, divided by the length) and the ``n_s`` static tokens are
   merged by DPC-KNN into ``c = round(n_s * r')`` centres (round half to even; ``c = 0`` drops them):
   distances ``cdist / sqrt(D)`` computed pair by pair (exact 0 on the diagonal); ``k = min(k, c)``
   nearest (self included); density ``exp(-mean squared k-NN distance)`` (+ ``noise * U[0, 1)`` if
   ``noise > 0``); a token's parent distance is the distance to its nearest strictly denser token,
   or the largest pairwise distance of the segment if there is none; the ``c`` largest
   ``density * parent distance`` are the centres, in position order; every other static token joins
   its nearest centre (lowest position on ties); a centre with members becomes
   ``beta * centre + (1 - beta) * mean(members)``, one without stays as it is.
   Every frame (of any segment) keeps its ``ceil(n_d * r')`` dynamic positions of highest saliency,
   in position order (``n_d = T - n_s``; a singleton segment has ``n_s = 0``).
5. Output: segments in time order; per segment its centres, then each frame's kept dynamic tokens.

Tie rules (the authors' ``topk`` leaves them unspecified; with ``noise = 0`` ours are deterministic):
equal scores or saliencies -> the lower position wins. Equal densities are not "denser" than each
other. With ``c == 1`` the neighbourhood is the token itself, so every density is ``exp(0) = 1``, every
token is a density peak and all scores tie at the largest distance: the authors' noise then picks a
uniformly random static token; we pick the first static position (one of their possible outcomes).

Precision: similarities, segment means and the clustering run in fp32 (member sums in fp64) whatever
the input dtype, and the merged centres are cast to the input dtype once at the end; the authors run
all of it in the model dtype (bf16), where ``S > 0.8`` compares against bf16(0.8). Kept dynamic tokens
are the input rows, bit for bit.

Every ``F >= 1`` is defined: ``F = 1`` is a single singleton segment (no static tokens, ``r' = r``).
Videos are independent: a batch never changes a video's result (no shared retain ratio, no padding
leaking into sums). Python loops run over frames (the DP, the segment sums), log2(F) pointer-doubling
steps (segment ends) and the k <= 7 neighbours, never over positions or tokens.
Shapes in a batch must agree (``[B, F, T, D]``); outputs are ragged (one ``[N_b, D]`` per video).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F_

__all__ = ["HoliTomPlan", "frame_similarity", "holitom_merge", "plan_segments"]

_SIMILARITY_CHUNK = 1 << 27  # feature elements per similarity call (~0.5 GiB per fp32 temporary)


@dataclass(frozen=True)
class HoliTomPlan:
    """Per-frame segmentation and budget of a batch (all tensors on the input's device).

    Attributes:
        seg_start: ``[B, F]`` int64, first frame of the segment each frame belongs to.
        seg_end: ``[B, F]`` int64, last frame of that segment (inclusive).
        static: ``[B, F, T]`` bool, positions static over the frame's whole segment (False in singletons).
        removed: ``[B]`` int64, tokens removed by temporal averaging (the DP optimum).
        ratio: ``[B]`` float64, the re-targeted retain ratio ``r'``.
        centres: ``[B, F]`` int64, static centres of the segment starting at that frame (0 elsewhere).
        dynamic: ``[B, F]`` int64, dynamic tokens the frame keeps.
    """

    seg_start: torch.Tensor
    seg_end: torch.Tensor
    static: torch.Tensor
    removed: torch.Tensor
    ratio: torch.Tensor
    centres: torch.Tensor
    dynamic: torch.Tensor

    @property
    def num_tokens(self) -> torch.Tensor:
        """``[B]`` int64, output tokens per video (newline excluded)."""
        return self.centres.sum(1) + self.dynamic.sum(1)


def frame_similarity(features: torch.Tensor) -> torch.Tensor:
    """``[B, F, T, D]`` -> ``[B, F-1, T]`` fp32 cosine of each position with the same position in the next frame."""
    x = F_.normalize(features.float(), p=2, dim=-1)
    return F_.cosine_similarity(x[:, :-1], x[:, 1:], dim=-1)


def plan_segments(similarity: torch.Tensor, retain_ratio: float, tau: float = 0.8,
                  max_window: int = 1024) -> HoliTomPlan:
    """DP segmentation, static positions and token budget from ``[B, F-1, T]`` similarities."""
    b, fm1, t = similarity.shape
    n_frames, dev = fm1 + 1, similarity.device
    frames = torch.arange(n_frames, device=dev)
    above = similarity > tau
    # run[b, s, t]: first frame j >= s where the position stops being static (F-1 if it never does),
    # so position t is static over segment [s, e] iff run[b, s, t] >= e.
    first_break = torch.where(above, n_frames - 1, frames[:fm1].view(1, -1, 1))
    run = first_break.flip(1).cummin(1).values.flip(1)
    run = torch.cat([run, run.new_full((b, 1, t), n_frames - 1)], 1)  # [B, F, T]; the last row is never used
    hist = torch.zeros(b, n_frames, n_frames, dtype=torch.long, device=dev)
    hist.scatter_add_(2, run, torch.ones_like(run))
    count = hist.flip(2).cumsum(2).flip(2)  # count[b, s, e] = #{t : run[b, s, t] >= e}
    gain = count * (frames.view(1, 1, -1) - frames.view(1, -1, 1)).clamp(min=0)  # [B, s, e]

    # by_len[b, i, w - 1]: gain of the window of length w ending at frame i (read only for w <= i + 1).
    w_max = min(n_frames, max_window)
    starts = (frames[:, None] - torch.arange(w_max, device=dev)[None]).clamp(min=0)  # [F, W]
    by_len = gain.transpose(1, 2).gather(2, starts[None].expand(b, -1, -1))
    # rbest[:, F - j] = best total of frames 0..j-1 (rbest[:, F] = 0), so the candidates of frame i,
    # window lengths 1, 2, ..., are the contiguous slice rbest[:, F-i : F-i+W].
    rbest = torch.zeros(b, n_frames + 1, dtype=torch.long, device=dev)
    pick = torch.empty(b, n_frames, dtype=torch.long, device=dev)
    for i in range(n_frames):
        w = min(i + 1, max_window)
        # max(dim) returns the first maximum: the shortest window among the best (the authors' strict '>')
        best, pick[:, i] = (rbest[:, n_frames - i : n_frames - i + w] + by_len[:, i, :w]).max(1)
        rbest[:, n_frames - i - 1] = best
    first = frames - pick  # first frame of the best segment ending at each frame

    # Segment ends = frames on the chain F-1 -> first(F-1) - 1 -> ...; found by pointer doubling.
    jump = torch.cat([torch.where(first > 0, first - 1, n_frames), first.new_full((b, 1), n_frames)], 1)
    on = torch.zeros(b, n_frames + 1, dtype=torch.long, device=dev)
    on[:, n_frames - 1] = 1
    for _ in range(n_frames.bit_length()):
        on = on.scatter_reduce(1, jump, on, reduce="amax")
        jump = jump.gather(1, jump)
    is_end = on[:, :n_frames].bool()
    is_start = torch.cat([is_end.new_ones(b, 1), is_end[:, :-1]], 1)
    seg_start = torch.where(is_start, frames, 0).cummax(1).values
    seg_end = torch.where(is_end, frames, n_frames - 1).flip(1).cummin(1).values.flip(1)
    longer = (seg_end > seg_start)[:, :, None]
    static = longer & (run.gather(1, seg_start[:, :, None].expand(b, n_frames, t)) >= seg_end[:, :, None])

    removed = rbest[:, 0]
    total = n_frames * t
    frac = (total - removed).double() / total
    ratio = torch.clamp(torch.full_like(frac, retain_ratio) / frac, max=1.0)
    n_static = static.sum(2)
    centres = torch.where(is_start, torch.round(n_static * ratio[:, None]).long(), 0)
    dynamic = torch.ceil((t - n_static) * ratio[:, None]).long()
    return HoliTomPlan(seg_start, seg_end, static, removed, ratio, centres, dynamic)


def _segment_means(features: torch.Tensor, gb: torch.Tensor, gs: torch.Tensor, length: torch.Tensor,
                   tpos: torch.Tensor) -> torch.Tensor:
    """Mean over frames ``gs .. gs+length-1`` of video ``gb`` at positions ``tpos [G, N]`` -> ``[G, N, D]`` fp32.

    ``features`` is ``[B, F, T, D]``. Summed in fp32 frame by frame in time order (elementwise: the same
    sums in any batch, identical inputs give identical sums), then divided by the length.
    """
    _, n_frames, t, d = features.shape
    flat = features.reshape(-1, d)
    base = ((gb * n_frames + gs) * t)[:, None] + tpos  # [G, N] rows of the segment's first frame
    last = base + ((length - 1) * t)[:, None]
    steps = int(length.max())
    offsets = torch.arange(steps, device=features.device)
    rows = torch.minimum(base[:, None] + offsets[None, :, None] * t, last[:, None])  # [G, L, N]
    on = (offsets[None] < length[:, None]).float()[:, :, None, None]  # [G, L, 1, 1]
    acc = flat[base].float()
    for w in range(1, steps):
        acc.addcmul_(flat[rows[:, w]].float(), on[:, w])  # + x * 1 or + x * 0: exact either way
    return acc / length[:, None, None]


def _dpc_knn_merge(z: torch.Tensor, valid: torch.Tensor, c: torch.Tensor, k: int, beta: float,
                   noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-KNN on padded groups: ``z [G, N, D]`` fp32, ``valid [G, N]``, ``c [G]`` centres (1 <= c <= valid count).

    Returns ``(merged [G, N, D], is_centre [G, N])``; rows that are not centres are meaningless.
    """
    g, n, d = z.shape
    dev = z.device
    dist = torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist") / (d ** 0.5)
    pair = valid[:, :, None] & valid[:, None, :]
    kmax = min(k, n)
    near = dist.masked_fill(~valid[:, None, :], float("inf")).topk(kmax, dim=-1, largest=False).values
    kk = c.clamp(max=k)  # the authors' neighbourhood is min(k, number of centres)
    sq = torch.where(torch.arange(kmax, device=dev) < kk[:, None, None], near.square(), 0.0)
    sums = sq[..., 0]
    for j in range(1, kmax):  # nearest first, one column at a time: the same sum whatever the padding
        sums = sums + sq[..., j]
    density = torch.exp(-(sums / kk[:, None]))
    if noise > 0:
        density = density + torch.rand(density.shape, device=dev, dtype=density.dtype) * noise
    denser = (density[:, None, :] > density[:, :, None]) & valid[:, None, :]
    dist_max = dist.masked_fill(~pair, float("-inf")).flatten(1).amax(1)
    parent = torch.where(denser, dist, dist_max[:, None, None]).amin(-1)
    score = (parent * density).masked_fill(~valid, float("-inf"))
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=dev).expand(g, n))
    is_centre = rank < c[:, None]
    member = valid & ~is_centre
    nearest = dist.masked_fill(~is_centre[:, None, :], float("inf")).argmin(-1)  # [G, N]
    flat = (torch.arange(g, device=dev)[:, None] * n + nearest)[member]
    # float64 accumulation: the GPU adds members in no fixed order; in float64 the order cannot show in
    # the float32 result (short of a 1e-16 coincidence), so a centre is the same in any batch.
    msum = torch.zeros(g * n, d, dtype=torch.float64, device=dev).index_add_(0, flat, z[member].double())
    mcount = torch.zeros(g * n, dtype=torch.long, device=dev).index_add_(0, flat, torch.ones_like(flat)).view(g, n)
    mean = msum.view(g, n, d).to(z.dtype) / mcount.clamp(min=1)[..., None]
    merged = torch.where((mcount > 0)[..., None], beta * z + (1 - beta) * mean, z)
    return merged, is_centre


@torch.no_grad()
def holitom_merge(features: torch.Tensor, saliency: torch.Tensor, retain_ratio: float, tau: float = 0.8,
                  beta: float = 0.6, k: int = 7, max_window: int = 1024, noise: float = 0.0) -> list[torch.Tensor]:
    """Compress a batch of videos with HoliTom's outer stages.

    Args:
        features: ``[B, F, T, D]`` pooled visual features (any float dtype; the output keeps it).
        saliency: ``[B, F, T]`` attention each position receives (higher = more salient).
        retain_ratio: r in (0, 1], the target fraction of the ``F * T`` tokens.
        tau: similarity above which (strictly) a position counts as static between two frames.
        beta: weight of a centre against the mean of its members.
        k: DPC-KNN neighbourhood (capped at the number of centres).
        max_window: longest segment, in frames (>= 1).
        noise: amplitude of the uniform noise the authors add to densities (1e-6 there); 0 = deterministic.

    Returns:
        ``B`` tensors ``[N_b, D]`` in output order (segments in time; centres then dynamic tokens);
        the newline embedding is NOT appended.
    """
    if features.dim() != 4 or saliency.shape != features.shape[:3]:
        raise ValueError(f"features must be [B, F, T, D] and saliency [B, F, T], got {tuple(features.shape)} "
                         f"and {tuple(saliency.shape)}")
    b, n_frames, t, d = features.shape
    if b == 0:
        return []
    if n_frames < 1 or t < 1:
        raise ValueError(f"need at least one frame and one token per frame, got F={n_frames}, T={t}")
    if not 0.0 < retain_ratio <= 1.0 or max_window < 1 or k < 1 or not 0.0 <= beta <= 1.0:
        raise ValueError(f"invalid HoliTom settings: retain_ratio={retain_ratio} (0, 1], max_window={max_window} "
                         f">= 1, k={k} >= 1, beta={beta} [0, 1]")
    dev = features.device
    step = max(1, _SIMILARITY_CHUNK // (n_frames * t * d))  # bounds the fp32 temporaries of the cosine
    sim = torch.cat([frame_similarity(features[i : i + step]) for i in range(0, b, step)])
    plan = plan_segments(sim, retain_ratio, tau, max_window)

    # Dynamic tokens: per frame, the `dynamic` most salient non-static positions (lower position on ties).
    key = saliency.float().masked_fill(plan.static, float("-inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(t, device=dev).expand_as(order))
    keep_dyn = rank < plan.dynamic[:, :, None]

    # Static centres: groups = segments with c > 0, their static tokens padded to the largest group.
    keep_static = torch.zeros_like(plan.static)
    gb, gs = (plan.centres > 0).nonzero(as_tuple=True)
    if gb.numel():
        stat = plan.static[gb, gs]  # [G, T]
        n_static = stat.sum(1)
        n = int(n_static.max())
        slot = stat.cumsum(1) - 1
        gi, ti = stat.nonzero(as_tuple=True)
        tpos = torch.zeros(gb.numel(), n, dtype=torch.long, device=dev)
        tpos[gi, slot[gi, ti]] = ti
        valid = torch.arange(n, device=dev)[None] < n_static[:, None]
        length = plan.seg_end[gb, gs] - gs + 1
        z = _segment_means(features, gb, gs, length, tpos)
        merged, is_centre = _dpc_knn_merge(z, valid, plan.centres[gb, gs], k, beta, noise)
        cg, cj = is_centre.nonzero(as_tuple=True)
        keep_static[gb[cg], gs[cg], tpos[cg, cj]] = True

    # Output slots in order: per frame, [static centres of a segment starting here (T) | dynamic (T)].
    flags = torch.cat([keep_static, keep_dyn], 2)  # [B, F, 2T]
    index = (flags.flatten().cumsum(0) - 1).view(b, n_frames, 2 * t)
    sizes = flags.flatten(1).sum(1)
    out = torch.empty(int(sizes.sum()), d, dtype=features.dtype, device=dev)
    out[index[:, :, t:][keep_dyn]] = features[keep_dyn]
    if gb.numel():
        out[index[gb[cg], gs[cg], tpos[cg, cj]]] = merged[cg, cj].to(features.dtype)
    return list(torch.split(out, sizes.tolist()))
