"""A preallocated, slot-addressed KV cache for continuous batched decoding (gpt-fast style).

Layout: per layer ``k, v: [R, H_kv, S, head_dim]``. Row ``r`` holds one sequence, left-aligned: its
token at position ``t`` lives in slot ``t`` (slot == RoPE position), so a row can be refilled with a new
sequence at any time without touching the others. Each row has its own write position ``positions[r]``
(a device tensor shared with the engine), so a decode step writes every row at once with one
``index_put`` and all shapes stay static (capturable in a CUDA graph). Slots past a row's length hold
garbage and are masked by the caller; nothing is evicted.

The object duck-types the part of ``transformers.Cache`` a decoder layer uses: ``update``. Every
``update`` call is counted (:attr:`updates`), so the engine can check that a forward pass really wrote
the cache: a decoder that silently ignores the cache keyword (a renamed argument) fails loudly instead of
answering from an empty cache.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    """Static KV storage for ``rows`` sequences of up to ``slots`` positions each.

    Write modes (one at a time):

    * **prefill** (``begin_rows(rows)``): ``update`` copies batch row ``i``'s keys/values (``[n, H_kv, m, d]``)
      into cache row ``rows[i]`` at slots ``[0, m)`` and returns them unchanged, so attention is plain causal
      attention within each sequence;
    * **chunk** (``begin_chunk(rows, slots)``): ``update`` writes token ``j`` of batch row ``i``
      (``[n, H_kv, m, d]``) at slot ``slots[i, j]`` of cache row ``rows[i]`` and returns those rows' full
      buffers (``[n, H_kv, S, d]``); the caller masks what each query may see (suffix prefill after a
      cached prefix);
    * **decode** (default): ``update`` writes the single new token of every row at slot
      ``positions[r]`` and returns the full ``[R, H_kv, S, d]`` buffers.
    """

    def __init__(self, num_layers: int, rows: int, kv_heads: int, slots: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, positions: torch.Tensor | None = None):
        shape = (rows, kv_heads, slots, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.positions = positions if positions is not None else torch.zeros(rows, dtype=torch.long, device=device)
        self.row_index = torch.arange(rows, device=device)
        self.updates = 0  # host-side count of update calls (never synchronises)
        self._mode: tuple | None = None

    @property
    def rows(self) -> int:
        return self.k[0].shape[0]

    @property
    def slots(self) -> int:
        return self.k[0].shape[2]

    @property
    def num_layers(self) -> int:
        return len(self.k)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    # ------------------------------------------------------------------ modes
    def begin_rows(self, rows: torch.Tensor) -> None:
        """Batched prefill from slot 0: batch row ``i`` (``[n, H_kv, m, d]``) goes to slots ``[0, m)`` of cache row
        ``rows[i]``; ``update`` returns the keys/values unchanged (causal attention within each sequence)."""
        self._mode = ("rows", rows)
        self.updates = 0

    def begin_chunk(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        """``rows [n]`` long and ``slots [n, m]`` long, both on the cache's device."""
        self._mode = ("chunk", rows, slots)
        self.updates = 0

    def begin_decode(self) -> None:
        self._mode = None
        self.updates = 0

    def end(self) -> None:
        self._mode = None

    def check_written(self, what: str) -> None:
        """Raise unless the last forward pass wrote every layer (the decoder took this cache)."""
        if self.updates != self.num_layers:
            raise RuntimeError(
                f"{what}: the decoder wrote {self.updates} of {self.num_layers} layers of the KV cache; the installed "
                "transformers does not take the cache keyword the engine passes (a renamed argument is silently "
                "ignored), so answers would be wrong")

    # ------------------------------------------------------------------ the transformers hook
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.updates += 1
        k, v = self.k[layer_idx], self.v[layer_idx]
        mode = self._mode
        if mode is None:
            k[self.row_index, :, self.positions] = key_states[:, :, 0]
            v[self.row_index, :, self.positions] = value_states[:, :, 0]
            return k, v
        if mode[0] == "rows":
            n = key_states.shape[2]
            k[mode[1], :, :n] = key_states
            v[mode[1], :, :n] = value_states
            return key_states, value_states
        _, rows, slots = mode
        k[rows[:, None], :, slots] = key_states.transpose(1, 2)
        v[rows[:, None], :, slots] = value_states.transpose(1, 2)
        return k.index_select(0, rows), v.index_select(0, rows)

    # ------------------------------------------------------------------ row moves
    def copy_prefix(self, src: int, dst: torch.Tensor, length: int) -> None:
        """Slots ``[0, length)`` of row ``src`` are copied to rows ``dst`` (``[n]`` long): a shared prompt
        prefix computed once."""
        for t in self.k + self.v:
            t[dst, :, :length] = t[src : src + 1, :, :length]

    def gather_rows_(self, index: torch.Tensor) -> None:
        """Rows ``index`` (``[m]`` long) move to rows ``[0, m)``, in place (one layer's worth of temporary
        memory at a time); the other rows are garbage afterwards."""
        m = index.numel()
        for t in self.k + self.v:
            t[:m].copy_(t.index_select(0, index))

    def prefix(self, m: int, positions: torch.Tensor) -> SlotKVCache:
        """A cache over rows ``[0, m)`` of this one (views: same storage), writing at ``positions`` (``[m]``)."""
        view = SlotKVCache.__new__(SlotKVCache)
        view.k = [t[:m] for t in self.k]
        view.v = [t[:m] for t in self.v]
        view.positions = positions
        view.row_index = self.row_index[:m]
        view.updates = 0
        view._mode = None
        return view

    # transformers calls these only when it has to infer positions or masks; we always pass both.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise RuntimeError("SlotKVCache needs explicit position_ids and attention masks")
