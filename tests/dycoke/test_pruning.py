"""Dynamic pruning policy (DESIGN 4.4): dycoke.pruning.select_visual and helpers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dycoke import PruneState, candidate_mask, keep_budget, keep_to_bias, select_visual


def _softmax_rows(batch: int, positions: int, seed: int, heads: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, positions) if heads is None else (batch, heads, positions)
    return torch.randn(*shape, generator=g).mul(3).softmax(dim=-1)


def _step(attn, start, length, state, p=0.7, threshold=0.9):
    return select_visual(attn, torch.as_tensor(start), torch.as_tensor(length), state, p, threshold)


def _concentrated(positions: int, hot: list[int], base: float = 1e-4) -> torch.Tensor:
    """A [positions] attention row with most mass on ``hot``."""
    v = torch.full((positions,), base)
    v[hot] = 1.0
    return v / v.sum()


# --------------------------------------------------------------------------------------------------
# Budget and always-kept positions
# --------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 20000), p=st.floats(0.0, 0.999, allow_nan=False))
def test_keep_budget_matches_python_truncation(n: int, p: float) -> None:
    got = keep_budget(torch.tensor([n]), p).item()
    assert got == int(max(n - 1, 0) * (1 - p))


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 4),
    positions=st.integers(4, 80),
    p=st.floats(0.0, 0.95, allow_nan=False),
    data=st.data(),
)
def test_first_step_prunes_to_budget(batch: int, positions: int, p: float, data: st.DataObject) -> None:
    starts, lengths = [], []
    for _ in range(batch):
        s = data.draw(st.integers(0, positions - 2))
        n = data.draw(st.integers(2, positions - s))
        starts.append(s)
        lengths.append(n)
    attn = _softmax_rows(batch, positions, seed=data.draw(st.integers(0, 1000)))
    state = PruneState.empty(batch, positions)
    dec = _step(attn, starts, lengths, state, p=p)

    assert dec.keep.shape == (batch, positions) and dec.keep.dtype == torch.bool
    assert dec.pruned.all()  # no previous vector: always prunes
    for b in range(batch):
        s, n = starts[b], lengths[b]
        budget = int((n - 1) * (1 - p))
        keep = dec.keep[b]
        outside = torch.ones(positions, dtype=torch.bool)
        outside[s : s + n - 1] = False
        assert keep[outside].all()  # everything outside the candidates, incl. the last visual token
        assert keep[s + n - 1]
        assert int(keep[s : s + n - 1].sum()) == budget
        assert int(keep.sum()) == positions - (n - 1) + budget
        assert int(dec.visual_attended[b]) == budget + 1
        # the selected candidates are the highest-attention ones
        cand_scores = attn[b, s : s + n - 1]
        chosen = keep[s : s + n - 1]
        if 0 < budget < n - 1:
            assert cand_scores[chosen].min() >= cand_scores[~chosen].max()


def test_selected_are_topk_by_attention() -> None:
    positions, start, n = 40, 5, 21
    attn = _softmax_rows(1, positions, seed=3)
    dec = _step(attn, [start], [n], PruneState.empty(1, positions), p=0.5)
    budget = int((n - 1) * 0.5)
    top = attn[0, start : start + n - 1].topk(budget).indices + start
    expected = torch.ones(positions, dtype=torch.bool)
    expected[start : start + n - 1] = False
    expected[top] = True
    assert torch.equal(dec.keep[0], expected)


def test_last_visual_token_kept_even_with_zero_attention() -> None:
    positions, start, n = 30, 4, 20
    attn = torch.ones(1, positions)
    attn[0, start + n - 1] = 0.0  # last visual token gets no attention at all
    attn = attn / attn.sum()
    dec = _step(attn, [start], [n], PruneState.empty(1, positions), p=0.9)
    assert dec.keep[0, start + n - 1]
    assert dec.keep[0, start + n]  # the newline after the span
    assert dec.keep[0, :start].all()


def test_p_zero_keeps_everything() -> None:
    positions = 50
    attn = _softmax_rows(3, positions, seed=1)
    state = PruneState.empty(3, positions)
    dec = _step(attn, [0, 10, 20], [30, 25, 10], state, p=0.0)
    assert dec.pruned.all()
    assert dec.keep.all()
    assert dec.visual_attended.tolist() == [30, 25, 10]


def test_short_or_empty_spans_never_prune() -> None:
    positions = 12
    attn = _softmax_rows(3, positions, seed=2)
    state = PruneState.empty(3, positions)
    dec = _step(attn, [3, 3, 0], [0, 1, 2], state, p=0.9)
    assert dec.pruned.tolist() == [False, False, True]
    assert dec.keep[0].all() and dec.keep[1].all()
    assert dec.visual_attended.tolist()[:2] == [0, 1]
    # budget int(1 * 0.1) == 0: the single candidate is masked, everything else kept
    assert int((~dec.keep[2]).sum()) == 1 and not dec.keep[2, 0]


def test_candidate_mask() -> None:
    m = candidate_mask(torch.tensor([2, 0]), torch.tensor([4, 1]), 8)
    assert m[0].tolist() == [False, False, True, True, True, False, False, False]
    assert not m[1].any()


# --------------------------------------------------------------------------------------------------
# Threshold rule and state
# --------------------------------------------------------------------------------------------------


def test_identical_vectors_second_step_full_attention() -> None:
    positions, start, n = 40, 6, 25
    attn = _softmax_rows(1, positions, seed=4)
    state = PruneState.empty(1, positions)
    first = _step(attn, [start], [n], state)
    assert first.pruned.item() and not first.keep.all()
    second = _step(attn.clone(), [start], [n], state)
    assert not second.pruned.item()
    assert second.keep.all()
    assert second.visual_attended.item() == n


def test_dissimilar_vectors_prune_again() -> None:
    positions, start, n = 40, 6, 25
    a = _concentrated(positions, [start + 1, start + 2])[None]
    b = _concentrated(positions, [start + 10, start + 15])[None]
    state = PruneState.empty(1, positions)
    assert _step(a, [start], [n], state).pruned.item()
    dec = _step(b, [start], [n], state)
    assert dec.pruned.item()
    budget = int((n - 1) * 0.3)
    assert int(dec.keep[0, start : start + n - 1].sum()) == budget
    assert dec.keep[0, start + 10] and dec.keep[0, start + 15]
    # and a, b, b: the third step sees b again -> full attention
    assert not _step(b, [start], [n], state).pruned.item()


def test_only_candidate_positions_enter_similarity() -> None:
    positions, start, n = 40, 6, 25
    a = _concentrated(positions, [start + 1, start + 2])[None]
    b = a.clone()
    b[0, :start] = torch.linspace(0.5, 1.0, start)  # wildly different text attention
    b[0, start + n - 1 :] = 0.7  # and on the last visual token / newline / tail
    state = PruneState.empty(1, positions)
    _step(a, [start], [n], state)
    assert not _step(b, [start], [n], state).pruned.item()


def _pair_with_cosine(cos: float, n_cand: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two non-negative candidate vectors with a given cosine (>= 0)."""
    u = torch.zeros(n_cand)
    u[0] = 1.0
    v = torch.zeros(n_cand)
    v[0] = cos
    v[1] = (1 - cos**2) ** 0.5
    return u, v


@pytest.mark.parametrize("cos,threshold,expect_pruned", [(0.8, 0.9, True), (0.8, 0.7, False), (0.95, 0.9, False), (0.95, 0.99, True)])
def test_threshold_is_a_parameter(cos: float, threshold: float, expect_pruned: bool) -> None:
    positions, start, n = 20, 3, 11
    u, v = _pair_with_cosine(cos, n - 1)
    a = torch.zeros(1, positions)
    b = torch.zeros(1, positions)
    a[0, start : start + n - 1] = u
    b[0, start : start + n - 1] = v
    a[0, 0] = b[0, 0] = 0.5  # non-candidate mass is ignored
    state = PruneState.empty(1, positions)
    _step(a, [start], [n], state, threshold=threshold)
    assert _step(b, [start], [n], state, threshold=threshold).pruned.item() is expect_pruned


def test_state_updates_even_when_not_pruning_and_reset() -> None:
    positions, start, n = 30, 2, 20
    a = _concentrated(positions, [start + 1])[None]
    state = PruneState.empty(1, positions)
    _step(a, [start], [n], state)
    _step(a, [start], [n], state)  # full attention step
    assert state.has_prev.all()
    cand = candidate_mask(torch.tensor([start]), torch.tensor([n]), positions)
    assert torch.equal(state.prev, a * cand)
    state.reset()
    assert _step(a, [start], [n], state).pruned.item()
    # row-wise reset
    state2 = PruneState.empty(2, positions)
    aa = a.expand(2, -1).clone()
    _step(aa, [start, start], [n, n], state2)
    state2.reset(torch.tensor([True, False]))
    assert _step(aa, [start, start], [n, n], state2).pruned.tolist() == [True, False]


def test_heads_input_equals_head_averaged() -> None:
    positions = 60
    attn3 = _softmax_rows(3, positions, seed=7, heads=8)
    attn2 = attn3.mean(dim=1)
    starts, lengths = [0, 5, 20], [40, 30, 10]
    s3, s2 = PruneState.empty(3, positions), PruneState.empty(3, positions)
    for step in range(3):
        x3 = attn3 if step != 1 else _softmax_rows(3, positions, seed=8, heads=8)
        x2 = x3.mean(dim=1)
        d3 = _step(x3, starts, lengths, s3)
        d2 = _step(x2, starts, lengths, s2)
        assert torch.equal(d3.keep, d2.keep)
        assert torch.equal(d3.pruned, d2.pruned)
        assert torch.equal(d3.visual_attended, d2.visual_attended)
    assert torch.equal(s3.prev, s2.prev)
    del attn2


def test_low_precision_attention_accepted() -> None:
    positions = 30
    attn = _softmax_rows(2, positions, seed=9, heads=4)
    d_bf = _step(attn.to(torch.bfloat16), [0, 3], [20, 20], PruneState.empty(2, positions))
    assert d_bf.keep.dtype == torch.bool and d_bf.pruned.all()


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(2, 5),
    steps=st.integers(2, 6),
    p=st.sampled_from([0.0, 0.5, 0.7, 0.8]),
    threshold=st.sampled_from([0.5, 0.9, 0.99]),
    seed=st.integers(0, 10_000),
)
def test_batch_rows_are_independent(batch: int, steps: int, p: float, threshold: float, seed: int) -> None:
    positions = 48
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 20, (batch,), generator=g)
    lengths = torch.randint(0, 28, (batch,), generator=g)
    state = PruneState.empty(batch, positions)
    alone = [PruneState.empty(1, positions) for _ in range(batch)]
    prev_attn = None
    for _ in range(steps):
        attn = torch.randn(batch, 4, positions, generator=g).mul(2).softmax(-1)
        if prev_attn is not None:  # some rows repeat (or nearly repeat) their previous attention
            repeat = torch.rand(batch, generator=g) < 0.5
            attn = torch.where(repeat[:, None, None], prev_attn * 1.0001, attn)
        prev_attn = attn
        dec = select_visual(attn, starts, lengths, state, p, threshold)
        for b in range(batch):
            one = select_visual(attn[b : b + 1], starts[b : b + 1], lengths[b : b + 1], alone[b], p, threshold)
            assert torch.equal(dec.keep[b], one.keep[0])
            assert dec.pruned[b].item() == one.pruned[0].item()
            assert dec.visual_attended[b].item() == one.visual_attended[0].item()
            assert torch.equal(state.prev[b], alone[b].prev[0])


def test_batch_state_does_not_leak_between_rows() -> None:
    """Row 1 seeing row 0's previous vector must not make it skip pruning (the reference's leak)."""
    positions, start, n = 30, 2, 20
    a = _concentrated(positions, [start + 1])[None]
    b = _concentrated(positions, [start + 9])[None]
    state = PruneState.empty(2, positions)
    _step(torch.cat([a, b]), [start, start], [n, n], state)
    dec = _step(torch.cat([b, a]), [start, start], [n, n], state)
    assert dec.pruned.tolist() == [True, True]
    dec = _step(torch.cat([b, a]), [start, start], [n, n], state)
    assert dec.pruned.tolist() == [False, False]


# --------------------------------------------------------------------------------------------------
# Bias
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_keep_to_bias(dtype: torch.dtype) -> None:
    keep = torch.tensor([[True, False, True], [False, True, True]])
    bias = keep_to_bias(keep, dtype)
    assert bias.shape == (2, 1, 1, 3)
    assert bias.dtype == dtype
    flat = bias[:, 0, 0, :]
    assert bool((flat[keep] == 0).all())
    assert bool(torch.isneginf(flat[~keep]).all())
    # softmax with the bias gives zero probability to masked positions
    probs = (torch.zeros(2, 1, 1, 3, dtype=torch.float32) + bias.float()).softmax(-1)[:, 0, 0, :]
    assert bool((probs[~keep] == 0).all())
