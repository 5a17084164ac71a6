"""The backend on tiny random LLaVA / LLaVA-NeXT through ``generate``: the two oracles.

1. every budget at 100%: the compiled model generates exactly what the uncompiled one does;
2. any budget: the compiled model generates exactly what the eager reference policy does.
The reference-equality tests run in float64 so that top-k selections cannot flip on
rounding differences between the two implementations.
"""

import functools
import warnings

import pytest
import torch
from helpers import NEW_TOKENS, compiled_greedy, greedy, reference_greedy, row_alone

from avl_compile import kv_rows_in_use
from avl_compile.cache import generated_cache
from avl_compile.policies.budgets import fraction_count, text_budget
from avl_compile.policies.decode_schedule import spare_slots
from avl_compile.tiny_models import llava_prompt, tiny_llava, tiny_llava_next

FULL = {"vision_keep": 1.0, "vision_compute": 1.0, "text_keep": 1.0}
FAMILIES = {"llava": tiny_llava, "llava_next": tiny_llava_next}
PREFIX, SUFFIX = [1, 5, 6], [7, 8, 9, 10]


def _maker(family: str, dtype=torch.float32):
    return functools.partial(FAMILIES[family], dtype=dtype)


@pytest.mark.parametrize(
    "family, inner", [("llava", "eager"), ("llava", "aot_eager"), ("llava_next", "aot_eager")]
)
def test_full_budgets_generate_exactly_the_uncompiled_tokens(family, inner):
    make = _maker(family)
    prompt = llava_prompt(make(), [PREFIX], [SUFFIX])
    expected = greedy(make(), prompt.inputs).sequences
    model, got = compiled_greedy(make, prompt.inputs, {**FULL, "inner": inner})
    assert torch.equal(got.sequences, expected)
    counters = model._avl_backend.runtime.counters
    layers = model.config.text_config.num_hidden_layers
    assert counters["prefill_sites"] == layers  # every decoder layer went through the policy
    assert counters["decode_sites"] == layers * (NEW_TOKENS - 1)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_default_options_match_the_reference_and_the_planned_cache_size(family):
    make = _maker(family, torch.float64)
    prompt = llava_prompt(make(), [PREFIX], [SUFFIX])
    options = {"inner": "eager"}
    model, got = compiled_greedy(make, prompt.inputs, options)
    expected = reference_greedy(make, prompt.inputs, options)
    assert torch.equal(got.sequences, expected)
    dense = greedy(make(), prompt.inputs).sequences
    assert not torch.equal(got.sequences, dense), "the policy should change a random model's text"

    n_image = prompt.image_tokens
    n_text = len(SUFFIX) + NEW_TOKENS - 1  # the last generated token never enters the cache
    planned = len(PREFIX) + fraction_count(0.5, n_image) + min(n_text, text_budget(n_text, 0.6, 20))
    assert kv_rows_in_use(generated_cache(got)) == [planned] * len(generated_cache(got).layers)
    for layer in generated_cache(got).layers:  # plus free rows for the next tokens
        assert (
            planned
            <= layer.keys.shape[2]
            == layer.values.shape[2]
            <= planned + 1 + spare_slots(planned + 1)
        )


@pytest.mark.skipif(
    torch.__version__.startswith("2.11") and not torch.cuda.is_available(),
    reason="torch 2.11's CPU Inductor miscompiles this model even without avl (CppCompileError)",
)
def test_inductor_matches_the_reference_on_prompts_of_two_lengths():
    make = _maker("llava", torch.float64)
    prompt = llava_prompt(make(), [PREFIX], [SUFFIX])
    model, got = compiled_greedy(make, prompt.inputs, {"inner": "inductor"})
    assert torch.equal(got.sequences, reference_greedy(make, prompt.inputs, {}))
    # a longer prompt makes Dynamo recompile with dynamic lengths: the pieces between the
    # sites then run on symbolic shapes (the LLaVA merge's masked_scatter among them)
    longer = llava_prompt(make(), [PREFIX + [5]], [SUFFIX + [11, 12]])
    again = greedy(model, longer.inputs)
    assert torch.equal(again.sequences, reference_greedy(make, longer.inputs, {}))


def _halve_scales(model):
    for module in model.modules():
        if hasattr(module, "scaling"):
            module.scaling = module.scaling * 0.5
    return model


def test_a_scale_changed_after_compiling_is_traced_again_as_a_number():
    # a float attribute that changed after its frame was traced (here every attention's
    # ``scaling``; in a process of several models, one seen by transformers' shared wrapper
    # frames) comes back from Dynamo as a symbolic float: the sites need a number
    make = _maker("llava", torch.float64)
    prompt = llava_prompt(make(), [PREFIX], [SUFFIX])
    model, _ = compiled_greedy(make, prompt.inputs, {"inner": "aot_eager"})
    _halve_scales(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = greedy(model, prompt.inputs)
    assert not [w for w in caught if "avl" in str(w.message)], "no site may fall back to dense"
    expected = reference_greedy(lambda: _halve_scales(make()), prompt.inputs, {})
    assert torch.equal(got.sequences, expected)
    assert not torch.equal(expected, reference_greedy(make, prompt.inputs, {}))


@pytest.mark.parametrize(
    "options",
    [
        {"refresh_every": -1},
        {"refresh_every": 1},
        {"vision_keep": 0.3, "vision_compute": 0.1, "refresh_every": 2},
        {"text_keep": 0.2, "text_min_budget": 2},
        {"text_keep": 0.3, "text_min_budget": 1, "text_heavy_share": 0.0},
        {"prefill_filter_keep": 0.6, "prefill_filter_layer": 1},
        {"prefill_filter_keep": 0.5, "vision_keep": 0.5, "vision_compute": 0.2},
    ],
)
def test_options_match_the_reference(options):
    make = _maker("llava", torch.float64)
    prompt = llava_prompt(make(), [PREFIX], [SUFFIX])
    _, got = compiled_greedy(make, prompt.inputs, {**options, "inner": "eager"})
    assert torch.equal(got.sequences, reference_greedy(make, prompt.inputs, options))


def test_prefill_filter_changes_the_prefill():
    make = _maker("llava", torch.float64)
    prompt = llava_prompt(make(), [PREFIX], [SUFFIX])
    without = reference_greedy(make, prompt.inputs, {}, new_tokens=8)
    with_filter = reference_greedy(
        make, prompt.inputs, {"prefill_filter_keep": 0.5, "prefill_filter_layer": 1}, 8
    )
    assert not torch.equal(without, with_filter)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_batch_rows_with_left_padding_are_independent(family):
    make = _maker(family, torch.float64)
    prompt = llava_prompt(make(), [[1, 5, 6], [1, 9]], [[7, 8, 9, 10], [7, 8, 9, 10, 11, 12, 13]])
    assert (prompt.inputs["attention_mask"] == 0).any(), "the test needs left padding"
    options = {"inner": "eager"}
    _, batched = compiled_greedy(make, prompt.inputs, options)
    assert torch.equal(batched.sequences, reference_greedy(make, prompt.inputs, options))
    for row in range(2):
        _, alone = compiled_greedy(make, row_alone(prompt.inputs, row), options)
        assert torch.equal(alone.sequences[0, -NEW_TOKENS:], batched.sequences[row, -NEW_TOKENS:])


def test_second_generate_starts_fresh_and_models_do_not_disturb_each_other():
    make = _maker("llava", torch.float64)
    first = llava_prompt(make(), [PREFIX], [SUFFIX], seed=1)
    second = llava_prompt(make(), [[1, 4]], [[7, 8, 9, 10, 11, 12]], seed=2)
    options = {"inner": "eager"}
    expected_first = reference_greedy(make, first.inputs, options)
    expected_second = reference_greedy(make, second.inputs, options)
    _, model_a_first = compiled_greedy(make, first.inputs, options)
    model_a = _
    model_b, model_b_second = compiled_greedy(make, second.inputs, options)
    model_a_second = greedy(model_a, second.inputs)  # same model, new image and prompt
    model_b_first = greedy(model_b, first.inputs)
    assert torch.equal(model_a_first.sequences, expected_first)
    assert torch.equal(model_b_second.sequences, expected_second)
    assert torch.equal(model_a_second.sequences, expected_second)
    assert torch.equal(model_b_first.sequences, expected_first)


def test_recompiles_per_generate_stay_bounded():
    make = _maker("llava")
    model, _ = compiled_greedy(
        make, llava_prompt(make(), [PREFIX], [SUFFIX]).inputs, {"inner": "eager"}
    )
    graphs = model._avl_backend.graphs
    first = len(graphs)
    # LLaVA's graph break splits prefill into 4 graphs (7 with transformers 5.17, whose
    # vision tower compiles separately); decode steps 1 and 2, then dynamic
    assert first <= 9
    # prefill + one decode graph, 3 layers: the cache keeps its length between steps and
    # its length is dynamic from the first decode graph on
    assert sum(g.rewritten for g in graphs) == 2 * 3
    assert sum(g.decode_in_graph for g in graphs) == 1
    greedy(model, llava_prompt(make(), [[1, 2, 3, 4, 5]], [[7, 8, 9]], seed=3).inputs, 40)
    second = len(graphs)
    assert second - first <= 4  # the prompt-length dimension goes dynamic once
    greedy(model, llava_prompt(make(), [[1, 2]], [[7, 8, 9, 5, 5, 5, 5]], seed=4).inputs, 40)
    assert len(graphs) == second  # a third prompt length compiles nothing new


def test_bad_options_raise_through_torch_compile():
    model = tiny_llava()
    prompt = llava_prompt(model, [PREFIX], [SUFFIX])
    model.forward = torch.compile(model.forward, backend="avl", options={"vision_compute": 0.9})
    with pytest.raises(Exception, match=r"vision_compute=0\.9.*vision_keep=0\.5") as error:
        greedy(model, prompt.inputs, new_tokens=2)
    assert isinstance(getattr(error.value, "inner_exception", error.value), ValueError)


def test_helper_raises_value_error_at_once():
    import avl_compile

    with pytest.raises(ValueError, match="text_keep=0"):
        avl_compile.compile(tiny_llava(), options={"text_keep": 0})


def test_the_readme_pattern_compiles_the_forward_that_generate_calls():
    model = tiny_llava()
    prompt = llava_prompt(model, [PREFIX], [SUFFIX])
    model.forward = torch.compile(
        model.forward, backend="avl",
        options={"vision_keep": 0.5, "vision_compute": 0.3, "refresh_every": 3, "text_keep": 0.6,
                 "inner": "eager"},
    )  # fmt: skip
    out = greedy(model, prompt.inputs, new_tokens=4)
    prompt_len = prompt.inputs["input_ids"].shape[1]
    assert all(layer.keys.shape[2] < prompt_len for layer in generated_cache(out).layers)


def test_the_module_compile_form_reaches_generate_and_the_wrapping_form_does_not():
    """``model.compile(backend="avl", options=...)`` (nn.Module.compile) is what generate
    runs; ``torch.compile(model, backend="avl").generate`` runs the plain model (PyTorch
    hands ``generate`` to the original module), as the README says."""
    make = functools.partial(tiny_llava, dtype=torch.float64)
    prompt = llava_prompt(make(), [PREFIX], [SUFFIX])
    options = {"inner": "eager"}
    dense = greedy(make(), prompt.inputs, 12).sequences
    model = make()
    model.compile(backend="avl", options=options)
    got = greedy(model, prompt.inputs, 12).sequences
    assert torch.equal(got, reference_greedy(make, prompt.inputs, options, 12))
    assert not torch.equal(got, dense)
    wrapped = torch.compile(make(), backend="avl", options=options)
    assert torch.equal(greedy(wrapped, prompt.inputs, 12).sequences, dense)
