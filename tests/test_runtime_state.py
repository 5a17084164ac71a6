"""State that outlives one graph call: it follows the KV cache and is freed with it."""

import functools
import gc
import warnings
import weakref

import pytest
import torch
from helpers import compiled_greedy, greedy, reference_greedy

import avl_compile
from avl_compile.cache import generated_cache
from avl_compile.runtime import _LAYER_STATES
from avl_compile.tiny_models import IMAGE_TOKEN_ID, llava_prompt, tiny_llava


def test_nothing_leaks_across_100_generate_calls():
    gc.collect()
    before = len(_LAYER_STATES)  # caches another test may still hold (a failed test's frames)
    prompt = llava_prompt(tiny_llava(), [[1, 5]], [[7, 8]])
    model = compiled_greedy(tiny_llava, prompt.inputs, {"inner": "eager"}, new_tokens=2)[0]
    gc.collect()
    baseline = len(_LAYER_STATES)
    for _ in range(100):
        out = greedy(model, prompt.inputs, new_tokens=2)
        assert len(_LAYER_STATES) <= baseline + 3  # the live cache's layers, no more
    del out
    gc.collect()
    assert len(_LAYER_STATES) == before


def test_50_models_compiled_one_after_another_keep_only_the_live_backend():
    """Dynamo keeps every backend handed to torch.compile for good: it gets a weak handle,
    and each model's backend (its graph records, options, counters) dies with the model.
    Fifty models fit under the recompile limit the backend sets."""
    prompt = llava_prompt(tiny_llava(num_layers=1), [[1, 5]], [[7, 8]])
    backends = []
    for seed in range(50):
        model = avl_compile.compile(tiny_llava(seed, num_layers=1), options={"inner": "eager"})
        greedy(model, prompt.inputs, new_tokens=2)  # a prefill graph and a decode graph
        assert model._avl_backend.runtime.counters["decode_graphs_in_graph"] == 1
        backends.append(weakref.ref(model._avl_backend))
        gc.collect()
        assert [b() is not None for b in backends] == [False] * seed + [True]
    del model
    gc.collect()
    assert all(b() is None for b in backends)


def test_a_cache_the_backend_did_not_produce_is_a_clear_error():
    prompt = llava_prompt(tiny_llava(), [[1, 5]], [[7, 8]])
    model = compiled_greedy(tiny_llava, prompt.inputs, {"inner": "eager"}, new_tokens=2)[0]
    # beam search reorders the cache between steps: the compacted rows can't be matched
    with pytest.raises(RuntimeError, match="did not produce.*beam search"):
        model.generate(**prompt.inputs, max_new_tokens=4, num_beams=2, do_sample=False)


def test_an_image_mask_is_used_once_per_layer_then_is_stale():
    prompt = llava_prompt(tiny_llava(), [[1, 5]], [[7, 8]])
    model, _ = compiled_greedy(tiny_llava, prompt.inputs, {"inner": "eager"}, new_tokens=2)
    with torch.no_grad():
        model(**prompt.inputs)  # a prefill with no decode after it leaves its mask behind
    text_only = {
        "input_ids": torch.full_like(prompt.inputs["input_ids"], 9),
        "attention_mask": prompt.inputs["attention_mask"],
    }
    expected = greedy(tiny_llava(), text_only, new_tokens=4).sequences
    got = greedy(model, text_only, new_tokens=4)
    assert torch.equal(got.sequences, expected)
    full_length = text_only["input_ids"].shape[1] + 3
    assert all(layer.keys.shape[2] == full_length for layer in generated_cache(got).layers)


def test_a_dense_prefill_leaves_no_image_mask_for_the_next_prompt():
    # masks scattered in one prefill are merged (images, then video frames); a prompt that ran
    # dense must not leave its mask to be merged into the next prompt of the same shape
    make = functools.partial(tiny_llava, dtype=torch.float64)
    model = avl_compile.compile(make(), options={"inner": "eager"})
    first = llava_prompt(model, [[1, 5], [1, 5]], [[7, 8, 9, 10, 11, 12]] * 2)
    first.inputs["input_ids"][1][first.inputs["input_ids"][1] == IMAGE_TOKEN_ID] = 3
    first.inputs["pixel_values"] = first.inputs["pixel_values"][:1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # row 1 has no image: dense, with a warning
        greedy(model, first.inputs, 8)
    second = llava_prompt(model, [[1, 5, 6, 6, 6]] * 2, [[7, 8, 9]] * 2, seed=1)
    assert second.inputs["input_ids"].shape == first.inputs["input_ids"].shape
    got = greedy(model, second.inputs, 8).sequences
    assert torch.equal(got, reference_greedy(make, second.inputs, {}, 8))


def test_past_dynamos_recompile_limit_a_model_fails_instead_of_running_uncompiled(monkeypatch):
    # an uncompiled forward could run on a cache a compiled prefill compacted (wrong tokens,
    # silently): the backend makes reaching the limit an error
    import avl_compile.backend

    monkeypatch.setattr(avl_compile.backend, "RECOMPILE_LIMIT", 8)
    config = torch._dynamo.config
    saved = config.recompile_limit, config.fail_on_recompile_limit_hit
    config.recompile_limit, config.fail_on_recompile_limit_hit = 8, False
    prompt = llava_prompt(tiny_llava(), [[1, 5]], [[7, 8]])
    try:
        with pytest.raises(Exception, match="recompile_limit"):
            for _ in range(4):  # each model adds entries to the shared forward's cache
                model = avl_compile.compile(tiny_llava(), options={"inner": "eager"})
                greedy(model, prompt.inputs, new_tokens=3)
                assert model._avl_backend.runtime.counters["decode_graphs_in_graph"] == 2
    finally:
        config.recompile_limit, config.fail_on_recompile_limit_hit = saved
