"""Per-instance adapters for the SigLIP vision tower (same math; nothing copied from transformers but the
three-line MLP, marked below). :func:`adapt_vision_tower` installs both:

* **Contiguous residual stream.** The patch embedding is a convolution whose ``[N, D, g, g]`` output the
  embeddings module flattens and transposes to ``[N, g*g, D]``, a strided view; adding the position
  embeddings keeps that layout, so every residual add and layer norm of every layer runs on a strided
  tensor (a slow non-vectorised kernel, about 30% of the tower's GPU time at 8 videos per call). A forward
  hook on the embeddings returns them contiguous: one copy instead of two strided passes per layer.
  Values are unchanged.
* **Fused GELU.** SigLIP's MLP is ``fc2(gelu_tanh(fc1(x)))``. On CUDA the GELU runs as its own kernel over the
``[tokens, intermediate]`` activation (4,304 wide for so400m), one full read and write of the largest
tensor in the tower per layer. :class:`FusedGeluMLP` runs ``fc1`` with the bias and the tanh-GELU in the
GEMM's epilogue (``torch._addmm_activation``, cuBLASLt's GELU_BIAS epilogue), so that tensor is written
once. The epilogue applies GELU to the fp32 accumulator before rounding, so results differ from the
unfused module by bf16 rounding only. On other devices the module's own forward runs unchanged (the CPU
kernel of ``_addmm_activation`` uses the exact erf GELU, not the tanh approximation).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

TANH_GELU = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")


class FusedGeluMLP:
    """Replacement ``forward`` for one ``SiglipMLP`` instance (adapted): ``[..., hidden] -> [..., hidden]``."""

    def __init__(self, mlp):
        self.mlp = mlp
        self.original = type(mlp).forward.__get__(mlp)

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        fc1 = self.mlp.fc1
        if not hidden_states.is_cuda or fc1.bias is None:
            return self.original(hidden_states)
        shape = hidden_states.shape
        h = torch._addmm_activation(fc1.bias, hidden_states.reshape(-1, shape[-1]), fc1.weight.t(), use_gelu=True)
        return self.mlp.fc2(h).reshape(*shape[:-1], -1)


def _contiguous(module, args, output):
    return output.contiguous()


def adapt_vision_tower(vision_tower) -> None:
    """Both adapters on one vision tower instance (idempotent)."""
    embeddings = getattr(vision_tower, "vision_model", vision_tower).embeddings
    if not getattr(embeddings, "_dycoke_contiguous", False):
        embeddings.register_forward_hook(_contiguous)
        embeddings._dycoke_contiguous = True
    fuse_mlp_gelu(vision_tower)


def fuse_mlp_gelu(vision_tower) -> int:
    """Install :class:`FusedGeluMLP` on every encoder layer of ``vision_tower`` whose activation is the tanh
    GELU; returns how many layers were adapted (0 for other activations: nothing changes)."""
    cfg = vision_tower.config
    if getattr(cfg, "hidden_act", None) not in TANH_GELU:
        log.info("vision MLP activation %s: not fused", getattr(cfg, "hidden_act", None))
        return 0
    layers = getattr(vision_tower, "vision_model", vision_tower).encoder.layers
    for layer in layers:
        if not isinstance(layer.mlp.forward, FusedGeluMLP):
            layer.mlp.forward = FusedGeluMLP(layer.mlp)
    return len(layers)


def unfuse_mlp_gelu(vision_tower) -> None:
    """Undo :func:`fuse_mlp_gelu` (benchmarks compare both)."""
    for layer in getattr(vision_tower, "vision_model", vision_tower).encoder.layers:
        if isinstance(layer.mlp.__dict__.get("forward"), FusedGeluMLP):
            del layer.mlp.forward
