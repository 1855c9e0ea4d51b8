"""The SigLIP adapters (dycoke.vision: fused GELU MLP, patch embedding as one GEMM, Triton layer norm): installed
per instance, CPU path unchanged, CUDA path equal to the modules up to bf16 rounding."""

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
def test_cuda_adapted_tower_matches_the_modules(ckpt):
    from dycoke.vision import restore_vision_tower

    llm = VideoLLM.load(ckpt, dtype="bfloat16", device="cuda")
    pix = torch.randn(2, 4, 3, llm.image_size, llm.image_size, device="cuda").to(torch.bfloat16)
    adapted = llm.video_features(pix).float()
    unfuse_mlp_gelu(llm.model.model.vision_tower)
    mlp_only = llm.video_features(pix).float()
    restore_vision_tower(llm.model.model.vision_tower)
    plain = llm.video_features(pix).float()
    assert ((mlp_only - plain).norm() / plain.norm()).item() < 2e-2
    assert ((adapted - plain).norm() / plain.norm()).item() < 2e-2


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


def test_patch_embedding_as_one_gemm_equals_the_convolution():
    from dycoke.vision import PatchGemm, patch_embed

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 40, kernel_size=14, stride=14, padding="valid")
    assert PatchGemm.applies(conv)
    assert not PatchGemm.applies(torch.nn.Conv2d(3, 40, kernel_size=3, stride=1, padding=1))
    pixels = torch.randn(5, 3, 100, 86)  # 7 x 6 patches, trailing pixels dropped as the convolution drops them
    got = patch_embed(pixels, conv.weight, conv.bias)
    want = conv(pixels)
    assert got.shape == want.shape == (5, 40, 7, 6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.flatten(2).transpose(1, 2).is_contiguous()  # the embeddings' flatten + transpose needs no copy


def test_loaded_tower_has_the_layer_norm_and_patch_adapters(ckpt):
    from dycoke.vision import PatchGemm, TritonLayerNorm, restore_vision_tower

    llm = VideoLLM.load(str(ckpt), dtype="float32")
    tower = llm.model.model.vision_tower
    model = getattr(tower, "vision_model", tower)
    assert isinstance(model.embeddings.patch_embedding.forward, PatchGemm)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(isinstance(m.forward, TritonLayerNorm) for m in norms)
    pixels = torch.randn(1, 2, 3, llm.image_size, llm.image_size)
    adapted = llm.video_features(pixels)  # CPU: every adapter runs the module's own forward
    restore_vision_tower(tower)
    assert not any(isinstance(m.__dict__.get("forward"), (PatchGemm, TritonLayerNorm)) for m in model.modules())
    torch.testing.assert_close(adapted, llm.video_features(pixels), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_layer_norm_and_patch_gemm_match_torch():
    import torch.nn.functional as F

    from dycoke.vision import layer_norm, patch_embed

    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        for rows, width in ((3, 1152), (4099, 1152), (17, 96)):
            x = (torch.randn(rows, width, device="cuda", generator=g) * 3 + 1).to(dtype)
            w = torch.randn(width, device="cuda", generator=g).to(dtype)
            b = torch.randn(width, device="cuda", generator=g).to(dtype)
            want = F.layer_norm(x.float(), (width,), w.float(), b.float(), 1e-6)
            got = layer_norm(x, w, b, 1e-6)
            assert got.dtype == dtype
            torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
        pixels = torch.randn(4, 3, 384, 384, device="cuda", generator=g).to(dtype)
        weight = torch.randn(64, 3, 14, 14, device="cuda", generator=g).to(dtype) * 0.05
        bias = torch.randn(64, device="cuda", generator=g).to(dtype)
        want = F.conv2d(pixels.float(), weight.float(), bias.float(), stride=14)
        torch.testing.assert_close(patch_embed(pixels, weight, bias).float(), want, rtol=4 * tol, atol=4 * tol)
