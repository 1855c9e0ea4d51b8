"""Patch saliency for HoliTom: attention each vision patch receives in one SigLIP layer (adapted, hooks only).

HoliTom (DESIGN 4.6) ranks a frame's dynamic tokens by the attention its SigLIP patches receive in the
layer whose output becomes the visual features: in the authors' LLaVA-NeXT tower (last of the 27
layers deleted, features = output of the remaining last layer, before the post-layernorm) they take
``output_attentions`` of that layer, ``softmax(q k^T * scale)`` of shape ``[N, heads, P, P]``, and average
it over heads, then over queries, giving ``[N, P]``; then they pool it like the features (2x2 bilinear).
SigLIP has no CLS token, so all P = 729 keys are patches. The Hugging Face LLaVA-OneVision checkpoints
keep 26 layers and select ``hidden_states[-1]``: the same layer.

:class:`PatchSaliency` gets that map without switching the tower to eager attention and without
keeping the ``[N, heads, P, P]`` maps: forward hooks on the layer's ``q_proj`` / ``k_proj`` keep their
outputs, and a hook on the attention module (after it ran with the model's own kernel) recomputes the
probabilities in chunks of frames, reduces them to ``[N, P]`` and drops q and k. Hooks exist only inside
:meth:`PatchSaliency.capture`, so the tower costs nothing extra when HoliTom is not used.

Precision: as the authors', scores are a matmul in the model dtype scaled in the model dtype, and the
softmax runs in fp32; unlike theirs, the probabilities stay fp32 for the two means (they cast them back
to bf16 first, which makes many nearby saliencies exactly equal; fp32 keeps the ranking finer).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def feature_layer_index(num_layers: int, vision_feature_layer) -> int:
    """Encoder layer whose output is ``hidden_states[vision_feature_layer]`` (``hidden_states[0]`` = embeddings)."""
    if not isinstance(vision_feature_layer, int):
        raise ValueError(f"HoliTom needs a single vision_feature_layer, the model uses {vision_feature_layer!r}")
    index = vision_feature_layer % (num_layers + 1) - 1
    if not 0 <= index < num_layers:
        raise ValueError(f"vision_feature_layer {vision_feature_layer} selects the patch embeddings, not a layer")
    return index


class PatchSaliency:
    """Per-instance hooks on one SigLIP attention module (``SiglipAttention``: q_proj, k_proj, num_heads, scale).

    Usage::

        probe = PatchSaliency(attn)
        with probe.capture() as out:
            tower(pixels)            # any number of forward calls
        out.value                    # [N, P] fp32 saliency, frames in call order

    ``chunk_elements`` bounds the fp32 probability block computed at once (frames x heads x P x P).
    """

    def __init__(self, attention: torch.nn.Module, chunk_elements: int = 1 << 26):
        self.attention = attention
        self.chunk_elements = chunk_elements

    def received(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``q, k [N, P, E]`` projections -> ``[N, P]`` attention each key receives (mean over heads and queries)."""
        n, p, e = q.shape
        h = self.attention.num_heads
        q = q.view(n, p, h, e // h).transpose(1, 2)
        k = k.view(n, p, h, e // h).transpose(1, 2)
        step = max(1, self.chunk_elements // (h * p * p))
        out = []
        for i in range(0, n, step):  # chunks of frames, not a loop over tokens
            scores = torch.matmul(q[i : i + step], k[i : i + step].transpose(-1, -2)).mul_(self.attention.scale)
            if mask is not None:
                scores = scores + mask[i : i + step]
            out.append(scores.softmax(-1, dtype=torch.float32).mean(dim=(1, 2)))
        return torch.cat(out)

    @contextmanager
    def capture(self):
        attn = self.attention
        store: dict[str, torch.Tensor] = {}
        result = _Captured()

        def keep(name):
            def hook(_module, _args, output):
                store[name] = output
            return hook

        def reduce(_module, _args, kwargs, _output):
            sal = self.received(store.pop("q"), store.pop("k"), kwargs.get("attention_mask"))
            result.parts.append(sal)

        handles = [attn.q_proj.register_forward_hook(keep("q")), attn.k_proj.register_forward_hook(keep("k")),
                   attn.register_forward_hook(reduce, with_kwargs=True)]
        try:
            yield result
        finally:
            for handle in handles:
                handle.remove()
            store.clear()


class _Captured:
    def __init__(self):
        self.parts: list[torch.Tensor] = []

    @property
    def value(self) -> torch.Tensor:
        if not self.parts:
            raise RuntimeError("no forward pass ran through the hooked attention layer")
        return torch.cat(self.parts)
