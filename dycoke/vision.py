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
* **Patch embedding as one GEMM.** The 14 x 14 stride-14 convolution runs in cuDNN at a few percent of the
  matmul peak (about 1 ms per video at 32 frames). :class:`PatchGemm` cuts the pixels into non-overlapping
  patches and multiplies once (``[N * g * g, 3 * 14 * 14] @ [3 * 14 * 14, D]`` with the bias in the epilogue); its
  ``[N, D, g, g]`` result is a channels-last view, so the embeddings' flatten + transpose is contiguous with no copy.
* **LayerNorm in one pass.** PyTorch's layer-norm kernel reaches about a third of the copy bandwidth on the
  ``[tokens, 1152]`` residual stream (two per layer). :class:`TritonLayerNorm` normalises several rows per
  program with the same arithmetic (fp32 mean and biased variance, ``(x - mean) * rsqrt(var + eps) * w + b``,
  rounded once to the input dtype).

On other devices (and without Triton, for the layer norm) each module's own forward runs unchanged.
"""

from __future__ import annotations

import functools
import logging

import torch

from dycoke.fused import triton_available

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


class PatchGemm:
    """Replacement ``forward`` of a patch-embedding ``Conv2d`` whose kernel equals its stride (no padding,
    dilation or groups): ``[N, C, H, W] -> [N, D, H // p, W // p]`` (a channels-last view), same math as the
    convolution up to fp32 summation order."""

    def __init__(self, conv):
        self.conv = conv
        self.original = type(conv).forward.__get__(conv)

    @staticmethod
    def applies(conv) -> bool:
        return (isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == conv.stride and conv.groups == 1
                and conv.dilation == (1, 1) and conv.padding in ((0, 0), "valid") and conv.bias is not None)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if not pixels.is_cuda:
            return self.original(pixels)
        return patch_embed(pixels, self.conv.weight, self.conv.bias)


def patch_embed(pixels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A stride = kernel convolution as one GEMM: ``pixels [N, C, H, W]``, ``weight [D, C, p, q]``, ``bias [D]``
    -> ``[N, D, H // p, W // q]``, a view of ``[N, H // p, W // q, D]`` memory (trailing pixels dropped, as the
    convolution drops them)."""
    n, c, h, w = pixels.shape
    d, _, p, q = weight.shape
    gh, gw = h // p, w // q
    patches = (pixels[:, :, : gh * p, : gw * q].reshape(n, c, gh, p, gw, q).permute(0, 2, 4, 1, 3, 5)
               .reshape(n * gh * gw, c * p * q))
    out = torch.addmm(bias, patches, weight.reshape(d, -1).t())
    return out.view(n, gh, gw, d).permute(0, 3, 1, 2)


@functools.cache
def _layer_norm_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, w_ptr, b_ptr, o_ptr, n_rows, width, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]  # [ROWS, 1]
        cols = tl.arange(0, BLOCK)[None, :]  # [1, BLOCK]
        inside = (rows < n_rows) & (cols < width)
        offs = rows.to(tl.int64) * width + cols
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / width
        xc = tl.where(inside, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / width + eps)
        w = tl.load(w_ptr + cols, mask=cols < width, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=cols < width, other=0.0).to(tl.float32)
        tl.store(o_ptr + offs, (xc * rstd[:, None] * w + b).to(o_ptr.dtype.element_ty), mask=inside)

    return kernel


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last axis of a contiguous CUDA tensor ``[..., D]`` (one Triton pass)."""
    width = x.shape[-1]
    rows = x.numel() // width
    out = torch.empty_like(x)
    block = 1 << (width - 1).bit_length()
    per = max(1, min(8, 8192 // block))  # rows per program: about 8K elements in flight
    _layer_norm_kernel()[(-(-rows // per),)](x, weight, bias, out, rows, width, eps, ROWS=per, BLOCK=block,
                                              num_warps=8 if block * per >= 8192 else 4)
    return out


class TritonLayerNorm:
    """Replacement ``forward`` of one ``nn.LayerNorm`` over the last axis with weight and bias."""

    def __init__(self, norm):
        self.norm = norm
        self.original = type(norm).forward.__get__(norm)

    @staticmethod
    def applies(norm) -> bool:
        return (isinstance(norm, torch.nn.LayerNorm) and len(norm.normalized_shape) == 1
                and norm.weight is not None and norm.bias is not None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm
        if not x.is_cuda or not x.is_contiguous() or x.dtype != n.weight.dtype or not triton_available():
            return self.original(x)
        return layer_norm(x, n.weight, n.bias, n.eps)


def adapt_vision_tower(vision_tower) -> None:
    """Every adapter of this module on one vision tower instance (idempotent)."""
    model = getattr(vision_tower, "vision_model", vision_tower)
    embeddings = model.embeddings
    if not getattr(embeddings, "_dycoke_contiguous", False):
        embeddings.register_forward_hook(_contiguous)
        embeddings._dycoke_contiguous = True
    conv = embeddings.patch_embedding
    if PatchGemm.applies(conv) and not isinstance(conv.__dict__.get("forward"), PatchGemm):
        conv.forward = PatchGemm(conv)
    for module in model.modules():
        if TritonLayerNorm.applies(module) and not isinstance(module.__dict__.get("forward"), TritonLayerNorm):
            module.forward = TritonLayerNorm(module)
    fuse_mlp_gelu(vision_tower)


def restore_vision_tower(vision_tower) -> None:
    """Remove the patch-embedding and layer-norm adapters (benchmarks compare both; the MLP has its own)."""
    for module in getattr(vision_tower, "vision_model", vision_tower).modules():
        if isinstance(module.__dict__.get("forward"), (PatchGemm, TritonLayerNorm)):
            del module.forward


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
