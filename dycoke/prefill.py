"""The engine's prefill forwards over a :class:`~dycoke.session.Session` (pure functions of the session).

* :func:`prefix_forward` — the shared prefixes (system prompt, user header, visual span + newline) of several
  groups in one right-padded causal forward, each written to its group's first row and copied on the device to
  the group's other rows;
* :func:`suffix_forward` — the task suffixes of many rows in one padded forward, each row attending to its own
  cached prefix (query heads of a KV group stacked, :func:`dycoke.attention.grouped_mask`);
* :func:`start_rows` — the first generated token of each admitted row and its per-row decode state.

Every function checks that the decoder wrote the KV cache (a renamed cache keyword fails loudly).
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from dycoke.attention import grouped_mask
from dycoke.sampling import greedy, sample
from dycoke.scheduling import Group, Prepared, on_device


def prefix_batches(admitted: list, max_tokens: int) -> list[list]:
    """Consecutive ``(group, rows)`` items whose padded prefixes (items x longest) stay within ``max_tokens``."""
    out: list[list] = []
    for item in admitted:
        if out and (len(out[-1]) + 1) * max(item[0].prefix.shape[0], *(g.prefix.shape[0] for g, _ in out[-1])) <= max_tokens:
            out[-1].append(item)
        else:
            out.append([item])
    return out


def prefix_forward(s, cache_kwarg: str, batch: list[tuple[Group, list[int]]]) -> None:
    """The prefixes of ``batch``'s groups in one causal forward, right-padded to the longest (a real token never
    sees the padding after it; the padding's KV lands past its row's prefix, where the suffix overwrites it)."""
    llm = s.llm
    dev = llm.device
    emb = pad_sequence([g.prefix for g, _ in batch], batch_first=True)
    width = emb.shape[1]
    s.cache.begin_rows(on_device([rows[0] for _, rows in batch], dev))
    try:
        llm.language_model(inputs_embeds=emb, position_ids=torch.arange(width, device=dev)[None].expand(len(batch), -1),
                           attention_mask={"full_attention": None}, use_cache=True, **{cache_kwarg: s.cache})
        s.cache.check_written("prefix prefill")
    finally:
        s.cache.end()
    for g, rows in batch:
        if len(rows) > 1:
            s.cache.copy_prefix(rows[0], on_device(rows[1:], dev), g.prefix.shape[0])


def suffix_forward(s, cache_kwarg: str, members: list[tuple[Prepared, int]]) -> torch.Tensor:
    """One forward over the suffixes of ``members`` (padded to the longest), each row attending to its own
    cached prefix; returns the next-token logits ``[n, V]`` (float32) at each suffix's last token."""
    llm = s.llm
    dev = llm.device
    emb = pad_sequence([p.suffix for p, _ in members], batch_first=True)  # [n, width, D]
    n, width = emb.shape[:2]
    start = on_device([p.prefix.shape[0] for p, _ in members], dev)
    lengths = on_device([p.suffix.shape[0] for p, _ in members], dev)
    pos = start[:, None] + torch.arange(width, device=dev)[None]  # [n, width]
    slots = pos.clamp(max=s.slots - 1)  # padding past a short suffix lands beyond its row's length (masked)
    bias = torch.zeros(n, 1, width, s.slots, dtype=llm.dtype, device=dev)
    bias.masked_fill_(s.slot_idx[None, None, None, :] > pos[:, None, :, None], float("-inf"))
    s.cache.begin_chunk(on_device([r for _, r in members], dev), slots)
    try:
        cfg = llm.language_model.config
        h = llm.language_model(inputs_embeds=emb, position_ids=pos, attention_mask={"full_attention": bias},
                               use_cache=True, **{cache_kwarg: s.cache},
                               dycoke_grouped_mask=grouped_mask(bias, cfg.num_attention_heads // cfg.num_key_value_heads),
                               ).last_hidden_state
        s.cache.check_written("suffix prefill")
    finally:
        s.cache.end()
    return llm.lm_head(h[torch.arange(n, device=dev), lengths - 1]).float()


def start_rows(s, members: list[tuple[Prepared, int]], logits: torch.Tensor, pad_id: int) -> None:
    """Rows ``members`` (``(sequence, row)``) start decoding: first token from ``logits`` (``[n, V]``), position at the
    end of each prompt, per-row settings, fresh DyCoke pruning state."""
    dev = s.llm.device
    rows = on_device([r for _, r in members], dev)
    lengths = on_device([p.length for p, _ in members], dev)
    col = lambda vals, dt=torch.long: on_device(vals, dev, dt)  # noqa: E731
    sets = [p.request.settings for p, _ in members]
    temperature = col([x.temperature for x in sets], torch.float32)
    top_p = col([x.top_p for x in sets], torch.float32)
    first = sample(logits, temperature, top_p) if any(x.temperature > 0 for x in sets) else greedy(logits)
    stop_ids = col([list(p.stop_ids) + [-1] * (s.max_stop - len(p.stop_ids)) for p, _ in members])
    max_new = col([x.max_new_tokens for x in sets])
    for name, value in (("tok", first), ("pos", lengths), ("count", torch.ones_like(first)), ("max_new", max_new),
                        ("vis_start", col([p.vis_start for p, _ in members])),
                        ("vis_len", col([p.vis_len for p, _ in members])), ("steps", torch.zeros_like(first)),
                        ("attended", torch.zeros_like(temperature)), ("temperature", temperature),
                        ("top_p", top_p), ("stop_ids", stop_ids), ("share_gid", col([p.group for p, _ in members])),
                        ("share_len", col([p.prefix.shape[0] for p, _ in members]))):
        getattr(s, name).index_copy_(0, rows, value)
    s.out.index_fill_(0, rows, pad_id)
    s.out[rows, 0] = first
    stopped = (first.unsqueeze(-1) == stop_ids).any(-1)
    s.done.index_copy_(0, rows, stopped | (max_new <= 1))
    fresh = torch.zeros(s.rows, dtype=torch.bool, device=dev)
    fresh[rows] = True
    s.ctx.state.reset(fresh)
