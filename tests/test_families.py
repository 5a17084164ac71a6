"""The backend on the other vision-language families (issue 6), tiny random models built from
transformers' config classes (``avl_compile.tiny_models``), through ``generate``:

1. every budget at 100% (float32): the compiled model generates exactly the uncompiled tokens;
2. default options (float64): the compiled model generates exactly what the eager reference
   policy does, every decoder layer went through the policy and the cache is the planned size;
3. prompts with two images, with a video, and with an image and a video (LLaVA-OneVision,
   Qwen2-VL, Qwen2.5-VL), likewise.

Gemma3's sliding-window layers stay dense (their cache keeps only a window of rows, so the
compiled graph writes back a slice, not the cache concat); its oracle is the reference policy
on the full-attention layers and plain attention on the sliding ones.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import compiled_greedy, greedy
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from avl_compile import kv_rows_in_use
from avl_compile.cache import generated_cache
from avl_compile.options import AvlOptions
from avl_compile.passes.find_attention_sites import NOT_DECODER_REASON
from avl_compile.policies.budgets import fraction_count, text_budget
from avl_compile.reference import AvlReference, reference_attention, reference_generate
from avl_compile.tiny_models import (
    GEMMA3_SLIDING_WINDOW,
    IMAGE,
    IMAGE_TOKEN_ID,
    TINY_FAMILIES,
    VIDEO,
    VIDEO_TOKEN_ID,
    Segment,
    vlm_prompt,
)

NEW_TOKENS = 12
FULL = {"vision_keep": 1.0, "vision_compute": 1.0, "text_keep": 1.0, "inner": "eager"}
DEFAULT = {"inner": "eager"}
FAMILIES = [
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "idefics3",
    "smolvlm",
    "gemma3",
    "paligemma",
    "internvl",
    "mistral3",
]
VIDEO_FAMILIES = ["llava_onevision", "qwen2_vl", "qwen2_5_vl"]


def _one_image(family: str) -> list[Segment]:
    if family == "paligemma":  # PaliGemma's layout: image(s) first, then BOS and the prompt
        return [IMAGE, [1, 5, 6, 7, 8, 9, 10]]
    return [[1, 5, 6], IMAGE, [7, 8, 9, 10]]


def _two_images(family: str) -> list[Segment]:
    if family == "paligemma":
        return [IMAGE, IMAGE, [1, 5, 6, 7, 8, 9, 10]]
    return [[1, 5, 6], IMAGE, [7, 8], IMAGE, [9, 10]]


def _maker(family: str, dtype: torch.dtype):
    return functools.partial(TINY_FAMILIES[family], dtype=dtype)


def _policy_layers(model) -> list[int]:
    """Decoder layers the policy runs on: all but sliding-window ones (Gemma3), left dense."""
    text = model.config.get_text_config()
    types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    return [i for i, kind in enumerate(types) if kind != "sliding_attention"]


class _SlidingLayersDense(AvlReference):
    """The reference policy on full-attention layers; sliding-window layers attend densely
    within their window, as the compiled model leaves them."""

    def attention(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        if getattr(module, "is_sliding", False):
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, scaling=scaling, **kwargs
            )
        return super().attention(module, query, key, value, attention_mask, scaling, **kwargs)


def _reference(make, inputs: dict, options: dict) -> torch.Tensor:
    model = make()
    generate_kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    if model.config.model_type != "gemma3":
        return reference_generate(model, inputs, options, **generate_kwargs)
    image_mask = inputs["input_ids"] == model.config.image_token_id
    reference = _SlidingLayersDense(AvlOptions.from_mapping(options), image_mask)
    with reference_attention(model, reference):
        return model.generate(**inputs, **generate_kwargs)


def _planned_cache_rows(input_ids: torch.Tensor, options: dict) -> int:
    """sink + floor(S * N) + text budget, as planned for A-VL at the end of generation."""
    opts = AvlOptions.from_mapping(options)
    ids = input_ids[0]
    visual = (ids == IMAGE_TOKEN_ID) | (ids == VIDEO_TOKEN_ID)
    first = int(visual.int().argmax())
    n_visual = int(visual.sum())
    # text after the first image, plus the generated tokens (the last never enters the cache)
    n_text = int((~visual[first:]).sum()) + NEW_TOKENS - 1
    kept_text = min(n_text, text_budget(n_text, opts.text_keep, opts.text_min_budget))
    return first + fraction_count(opts.vision_keep, n_visual) + kept_text


def _check_policy_ran(model, out, input_ids: torch.Tensor, options: dict) -> None:
    policy_layers = _policy_layers(model)
    counters = model._avl_backend.runtime.counters
    assert counters["image_masks_recorded"] >= 1
    assert counters["prefill_sites"] == len(policy_layers)
    assert counters["decode_sites"] == len(policy_layers) * (NEW_TOKENS - 1)
    dense_rows = input_ids.shape[1] + NEW_TOKENS - 1
    planned = _planned_cache_rows(input_ids, options)
    in_use = kv_rows_in_use(generated_cache(out))
    for i, layer in enumerate(generated_cache(out).layers):
        if i in policy_layers:
            assert in_use[i] == planned < dense_rows, f"layer {i}"
        else:  # a sliding-window layer: HF's own window cache, untouched
            assert layer.keys.shape[2] == in_use[i] == GEMMA3_SLIDING_WINDOW - 1, f"layer {i}"


def _check_sites(model) -> None:
    """Every decoder site is rewritten but sliding-window ones, which stay dense with the
    reason recorded; vision-tower attention is left dense by design."""
    policy_layers = _policy_layers(model)
    sites = [site for record in model._avl_backend.graphs for site in record.sites]
    assert any(site.rewritable for site in sites)
    for site in sites:
        if site.reason == NOT_DECODER_REASON:
            continue  # no KV cache: the vision tower (counters show every decoder layer ran)
        if site.layer_idx in policy_layers:
            assert site.rewritable, (site.name, site.reason)
        else:  # Gemma3's window cache writes back a slice of the concat, not the concat
            assert site.reason is not None and "not written back" in site.reason, site.name


def _skip_unless_scattered(model) -> None:
    """Older transformers (5.17) merge SmolVLM's image features with torch.where, not
    masked_scatter: the image-mask pass finds no image, so the model runs dense (warned)."""
    if model._avl_backend.runtime.counters["image_masks_recorded"] == 0:
        pytest.skip("this transformers does not masked_scatter the image features: ran dense")


def _skip_if_the_model_rejects(make, inputs) -> None:
    """The tiny prompts follow transformers 5.24's token counts; older ones may differ."""
    try:
        greedy(make(), inputs, 2)
    except ValueError as error:
        pytest.skip(f"this transformers rejects the tiny prompt without avl: {error}")


@pytest.mark.parametrize("family", FAMILIES)
def test_full_budgets_generate_exactly_the_uncompiled_tokens(family):
    make = _maker(family, torch.float32)
    prompt = vlm_prompt(make(), _one_image(family))
    expected = greedy(make(), prompt.inputs, NEW_TOKENS).sequences
    model, got = compiled_greedy(make, prompt.inputs, FULL, NEW_TOKENS)
    assert torch.equal(got.sequences, expected)  # dense or not, exactly the uncompiled tokens
    _skip_unless_scattered(model)
    counters = model._avl_backend.runtime.counters
    assert counters["prefill_sites"] == len(_policy_layers(model))
    assert counters["decode_sites"] == len(_policy_layers(model)) * (NEW_TOKENS - 1)
    _check_sites(model)
    if family == "gemma3":
        assert prompt.inputs["input_ids"].shape[1] > GEMMA3_SLIDING_WINDOW, "window must matter"
        assert len(_policy_layers(model)) < model.config.text_config.num_hidden_layers


@pytest.mark.parametrize("family", FAMILIES)
def test_default_options_match_the_reference_and_shrink_the_cache(family):
    make = _maker(family, torch.float64)
    prompt = vlm_prompt(make(), _one_image(family))
    model, got = compiled_greedy(make, prompt.inputs, DEFAULT, NEW_TOKENS)
    _skip_unless_scattered(model)
    assert torch.equal(got.sequences, _reference(make, prompt.inputs, DEFAULT))
    _check_policy_ran(model, got, prompt.inputs["input_ids"], DEFAULT)


# SmolVLM's modelling is generated from Idefics3's, and Qwen2.5-VL's decoder side (placeholder
# mask, image M-RoPE positions) is Qwen2-VL's: one of each pair is enough here, to save time
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("smolvlm", "qwen2_5_vl")])
def test_two_image_prompts_match_the_reference(family):
    make = _maker(family, torch.float64)
    prompt = vlm_prompt(make(), _two_images(family))
    assert prompt.image_tokens >= 2 * 17
    model, got = compiled_greedy(make, prompt.inputs, DEFAULT, NEW_TOKENS)
    assert torch.equal(got.sequences, _reference(make, prompt.inputs, DEFAULT))
    _check_policy_ran(model, got, prompt.inputs["input_ids"], DEFAULT)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_prompts_match_the_reference(family):
    make = _maker(family, torch.float64)
    prompt = vlm_prompt(make(), [[1, 5, 6], VIDEO, [7, 8, 9, 10]])
    assert (prompt.inputs["input_ids"] == VIDEO_TOKEN_ID).sum() == prompt.image_tokens
    _skip_if_the_model_rejects(make, prompt.inputs)
    model, got = compiled_greedy(make, prompt.inputs, DEFAULT, NEW_TOKENS)
    assert torch.equal(got.sequences, _reference(make, prompt.inputs, DEFAULT))
    _check_policy_ran(model, got, prompt.inputs["input_ids"], DEFAULT)


# Image and video features are scattered by two masked_scatter calls in two graphs (a graph
# break between them): the runtime must merge the two recorded masks of one prefill, or the
# image is neither scored nor evicted (it joins the sink before the first video token).
@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_image_and_video_in_one_prompt_match_the_reference(family):
    make = _maker(family, torch.float64)
    prompt = vlm_prompt(make(), [[1, 5, 6], IMAGE, [7, 8], VIDEO, [9, 10]])
    _skip_if_the_model_rejects(make, prompt.inputs)
    model, got = compiled_greedy(make, prompt.inputs, DEFAULT, NEW_TOKENS)
    assert torch.equal(got.sequences, _reference(make, prompt.inputs, DEFAULT))
    assert model._avl_backend.runtime.counters["image_masks_recorded"] == 2
    _check_policy_ran(model, got, prompt.inputs["input_ids"], DEFAULT)


def test_paligemma_prefix_is_bidirectional():
    """The exactness and reference tests above run PaliGemma with its bidirectional prefix
    (token_type_ids 0): check that it differs from causal attention over the same prompt."""
    model = TINY_FAMILIES["paligemma"]()
    inputs = vlm_prompt(model, _one_image("paligemma")).inputs
    causal = {**inputs, "token_type_ids": torch.ones_like(inputs["token_type_ids"])}
    with torch.no_grad():
        prefix_logits = model(**inputs).logits[0, -1]
        causal_logits = model(**causal).logits[0, -1]
    assert not torch.allclose(prefix_logits, causal_logits)
