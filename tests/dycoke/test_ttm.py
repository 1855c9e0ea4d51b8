"""Temporal token merging (DESIGN 4.2 / 4.3).

The oracles here are deliberately naive, written from the design text with Python loops over frames
and frame pairs, one ``cosine_similarity`` and one ``topk`` per frame pair, and share no code with
:mod:`dycoke.ttm`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dycoke import MergeResult, frame_plan, keep_count, output_length, temporal_merge

T196 = 196


def _rand(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


# --------------------------------------------------------------------------------------------------
# Naive oracles (written from DESIGN 4.2 / 4.3; loops on purpose)
# --------------------------------------------------------------------------------------------------


def naive_reference(frames: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's structure: stage 1 builds a per-frame list from pairs, stage 2 replaces element
    ``i + 2`` for ``i in range(0, F - 4, 4)``. Like the reference, an odd trailing frame is dropped.

    Returns ``(tokens [N, D], index [N])``, where tokens are built from frame slices (not from index).
    """
    n_frames, t, _ = frames.shape
    keep = int((1 - k) * t)
    token_list: list[torch.Tensor] = []
    index_list: list[torch.Tensor] = []
    # Stage 1: pairs (0, 1), (2, 3), ...
    for i in range(0, n_frames - 1, 2):
        first, second = frames[i], frames[i + 1]
        sim = F.cosine_similarity(first, second, dim=1)
        chosen = sim.topk(keep, largest=False).indices
        token_list.append(first)
        index_list.append(torch.arange(t) + i * t)
        token_list.append(second[chosen])
        index_list.append(chosen + (i + 1) * t)
    # Stage 2: element i + 2 is replaced by its tokens least similar to frame i (original features).
    for i in range(0, n_frames - 4, 4):
        first, third = frames[i], frames[i + 2]
        sim = F.cosine_similarity(first, third, dim=1)
        chosen = sim.topk(keep, largest=False).indices
        token_list[i + 2] = third[chosen]
        index_list[i + 2] = chosen + (i + 2) * t
    return torch.cat(token_list, dim=0), torch.cat(index_list, dim=0)


def naive_complete(frames: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DESIGN 4.3: every 4-frame window [a, b, c, d] (the last one too, possibly short) has a whole,
    b vs a, c vs a, d vs c; kept tokens in raster order."""
    n_frames, t, _ = frames.shape
    keep = int((1 - k) * t)
    token_list: list[torch.Tensor] = []
    index_list: list[torch.Tensor] = []
    for f in range(n_frames):
        pos, window_start = f % 4, f - f % 4
        if pos == 0:
            token_list.append(frames[f])
            index_list.append(torch.arange(t) + f * t)
            continue
        ref = window_start + 2 if pos == 3 else window_start
        sim = F.cosine_similarity(frames[ref], frames[f], dim=1)
        chosen = sorted(sim.topk(keep, largest=False).indices.tolist())
        chosen_t = torch.tensor(chosen, dtype=torch.long)
        token_list.append(frames[f][chosen_t])
        index_list.append(chosen_t + f * t)
    return torch.cat(token_list, dim=0), torch.cat(index_list, dim=0)


def _complete_length(n_frames: int, t: int, k: float) -> int:
    """Complete mode from its rule: only each window's first frame is whole."""
    whole = math.ceil(n_frames / 4)
    return whole * t + (n_frames - whole) * int((1 - k) * t)


# --------------------------------------------------------------------------------------------------
# 1. Published token counts
# --------------------------------------------------------------------------------------------------

PUBLISHED = [
    (32, 0.7, 3098),
    (32, 0.5, 4018),
    (32, 0.3, 4915),
    (16, 0.7, 1618),
    (64, 0.7, 6058),
    (8, 0.7, 878),
]


@pytest.mark.parametrize("n_frames,k,expected", PUBLISHED)
@pytest.mark.parametrize("batch", [None, 4])
def test_published_counts_reference(n_frames: int, k: float, expected: int, batch: int | None) -> None:
    assert output_length(n_frames, T196, k, "reference") == expected
    shape = (n_frames, T196, 4) if batch is None else (batch, n_frames, T196, 4)
    res = temporal_merge(_rand(*shape, seed=n_frames), k, mode="reference")
    out_shape = (expected, 4) if batch is None else (batch, expected, 4)
    assert tuple(res.tokens.shape) == out_shape
    assert tuple(res.index.shape) == out_shape[:-1]
    assert res.num_tokens == expected
    assert sum(res.frame_sizes) == expected


@pytest.mark.parametrize("n_frames,k,_published", PUBLISHED)
@pytest.mark.parametrize("batch", [None, 4])
def test_counts_complete(n_frames: int, k: float, _published: int, batch: int | None) -> None:
    expected = _complete_length(n_frames, T196, k)
    assert output_length(n_frames, T196, k, "complete") == expected
    # Complete mode prunes one more frame than reference mode (the last window's c).
    assert expected == _published - T196 + keep_count(T196, k)
    shape = (n_frames, T196, 4) if batch is None else (batch, n_frames, T196, 4)
    res = temporal_merge(_rand(*shape, seed=n_frames), k, mode="complete")
    assert res.tokens.shape[-2] == expected
    assert sum(res.frame_sizes) == expected


def test_complete_counts_32_frames() -> None:
    # 8 whole frames + 24 pruned frames.
    assert output_length(32, T196, 0.7, "complete") == 8 * 196 + 24 * 58 == 2960
    assert output_length(32, T196, 0.5, "complete") == 8 * 196 + 24 * 98 == 3920
    assert output_length(32, T196, 0.3, "complete") == 8 * 196 + 24 * 137 == 4856


@pytest.mark.parametrize("k,keep", [(0.7, 58), (0.5, 98), (0.3, 137), (0.0, 196)])
def test_keep_count_truncates_like_python(k: float, keep: int) -> None:
    assert keep_count(T196, k) == keep == int((1 - k) * T196)


@settings(max_examples=60, deadline=None)
@given(
    n_frames=st.integers(1, 70),
    t=st.integers(1, 300),
    k=st.floats(0.0, 0.99, allow_nan=False),
    mode=st.sampled_from(["reference", "complete"]),
)
def test_output_length_formula(n_frames: int, t: int, k: float, mode: str) -> None:
    keep = int((1 - k) * t)
    if mode == "complete":
        expected = _complete_length(n_frames, t, k)
    else:
        pairs = n_frames // 2
        stage2 = len(range(0, n_frames - 4, 4))
        whole = pairs - stage2 + n_frames % 2
        expected = whole * t + (n_frames - whole) * keep
    assert output_length(n_frames, t, k, mode) == expected


# --------------------------------------------------------------------------------------------------
# 2. Reference mode == naive reference, token for token
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_frames", [6, 8, 12, 16, 32])
@pytest.mark.parametrize("k", [0.7, 0.5, 0.3])
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_matches_naive_even(n_frames: int, k: float, seed: int) -> None:
    frames = _rand(n_frames, T196, 24, seed=seed * 1000 + n_frames)
    want_tokens, want_index = naive_reference(frames, k)
    res = temporal_merge(frames, k, mode="reference")
    assert torch.equal(res.index, want_index)
    assert torch.equal(res.tokens, want_tokens)


@pytest.mark.parametrize("n_frames", [2, 4, 6, 8, 12])
def test_reference_matches_naive_batched(n_frames: int) -> None:
    frames = _rand(3, n_frames, 50, 16, seed=77 + n_frames)
    res = temporal_merge(frames, 0.7, mode="reference")
    for b in range(3):
        want_tokens, want_index = naive_reference(frames[b], 0.7)
        assert torch.equal(res.index[b], want_index)
        assert torch.equal(res.tokens[b], want_tokens)


@pytest.mark.parametrize("n_frames", [3, 5, 7, 9, 11, 13, 33])
def test_reference_odd_frames_keep_last_frame_whole(n_frames: int) -> None:
    t, d = 40, 16
    frames = _rand(n_frames, t, d, seed=n_frames)
    want_tokens, want_index = naive_reference(frames, 0.7)  # drops the last frame, like the reference
    last = n_frames - 1
    want_tokens = torch.cat([want_tokens, frames[last]])
    want_index = torch.cat([want_index, torch.arange(t) + last * t])
    res = temporal_merge(frames, 0.7, mode="reference")
    assert torch.equal(res.index, want_index)
    assert torch.equal(res.tokens, want_tokens)
    assert res.frame_sizes[-1] == t


def test_f1_is_whole() -> None:
    for mode in ("reference", "complete"):
        frames = _rand(1, T196, 8, seed=1)
        res = temporal_merge(frames, 0.7, mode=mode)
        assert frame_plan(1, mode) == (-1,)
        assert torch.equal(res.index, torch.arange(T196))
        assert torch.equal(res.tokens, frames[0])
        assert res.frame_sizes == (T196,)


@pytest.mark.parametrize("n_frames,plan", [(1, (-1,)), (2, (-1, 0)), (3, (-1, 0, -1)), (4, (-1, 0, -1, 2))])
def test_short_videos_have_no_stage2(n_frames: int, plan: tuple[int, ...]) -> None:
    """F <= 4: stage 1 only (the reference crashes here); the odd tail frame is whole."""
    assert frame_plan(n_frames, "reference") == plan
    frames = _rand(n_frames, 30, 8, seed=n_frames)
    res = temporal_merge(frames, 0.5, mode="reference")
    keep = keep_count(30, 0.5)
    assert res.frame_sizes == tuple(30 if r < 0 else keep for r in plan)
    if n_frames >= 2:
        want_tokens, want_index = naive_reference(frames, 0.5)
        if n_frames % 2:
            want_tokens = torch.cat([want_tokens, frames[-1]])
            want_index = torch.cat([want_index, torch.arange(30) + (n_frames - 1) * 30])
        assert torch.equal(res.index, want_index)
        assert torch.equal(res.tokens, want_tokens)


def test_frame_plan_reference_32() -> None:
    plan = frame_plan(32, "reference")
    for i in range(0, 32, 4):
        assert plan[i] == -1
        assert plan[i + 1] == i
        assert plan[i + 3] == i + 2
        assert plan[i + 2] == (i if i < 28 else -1)  # last window's c stays whole


def test_frame_plan_complete_32() -> None:
    plan = frame_plan(32, "complete")
    for i in range(0, 32, 4):
        assert plan[i : i + 4] == (-1, i, i, i + 2)


def test_reference_order_is_ascending_similarity() -> None:
    frames = _rand(8, 64, 16, seed=5)
    res = temporal_merge(frames, 0.5, mode="reference")
    plan, t = frame_plan(8, "reference"), 64
    cursor = 0
    for f, (ref, size) in enumerate(zip(plan, res.frame_sizes)):
        local = res.index[cursor : cursor + size] - f * t
        if ref < 0:
            assert torch.equal(local, torch.arange(t))
        else:
            sim = F.cosine_similarity(frames[ref], frames[f], dim=1)[local]
            assert bool((sim[1:] >= sim[:-1]).all())
            # and these are the least similar: every dropped token is at least as similar as the max kept
            dropped = torch.ones(t, dtype=torch.bool)
            dropped[local] = False
            all_sim = F.cosine_similarity(frames[ref], frames[f], dim=1)
            assert bool((all_sim[dropped] >= sim.max()).all())
        cursor += size


# --------------------------------------------------------------------------------------------------
# 3. Complete mode == naive DESIGN 4.3
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_frames", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 32])
@pytest.mark.parametrize("k", [0.7, 0.3])
def test_complete_matches_naive(n_frames: int, k: float) -> None:
    frames = _rand(n_frames, T196, 16, seed=500 + n_frames)
    want_tokens, want_index = naive_complete(frames, k)
    res = temporal_merge(frames, k, mode="complete")
    assert torch.equal(res.index, want_index)
    assert torch.equal(res.tokens, want_tokens)


def test_complete_batched_matches_naive() -> None:
    frames = _rand(4, 10, 50, 8, seed=9)
    res = temporal_merge(frames, 0.6, mode="complete")
    for b in range(4):
        want_tokens, want_index = naive_complete(frames[b], 0.6)
        assert torch.equal(res.index[b], want_index)
        assert torch.equal(res.tokens[b], want_tokens)


def test_complete_selects_same_set_as_reference_where_both_prune() -> None:
    frames = _rand(16, 64, 8, seed=3)
    ref = temporal_merge(frames, 0.7, mode="reference")
    com = temporal_merge(frames, 0.7, mode="complete")
    plan_r, plan_c = frame_plan(16, "reference"), frame_plan(16, "complete")
    off_r = off_c = 0
    for f in range(16):
        sr, sc = ref.frame_sizes[f], com.frame_sizes[f]
        if plan_r[f] >= 0:
            assert plan_c[f] == plan_r[f]
            a = ref.index[off_r : off_r + sr].sort().values
            assert torch.equal(a, com.index[off_c : off_c + sc])
        off_r += sr
        off_c += sc


# --------------------------------------------------------------------------------------------------
# 4. Properties
# --------------------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    n_frames=st.integers(1, 11),
    t=st.integers(1, 24),
    d=st.integers(1, 8),
    k=st.floats(0.0, 0.95, allow_nan=False),
    mode=st.sampled_from(["reference", "complete"]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_properties(
    batch: int, n_frames: int, t: int, d: int, k: float, mode: str, dtype: torch.dtype, seed: int
) -> None:
    frames = _rand(batch, n_frames, t, d, seed=seed, dtype=dtype)
    res = temporal_merge(frames, k, mode=mode)
    n_out = output_length(n_frames, t, k, mode)
    keep = keep_count(t, k)

    assert isinstance(res, MergeResult)
    assert res.tokens.shape == (batch, n_out, d)
    assert res.index.shape == (batch, n_out)
    assert res.tokens.dtype == dtype
    assert res.index.dtype == torch.long
    assert res.frame_sizes == tuple(t if r < 0 else keep for r in frame_plan(n_frames, mode))

    flat = frames.flatten(-3, -2)
    for b in range(batch):
        idx = res.index[b]
        assert bool(((idx >= 0) & (idx < n_frames * t)).all())
        assert idx.unique().numel() == n_out
        assert torch.equal(res.tokens[b], flat[b][idx])
        # every frame contributes T or keep tokens, contiguously and in frame order
        per_frame = torch.bincount(idx // t, minlength=n_frames).tolist()
        assert per_frame == list(res.frame_sizes)
        assert all(s in (t, keep) for s in per_frame)
        assert bool((idx // t)[1:].ge((idx // t)[:-1]).all())
        # batch result == per-sample result
        alone = temporal_merge(frames[b], k, mode=mode)
        assert torch.equal(alone.index, idx)
        assert torch.equal(alone.tokens, res.tokens[b])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["reference", "complete"])
def test_dtype_preserved_and_gather(dtype: torch.dtype, mode: str) -> None:
    frames = _rand(2, 32, T196, 16, seed=11, dtype=dtype)
    res = temporal_merge(frames, 0.7, mode=mode)
    assert res.tokens.dtype == dtype
    assert res.tokens.device == frames.device
    assert torch.equal(res.tokens, torch.gather(frames.flatten(1, 2), 1, res.index[..., None].expand(-1, -1, 16)))


def test_k_zero_keeps_everything() -> None:
    frames = _rand(8, 20, 4, seed=2)
    for mode in ("reference", "complete"):
        res = temporal_merge(frames, 0.0, mode=mode)
        assert res.num_tokens == 8 * 20
        assert torch.equal(res.index.sort().values, torch.arange(160))


def test_non_contiguous_input() -> None:
    base = _rand(2, 8, 12, 30, seed=4)  # [B, F, D, T] then transposed to [B, F, T, D]
    frames = base.transpose(-1, -2)
    assert not frames.is_contiguous()
    res = temporal_merge(frames, 0.5)
    want = temporal_merge(frames.contiguous(), 0.5)
    assert torch.equal(res.index, want.index)
    assert torch.equal(res.tokens, want.tokens)


def test_three_dim_equals_batch_of_one() -> None:
    frames = _rand(12, 30, 8, seed=6)
    a = temporal_merge(frames, 0.7)
    b = temporal_merge(frames[None], 0.7)
    assert torch.equal(a.index, b.index[0])
    assert torch.equal(a.tokens, b.tokens[0])


def test_repeated_calls_are_deterministic() -> None:
    frames = _rand(2, 16, 40, 8, seed=8)
    a = temporal_merge(frames, 0.7)
    b = temporal_merge(frames, 0.7)
    assert torch.equal(a.index, b.index)
    assert torch.equal(a.tokens, b.tokens)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="frames"):
        temporal_merge(torch.zeros(5, 4), 0.5)
    with pytest.raises(ValueError, match="prune_ratio"):
        temporal_merge(torch.zeros(2, 4, 3), 1.0)
    with pytest.raises(ValueError, match="prune_ratio"):
        temporal_merge(torch.zeros(2, 4, 3), -0.1)
    with pytest.raises(ValueError, match="mode"):
        temporal_merge(torch.zeros(2, 4, 3), 0.5, mode="x")
    with pytest.raises(ValueError):
        temporal_merge(torch.zeros(0, 4, 3), 0.5)
    with pytest.raises(ValueError, match="mode"):
        output_length(4, 4, 0.5, mode="x")


def test_layout_cached_under_inference_mode_works_with_autograd() -> None:
    """Cached index tensors made under inference_mode must not poison later autograd calls."""
    shape = (1, 7, 23, 5)  # a layout no other test uses, so the cache is filled here
    with torch.inference_mode():
        first = temporal_merge(_rand(*shape, seed=1), 0.45)
    frames = _rand(*shape, seed=1).requires_grad_(True)
    res = temporal_merge(frames, 0.45)
    assert torch.equal(res.index, first.index)
    res.tokens.sum().backward()
    assert frames.grad is not None
    assert int(frames.grad.sum()) == res.num_tokens * 5


# --------------------------------------------------------------------------------------------------
# Device and benchmark
# --------------------------------------------------------------------------------------------------


def _load_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "bench_ttm.py"
    spec = importlib.util.spec_from_file_location("bench_ttm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_smoke_cpu(tmp_path) -> None:
    """The benchmark's smallest CPU path, so it cannot rot."""
    import json

    bench = _load_bench()
    out = tmp_path / "bench_ttm.json"
    report = bench.run(cpu=True, small=True, reps=3, warmup=1, n_sets=2, out=out, quiet=True)
    assert report["correctness"]["ok"]
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert {(tuple(r["shape"]), r["mode"]) for r in report["results"]} == {
        (s, m) for s in bench.SMALL_CASES for m in bench.MODES
    }
    for r in report["results"]:
        assert r["median_ms"] > 0 and r["floor_ms"] > 0 and r["ratio_to_floor"] > 0
        assert r["tokens_out"] == output_length(r["shape"][1], r["shape"][2], bench.K, r["mode"])


def test_bench_tie_check_detects_real_differences() -> None:
    bench = _load_bench()
    frames = _rand(1, 4, 10, 6, seed=3)
    res = temporal_merge(frames, 0.5)
    assert bench._tie_equivalent(frames, res.index, res.index.clone(), "reference", 1e-5)
    bad = res.index.clone()
    bad[0, 10], bad[0, 11] = bad[0, 11].clone(), bad[0, 10].clone()  # swap two pruned-frame tokens
    assert not bench._tie_equivalent(frames, res.index, bad, "reference", 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["reference", "complete"])
def test_cuda_matches_cpu(mode: str) -> None:
    bench = _load_bench()
    frames = _rand(2, 16, T196, 64, seed=21)
    cpu = temporal_merge(frames, 0.7, mode)
    dev = temporal_merge(frames.cuda(), 0.7, mode)
    assert bench._tie_equivalent(frames, cpu.index, dev.index.cpu(), mode, 1e-5)
    assert torch.equal(dev.tokens.cpu(), frames.flatten(1, 2)[torch.arange(2)[:, None], dev.index.cpu()])


# --------------------------------------------------------------------------------------------------
# Internals the fast path relies on
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 32, 196, 64), (1, 7, 13, 5), (3, 12, 20, 33)])
@pytest.mark.parametrize("mode", ["reference", "complete"])
def test_similarities_bitwise_equal_cosine_similarity(dtype: torch.dtype, shape: tuple, mode: str) -> None:
    """The strided, normalise-once similarity is bit for bit F.cosine_similarity on gathered frames."""
    from dycoke.ttm import _layout, _similarities

    x = _rand(*shape, seed=sum(shape), dtype=dtype)
    x[0, 0, 0] = 0.0  # a zero token exercises the eps clamp
    runs, pruned = _layout(shape[1], shape[2], 1, mode)[:2]
    plan = frame_plan(shape[1], mode)
    refs = [plan[f] for f in pruned]
    want = F.cosine_similarity(x[:, list(pruned)], x[:, refs], dim=-1)
    got = _similarities(x, runs)
    assert got.dtype == want.dtype
    # fp16 cannot hold eps=1e-8, so a zero token gives NaN in both (as F.cosine_similarity does)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got.isnan(), want.isnan())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 5)), max_size=15, unique_by=lambda p: p[0]))
def test_progressions_cover_every_pruned_frame(pairs: list[tuple[int, int]]) -> None:
    from dycoke.ttm import _progressions

    pairs = [(f + d, d) for f, d in sorted(pairs)]  # frame f + d pruned against f
    pruned = [f for f, _ in pairs]
    if len(set(pruned)) != len(pruned):
        return
    refs = [f - d for f, d in pairs]
    runs = _progressions(pruned, refs)
    covered = [(first + j * step, delta) for first, step, count, delta in runs for j in range(count)]
    assert sorted(covered) == sorted(pairs)
    assert all(step >= 1 and count >= 1 for _, step, count, _ in runs)


@pytest.mark.parametrize("n_frames,mode,n_runs", [(32, "reference", 2), (32, "complete", 2), (4, "reference", 1), (1, "reference", 0)])
def test_runs_of_the_standard_plans(n_frames: int, mode: str, n_runs: int) -> None:
    from dycoke.ttm import _layout

    assert len(_layout(n_frames, 196, 58, mode)[0]) == n_runs


def test_empty_batch() -> None:
    res = temporal_merge(torch.zeros(0, 8, 10, 4), 0.5)
    assert res.tokens.shape == (0, output_length(8, 10, 0.5), 4)
    assert res.index.shape == (0, output_length(8, 10, 0.5))
