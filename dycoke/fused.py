"""Per-instance adapters that fuse the language model's memory-bound elementwise work on CUDA (same math).

In a prefill the decoder's GEMMs are compute-bound, but two pieces around them are chains of elementwise
kernels over ``[tokens, width]`` tensors, each a full pass through memory:

* **RMSNorm** (Qwen2's ``Qwen2RMSNorm``: upcast, square, mean, rsqrt, scale, downcast, weight: about seven
  passes over a ``[tokens, 3584]`` tensor, twice per layer). :class:`FusedRMSNorm` calls
  ``torch.nn.functional.rms_norm`` (one fused kernel on CUDA, fp32 arithmetic, the same formula) and then
  multiplies by the weight in the input dtype, as the module does.
* **SwiGLU** (``down(silu(gate(x)) * up(x))``: two passes over the ``[tokens, 18944]`` activations).
  :class:`FusedSwiGLU` computes ``silu(gate) * up`` in one Triton kernel with torch's rounding (the SiLU
  result rounded to the input dtype before the product, as two separate torch ops round it).

Adapted per instance from transformers' ``Qwen2RMSNorm`` / ``Qwen2MLP`` (marked here; no modeling file is
copied). On other devices, and without Triton for SwiGLU, the modules' own forwards run.
:func:`adapt_language_model` installs both on one decoder stack; :func:`restore` removes them.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


class _Adapter:
    def __init__(self, module):
        self.module = module
        self.original = type(module).forward.__get__(module)


class FusedRMSNorm(_Adapter):
    """Replacement ``forward`` of one RMSNorm with ``weight`` and ``variance_epsilon``: ``[..., D] -> [..., D]``."""

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not hidden_states.is_cuda:
            return self.original(hidden_states)
        m = self.module
        normed = F.rms_norm(hidden_states, (hidden_states.shape[-1],), eps=m.variance_epsilon)
        return m.weight * normed


@functools.cache
def _silu_mul_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(g_ptr, u_ptr, o_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0)
        gf = g.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # torch's silu rounds to the tensor dtype
        tl.store(o_ptr + offs, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=mask)

    return kernel


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for two contiguous CUDA tensors of one shape and dtype, in one pass."""
    out = torch.empty_like(gate)
    n = gate.numel()
    block = 4096
    _silu_mul_kernel()[(-(-n // block),)](gate, up, out, n, BLOCK=block, num_warps=8)
    return out


class FusedSwiGLU(_Adapter):
    """Replacement ``forward`` of one ``down(act(gate(x)) * up(x))`` MLP with a SiLU ``act``."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if not x.is_cuda:
            return self.original(x)
        return m.down_proj(silu_mul(m.gate_proj(x).contiguous(), m.up_proj(x).contiguous()))


@functools.cache
def triton_available() -> bool:
    """Triton imports (every Triton kernel of ``dycoke`` checks this one function)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def adapt_language_model(language_model) -> int:
    """Install the adapters on every RMSNorm and SiLU MLP of ``language_model``; returns how many modules were
    adapted. Modules of other shapes (no ``variance_epsilon``, another activation) are left alone."""
    act = getattr(language_model.config, "hidden_act", None)
    swiglu = act == "silu" and triton_available()
    count = 0
    for module in language_model.modules():
        if isinstance(module.__dict__.get("forward"), _Adapter):
            continue
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = FusedRMSNorm(module)
            count += 1
        elif swiglu and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")):
            module.forward = FusedSwiGLU(module)
            count += 1
    return count


def restore(language_model) -> None:
    """Remove :func:`adapt_language_model`'s adapters (benchmarks compare both)."""
    for module in language_model.modules():
        if isinstance(module.__dict__.get("forward"), _Adapter):
            del module.forward
