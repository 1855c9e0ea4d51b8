"""Token selection for a batch of rows with per-row settings, entirely on the device.

``logits [B, V]`` float -> ``[B]`` int64. Rows with ``temperature == 0`` are greedy (argmax); others
sample from the temperature-scaled distribution restricted to the smallest top-p nucleus, using the
exponential-race trick (``argmax(p / Exp(1))``) so no host round trip or ``multinomial`` is needed.
"""

from __future__ import annotations

import torch


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-row temperature / top-p sampling; ``temperature[b] == 0`` means greedy for that row."""
    best = logits.argmax(dim=-1)
    t = temperature.clamp(min=1e-5).unsqueeze(-1)
    probs = torch.softmax(logits.float() / t, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(dim=-1) - sorted_p
    sorted_p = sorted_p.masked_fill(before > top_p.unsqueeze(-1), 0.0)
    race = torch.empty_like(sorted_p).exponential_(1.0, generator=generator)
    choice = (sorted_p / race).argmax(dim=-1, keepdim=True)
    drawn = order.gather(-1, choice).squeeze(-1)
    return torch.where(temperature > 0, drawn, best)
