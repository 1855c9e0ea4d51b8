"""LLaVA-OneVision adapter: load a Hugging Face checkpoint, preprocess frames, encode videos, compress.

Everything here uses the checkpoint's own files and the model's own methods (no modeling code is
copied): ``from_pretrained`` for weights, the tokenizer's chat template for prompts, the preprocessor
config for resize / mean / std, and ``model.get_video_features`` for vision tower + projector + 2x2
bilinear pooling. Only preprocessing is reimplemented, in plain torch (no torchvision).

Shapes: frames ``[F, H, W, 3]`` uint8 -> pixels ``[F, 3, S, S]`` -> features ``[B, F, T, D]``
(T = 196 for the real 384 px SigLIP) -> :func:`dycoke.temporal_merge` (DyCoke) or
:func:`dycoke.holitom_merge` (HoliTom, with the patch saliency of :mod:`dycoke.saliency`) -> ``[N, D]`` ->
with the newline embedding appended, the ``[N + 1, D]`` visual span spliced at the prompt's ``<video>``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dycoke.config import DyCokeConfig
from dycoke.fused import adapt_language_model
from dycoke.holitom import holitom_merge
from dycoke.saliency import PatchSaliency, feature_layer_index
from dycoke.scheduling import on_device
from dycoke.ttm import temporal_merge
from dycoke.vision import adapt_vision_tower

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


@dataclass
class VisualTokens:
    """One video's visual span, ready to splice into a prompt.

    Attributes:
        tokens: ``[N + 1, D]`` in the model dtype; the last row is the newline embedding.
        num_full: visual tokens before compression (``F * T``).
        num_kept: visual tokens after TTM (``N``), newline excluded.
        num_frames: frames the video contributed (F).
    """

    tokens: torch.Tensor
    num_full: int
    num_kept: int
    num_frames: int

    def to_numpy_dict(self) -> dict:
        """Host-side form for shipping between processes; bfloat16 travels as its uint16 bit pattern."""
        t = self.tokens.detach().cpu().contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        array = t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
        return {"tokens": array, "dtype": dtype, "num_full": self.num_full, "num_kept": self.num_kept,
                "num_frames": self.num_frames}

    @classmethod
    def from_numpy_dict(cls, d: dict, device: str | torch.device = "cpu") -> VisualTokens:
        array = np.ascontiguousarray(d["tokens"])
        if d["dtype"] == "bfloat16":
            t = torch.from_numpy(array.astype(np.uint16, copy=False)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(array)
        return cls(tokens=t.to(device), num_full=int(d["num_full"]), num_kept=int(d["num_kept"]),
                   num_frames=int(d["num_frames"]))


@dataclass(frozen=True)
class PixelSpec:
    """Preprocessing read from the checkpoint: square side, per-channel mean and std, rescale factor."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float = 1 / 255

    @classmethod
    def from_checkpoint(cls, model_dir_or_id: str, **hub_kwargs) -> PixelSpec:
        """Read ``video_preprocessor_config.json`` if the checkpoint has one, else ``preprocessor_config.json``."""
        from transformers.utils import cached_file

        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            path = cached_file(model_dir_or_id, name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
            if path:
                cfg = json.loads(Path(path).read_text())
                size = cfg.get("size", {})
                side = size.get("height") or size.get("shortest_edge") or cfg.get("crop_size", {}).get("height")
                if side is None:
                    raise ValueError(f"{name} of {model_dir_or_id} has no usable 'size': {size}")
                return cls(size=int(side), mean=tuple(cfg["image_mean"]), std=tuple(cfg["image_std"]),
                           rescale=float(cfg.get("rescale_factor", 1 / 255)))
        raise FileNotFoundError(f"{model_dir_or_id} has no preprocessor_config.json")


def preprocess_frames(frames: torch.Tensor, spec: PixelSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[F, H, W, 3]`` uint8 -> ``[F, 3, S, S]`` normalized pixels.

    Bicubic resize with antialiasing to ``S x S`` (as the checkpoint's PIL processor does), rounded
    back to 8-bit like a PIL image, then rescale and normalize with the checkpoint's mean / std.
    Runs on whatever device ``frames`` is on.
    """
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3], got {tuple(frames.shape)}")
    x = frames.permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (spec.size, spec.size):
        x = F.interpolate(x, size=(spec.size, spec.size), mode="bicubic", align_corners=False, antialias=True)
        x = x.round_().clamp_(0, 255)
    mean = on_device(spec.mean, x.device, torch.float32).view(1, 3, 1, 1)
    std = on_device(spec.std, x.device, torch.float32).view(1, 3, 1, 1)
    return ((x * spec.rescale - mean) / std).to(dtype)


def bilinear_weights(n_in: int, n_out: int) -> torch.Tensor:
    """``[n_out, n_in]`` float64 matrix of 1-D bilinear resampling, ``align_corners=False``, no antialias.

    Row ``i`` samples source coordinate ``(i + 0.5) * n_in / n_out - 0.5`` (clamped at 0), the rule of
    ``torch.nn.functional.interpolate(mode="bilinear")``.
    """
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    scale = n_in / n_out
    for i in range(n_out):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(src), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        w[i, i0] += 1.0 - frac
        w[i, i1] += frac
    return w


class BilinearPooling:
    """Per-instance replacement of ``LlavaOnevisionModel.apply_pooling`` (adapted, same math).

    The model pools each frame's ``g x g`` patch grid to ``ceil(g/2) x ceil(g/2)`` with bilinear
    ``interpolate`` on a ``[frames, D, g, g]`` tensor, whose GPU kernel is slow for wide D (about 11 ms
    of 75 ms per 32-frame video on an H100). Bilinear resampling is linear, so it is one matmul with
    the fixed ``[ceil(g/2)^2, g^2]`` Kronecker product of the 1-D weights:
    ``[frames, g*g, D] -> [frames, ceil(g/2)^2, D]``. Equal to the original up to float rounding.
    """

    def __init__(self, grid: int):
        out = math.ceil(grid / 2)
        w = bilinear_weights(grid, out)
        self.grid = grid
        self.matrix64 = torch.kron(w, w)  # [out*out, grid*grid]
        self._cache: dict[tuple, torch.Tensor] = {}

    def __call__(self, image_features: torch.Tensor) -> torch.Tensor:
        key = (image_features.device, image_features.dtype)
        if key not in self._cache:
            self._cache[key] = self.matrix64.to(device=image_features.device, dtype=image_features.dtype)
        return torch.matmul(self._cache[key], image_features)


class VideoLLM:
    """A loaded LLaVA-OneVision checkpoint: model, tokenizer, chat template and pixel spec."""

    def __init__(self, model, tokenizer, pixel_spec: PixelSpec, model_id: str):
        self.model = model
        self.tokenizer = tokenizer
        self.pixel_spec = pixel_spec
        self.model_id = model_id
        cfg = model.config
        self.video_token_id = int(cfg.video_token_index if hasattr(cfg, "video_token_index") else cfg.video_token_id)
        grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
        self.tokens_per_frame = math.ceil(grid / 2) ** 2
        self.hidden_size = cfg.text_config.hidden_size
        self.max_context = int(getattr(cfg.text_config, "max_position_embeddings", 32768))
        # Adapted per instance (see BilinearPooling): the model's get_video_features calls self.apply_pooling.
        model.model.apply_pooling = BilinearPooling(grid)
        adapt_vision_tower(model.model.vision_tower)  # adapted per instance too (dycoke.vision, dycoke.fused)
        adapt_language_model(model.model.language_model)
        self._saliency: PatchSaliency | None = None  # built on first HoliTom use

    @property
    def saliency_probe(self) -> PatchSaliency:
        """Hooks on the SigLIP layer that produces the selected features (see :mod:`dycoke.saliency`)."""
        if self._saliency is None:
            tower = self.model.model.vision_tower
            layers = getattr(tower, "vision_model", tower).encoder.layers  # older transformers nest a vision_model
            index = feature_layer_index(len(layers), self.model.config.vision_feature_layer)
            self._saliency = PatchSaliency(layers[index].self_attn)
        return self._saliency

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, model: str, *, dtype: str | torch.dtype = "bfloat16", device: str | torch.device = "cpu",
             attn_implementation: str = "sdpa", trust_remote_code: bool = False, **hub_kwargs) -> VideoLLM:
        """Load from a hub id or a local directory in Hugging Face layout."""
        from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

        torch_dtype = resolve_dtype(dtype)
        log.info("loading %s (%s, %s, attention=%s)", model, torch_dtype, device, attn_implementation)
        net = LlavaOnevisionForConditionalGeneration.from_pretrained(
            model, dtype=torch_dtype, attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code, **hub_kwargs,
        ).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code, **hub_kwargs)
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = _read_chat_template(model, **hub_kwargs)
        return cls(net, tokenizer, PixelSpec.from_checkpoint(model, **hub_kwargs), str(model))

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def image_size(self) -> int:
        return self.pixel_spec.size

    @property
    def language_model(self):
        """The Qwen2 decoder stack (``Qwen2Model``)."""
        return self.model.model.language_model

    @property
    def lm_head(self):
        return self.model.lm_head

    # ------------------------------------------------------------------ vision
    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """``[F, H, W, 3]`` uint8 -> ``[F, 3, S, S]`` in the model dtype, on the model device (copied without a host
        synchronisation: asynchronous from pinned memory, see ``pipeline.stages``)."""
        return preprocess_frames(frames.to(self.device, non_blocking=True), self.pixel_spec, self.dtype)

    @torch.inference_mode()
    def video_features(self, pixels: torch.Tensor, saliency: bool = False):
        """``[B, F, 3, S, S]`` pixels -> ``[B, F, T, D]`` per-frame visual tokens, exactly as the model computes them.

        With ``saliency=True`` returns ``(features, saliency [B, F, T] fp32)``: the attention each patch
        receives in the feature layer, pooled to T like the features.
        """
        b, f = pixels.shape[:2]
        if saliency:
            with self.saliency_probe.capture() as captured:
                feats = self.video_features(pixels)
            pooled = self.model.model.apply_pooling(captured.value[..., None])  # [B*F, T, 1]
            return feats, pooled.reshape(b, f, -1)
        out = self.model.model.get_video_features(pixels.to(self.device, self.dtype))
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        if isinstance(feats, (list, tuple)):
            feats = torch.stack(list(feats))
        t = self.tokens_per_frame
        feats = feats.reshape(b, -1, feats.shape[-1])
        if feats.shape[1] == f * t + 1:  # newer transformers append the newline embedding
            feats = feats[:, :-1]
        return feats.reshape(b, f, t, -1)

    @torch.inference_mode()
    def encode(self, videos: list[torch.Tensor], config: DyCokeConfig) -> list[VisualTokens]:
        """Encode and compress a batch of videos (each ``[F_i, H, W, 3]`` uint8; F may differ).

        Videos with the same frame count are run through the vision tower together.
        """
        out: list[VisualTokens | None] = [None] * len(videos)
        groups: dict[int, list[int]] = {}
        for i, v in enumerate(videos):
            groups.setdefault(int(v.shape[0]), []).append(i)
        for idx in groups.values():
            pixels = torch.stack([self.preprocess(videos[i]) for i in idx])
            for i, vis in zip(idx, self.encode_pixels(pixels, config)):
                out[i] = vis
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor, config: DyCokeConfig) -> list[VisualTokens]:
        """``[B, F, 3, S, S]`` preprocessed pixels -> one :class:`VisualTokens` per video, compressed per ``config``.

        HoliTom spans differ in length from video to video; each video's result is independent of the batch.
        """
        n_frames = pixels.shape[1]
        holitom = config.ttm_enabled and config.ttm_method == "holitom"
        feats, sal = self.video_features(pixels, saliency=True) if holitom else (self.video_features(pixels), None)
        if holitom:  # feats [B, F, T, D], sal [B, F, T]
            merged = holitom_merge(feats, sal, config.holitom_retain_ratio, tau=config.holitom_tau,
                                   beta=config.holitom_beta, k=config.holitom_k, max_window=config.holitom_max_window)
        elif config.ttm_enabled:
            merged = temporal_merge(feats, config.prune_ratio_k, config.ttm_mode).tokens
        else:
            merged = feats.flatten(1, 2)
        newline = self.model.model.image_newline.to(self.dtype)[None]
        return [VisualTokens(tokens=torch.cat([m, newline], dim=0), num_full=n_frames * feats.shape[2],
                             num_kept=m.shape[0], num_frames=n_frames) for m in merged]

    # ------------------------------------------------------------------ prompts
    def prompt_ids(self, question: str, system_prompt: str | None = None) -> list[int]:
        """Token ids of the chat-templated prompt with exactly one ``<video>`` placeholder."""
        messages = []
        if system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
        messages.append({"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids.count(self.video_token_id) != 1:
            raise ValueError(f"chat template produced {ids.count(self.video_token_id)} video placeholders, expected 1")
        return ids


def _read_chat_template(model: str, **hub_kwargs) -> str:
    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        path = cached_file(model, name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        if path:
            text = Path(path).read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    raise FileNotFoundError(f"{model} has no chat template (tokenizer_config, chat_template.jinja or .json)")
