"""The decode kernel's host-side pieces that run anywhere (the kernel itself: tests/dycoke/test_engine_gpu.py)."""

from __future__ import annotations

import torch

from dycoke.decode_attention import kept_slots


def test_kept_slots_lists_each_rows_kept_slots_below_its_length_in_order():
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(6, 50, generator=g) > 0.5
    keep[2] = False  # a row that keeps nothing
    keep[3] = True  # a row that keeps everything
    lengths = torch.tensor([50, 20, 50, 37, 1, 0])
    index, count = kept_slots(keep, lengths)
    assert index.dtype == count.dtype == torch.int32 and index.shape == (6, 50)
    for b in range(6):
        expected = (keep[b] & (torch.arange(50) < lengths[b])).nonzero().flatten()
        assert count[b] == expected.numel()
        assert torch.equal(index[b, : count[b]].long(), expected)
    assert count.tolist()[2:] == [0, 37, int(keep[4, 0]), 0]
