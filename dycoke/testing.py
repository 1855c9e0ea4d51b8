"""Tiny random-weight LLaVA-OneVision checkpoints for tests, benchmarks and the demo.

No machine this project is developed on can download weights, so tests build a small model of the
*real* architecture (SigLIP vision tower + projector + Qwen2 LLM), save it in Hugging Face layout with
``save_pretrained`` (config, safetensors, tokenizer with a chat template, preprocessor config) and load
it back through the same path real checkpoints take (:func:`dycoke.llava.VideoLLM.load`).

The tokenizer is a small byte-level BPE trained on the fly; its text output is meaningless.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

# A Qwen-style chat template with LLaVA content items: {"type": "video"} renders the <video> placeholder.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'video' %}<video>\n{% elif item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "Describe the video in detail.",
    "What is happening in this video? Answer with a short sentence.",
    "Which option best describes the scene? Answer with the option's letter.",
    "A person walks across the room, picks up a red ball and throws it to a dog.",
    "The camera pans over a city street at night; cars pass and lights blink.",
    "Options: (A) cooking (B) dancing (C) driving (D) reading. The answer is A.",
    "You are a helpful assistant. The user asks about the frames of a short clip.",
]


def build_tiny_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer with the special tokens and chat template of a LLaVA-OneVision checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<image>", "<video>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
    )


def tiny_config(tokenizer, *, image_size: int = 56, patch_size: int = 14, hidden: int = 64, layers: int = 4,
                heads: int = 4, kv_heads: int = 2, vision_hidden: int = 32, vision_layers: int = 2):
    """A :class:`LlavaOnevisionConfig` of the real architecture at toy sizes.

    ``image_size / patch_size`` patches per side, pooled 2x2 by the model: the default gives
    ``ceil(4 / 2) ** 2 = 4`` visual tokens per frame.
    """
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vocab = len(tokenizer)
    text = Qwen2Config(
        vocab_size=vocab + (-vocab % 64),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    vision = SiglipVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 2,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )
    return LlavaOnevisionConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=[[image_size, image_size]],
        tie_word_embeddings=False,
    )


def build_tiny_checkpoint(path: str | Path, *, seed: int = 0, image_size: int = 56, **config_kwargs) -> Path:
    """Build, randomly initialise and save a tiny LLaVA-OneVision checkpoint under ``path``; return the path.

    Safe to call twice: an existing complete checkpoint is left as it is.
    """
    from transformers import LlavaOnevisionForConditionalGeneration

    path = Path(path)
    marker = path / "config.json"
    if marker.exists() and (path / "tokenizer_config.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    config = tiny_config(tokenizer, image_size=image_size, **config_kwargs)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    # Larger-than-default init so the tiny model's greedy choices are far from ties.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.normal_(0.0, 0.2)
    save_checkpoint(model, tokenizer, path, image_size)
    log.info("wrote tiny LLaVA-OneVision checkpoint to %s", path)
    return path


def save_checkpoint(model, tokenizer, path: str | Path, image_size: int,
                    mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
                    std: tuple[float, float, float] = (0.5, 0.5, 0.5)) -> Path:
    """Save a ``LlavaOnevisionForConditionalGeneration`` in the Hugging Face layout the real loading path reads.

    Writes config + safetensors (``save_pretrained``), the tokenizer with its chat template, and a
    ``preprocessor_config.json`` (square side ``image_size``, per-channel ``mean`` / ``std``, 1/255 rescale),
    which :meth:`dycoke.llava.PixelSpec.from_checkpoint` reads. Returns ``path``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    preprocessor = {
        "image_processor_type": "LlavaOnevisionImageProcessor",
        "size": {"height": image_size, "width": image_size},
        "image_mean": list(mean),
        "image_std": list(std),
        "rescale_factor": 1 / 255,
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "resample": 3,
    }
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return path
