"""The decode-side state of the engine: static per-row buffers, the decode step and its CUDA graphs.

A :class:`Session` holds ``rows`` sequences of at most ``slots`` positions (KV cache included). Every
per-row tensor has the rows on dim 0 and lives on the device; a row is refilled in place when its
sequence ends (continuous batching), so the step's shapes never change and, on CUDA, the step is captured
once per (session, sampling) and replayed. One step (:meth:`Session.step`):

* writes the current token of every row at its own position ``pos[r]`` and attends to slots
  ``[0, pos[r]]`` (DyCoke's dynamic pruning through :class:`~dycoke.attention.DecodeContext`); with the decode
  kernel, live rows admitted from one prefix group (``share_gid``) read their common ``share_len`` prefix slots
  once per group (:func:`~dycoke.decode_attention.cascade_attention`);
* picks the next token per row (greedy or temperature / top-p), records it at ``out[r, count[r]]``;
* stops a row on a stop token or at ``max_new``; finished and free rows (``done``) keep their position
  and output, so running them costs compute but changes nothing.

Compaction (:meth:`Session.compacted`) moves the live rows to the front in place and returns the session
over that prefix (a view with its own graph), so the batch's tail costs what its live rows cost.
"""

from __future__ import annotations

import weakref

import torch

from dycoke.attention import DecodeContext
from dycoke.decode_attention import share_groups
from dycoke.kv_cache import SlotKVCache
from dycoke.pruning import PruneState
from dycoke.sampling import greedy, sample

#: per-row tensors (dim 0 = rows) a compaction permutes, besides the KV cache and the prune state
ROW_TENSORS = ("tok", "pos", "count", "max_new", "vis_start", "vis_len", "steps", "attended", "temperature",
               "top_p", "done", "stop_ids", "out", "share_gid", "share_len")

#: rows of one prefix group read together by the cascade decode kernel (a video's tasks; larger groups split)
SHARE_WIDTH = 4


class Session:
    """Static buffers for ``rows`` x ``slots``; ``out`` holds up to ``slots`` generated ids per row."""

    def __init__(self, engine, rows: int, slots: int, max_stop: int):
        llm = engine.llm
        lm_cfg = llm.language_model.config
        dev, dt = llm.device, llm.dtype
        head_dim = getattr(lm_cfg, "head_dim", None) or lm_cfg.hidden_size // lm_cfg.num_attention_heads
        # what the step needs from the engine, copied (a back reference would make a cycle keeping the cache alive)
        self.llm, self.cache_kwarg, self.pad_id = llm, engine.cache_kwarg, engine.pad_id
        self.rows, self.slots, self.max_stop = rows, slots, max_stop
        z = lambda dtype=torch.long: torch.zeros(rows, dtype=dtype, device=dev)  # noqa: E731
        self.tok, self.pos, self.count, self.max_new = z(), z(), z(), z()
        self.vis_start, self.vis_len, self.steps = z(), z(), z()
        self.share_gid, self.share_len = z(), z()  # prefix group of the row's request and its length
        self.row_ids = torch.arange(rows, device=dev)
        self.attended = z(torch.float32)
        self.temperature, self.top_p = z(torch.float32), z(torch.float32)
        self.done = torch.ones(rows, dtype=torch.bool, device=dev)  # a free row is a finished row
        self.stop_ids = torch.full((rows, max_stop), -1, dtype=torch.long, device=dev)
        self.out = torch.zeros(rows, slots, dtype=torch.long, device=dev)
        self.slot_idx = torch.arange(slots, device=dev)
        self.cache = SlotKVCache(lm_cfg.num_hidden_layers, rows, lm_cfg.num_key_value_heads, slots, head_dim, dt, dev,
                                 positions=self.pos)
        cfg = engine.config
        self.ctx = DecodeContext(
            bias=torch.zeros(rows, 1, 1, slots, dtype=dt, device=dev),
            dp_layer=cfg.dp_layer if cfg.dp_enabled else 0,
            prune_ratio=cfg.dp_prune_ratio, threshold=cfg.dp_threshold,
            start=self.vis_start, length=self.vis_len, state=PruneState.empty(rows, slots, dev),
            use_kernel=engine.use_decode_kernel,
        )
        # shared prefix reads: allowed with the decode kernel; switched on (for the root and its prefix sessions)
        # by the engine once a group of several rows is admitted, so a caption-only job keeps the split kernel
        self.share_reads, self.sharing = engine.use_decode_kernel and engine.share_decode_reads, False
        self.graphs: dict[tuple[bool, bool], torch.cuda.CUDAGraph] = {}  # per (sampling, shared reads)
        self._parent: weakref.ref | None = None  # a prefix session's root (weak: no cycle keeps a cache alive)
        self._prefixes: dict[int, Session] = {}

    @property
    def root(self) -> Session:
        return self if self._parent is None else self._parent()

    @property
    def cascade(self) -> bool:
        return self.share_reads and self.root.sharing

    # ------------------------------------------------------------------ the step
    def step(self, do_sample: bool) -> None:
        """One token for every row; in-place updates of this session's static tensors only."""
        llm = self.llm
        valid = self.slot_idx <= self.pos.unsqueeze(1)
        bias = self.ctx.bias
        bias.zero_().masked_fill_(~valid[:, None, None, :], float("-inf"))
        if self.ctx.use_kernel:  # finished rows read nothing (their output is discarded)
            self.ctx.lengths = torch.where(self.done, 0, self.pos + 1)
        if self.cascade:  # ... and share with nobody (a refill overwrites their prefix)
            self.ctx.members = share_groups(torch.where(self.done, -1 - self.row_ids, self.share_gid), SHARE_WIDTH)
            self.ctx.shared = torch.where(self.done, 0, self.share_len)
        else:
            self.ctx.members = None
        self.cache.begin_decode()
        h = llm.language_model(input_ids=self.tok.unsqueeze(1), position_ids=self.pos.unsqueeze(1),
                               attention_mask={"full_attention": bias}, use_cache=True, dycoke_ctx=self.ctx,
                               **{self.cache_kwarg: self.cache}).last_hidden_state
        self.cache.check_written("decode step")
        logits = llm.lm_head(h[:, -1]).float()
        nxt = sample(logits, self.temperature, self.top_p) if do_sample else greedy(logits)
        live = ~self.done
        nxt = torch.where(live, nxt, torch.full_like(nxt, self.pad_id))
        self.out.scatter_(1, self.count.clamp(max=self.slots - 1).unsqueeze(1), nxt.unsqueeze(1))
        self.attended.add_(torch.where(live, self.ctx.visual_attended.float(), torch.zeros_like(self.attended)))
        self.steps.add_(live.long())
        self.count.add_(live.long())
        self.done.logical_or_(self.is_stop(nxt) | (self.count >= self.max_new))
        self.tok.copy_(nxt)
        self.pos.copy_(torch.where(live, self.pos + 1, self.pos).clamp_(max=self.slots - 1))

    def is_stop(self, tok: torch.Tensor) -> torch.Tensor:
        return (tok.unsqueeze(-1) == self.stop_ids).any(-1)

    def stepper(self, do_sample: bool, use_graph: bool):
        """A zero-argument callable running one step (a CUDA graph replay when ``use_graph``)."""
        if not use_graph:
            return lambda: self.step(do_sample)
        key = (do_sample, self.cascade)
        graph = self.graphs.get(key)
        if graph is None:
            saved = [t.clone() for t in self._mutable()]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.step(do_sample)
            torch.cuda.current_stream().wait_stream(stream)
            for t, v in zip(self._mutable(), saved):
                t.copy_(v)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.step(do_sample)
            for t, v in zip(self._mutable(), saved):
                t.copy_(v)
            self.graphs[key] = graph
        return graph.replay

    def _mutable(self) -> list[torch.Tensor]:
        # The KV cache needs no saving: a warm-up step rewrites the slot the real step writes with the same
        # values, and anything it writes further is past the row's length (masked, overwritten later).
        return [self.tok, self.pos, self.count, self.steps, self.attended, self.done, self.out,
                self.ctx.state.prev, self.ctx.state.has_prev]

    # ------------------------------------------------------------------ compaction
    def compacted(self, live: torch.Tensor, done: torch.Tensor) -> tuple[Session, torch.Tensor]:  # done: host [rows]
        """Move the ``live`` rows (``[n]`` long, on the device) to the front, in place, and return the session
        over the first ``m`` rows (``m``: the next power of two >= n, so a root sees at most log2(rows) prefix
        shapes, each captured once and reused) plus the permutation applied (``[m]``, host): live rows first,
        then finished rows as filler (they stay finished and change nothing)."""
        n = live.numel()
        m = min(self.rows, 1 << (n - 1).bit_length())
        filler = done.nonzero().flatten()[: m - n]
        perm = torch.cat([live.cpu(), filler])
        index = perm.to(live.device)
        self.cache.gather_rows_(index)
        self.ctx.state.gather_rows_(index)
        for name in ROW_TENSORS:
            t = getattr(self, name)
            t[:m].copy_(t.index_select(0, index))
        return self.root.prefix(m), perm

    def prefix(self, m: int) -> Session:
        """The session over this (root) session's first ``m`` rows: views of its buffers, own graphs."""
        if m == self.rows:
            return self
        child = self._prefixes.get(m)
        if child is None:
            child = Session.__new__(Session)
            child.llm, child.cache_kwarg, child.pad_id = self.llm, self.cache_kwarg, self.pad_id
            child.rows, child.slots, child.max_stop = m, self.slots, self.max_stop
            for name in ROW_TENSORS:
                setattr(child, name, getattr(self, name)[:m])
            child.slot_idx, child.row_ids, child.share_reads = self.slot_idx, self.row_ids[:m], self.share_reads
            child.cache = self.cache.prefix(m, child.pos)
            c = self.ctx
            child.ctx = DecodeContext(bias=c.bias[:m], dp_layer=c.dp_layer, prune_ratio=c.prune_ratio,
                                      threshold=c.threshold, start=child.vis_start, length=child.vis_len,
                                      state=c.state.prefix(m), use_kernel=c.use_kernel)
            child.graphs, child._parent, child._prefixes = {}, weakref.ref(self), {}
            self._prefixes[m] = child
        return child
