"""The SigLIP MLP adapter (dycoke.vision): installed per instance, CPU path unchanged, CUDA path equal to the
module up to bf16 rounding."""

from __future__ import annotations

import pytest
import torch

from dycoke.llava import VideoLLM
from dycoke.testing import build_tiny_checkpoint
from dycoke.vision import FusedGeluMLP, fuse_mlp_gelu, unfuse_mlp_gelu


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "m"))


def _layers(llm):
    tower = llm.model.model.vision_tower
    return getattr(tower, "vision_model", tower).encoder.layers


def test_loaded_model_has_the_adapter_and_cpu_output_is_unchanged(ckpt):
    llm = VideoLLM.load(ckpt, dtype="float32")
    assert all(isinstance(layer.mlp.forward, FusedGeluMLP) for layer in _layers(llm))
    pix = torch.randn(2, 3, 3, llm.image_size, llm.image_size, generator=torch.Generator().manual_seed(0))
    fused = llm.video_features(pix)
    unfuse_mlp_gelu(llm.model.model.vision_tower)
    assert not any("forward" in vars(layer.mlp) for layer in _layers(llm))
    assert torch.equal(fused, llm.video_features(pix))


def test_other_activations_are_left_alone(ckpt):
    llm = VideoLLM.load(ckpt, dtype="float32")
    tower = llm.model.model.vision_tower
    unfuse_mlp_gelu(tower)
    tower.config.hidden_act = "relu"
    assert fuse_mlp_gelu(tower) == 0
    assert not any("forward" in vars(layer.mlp) for layer in _layers(llm))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fused_mlp_matches_the_module(ckpt):
    llm = VideoLLM.load(ckpt, dtype="bfloat16", device="cuda")
    pix = torch.randn(2, 4, 3, llm.image_size, llm.image_size, device="cuda").to(torch.bfloat16)
    fused = llm.video_features(pix).float()
    unfuse_mlp_gelu(llm.model.model.vision_tower)
    plain = llm.video_features(pix).float()
    assert ((fused - plain).norm() / plain.norm()).item() < 2e-2


def test_residual_stream_is_contiguous_and_values_unchanged(ckpt):
    """The embeddings hook makes every encoder layer see a contiguous [N, tokens, D] stream (the unadapted
    module hands them a transposed view) and changes no value."""
    llm = VideoLLM.load(ckpt, dtype="float32")
    tower = llm.model.model.vision_tower
    vm = getattr(tower, "vision_model", tower)
    seen = []
    handle = vm.encoder.layers[0].register_forward_pre_hook(lambda m, args, kwargs: seen.append(
        (args[0] if args else kwargs["hidden_states"]).is_contiguous()), with_kwargs=True)
    pix = torch.randn(3, 3, llm.image_size, llm.image_size, generator=torch.Generator().manual_seed(1))
    adapted = vm(pixel_values=pix).last_hidden_state
    plain_emb = vm.embeddings.__class__.forward(vm.embeddings, pix)  # the module's own forward, no hook
    handle.remove()
    assert seen == [True] and not plain_emb.is_contiguous()
    assert torch.equal(vm.embeddings(pix), plain_emb)
    assert adapted.shape[0] == 3
