"""Batched generation for video LLMs with DyCoke, in three explicit pieces (gpt-fast style).

* **prefill** — each request's prompt (text embeddings with the compressed visual span spliced in
  at its ``<video>`` placeholder) runs once through the decoder, writing its row of a preallocated
  :class:`~dycoke.kv_cache.SlotKVCache` (right-aligned, so all rows share one decode write slot);
* **decode step** — one token for every row: masked attention over the cache with DyCoke's dynamic
  pruning (:mod:`dycoke.attention`), per-row sampling, stop handling; every tensor is updated in
  place, so on CUDA the step is captured once in a CUDA graph and replayed;
* **the loop** — replays the step and reads one flag (all rows done?) every ``sync_every`` steps:
  the only host synchronisation while decoding.

Requests are sorted by prompt length and packed into batches bounded by ``max_batch_size`` and
``max_batch_tokens`` (rows x cache slots). Rows that finish early are masked; a batch stops as soon
as all of its rows are done. **Compaction**: when at a sync point at most ``compact_ratio`` of the
batch's rows are still live (and enough steps may remain), the live rows are moved to the front of
every per-row buffer in place (KV cache included, one layer at a time) and decoding goes on with a
session over that prefix: the step's cost follows the live rows, not the batch's longest answer, and no
memory is allocated beyond one layer's worth of the live rows. Prefix shapes are powers of two (finished
rows fill the gap), each captured in its own CUDA graph once and reused by later batches. Results are
unchanged (rows are independent).
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field

import torch

from dycoke.attention import DecodeContext, install
from dycoke.config import DyCokeConfig
from dycoke.kv_cache import SlotKVCache
from dycoke.llava import VideoLLM, VisualTokens
from dycoke.pruning import PruneState
from dycoke.sampling import greedy, sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    """Per-request decoding settings.

    ``stop_token_ids=None`` stops on the tokenizer's end-of-turn / EOS tokens; ``ignore_eos`` always
    generates exactly ``max_new_tokens`` (benchmarks).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Request:
    """One prompt about one video. ``visual=None`` makes a text-only prompt (placeholder removed)."""

    request_id: str
    visual: VisualTokens | None
    question: str
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    system_prompt: str | None = None


@dataclass
class Result:
    request_id: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    visual_tokens: int
    output_tokens: int
    visual_tokens_attended: float
    prefill_s: float
    decode_s: float
    finish_reason: str  # "stop" | "length" | "error"
    error: str | None = None


@dataclass
class _Prepared:
    index: int
    request: Request
    embeds: torch.Tensor  # [L, D]
    vis_start: int  # offset of the first visual token in the prompt
    vis_len: int  # visual tokens (newline excluded)
    stop_ids: tuple[int, ...]

    @property
    def length(self) -> int:
        return self.embeds.shape[0]


class _Session:
    """Static buffers (and the captured graph) for one (rows, slots, sampling) shape."""

    def __init__(self, engine: Engine, rows: int, slots: int, do_sample: bool, max_stop: int):
        lm_cfg = engine.llm.language_model.config
        dev, dt = engine.llm.device, engine.llm.dtype
        head_dim = getattr(lm_cfg, "head_dim", None) or lm_cfg.hidden_size // lm_cfg.num_attention_heads
        self.rows, self.slots, self.do_sample, self.max_stop = rows, slots, do_sample, max_stop
        self.cache = SlotKVCache(lm_cfg.num_hidden_layers, rows, lm_cfg.num_key_value_heads, slots, head_dim, dt, dev)
        z = lambda dtype=torch.long: torch.zeros(rows, dtype=dtype, device=dev)  # noqa: E731
        self.tok, self.pos, self.pad, self.count, self.max_new = z(), z(), z(), z(), z()
        self.vis_start, self.vis_len, self.steps = z(), z(), z()
        self.attended = z(torch.float32)
        self.temperature, self.top_p = z(torch.float32), z(torch.float32)
        self.done = z(torch.bool)
        self.stop_ids = torch.full((rows, max_stop), -1, dtype=torch.long, device=dev)
        self.gen_idx = torch.zeros(1, dtype=torch.long, device=dev)
        self.out = torch.zeros(rows, slots, dtype=torch.long, device=dev)  # generated ids (slots > max_new)
        self.slot_idx = torch.arange(slots, device=dev)
        cfg = engine.config
        self.ctx = DecodeContext(
            bias=torch.zeros(rows, 1, 1, slots, dtype=dt, device=dev),
            dp_layer=cfg.dp_layer if cfg.dp_enabled else 0,
            prune_ratio=cfg.dp_prune_ratio, threshold=cfg.dp_threshold,
            start=self.vis_start, length=self.vis_len, state=PruneState.empty(rows, slots, dev),
        )
        self.graph: torch.cuda.CUDAGraph | None = None
        self._parent: weakref.ref | None = None  # a prefix session's root (weak: no cycle keeps a cache alive)
        self._prefixes: dict[int, _Session] = {}  # prefix sessions by row count, reused across batches

    #: per-row tensors (dim 0 = rows) a compaction permutes, besides the KV cache and the prune state
    ROW_TENSORS = ("tok", "pos", "pad", "count", "max_new", "vis_start", "vis_len", "steps", "attended",
                   "temperature", "top_p", "done", "stop_ids", "out")

    def compacted(self, live: torch.Tensor, done: torch.Tensor) -> tuple[_Session, torch.Tensor]:
        """Move the ``live`` rows (``[n]`` long, on the device) to the front, in place, and return the
        session over the first ``m`` rows (``m``: the next power of two >= n, so a batch size sees at most
        log2(rows) prefix shapes, each captured once and reused) plus the permutation applied (``[m]``,
        host): live rows first, then finished rows as filler (they stay finished and change nothing)."""
        n = live.numel()
        m = min(self.rows, 1 << (n - 1).bit_length())
        filler = done.nonzero().flatten()[: m - n]
        perm = torch.cat([live.cpu(), filler])
        index = perm.to(live.device)
        self.cache.gather_rows_(index)
        self.ctx.state.gather_rows_(index)
        for name in self.ROW_TENSORS:
            t = getattr(self, name)
            t[:m].copy_(t.index_select(0, index))
        root = self if self._parent is None else self._parent()
        return root._prefix(m), perm

    def _prefix(self, m: int) -> _Session:
        """The session over this (root) session's first ``m`` rows: views of its buffers, own graph."""
        if m == self.rows:
            return self
        child = self._prefixes.get(m)
        if child is None:
            child = _Session.__new__(_Session)
            child.rows, child.slots, child.do_sample, child.max_stop = m, self.slots, self.do_sample, self.max_stop
            child.cache = self.cache.prefix(m)
            for name in self.ROW_TENSORS:
                setattr(child, name, getattr(self, name)[:m])
            child.gen_idx, child.slot_idx = self.gen_idx, self.slot_idx
            c = self.ctx
            child.ctx = DecodeContext(bias=c.bias[:m], dp_layer=c.dp_layer, prune_ratio=c.prune_ratio,
                                      threshold=c.threshold, start=child.vis_start, length=child.vis_len,
                                      state=c.state.prefix(m))
            child.graph, child._parent, child._prefixes = None, weakref.ref(self), {}
            self._prefixes[m] = child
        return child

    def mutable(self) -> list[torch.Tensor]:
        return [self.tok, self.pos, self.count, self.steps, self.attended, self.done, self.gen_idx,
                self.cache.write_slot, self.ctx.state.prev, self.ctx.state.has_prev]


class Engine:
    """Batched prefill + decode with DyCoke for a loaded :class:`~dycoke.llava.VideoLLM`.

    Args:
        llm: the loaded model (its decoder is switched to the DyCoke attention function; it still
            behaves exactly as before when called without a decode context).
        config: DyCoke settings; TTM is applied earlier (``llm.encode``), DP here.
        max_batch_size: rows decoded together.
        max_batch_tokens: bound on rows x cache slots per batch (KV memory); None for no bound.
        use_cuda_graph: capture the decode step (default: on for CUDA devices).
        sync_every: decode steps between checks of the all-done flag.
        compact_ratio: compact a batch when at most this fraction of its rows is still live at a
            sync point (0 disables compaction).
    """

    def __init__(self, llm: VideoLLM, config: DyCokeConfig, *, max_batch_size: int = 16,
                 max_batch_tokens: int | None = None, use_cuda_graph: bool | None = None, sync_every: int = 8,
                 slot_multiple: int = 64, compact_ratio: float = 0.5):
        n_layers = llm.language_model.config.num_hidden_layers
        if config.dp_enabled and config.dp_layer >= n_layers:
            raise ValueError(f"dp_layer (L={config.dp_layer}) must be < the model's {n_layers} decoder layers")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.llm = llm
        self.config = config
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.use_cuda_graph = llm.device.type == "cuda" if use_cuda_graph is None else use_cuda_graph
        self.sync_every = max(1, sync_every)
        if not 0.0 <= compact_ratio < 1.0:
            raise ValueError(f"compact_ratio must be in [0, 1), got {compact_ratio}")
        self.compact_ratio = compact_ratio
        self.compactions = 0  # batches compacted so far (a figure for benchmarks and logs)
        self.slot_multiple = slot_multiple
        self._session: _Session | None = None
        tok = llm.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        stops = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
        gen_eos = getattr(getattr(llm.model, "generation_config", None), "eos_token_id", None)
        stops.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.default_stop_ids = tuple(sorted(i for i in stops if isinstance(i, int) and i >= 0))
        install(llm.language_model)

    # ------------------------------------------------------------------ public
    @torch.inference_mode()
    def generate(self, requests: list[Request]) -> list[Result]:
        """Generate for all requests; results come back in request order."""
        results: list[Result | None] = [None] * len(requests)
        ready: list[_Prepared] = []
        for i, req in enumerate(requests):
            try:
                ready.append(self._prepare(i, req))
            except ValueError as exc:
                results[i] = _error_result(req, str(exc))
        for batch in self._plan(ready):
            for p, res in zip(batch, self._run_batch(batch)):
                results[p.index] = res
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ prompts and batching
    def _prepare(self, index: int, req: Request) -> _Prepared:
        llm = self.llm
        ids = llm.prompt_ids(req.question, req.system_prompt)
        p = ids.index(llm.video_token_id)
        emb = llm.language_model.embed_tokens(torch.tensor(ids, device=llm.device))
        if req.visual is None:
            embeds, vis_len = torch.cat([emb[:p], emb[p + 1 :]]), 0
        else:
            vis = req.visual.tokens.to(llm.device, llm.dtype)
            if vis.shape[-1] != emb.shape[-1]:
                raise ValueError(f"visual tokens have width {vis.shape[-1]}, the model expects {emb.shape[-1]}")
            embeds, vis_len = torch.cat([emb[:p], vis, emb[p + 1 :]]), req.visual.num_kept
        total = embeds.shape[0] + req.settings.max_new_tokens
        if total > llm.max_context:
            raise ValueError(f"prompt of {embeds.shape[0]} tokens + {req.settings.max_new_tokens} new tokens "
                             f"exceeds the model context of {llm.max_context}")
        s = req.settings
        stop = () if s.ignore_eos else (s.stop_token_ids if s.stop_token_ids is not None else self.default_stop_ids)
        return _Prepared(index, req, embeds, p, vis_len, tuple(stop))

    def _slots(self, batch: list[_Prepared]) -> int:
        need = max(p.length for p in batch) + max(p.request.settings.max_new_tokens for p in batch)
        return -(-need // self.slot_multiple) * self.slot_multiple

    def _plan(self, ready: list[_Prepared]) -> list[list[_Prepared]]:
        order = sorted(ready, key=lambda p: (p.length, p.request.settings.max_new_tokens), reverse=True)
        batches: list[list[_Prepared]] = []
        for p in order:
            cur = batches[-1] if batches else None
            if cur is not None and len(cur) < self.max_batch_size:
                trial = cur + [p]
                if self.max_batch_tokens is None or len(trial) * self._slots(trial) <= self.max_batch_tokens:
                    cur.append(p)
                    continue
            batches.append([p])
        return batches

    # ------------------------------------------------------------------ one batch
    def _get_session(self, rows: int, slots: int, do_sample: bool, max_stop: int) -> _Session:
        s = self._session
        if s is None or (s.rows, s.slots, s.do_sample, s.max_stop) != (rows, slots, do_sample, max_stop):
            self._session = s = None  # drop every reference first: the old KV cache is freed before the new one
            s = self._session = _Session(self, rows, slots, do_sample, max_stop)
        return s

    def _run_batch(self, batch: list[_Prepared]) -> list[Result]:
        llm, lm = self.llm, self.llm.language_model
        dev = llm.device
        rows = len(batch)
        prompt_len = max(p.length for p in batch)
        max_new = max(p.request.settings.max_new_tokens for p in batch)
        slots = self._slots(batch)
        do_sample = any(p.request.settings.temperature > 0 for p in batch)
        max_stop = max(1, max(len(p.stop_ids) for p in batch))
        s = self._get_session(rows, slots, do_sample, max_stop)

        def col(values, dtype=torch.long):
            return torch.tensor(values, dtype=dtype, device=dev)

        pads = [prompt_len - p.length for p in batch]
        s.pad.copy_(col(pads))
        s.vis_start.copy_(col([pad + p.vis_start for pad, p in zip(pads, batch)]))
        s.vis_len.copy_(col([p.vis_len for p in batch]))
        s.max_new.copy_(col([p.request.settings.max_new_tokens for p in batch]))
        s.temperature.copy_(col([p.request.settings.temperature for p in batch], torch.float32))
        s.top_p.copy_(col([p.request.settings.top_p for p in batch], torch.float32))
        s.stop_ids.copy_(col([list(p.stop_ids) + [-1] * (max_stop - len(p.stop_ids)) for p in batch]))
        s.ctx.state.reset()
        s.out.fill_(self.pad_id)

        # ---- prefill, one sequence at a time (long video prompts fill the device on their own)
        logits = torch.empty(rows, lm.config.vocab_size if hasattr(lm.config, "vocab_size") else 0,
                             device=dev, dtype=torch.float32)
        prefill_s = []
        for b, p in enumerate(batch):
            t0 = time.perf_counter()
            s.cache.begin_prefill(b, pads[b])
            try:
                h = lm(inputs_embeds=p.embeds[None], position_ids=torch.arange(p.length, device=dev)[None],
                       past_key_values=s.cache, attention_mask={"full_attention": None}, use_cache=True
                       ).last_hidden_state
            finally:
                s.cache.end_prefill()
            row_logits = llm.lm_head(h[:, -1]).float()
            if logits.shape[1] != row_logits.shape[1]:
                logits = torch.empty(rows, row_logits.shape[1], device=dev, dtype=torch.float32)
            logits[b] = row_logits[0]
            _sync(dev)
            prefill_s.append(time.perf_counter() - t0)

        # ---- first token, then the decode loop
        t0 = time.perf_counter()
        first = self._pick(s, logits)
        s.tok.copy_(first)
        s.out[:, 0] = first
        s.count.fill_(1)
        s.steps.zero_()
        s.attended.zero_()
        s.done.copy_(self._is_stop(s, first) | (s.count >= s.max_new))
        s.pos.copy_(col([p.length for p in batch]))
        s.cache.write_slot.fill_(prompt_len)
        s.gen_idx.fill_(1)
        out = torch.empty(rows, max_new, dtype=torch.long)  # host copies, filled as rows leave the session
        steps = torch.empty(rows, dtype=torch.long)
        attended = torch.empty(rows, dtype=torch.float32)
        order = torch.arange(rows)  # session row -> batch row
        cur = s
        step = self._stepper(cur)
        for i in range(max_new - 1):
            if i % self.sync_every == 0:
                done = cur.done.cpu()  # the loop's one host sync per sync_every steps
                if bool(done.all()):
                    break
                live = (~done).nonzero().flatten()
                if self._should_compact(cur.rows, live.numel(), max_new - 1 - i):
                    self._collect(cur, order, out, steps, attended, max_new)
                    cur, perm = cur.compacted(live.to(dev), done)
                    order = order[perm]
                    step = self._stepper(cur)
                    self.compactions += 1
            step()
        self._collect(cur, order, out, steps, attended, max_new)
        decode_s = time.perf_counter() - t0

        results = []
        for b, p in enumerate(batch):
            ids = out[b].tolist()
            n = p.request.settings.max_new_tokens
            ids, reason = ids[:n], "length"
            for j, t in enumerate(ids):
                if t in p.stop_ids:
                    ids, reason = ids[:j], "stop"
                    break
            mean_att = float(attended[b] / steps[b]) if steps[b] > 0 else float(p.vis_len)
            results.append(Result(
                request_id=p.request.request_id,
                text=llm.tokenizer.decode(ids, skip_special_tokens=True),
                token_ids=ids, prompt_tokens=p.length, visual_tokens=p.vis_len,
                output_tokens=len(ids) + (1 if reason == "stop" else 0),
                visual_tokens_attended=mean_att, prefill_s=prefill_s[b], decode_s=decode_s,
                finish_reason=reason,
            ))
        return results

    def _should_compact(self, rows: int, live: int, remaining: int) -> bool:
        """Worth it when few rows are live and at least two more sync intervals may follow."""
        return (self.compact_ratio > 0 and 0 < live <= rows * self.compact_ratio
                and remaining >= 2 * self.sync_every)

    @staticmethod
    def _collect(s: _Session, order: torch.Tensor, out: torch.Tensor, steps: torch.Tensor,
                 attended: torch.Tensor, max_new: int) -> None:
        """Copy the session's per-row outputs to the host arrays, at the batch rows ``order`` names."""
        out[order] = s.out[:, :max_new].cpu()
        steps[order] = s.steps.cpu()
        attended[order] = s.attended.cpu()

    def _stepper(self, s: _Session):
        return self._graph_step(s) if self.use_cuda_graph else (lambda: self._step(s))

    # ------------------------------------------------------------------ the decode step
    def _pick(self, s: _Session, logits: torch.Tensor) -> torch.Tensor:
        return sample(logits, s.temperature, s.top_p) if s.do_sample else greedy(logits)

    @staticmethod
    def _is_stop(s: _Session, tok: torch.Tensor) -> torch.Tensor:
        return (tok.unsqueeze(-1) == s.stop_ids).any(-1)

    def _step(self, s: _Session) -> None:
        """One token for every row; in-place updates of the session's static tensors only."""
        llm = self.llm
        valid = (s.slot_idx >= s.pad.unsqueeze(1)) & (s.slot_idx <= s.cache.write_slot)
        bias = s.ctx.bias
        bias.zero_().masked_fill_(~valid[:, None, None, :], float("-inf"))
        h = llm.language_model(
            input_ids=s.tok.unsqueeze(1), position_ids=s.pos.unsqueeze(1), past_key_values=s.cache,
            attention_mask={"full_attention": bias}, use_cache=True, dycoke_ctx=s.ctx,
        ).last_hidden_state
        nxt = self._pick(s, llm.lm_head(h[:, -1]).float())
        live = ~s.done
        nxt = torch.where(live, nxt, torch.full_like(nxt, self.pad_id))
        s.out.index_copy_(1, s.gen_idx, nxt.unsqueeze(1))
        s.attended.add_(torch.where(live, s.ctx.visual_attended.float(), torch.zeros_like(s.attended)))
        s.steps.add_(live.long())
        s.count.add_(live.long())
        s.done.logical_or_(self._is_stop(s, nxt) | (s.count >= s.max_new))
        s.tok.copy_(nxt)
        s.pos.add_(1)
        s.cache.write_slot.add_(1)
        s.gen_idx.add_(1)

    def _graph_step(self, s: _Session):
        if s.graph is None:
            saved = [t.clone() for t in s.mutable()]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step(s)
            torch.cuda.current_stream().wait_stream(stream)
            for t, v in zip(s.mutable(), saved):
                t.copy_(v)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step(s)
            for t, v in zip(s.mutable(), saved):
                t.copy_(v)
            s.graph = graph
        return s.graph.replay


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _error_result(req: Request, message: str) -> Result:
    return Result(request_id=req.request_id, text="", token_ids=[], prompt_tokens=0,
                  visual_tokens=req.visual.num_kept if req.visual is not None else 0, output_tokens=0,
                  visual_tokens_attended=0.0, prefill_s=0.0, decode_s=0.0, finish_reason="error", error=message)
