"""Host-side bookkeeping of the engine: requests and their settings, prepared sequences, prefix-sharing
groups, handles, results, and the sizing rules (rows from free memory, suffix buckets).

Nothing here runs on the device except the embedding tensors a :class:`Prepared` carries (its prefix
``[Lp, D]`` and suffix ``[Ls, D]``, already on the model's device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from dycoke.llava import VisualTokens


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


def error_result(req, message: str) -> Result:
    return Result(request_id=req.request_id, text="", token_ids=[], prompt_tokens=0,
                  visual_tokens=req.visual.num_kept if req.visual is not None else 0, output_tokens=0,
                  visual_tokens_attended=0.0, prefill_s=0.0, decode_s=0.0, finish_reason="error", error=message)


class Handle:
    """The results of one :meth:`~dycoke.engine.Engine.add` call, filled in as rows finish."""

    def __init__(self, requests: list):
        self.results: list[Result | None] = [None] * len(requests)
        self.remaining = len(requests)

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def finish(self, index: int, result: Result) -> None:
        self.results[index] = result
        self.remaining -= 1


@dataclass
class Prepared:
    """One request, tokenized and embedded: ``prefix [Lp, D]`` (system prompt, user header, visual span with
    its newline) and ``suffix [Ls, D]`` (the task text and the assistant header)."""

    index: int  # position in its handle
    request: Any  # dycoke.engine.Request
    handle: Handle | None
    prefix: torch.Tensor
    suffix: torch.Tensor
    vis_start: int  # prompt offset of the first visual token
    vis_len: int  # visual tokens (newline excluded)
    stop_ids: tuple[int, ...]
    prefix_key: tuple[int, ...]  # the prefix's text tokens before the visual span (same system prompt)
    prefill_s: float = 0.0
    admitted_at: float = 0.0
    group: int = 0  # the admission's prefix group (rows of one group hold the same prefix KV)

    @property
    def length(self) -> int:
        return self.prefix.shape[0] + self.suffix.shape[0]

    @property
    def embeds(self) -> torch.Tensor:
        """``[L, D]``: the whole prompt as the model sees it."""
        return torch.cat([self.prefix, self.suffix])

    def result(self, out: torch.Tensor, steps: int, attended: float, tokenizer, decode_s: float) -> Result:
        """The :class:`Result` from this row's generated ids ``out`` (host, at least ``max_new_tokens``)."""
        n = self.request.settings.max_new_tokens
        ids, reason = out[:n].tolist(), "length"
        if self.stop_ids:
            hits = torch.isin(out[:n], torch.tensor(self.stop_ids)).nonzero()
            if hits.numel():
                ids, reason = ids[: int(hits[0, 0])], "stop"
        return Result(
            request_id=self.request.request_id, text=tokenizer.decode(ids, skip_special_tokens=True), token_ids=ids,
            prompt_tokens=self.length, visual_tokens=self.vis_len,
            output_tokens=len(ids) + (1 if reason == "stop" else 0),
            visual_tokens_attended=attended / steps if steps > 0 else float(self.vis_len),
            prefill_s=self.prefill_s, decode_s=decode_s, finish_reason=reason,
        )


@dataclass
class Group:
    """Requests that share one prefix (the same visual tokens and system prompt): prefilled once."""

    prefix: torch.Tensor
    members: list[Prepared] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def slots(self) -> int:
        """Cache slots the longest member needs (prompt + new tokens)."""
        return max(p.length + p.request.settings.max_new_tokens for p in self.members)

    @property
    def max_stop(self) -> int:
        return max(len(p.stop_ids) for p in self.members)


def on_device(values, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``values`` (a list) as a tensor on ``device`` without a host synchronisation: ``torch.tensor(v, device=cuda)``
    copies synchronously, which drains every queued kernel first and leaves the device idle while the host
    prepares the next launch."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def kv_bytes_per_slot(llm) -> int:
    """Bytes of K and V one cache slot takes over all decoder layers."""
    cfg = llm.language_model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    itemsize = torch.empty(0, dtype=llm.dtype).element_size()
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * itemsize


def auto_rows(llm, slots: int, *, memory_fraction: float = 0.6, max_rows: int = 384, cpu_rows: int = 16) -> int:
    """Rows that fill the device: ``memory_fraction`` of the free device memory over the KV bytes of one
    row of ``slots`` slots (plus its per-row decode buffers), rounded down to a multiple of 8, in
    ``[8, max_rows]``. ``cpu_rows`` on a CPU. The cap: at 7B on an H200 the realistic mix ran 1-6% faster at 384 rows
    than at 256 in three paired runs (KV 68 GiB, peak 99 GiB); HoliTom's shorter rows gained nothing at 512."""
    if llm.device.type != "cuda":
        return cpu_rows
    free, _ = torch.cuda.mem_get_info(llm.device)
    free += torch.cuda.memory_reserved(llm.device) - torch.cuda.memory_allocated(llm.device)  # the allocator's idle blocks
    per_row = slots * (kv_bytes_per_slot(llm) + 8 + 4)  # KV + generated ids + prune-state float per slot
    rows = int(free * memory_fraction // per_row)
    return max(8, min(max_rows, math.floor(rows / 8) * 8))


def buckets(members: list, max_waste: float = 0.25) -> list[list]:
    """Split ``members`` (sorted by suffix length) into runs padded with at most ``max_waste`` of their real
    tokens, so one long suffix does not pad every short one (each run is one forward)."""
    out: list[list] = []
    real = 0
    for m in members:
        n = m[0].suffix.shape[0]
        if out and (len(out[-1]) + 1) * n <= (1 + max_waste) * (real + n):
            out[-1].append(m)
            real += n
        else:
            out.append([m])
            real = n
    return out
