"""The decode kernel's host-side pieces that run anywhere (the kernels themselves: tests/dycoke/test_engine_gpu.py)."""

from __future__ import annotations

import torch

from dycoke.decode_attention import share_groups


def test_share_groups_lists_each_group_under_its_first_row_in_runs_of_the_width():
    group = torch.tensor([7, 3, 7, 7, -5, 3, 7, 7, 9])  # 7: five rows -> a run of 4 and a run of 1
    members = share_groups(group, 4)
    assert members.dtype == torch.int32 and members.shape == (9, 4)
    assert members.tolist() == [
        [0, 2, 3, 6], [1, 5, -1, -1], [-1] * 4, [-1] * 4, [4, -1, -1, -1], [-1] * 4, [-1] * 4, [7, -1, -1, -1],
        [8, -1, -1, -1]]


def test_share_groups_puts_every_row_in_exactly_one_list():
    g = torch.Generator().manual_seed(0)
    for width in (1, 3, 4):
        group = torch.randint(0, 20, (200,), generator=g)
        members = share_groups(group, width)
        listed = members[members >= 0]
        assert sorted(listed.tolist()) == list(range(200))
        for lead in (members[:, 0] >= 0).nonzero().flatten():
            rows = members[lead][members[lead] >= 0].long()
            assert rows[0] == lead and (group[rows] == group[lead]).all() and (rows.diff() > 0).all()
