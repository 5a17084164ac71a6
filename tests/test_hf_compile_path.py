"""HF's own compile path: ``generate(..., cache=AvlCache(), compile_config=CompileConfig(...))``
on a forward compiled with the avl backend. HF then runs the decode steps through its
compiled call; both oracles hold there, and the decode runs in the avl decode graphs. A
static cache is refused with an error that says what to use instead; a prompt prefilled
outside the backend decodes dense, with one warning."""

import functools
import warnings

import pytest
import torch
from helpers import greedy, reference_greedy
from transformers import CompileConfig

import avl_compile
from avl_compile import AvlCache
from avl_compile.cache import cache_argument
from avl_compile.options import AvlOptions, with_compile_mode
from avl_compile.tiny_models import llava_prompt, tiny_llava

PREFIX, SUFFIX = [1, 5, 6], [7, 8, 9, 10]
FULL = {"vision_keep": 1.0, "vision_compute": 1.0, "text_keep": 1.0}
NEW_TOKENS = 12


def _hf_compiled_greedy(model, inputs, **config):
    config = CompileConfig(backend="avl", **config)
    config._compile_all_devices = True  # transformers compiles on GPUs only by default
    return greedy(
        model, inputs, NEW_TOKENS, compile_config=config, **{cache_argument(model): AvlCache()}
    )


def _padded_prompt(model):
    return llava_prompt(model, [PREFIX, [1, 9]], [SUFFIX, [7, 8, 9, 10, 11, 12]])


def test_full_budgets_on_hf_compile_path_generate_the_uncompiled_tokens():
    prompt = _padded_prompt(tiny_llava())
    expected = greedy(tiny_llava(), prompt.inputs, NEW_TOKENS).sequences
    options = {**FULL, "inner": "aot_eager"}
    model = avl_compile.compile(tiny_llava(), options=options)
    got = _hf_compiled_greedy(model, prompt.inputs, mode=None, options=options)
    assert torch.equal(got.sequences, expected)
    assert hasattr(model, "_compiled_call"), "generate did not take HF's compile path"
    counters = model._avl_backend.runtime.counters
    assert counters["decode_graphs_in_graph"] == NEW_TOKENS - 1
    assert counters["decode_graphs_in_python"] == 0


@pytest.mark.parametrize("options", [{}, {"refresh_every": 1}, {"policy": "h2o"}], ids=str)
def test_hf_compile_path_matches_the_reference(options):
    make = functools.partial(tiny_llava, dtype=torch.float64)
    prompt = _padded_prompt(make())
    options = {"inner": "aot_eager", **options}
    model = avl_compile.compile(make(), options=options)
    got = _hf_compiled_greedy(model, prompt.inputs, mode=None, options=options)
    expected = reference_greedy(make, prompt.inputs, options, NEW_TOKENS)
    assert torch.equal(got.sequences, expected)
    dense = greedy(make(), prompt.inputs, NEW_TOKENS).sequences
    assert not torch.equal(got.sequences, dense), "the policy should change a random model's text"
    counters = model._avl_backend.runtime.counters
    assert counters["decode_graphs_in_graph"] == NEW_TOKENS - 1
    assert counters["decode_graphs_in_python"] == 0
    assert sum(record.decode_in_graph for record in model._avl_backend.graphs) == 1


def test_a_prompt_prefilled_outside_the_backend_decodes_dense_with_one_warning():
    prompt = _padded_prompt(tiny_llava())
    expected = greedy(tiny_llava(), prompt.inputs, NEW_TOKENS).sequences
    model = tiny_llava()  # not compiled: HF's compile path compiles the decode steps only
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # CompileConfig's default mode, "reduce-overhead", reaches the backend as `mode`
        got = _hf_compiled_greedy(model, prompt.inputs)
    assert torch.equal(got.sequences, expected)
    ours = [str(w.message) for w in caught if str(w.message).startswith("avl")]
    assert len(ours) == 1 and "prefilled outside the avl backend" in ours[0], ours
    assert "avl_compile.compile" in ours[0]


def test_static_cache_generate_is_refused_with_a_clear_error():
    model = avl_compile.compile(tiny_llava(), options={"inner": "eager"})
    prompt = llava_prompt(model, [[1, 5, 6]], [[7, 8, 9]])
    config = CompileConfig(backend="avl", options={"inner": "eager"}, mode=None)
    config._compile_all_devices = True
    with pytest.raises(Exception, match="static KV cache") as caught:
        model.generate(
            **prompt.inputs, max_new_tokens=4, do_sample=False,
            cache_implementation="static", compile_config=config,
        )  # fmt: skip
    assert "AvlCache" in str(caught.value)


def test_compile_modes_map_to_options_and_others_are_refused():
    assert with_compile_mode(AvlOptions(), "reduce-overhead").cudagraphs is True
    assert with_compile_mode(AvlOptions(), None) == AvlOptions()
    with pytest.raises(ValueError, match="mode='max-autotune'.*reduce-overhead"):
        with_compile_mode(AvlOptions(), "max-autotune")
