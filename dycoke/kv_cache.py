"""A preallocated, slot-addressed KV cache for batched decoding (gpt-fast style).

Layout: per layer ``k, v: [B, H_kv, S, head_dim]``. A batch's prompts are right-aligned: sequence
``b`` of prompt length ``L_b`` occupies slots ``[pad_b, P)`` with ``pad_b = P - L_b``; decode step
``t`` writes slot ``P + t`` for every row at once, so one scalar write position serves the whole batch
and all shapes stay static (capturable in a CUDA graph). Positions (RoPE) are per sequence and passed
separately as ``position_ids``; slots never move, nothing is evicted.

The object duck-types the part of ``transformers.Cache`` a decoder layer uses: ``update``.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    """Static KV storage for ``batch`` rows of ``slots`` positions each.

    Two write modes:

    * prefill (``begin_prefill(row, offset)``): ``update`` copies one sequence's keys/values into
      row ``row`` at slots ``[offset, offset + n)`` and returns them unchanged, so attention is plain
      causal attention over that sequence;
    * decode (default): ``update`` writes the new token of every row at slot ``write_slot`` (a device
      tensor of shape ``[1]``) and returns the full ``[B, H_kv, S, d]`` buffers; the caller masks
      slots that are padding or not yet written.
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, slots: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, kv_heads, slots, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.write_slot = torch.zeros(1, dtype=torch.long, device=device)
        self._prefill: tuple[int, int] | None = None

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def slots(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def begin_prefill(self, row: int, offset: int) -> None:
        self._prefill = (row, offset)

    def end_prefill(self) -> None:
        self._prefill = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self._prefill is not None:
            row, off = self._prefill
            n = key_states.shape[2]
            self.k[layer_idx][row : row + 1, :, off : off + n].copy_(key_states)
            self.v[layer_idx][row : row + 1, :, off : off + n].copy_(value_states)
            return key_states, value_states
        self.k[layer_idx].index_copy_(2, self.write_slot, key_states)
        self.v[layer_idx].index_copy_(2, self.write_slot, value_states)
        return self.k[layer_idx], self.v[layer_idx]

    def gather_rows_(self, index: torch.Tensor) -> None:
        """Rows ``index`` (``[m]`` long) move to rows ``[0, m)``, in place (one layer's worth of temporary
        memory at a time); the other rows are garbage afterwards."""
        m = index.numel()
        for t in self.k + self.v:
            t[:m].copy_(t.index_select(0, index))

    def prefix(self, m: int) -> SlotKVCache:
        """A cache over rows ``[0, m)`` of this one (views: same storage, same write slot)."""
        view = SlotKVCache.__new__(SlotKVCache)
        view.k = [t[:m] for t in self.k]
        view.v = [t[:m] for t in self.v]
        view.write_slot = self.write_slot
        view._prefill = None
        return view

    # transformers calls these only when it has to infer positions or masks; we always pass both.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise RuntimeError("SlotKVCache needs explicit position_ids and attention masks")
