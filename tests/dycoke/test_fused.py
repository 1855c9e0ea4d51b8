"""The language model's fused RMSNorm / SwiGLU adapters (dycoke.fused): installed per instance on load, the CPU
path unchanged, the CUDA path equal to the modules up to rounding."""

from __future__ import annotations

import pytest
import torch

from dycoke.fused import FusedRMSNorm, FusedSwiGLU, adapt_language_model, restore, silu_mul
from dycoke.llava import VideoLLM
from dycoke.testing import build_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "m"))


def _adapters(lm):
    return [type(m.__dict__["forward"]) for m in lm.modules() if "forward" in m.__dict__]


def test_installed_on_load_and_cpu_output_unchanged(ckpt):
    llm = VideoLLM.load(ckpt, dtype="float32")
    lm = llm.language_model
    kinds = _adapters(lm)
    layers = lm.config.num_hidden_layers
    assert kinds.count(FusedRMSNorm) == 2 * layers + 1  # two per layer and the final norm
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    adapted = lm(input_ids=ids).last_hidden_state
    restore(lm)
    assert _adapters(lm) == []
    assert torch.equal(adapted, lm(input_ids=ids).last_hidden_state)
    assert adapt_language_model(lm) == len(kinds)  # idempotent count, reinstalled


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_silu_mul_matches_torch(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    gate = torch.randn(1000, 333, device="cuda", generator=g).to(dtype)
    up = torch.randn(1000, 333, device="cuda", generator=g).to(dtype)
    ref = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(silu_mul(gate, up), ref, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_adapters_match_the_modules(ckpt):
    llm = VideoLLM.load(ckpt, dtype="bfloat16", device="cuda")
    lm = llm.language_model
    assert FusedSwiGLU in _adapters(lm)
    ids = torch.randint(0, 100, (3, 40), device="cuda")
    with torch.inference_mode():
        adapted = lm(input_ids=ids).last_hidden_state.float()
        restore(lm)
        plain = lm(input_ids=ids).last_hidden_state.float()
    assert ((adapted - plain).norm() / plain.norm()).item() < 2e-2
