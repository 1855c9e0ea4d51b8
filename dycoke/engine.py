"""Continuous batched generation for video LLMs with DyCoke: schedule, prefill, decode (vLLM-core style).

* **requests and sharing** — :meth:`Engine.add` tokenizes each request's chat-templated prompt and splits it
  at the end of its visual span: the *prefix* (system prompt, user header, visual tokens + newline) and the
  task's *suffix* (its text and the assistant header). Requests added together that carry the same
  :class:`~dycoke.llava.VisualTokens` object and the same prefix tokens (same system prompt) form a
  *group*: its prefix is prefilled ONCE and its KV copied on the device to each member's row (DESIGN 4.7).
  The split point is fixed per request, so a result never depends on what else is in the engine.
* **admission** — groups wait in FIFO order and enter free rows of the :class:`~dycoke.session.Session`
  whole: one prefill per group prefix (long, one sequence fills the device), then ONE batched forward over
  the suffixes of every admitted row (padded, each row attending to its own prefix in the cache).
* **decode** — :meth:`Engine.step` admits what fits, replays ``sync_every`` decode steps (a CUDA graph on
  CUDA; no host synchronisation inside), then reads the done flags once, hands back finished results and
  frees their rows for the next admission (continuous batching). When nothing waits and at most
  ``compact_ratio`` of the rows are live, the live rows are compacted to a smaller prefix session.

:meth:`Engine.generate` is add + step until done. :class:`dycoke.serving.EngineLoop` runs the same loop
on a thread and takes new requests while it decodes.
"""

from __future__ import annotations

import collections
import inspect
import logging
import time

import torch

from dycoke import decode_attention
from dycoke.attention import install
from dycoke.config import DyCokeConfig
from dycoke.llava import VideoLLM
from dycoke.prefill import prefix_batches, prefix_forward, start_rows, suffix_forward
from dycoke.scheduling import (  # noqa: F401 - GenerationSettings, Request, Result: the engine's public API
    GenerationSettings,
    Group,
    Handle,
    Prepared,
    Request,
    Result,
    auto_rows,
    buckets,
    error_result,
    on_device,
)
from dycoke.session import Session

log = logging.getLogger(__name__)


def cache_keyword(language_model) -> str:
    """The keyword the installed transformers' decoder takes its KV cache by (``cache`` from 5.24 on,
    ``past_key_values`` before); fails at start-up when it takes neither."""
    params = inspect.signature(language_model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise RuntimeError(f"{type(language_model).__name__}.forward takes neither 'cache' nor 'past_key_values'")


class Engine:
    """Continuous batched prefill + decode with DyCoke for a loaded :class:`~dycoke.llava.VideoLLM`.

    Args:
        llm: the loaded model (its decoder is switched to the DyCoke attention function; it still
            behaves exactly as before when called without a decode context).
        config: DyCoke settings; TTM is applied earlier (``llm.encode``), DP here.
        max_batch_size: rows decoded together; None sizes it from free device memory and the KV bytes per
            row on CUDA (:func:`dycoke.scheduling.auto_rows`), 16 on CPU.
        max_batch_tokens: bound on rows x cache slots (KV memory); None for no bound.
        use_cuda_graph: capture the decode step (default: on for CUDA devices).
        sync_every: decode steps between reads of the done flags (the only host synchronisation).
        compact_ratio: when nothing waits, compact when at most this fraction of rows is live (0: never).
        admit_fraction: with rows still decoding, admit only once this fraction of the rows is free (batches
            the suffix prefill of several groups into one forward).
        decode_kernel: ``"auto"`` attends in decode steps with the split-K Triton kernel
            (:mod:`dycoke.decode_attention`) where it can run (CUDA with Triton), else SDPA; ``"sdpa"`` always
            SDPA; ``"triton"`` requires the kernel. With the kernel, the rows of one prefix group (the tasks of
            one video) read their shared prefix once per step for all of them (``share_decode_reads``, on by
            default; the result of a row does not depend on it beyond float summation order).
    """

    def __init__(self, llm: VideoLLM, config: DyCokeConfig, *, max_batch_size: int | None = 16,
                 max_batch_tokens: int | None = None, use_cuda_graph: bool | None = None, sync_every: int = 8,
                 slot_multiple: int = 64, compact_ratio: float = 0.5, admit_fraction: float = 0.125,
                 decode_kernel: str = "auto"):
        n_layers = llm.language_model.config.num_hidden_layers
        if config.dp_enabled and config.dp_layer >= n_layers:
            raise ValueError(f"dp_layer (L={config.dp_layer}) must be < the model's {n_layers} decoder layers")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if not 0.0 <= compact_ratio < 1.0:
            raise ValueError(f"compact_ratio must be in [0, 1), got {compact_ratio}")
        if decode_kernel not in ("auto", "sdpa", "triton"):
            raise ValueError(f"decode_kernel must be auto, sdpa or triton, got {decode_kernel!r}")
        lm_cfg = llm.language_model.config
        head_dim = getattr(lm_cfg, "head_dim", None) or lm_cfg.hidden_size // lm_cfg.num_attention_heads
        kernel_ok = decode_attention.available(llm.lm_head.weight, head_dim)
        if decode_kernel == "triton" and not kernel_ok:
            raise ValueError("decode_kernel='triton' needs a CUDA device and the triton package")
        self.use_decode_kernel = kernel_ok and decode_kernel != "sdpa"
        self.share_decode_reads = True  # read before a session is built (benchmarks switch it off to compare)
        self._groups = 0  # prefix groups admitted so far (ids for the decode kernel's shared reads)
        self.llm, self.config = llm, config
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        self.use_cuda_graph = llm.device.type == "cuda" if use_cuda_graph is None else use_cuda_graph
        self.sync_every, self.slot_multiple = max(1, sync_every), slot_multiple
        self.compact_ratio, self.admit_fraction = compact_ratio, admit_fraction
        self.slot_headroom = 0.125
        self.max_prefill_tokens = 16384  # prefix tokens (padded) per prefill forward
        self.compactions = 0  # figures for benchmarks and logs
        self.stats = collections.Counter()
        tok = llm.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        stops = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
        gen_eos = getattr(getattr(llm.model, "generation_config", None), "eos_token_id", None)
        stops.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.default_stop_ids = tuple(sorted(i for i in stops if isinstance(i, int) and i >= 0))
        install(llm.language_model)
        self.cache_kwarg = cache_keyword(llm.language_model)
        self._session: Session | None = None  # the root session
        self._cur: Session | None = None  # the root or, after a compaction, a prefix of it
        self._rows: list[Prepared | None] = []  # root row -> its sequence
        self._waiting: collections.deque[Group] = collections.deque()
        # a job asks the same tasks of every video: their token ids and embeddings are computed once
        self._prompts: dict[tuple[str, str | None], tuple[list[int], torch.Tensor]] = {}

    # ------------------------------------------------------------------ public
    @torch.inference_mode()
    def generate(self, requests: list[Request]) -> list[Result]:
        """Generate for all requests (with whatever else was added before); results in request order."""
        handle = self.add(requests)
        while not handle.done:
            self.step()
        return handle.results  # type: ignore[return-value]

    @torch.inference_mode()
    def add(self, requests: list[Request]) -> Handle:
        """Queue ``requests``; the returned :class:`Handle` fills in as :meth:`step` finishes them.

        Requests that cannot run (too long for the context, bad visual width) get an ``error`` result at once.
        """
        handle = Handle(requests)
        groups: dict[tuple, Group] = {}
        prefixes: dict[tuple, torch.Tensor] = {}  # prefix tensors shared by the requests of a group
        for i, req in enumerate(requests):
            try:
                p = self._prepare(i, req, handle, prefixes)
            except ValueError as exc:
                handle.finish(i, error_result(req, str(exc)))
                continue
            key = (id(req.visual), p.prefix_key) if req.visual is not None else ("text", i)
            g = groups.get(key)
            if g is None or len(g.members) >= self._row_cap():
                groups[key] = g = Group(prefix=p.prefix, members=[])
                self._waiting.append(g)
            g.members.append(p)
        return handle

    def has_work(self) -> bool:
        return bool(self._waiting) or any(r is not None for r in self._rows)

    @torch.inference_mode()
    def step(self) -> None:
        """Admit what fits, run ``sync_every`` decode steps, finish and free the rows that are done."""
        try:
            self._admit()
            cur = self._cur
            if cur is None or not any(r is not None for r in self._rows):
                return
            do_sample = any(r is not None and r.request.settings.temperature > 0 for r in self._rows)
            run = cur.stepper(do_sample, self.use_cuda_graph)
            t0 = time.perf_counter()
            for _ in range(self.sync_every):
                run()
            done = cur.done.cpu()  # the loop's one host synchronisation per sync_every steps
            self.stats["decode_s"] += time.perf_counter() - t0
            self.stats["decode_steps"] += self.sync_every
            self._harvest(done)
            self._maybe_compact(done)
        except Exception:
            self.reset()
            raise

    def reset(self) -> None:
        """Forget every queued and running sequence (after a failure); the next step starts afresh."""
        self._waiting.clear()
        self._rows = [None] * len(self._rows)
        if self._session is not None:
            self._session.done.fill_(True)
        self._cur = self._session

    # ------------------------------------------------------------------ prompts
    def _prepare(self, index: int, req: Request, handle: Handle | None = None,
                 prefixes: dict[tuple, torch.Tensor] | None = None) -> Prepared:
        llm = self.llm
        ids, emb = self._prompt(req.question, req.system_prompt)
        p = ids.index(llm.video_token_id)
        if req.visual is None:
            prefix, vis_len = emb[:p], 0
        else:
            # one host-to-device copy per visual tokens object, one prefix tensor per (visual, prefix tokens): the
            # members of a group share it (only the group's prefix is prefilled)
            key = (id(req.visual), tuple(ids[:p]))
            prefix = None if prefixes is None else prefixes.get(key)
            if prefix is None:
                vis = req.visual.tokens.to(llm.device, llm.dtype, non_blocking=True)
                if vis.shape[-1] != emb.shape[-1]:
                    raise ValueError(f"visual tokens have width {vis.shape[-1]}, the model expects {emb.shape[-1]}")
                prefix = torch.cat([emb[:p], vis])
                if prefixes is not None:
                    prefixes[key] = prefix
            vis_len = req.visual.num_kept
        suffix = emb[p + 1 :]
        s = req.settings
        total = prefix.shape[0] + suffix.shape[0] + s.max_new_tokens
        if total > llm.max_context:
            raise ValueError(f"prompt of {prefix.shape[0] + suffix.shape[0]} tokens + {s.max_new_tokens} new tokens "
                             f"exceeds the model context of {llm.max_context}")
        stop = () if s.ignore_eos else (s.stop_token_ids if s.stop_token_ids is not None else self.default_stop_ids)
        return Prepared(index=index, request=req, handle=handle, prefix=prefix, suffix=suffix, vis_start=p,
                        vis_len=vis_len, stop_ids=tuple(stop), prefix_key=tuple(ids[:p]))

    def _prompt(self, question: str, system_prompt: str | None) -> tuple[list[int], torch.Tensor]:
        """Token ids and ``[L, D]`` embeddings of a chat-templated prompt (cached: 256 prompts, a few hundred MB at
        most at 7B; a new prompt is copied to the device without a host synchronisation)."""
        key = (question, system_prompt)
        hit = self._prompts.get(key)
        if hit is None:
            ids = self.llm.prompt_ids(question, system_prompt)
            hit = (ids, self.llm.language_model.embed_tokens(on_device(ids, self.llm.device)))
            if len(self._prompts) >= 256:
                self._prompts.clear()
            self._prompts[key] = hit
        return hit

    # ------------------------------------------------------------------ admission
    def _row_cap(self) -> int:
        return self._session.rows if self._session is not None else (self.max_batch_size or 16)

    def _new_session(self, slots: int, max_stop: int) -> None:
        """A session for sequences of up to ``slots`` positions. When it replaces a session that was too short
        (spans vary per video: HoliTom, short clips), it gets :attr:`slot_headroom` more, so that growing, which
        costs a drain, stays rare; the first session fits exactly (every slot is read at every decode step)."""
        if self._session is not None:
            slots = int(slots * (1 + self.slot_headroom))
        slots = -(-slots // self.slot_multiple) * self.slot_multiple
        rows = self.max_batch_size or auto_rows(self.llm, slots)
        if self.max_batch_tokens is not None:
            rows = max(1, min(rows, self.max_batch_tokens // slots))
        self._session = self._cur = None  # drop every reference first: the old KV cache is freed before the new one
        self._session = self._cur = Session(self, rows, slots, max_stop)
        self._rows = [None] * rows
        log.info("engine session: %d rows x %d slots (%.2f GiB KV cache)", rows, slots,
                 self._session.cache.nbytes() / 1024**3)

    def _admit(self) -> None:
        if not self._waiting:
            return
        occupied = sum(r is not None for r in self._rows)
        head = self._waiting[0]
        s = self._session
        if s is None or head.slots > s.slots or head.max_stop > s.max_stop:
            if occupied:
                return  # drain first, then a larger session
            self._new_session(max(g.slots for g in self._waiting), max(max(g.max_stop for g in self._waiting), 1))
            s = self._session
        free = [r for r, p in enumerate(self._rows) if p is None]
        if occupied and len(free) < max(head.size, int(s.rows * self.admit_fraction)):
            return
        admitted: list[tuple[Group, list[int]]] = []
        while self._waiting and self._waiting[0].size <= len(free) and self._waiting[0].slots <= s.slots \
                and self._waiting[0].max_stop <= s.max_stop:
            g = self._waiting.popleft()
            rows, free = free[: g.size], free[g.size :]
            admitted.append((g, rows))
        if not admitted:
            return
        if self._cur is not s:  # grow back from a compacted prefix: rows past it are free
            s.done[self._cur.rows :] = True
            self._cur = s
        self._prefill(admitted)

    def _prefill(self, admitted: list[tuple[Group, list[int]]]) -> None:
        """Prefixes once per group (batched, copied to the group's rows), then the admitted rows' suffixes in a few batched forwards
        (rows of similar suffix length together, :func:`~dycoke.scheduling.buckets`)."""
        dev = self.llm.device
        t0 = time.perf_counter()
        s = self._session
        for batch in prefix_batches(admitted, self.max_prefill_tokens):
            prefix_forward(s, self.cache_kwarg, batch)
        _sync(dev)
        t1 = time.perf_counter()
        if any(len(g.members) > 1 for g, _ in admitted):
            s.sharing = True  # the decode kernel reads shared prefixes once per group from now on
        for g, _ in admitted:
            self._groups += 1
            for p in g.members:
                p.group = self._groups
        members = [(p, r) for g, rows in admitted for p, r in zip(g.members, rows)]
        members.sort(key=lambda m: m[0].suffix.shape[0])
        logits = torch.cat([suffix_forward(s, self.cache_kwarg, b) for b in buckets(members)])
        start_rows(s, members, logits, self.pad_id)
        n = len(members)
        _sync(dev)
        t2 = time.perf_counter()
        self.stats["prefix_prefill_s"] += t1 - t0
        self.stats["suffix_prefill_s"] += t2 - t1
        self.stats["admissions"] += 1
        self.stats["prefixes"] += len(admitted)
        self.stats["rows_admitted"] += n
        for g, rows in admitted:
            for p, r in zip(g.members, rows):
                p.prefill_s = (t1 - t0) / n + (t2 - t1) / n
                p.admitted_at = t2
                self._rows[r] = p

    # ------------------------------------------------------------------ finishing
    def _harvest(self, done: torch.Tensor) -> None:
        """Hand back the results of the rows that are done and free them."""
        cur = self._cur
        occupied = torch.tensor([p is not None for p in self._rows[: cur.rows]])
        finished = (occupied & done).nonzero().flatten().tolist()
        if not finished:
            return
        idx = on_device(finished, cur.out.device)
        out, steps = cur.out.index_select(0, idx).cpu(), cur.steps.index_select(0, idx).cpu()
        attended = cur.attended.index_select(0, idx).cpu()
        now = time.perf_counter()
        for k, r in enumerate(finished):
            p = self._rows[r]
            self._rows[r] = None
            p.handle.finish(p.index, p.result(out[k], int(steps[k]), float(attended[k]), self.llm.tokenizer,
                                              now - p.admitted_at))

    def _maybe_compact(self, done: torch.Tensor) -> None:
        cur = self._cur
        live = [r for r in range(cur.rows) if self._rows[r] is not None]
        if self.compact_ratio <= 0 or self._waiting or not live or len(live) > cur.rows * self.compact_ratio:
            return
        if max(self._rows[r].request.settings.max_new_tokens for r in live) < 2 * self.sync_every:
            return  # answers this short end before a compacted shape would pay off
        new, perm = cur.compacted(on_device(live, cur.out.device), done)
        rows = [self._rows[int(i)] for i in perm]
        self._rows = rows + [None] * (len(self._rows) - len(rows))
        self._cur = new
        self.compactions += 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
