"""Tiny random LLaVA-family models and prompts, for tests, examples and the debugging tool.

No weights are downloaded: models are built from transformers' own config classes. The
attention projections get a larger init than HF's default so that attention is peaked
enough for selection (top-k) to be meaningful rather than a coin toss among near-ties.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

IMAGE_TOKEN_ID = 250
VOCAB_SIZE = 256


@dataclasses.dataclass
class TinyPrompt:
    inputs: dict  # keyword arguments for generate / forward
    image_tokens: int  # N per prompt


def _text_config(num_layers: int = 3) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _vision_config(image_size: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=4,
        projection_dim=32,
    )


def _sharpen_attention(model: torch.nn.Module, gain: float) -> None:
    for name, param in model.named_parameters():
        if "language_model" in name and ("q_proj" in name or "k_proj" in name):
            with torch.no_grad():
                param.mul_(gain)


def tiny_llava(seed: int = 0, dtype: torch.dtype = torch.float32, num_layers: int = 3):
    """LLaVA-1.5 layout: CLIP tower, 2-layer MLP projector, Llama decoder; 64 image tokens."""
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=_vision_config(image_size=32),
        text_config=_text_config(num_layers),
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    config.text_config.initializer_range = 0.1
    model = LlavaForConditionalGeneration(config).eval()
    _sharpen_attention(model, 3.0)
    return model.to(dtype)


def tiny_llava_next(seed: int = 0, dtype: torch.dtype = torch.float32, num_layers: int = 3):
    """LLaVA-NeXT layout: anyres tiles plus image-newline tokens inside the image block."""
    torch.manual_seed(seed)
    config = LlavaNextConfig(
        vision_config=_vision_config(image_size=16),
        text_config=_text_config(num_layers),
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[[16, 32], [32, 16]],
    )
    config.text_config.initializer_range = 0.1
    model = LlavaNextForConditionalGeneration(config).eval()
    _sharpen_attention(model, 3.0)
    return model.to(dtype)


def llava_prompt(
    model, batch_prefixes: list[list[int]], batch_suffixes: list[list[int]], seed: int = 0
) -> TinyPrompt:
    """Left-padded prompts ``prefix + <image>*N + suffix`` with one random image each."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    batch = len(batch_prefixes)
    dtype = next(model.parameters()).dtype
    if isinstance(model, LlavaNextForConditionalGeneration):
        size = config.vision_config.image_size
        image_size = torch.tensor([[2 * size, size]] * batch)
        pixel_values = torch.randn(batch, 3, 3, size, size, generator=generator, dtype=dtype)
        extra = {"image_sizes": image_size}
        n_image = _llava_next_image_tokens(model, image_size[0].tolist())
    else:
        size = config.vision_config.image_size
        pixel_values = torch.randn(batch, 3, size, size, generator=generator, dtype=dtype)
        extra = {}
        n_image = (size // config.vision_config.patch_size) ** 2
    pairs = zip(batch_prefixes, batch_suffixes, strict=True)
    rows = [prefix + [IMAGE_TOKEN_ID] * n_image + suffix for prefix, suffix in pairs]
    width = max(map(len, rows))
    input_ids = torch.zeros(batch, width, dtype=torch.long)
    attention_mask = torch.zeros(batch, width, dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, width - len(row) :] = torch.tensor(row)
        attention_mask[b, width - len(row) :] = 1
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        **extra,
    }
    return TinyPrompt(inputs=inputs, image_tokens=n_image)


def _llava_next_image_tokens(model, image_size: list[int]) -> int:
    # The processor's token count for one anyres image: base tile + unpadded grid with one
    # image-newline token per row (LLaVA-NeXT's layout).
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    config = model.config
    patch = config.vision_config.image_size // config.vision_config.patch_size
    rows, cols = get_anyres_image_grid_shape(
        image_size, config.image_grid_pinpoints, config.vision_config.image_size
    )
    height, width = rows * patch, cols * patch
    original_h, original_w = image_size
    # unpad as LLaVA-NeXT does
    if original_w / original_h > width / height:
        new_h = int(round(original_h * (width / original_w), 7))
        pad = (height - new_h) // 2
        height = height - 2 * pad
    else:
        new_w = int(round(original_w * (height / original_h), 7))
        pad = (width - new_w) // 2
        width = width - 2 * pad
    return patch * patch + height * (width + 1)
