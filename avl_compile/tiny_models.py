"""Tiny random vision-language models and prompts, for tests, examples and the debugging tool:
LLaVA-1.5 / LLaVA-NeXT (``llava_prompt``) and the other families of ``TINY_FAMILIES``
(``vlm_prompt``).

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


# --------------------------------------------------------------------------------------------
# Other families (issue 6). Each builder makes a tiny random model from transformers' own
# config classes: hidden 64, 3 decoder layers, a 2-layer vision tower, a few dozen image
# tokens. ``vlm_prompt`` builds valid processor-free inputs for any of them.

VIDEO_TOKEN_ID = 251
VISION_START_ID, VISION_END_ID = 248, 249  # Qwen2-VL's <|vision_start|> / <|vision_end|>
IMAGE_BREAK_ID, IMAGE_END_ID = 246, 247  # Pixtral's [IMG_BREAK] / [IMG_END]
IMAGE = "image"
VIDEO = "video"

_TEXT_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 1024,
    "initializer_range": 0.1,  # peaked attention, as for tiny_llava
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_VISION_SIZES = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}


def _text_sizes(num_layers: int, **overrides) -> dict:
    return {**_TEXT_SIZES, "num_hidden_layers": num_layers, **overrides}


def _finish(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    model.eval()
    _sharpen_attention(model, 3.0)
    return model.to(dtype)


def tiny_llava_onevision(seed: int = 0, dtype: torch.dtype = torch.float32, num_layers: int = 3):
    """LLaVA-OneVision: SigLIP tower, anyres_max_9 images, pooled video frames, Qwen2 decoder.

    One image: base tile + one anyres tile (36 tokens); several images: base tile each (17);
    a 4-frame video: 4 x 2 x 2 pooled tokens + one newline (17), under a second placeholder id.
    """
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**_VISION_SIZES, image_size=16, patch_size=4),
        text_config=Qwen2Config(**_text_sizes(num_layers)),
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=VIDEO_TOKEN_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=[[16, 16], [16, 32], [32, 16]],
    )
    return _finish(LlavaOnevisionForConditionalGeneration(config), dtype)


def _qwen_vl_text(config_class, num_layers: int):
    # mrope_section splits head_dim / 2 = 8 rotary frequencies into temporal, height, width
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    return config_class(**_text_sizes(num_layers), rope_parameters=rope)


def tiny_qwen2_vl(seed: int = 0, dtype: torch.dtype = torch.float32, num_layers: int = 3):
    """Qwen2-VL: native-resolution ViT with 2x2 patch merging, 3-D rotary positions (M-RoPE)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLTextConfig
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig

    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        text_config=_qwen_vl_text(Qwen2VLTextConfig, num_layers),
        vision_config=Qwen2VLVisionConfig(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
    )
    return _finish(Qwen2VLForConditionalGeneration(config), dtype)


def tiny_qwen2_5_vl(seed: int = 0, dtype: torch.dtype = torch.float32, num_layers: int = 3):
    """Qwen2.5-VL: as Qwen2-VL, with window attention in the ViT (one full-attention block)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLTextConfig,
    )
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=_qwen_vl_text(Qwen2_5_VLTextConfig, num_layers),
        vision_config=Qwen2_5_VLVisionConfig(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=16,
            out_hidden_size=64,
            fullatt_block_indexes=[1],
        ),
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
    )
    return _finish(Qwen2_5_VLForConditionalGeneration(config), dtype)


def tiny_idefics3(seed: int = 0, dtype: torch.dtype = torch.float32, num_layers: int = 3):
    """Idefics3: SigLIP-like tower, pixel-shuffle connector (scale 2), Llama decoder; 36 tokens."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    torch.manual_seed(seed)
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(**_VISION_SIZES, image_size=48, patch_size=4),
        text_config=LlamaConfig(**_text_sizes(num_layers)),
        image_token_id=IMAGE_TOKEN_ID,
        scale_factor=2,
    )
    return _finish(Idefics3ForConditionalGeneration(config), dtype)


def tiny_smolvlm(seed: int = 0, dtype: torch.dtype = torch.float32, num_layers: int = 3):
    """SmolVLM: Idefics3's layout with its own classes; 36 image tokens."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

    torch.manual_seed(seed)
    config = SmolVLMConfig(
        vision_config=SmolVLMVisionConfig(**_VISION_SIZES, image_size=48, patch_size=4),
        text_config=LlamaConfig(**_text_sizes(num_layers)),
        image_token_id=IMAGE_TOKEN_ID,
        scale_factor=2,
    )
    return _finish(SmolVLMForConditionalGeneration(config), dtype)


GEMMA3_SLIDING_WINDOW = 16  # shorter than the prompts, so the window matters


def tiny_gemma3(seed: int = 0, dtype: torch.dtype = torch.float32, num_layers: int = 3):
    """Gemma3: SigLIP tower pooled to 36 tokens; decoder layers alternate full attention and
    sliding-window attention (window 16), images attend bidirectionally within their block.

    Layer 0 is a full-attention layer (real checkpoints start with sliding ones) so that its
    compacted cache is the one ``cache.get_seq_length()`` reports: the hard case for masks.
    Gemma3 normalises q and k per head (so sharpening the projections does nothing): a small
    ``query_pre_attn_scalar`` peaks the attention instead. Untied embeddings: Gemma's tied,
    sqrt(hidden)-scaled embeddings make a tiny random model repeat one token.
    """
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    layer_types = [
        "full_attention" if i % 2 == 0 else "sliding_attention" for i in range(num_layers)
    ]
    config = Gemma3Config(
        vision_config=SiglipVisionConfig(**_VISION_SIZES, image_size=48, patch_size=4),
        text_config=Gemma3TextConfig(
            **_text_sizes(num_layers),
            query_pre_attn_scalar=4,
            tie_word_embeddings=False,
            sliding_window=GEMMA3_SLIDING_WINDOW,
            layer_types=layer_types,
        ),
        mm_tokens_per_image=36,
        image_token_index=IMAGE_TOKEN_ID,
        boi_token_index=VISION_START_ID,
        eoi_token_index=VISION_END_ID,
        tie_word_embeddings=False,
    )
    return _finish(Gemma3ForConditionalGeneration(config), dtype)


def tiny_paligemma(seed: int = 0, dtype: torch.dtype = torch.float32, num_layers: int = 3):
    """PaliGemma: SigLIP tower (36 tokens), Gemma decoder, bidirectional image + prompt prefix
    (untied embeddings, as for Gemma3, so that the random model does not repeat one token)."""
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(**_VISION_SIZES, image_size=24, patch_size=4),
        text_config=GemmaConfig(**_text_sizes(num_layers)),
        image_token_index=IMAGE_TOKEN_ID,
        vocab_size=VOCAB_SIZE,
        projection_dim=64,
        hidden_size=64,
        tie_word_embeddings=False,
    )
    return _finish(PaliGemmaForConditionalGeneration(config), dtype)


def tiny_internvl(seed: int = 0, dtype: torch.dtype = torch.float32, num_layers: int = 3):
    """InternVL: InternViT tower, pixel shuffle (ratio 0.5), Qwen2 decoder; 36 tokens."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    torch.manual_seed(seed)
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(**_VISION_SIZES, image_size=48, patch_size=4),
        text_config=Qwen2Config(**_text_sizes(num_layers)),
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=36,
        downsample_ratio=0.5,
    )
    return _finish(InternVLForConditionalGeneration(config), dtype)


def tiny_mistral3(seed: int = 0, dtype: torch.dtype = torch.float32, num_layers: int = 3):
    """Mistral3: Pixtral tower, 2x2 patch merger, Mistral decoder; a 48x48 image is 6 rows of
    6 image tokens, each row closed by [IMG_BREAK] (the last by [IMG_END])."""
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralVisionConfig,
    )

    torch.manual_seed(seed)
    config = Mistral3Config(
        vision_config=PixtralVisionConfig(**_VISION_SIZES, image_size=48, patch_size=4),
        text_config=MistralConfig(**_text_sizes(num_layers), sliding_window=None),
        image_token_index=IMAGE_TOKEN_ID,
        spatial_merge_size=2,
    )
    return _finish(Mistral3ForConditionalGeneration(config), dtype)


TINY_FAMILIES = {
    "llava": tiny_llava,
    "llava_next": tiny_llava_next,
    "llava_onevision": tiny_llava_onevision,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "idefics3": tiny_idefics3,
    "smolvlm": tiny_smolvlm,
    "gemma3": tiny_gemma3,
    "paligemma": tiny_paligemma,
    "internvl": tiny_internvl,
    "mistral3": tiny_mistral3,
}

Segment = list[int] | str  # text token ids, or IMAGE / VIDEO


def vlm_prompt(model, segments: list[Segment], seed: int = 0) -> TinyPrompt:
    """A batch of one: text segments and IMAGE / VIDEO placeholders in order, with random
    pixels and the extra inputs (grids, sizes, token types) the family's processor would give.

    ``image_tokens`` counts every visual placeholder token (image and video ones).
    """
    generator = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    kinds = [s for s in segments if isinstance(s, str)]
    if any(k not in (IMAGE, VIDEO) for k in kinds):
        raise ValueError(f"unknown segment kind in {kinds}")
    build = _VISUAL_INPUTS.get(model.config.model_type)
    if build is None:
        raise ValueError(f"no tiny prompt builder for {model.config.model_type!r}")
    if VIDEO in kinds and model.config.model_type not in _VIDEO_FAMILIES:
        raise ValueError(f"{model.config.model_type} takes no video")

    def pixels(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype)

    blocks, extra = build(model, kinds, pixels)
    blocks = iter(blocks)
    ids: list[int] = []
    for segment in segments:
        ids += next(blocks) if isinstance(segment, str) else segment
    input_ids = torch.tensor([ids])
    visual = (input_ids == IMAGE_TOKEN_ID) | (input_ids == VIDEO_TOKEN_ID)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **extra}
    if model.config.model_type in ("qwen2_vl", "qwen2_5_vl"):
        # M-RoPE needs the modality of each token: text 0, image 1, video 2
        types = (input_ids == IMAGE_TOKEN_ID).int() + 2 * (input_ids == VIDEO_TOKEN_ID).int()
        inputs["mm_token_type_ids"] = types
    elif model.config.model_type == "gemma3":
        inputs["token_type_ids"] = visual.long()  # image blocks attend bidirectionally
    elif model.config.model_type == "paligemma":
        inputs["token_type_ids"] = torch.zeros_like(input_ids)  # the whole prompt is prefix
    return TinyPrompt(inputs=inputs, image_tokens=int(visual.sum()))


def _onevision_inputs(model, kinds: list[str], pixels) -> tuple[list[list[int]], dict]:
    # Token counts come from the model's own feature packing (anyres unpadding, newlines).
    size = model.config.vision_config.image_size
    n_images = kinds.count(IMAGE)
    if kinds.count(VIDEO) > 1:
        raise ValueError("one video per prompt")
    extra: dict = {}
    image_counts: list[int] = []
    video_count = 0
    with torch.no_grad():
        if n_images:
            # one image: base tile + one anyres tile; several: base tile each (as the processor)
            tiles = 2 if n_images == 1 else 1
            extra["pixel_values"] = pixels(n_images, tiles, 3, size, size)
            extra["image_sizes"] = torch.tensor([[size, size]] * n_images)
            extra["batch_num_images"] = torch.tensor([n_images])
            features = model.model.get_image_features(
                extra["pixel_values"], extra["image_sizes"], batch_num_images=[n_images]
            ).pooler_output
            image_counts = [f.shape[0] for f in features]
        if VIDEO in kinds:
            extra["pixel_values_videos"] = pixels(1, 4, 3, size, size)
            features = model.model.get_video_features(extra["pixel_values_videos"]).pooler_output
            video_count = features.shape[1]
    counts = iter(image_counts)
    blocks = [
        [IMAGE_TOKEN_ID] * next(counts) if k == IMAGE else [VIDEO_TOKEN_ID] * video_count
        for k in kinds
    ]
    return blocks, extra


def _qwen_vl_inputs(model, kinds: list[str], pixels) -> tuple[list[list[int]], dict]:
    # Flattened patches (t x h x w rows of C*T*P*P values) and their grid; each 2x2 group of
    # patches becomes one token. Images are one temporal patch of 12x12, videos two of 8x8.
    vision = model.config.vision_config
    merge = vision.spatial_merge_size
    row = 3 * vision.temporal_patch_size * vision.patch_size**2
    grids = {IMAGE: [1, 12, 12], VIDEO: [2, 8, 8]}
    blocks: list[list[int]] = []
    values: dict[str, list[torch.Tensor]] = {IMAGE: [], VIDEO: []}
    for kind in kinds:
        t, h, w = grids[kind]
        values[kind].append(pixels(t * h * w, row))
        token = IMAGE_TOKEN_ID if kind == IMAGE else VIDEO_TOKEN_ID
        blocks.append([VISION_START_ID] + [token] * (t * h * w // merge**2) + [VISION_END_ID])
    extra: dict = {}
    if values[IMAGE]:
        extra["pixel_values"] = torch.cat(values[IMAGE])
        extra["image_grid_thw"] = torch.tensor([grids[IMAGE]] * len(values[IMAGE]))
    if values[VIDEO]:
        extra["pixel_values_videos"] = torch.cat(values[VIDEO])
        extra["video_grid_thw"] = torch.tensor([grids[VIDEO]] * len(values[VIDEO]))
    return blocks, extra


def _square_image_inputs(model, kinds: list[str], pixels) -> tuple[list[list[int]], dict]:
    """Idefics3 / SmolVLM, Gemma3, PaliGemma, InternVL, Mistral3: fixed-size square images."""
    config = model.config
    kind = config.model_type
    size = config.vision_config.image_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = config.vision_config.patch_size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    n_images = len(kinds)
    side = size // patch  # patches per side
    extra: dict = {}
    if kind in ("idefics3", "smolvlm"):
        extra["pixel_values"] = pixels(1, n_images, 3, size, size)  # [batch, images, ...]
        count = (side // config.scale_factor) ** 2
    elif kind == "gemma3":
        extra["pixel_values"] = pixels(n_images, 3, size, size)
        count = config.mm_tokens_per_image
    elif kind == "paligemma":
        extra["pixel_values"] = pixels(n_images, 3, size, size)
        count = side**2
    elif kind == "internvl":
        extra["pixel_values"] = pixels(n_images, 3, size, size)
        count = int(side * config.downsample_ratio) ** 2
    else:  # mistral3: rows of merged patches, each row closed by [IMG_BREAK], last by [IMG_END]
        extra["pixel_values"] = pixels(n_images, 3, size, size)
        extra["image_sizes"] = torch.tensor([[size, size]] * n_images)
        rows = side // config.spatial_merge_size
        block = ([IMAGE_TOKEN_ID] * rows + [IMAGE_BREAK_ID]) * rows
        return [block[:-1] + [IMAGE_END_ID]] * n_images, extra
    if kind == "paligemma":
        return [[IMAGE_TOKEN_ID] * count] * n_images, extra  # PaliGemma has no image markers
    return [[VISION_START_ID] + [IMAGE_TOKEN_ID] * count + [VISION_END_ID]] * n_images, extra


_VISUAL_INPUTS = {
    "llava_onevision": _onevision_inputs,
    "qwen2_vl": _qwen_vl_inputs,
    "qwen2_5_vl": _qwen_vl_inputs,
    "idefics3": _square_image_inputs,
    "smolvlm": _square_image_inputs,
    "gemma3": _square_image_inputs,
    "paligemma": _square_image_inputs,
    "internvl": _square_image_inputs,
    "mistral3": _square_image_inputs,
}
_VIDEO_FAMILIES = ("llava_onevision", "qwen2_vl", "qwen2_5_vl")
