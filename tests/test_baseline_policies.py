"""The baselines (full, h2o, streaming, fastv, random) through the backend, against their own
eager references (float64, so that top-k choices cannot flip on rounding) and, at 100%
budgets, against the uncompiled model."""

import functools

import pytest
import torch
from helpers import NEW_TOKENS, compiled_greedy, greedy, reference_greedy

import avl_compile
from avl_compile.cache import generated_cache
from avl_compile.tiny_models import llava_prompt, tiny_llava

PREFIX, SUFFIX = [1, 5, 6], [7, 8, 9, 10]
BATCH_PREFIXES, BATCH_SUFFIXES = [[1, 5, 6], [1, 5]], [[7, 8, 9, 10], [7, 8, 9, 10, 11, 12]]
CASES = [
    {"policy": "full"},
    {"policy": "h2o"},
    {"policy": "h2o", "kv_budget": 0.3, "h2o_heavy_share": 0.5},
    {"policy": "streaming"},
    {"policy": "streaming", "kv_budget": 0.25, "streaming_sink": 2},
    {"policy": "fastv"},
    {"policy": "fastv", "kv_budget": 0.25, "prefill_filter_layer": 1},
    {"policy": "random"},
    {"policy": "random", "kv_budget": 0.1, "seed": 3},
]


def _id(case: dict) -> str:
    return "-".join(f"{v}" for v in case.values())


@pytest.mark.parametrize("options", CASES, ids=_id)
def test_compiled_matches_its_reference(options):
    make = functools.partial(tiny_llava, dtype=torch.float64)
    prompt = llava_prompt(make(), [PREFIX], [SUFFIX])
    _, got = compiled_greedy(make, prompt.inputs, {**options, "inner": "eager"})
    assert torch.equal(got.sequences, reference_greedy(make, prompt.inputs, options))


@pytest.mark.parametrize("policy", ["h2o", "streaming", "fastv", "random"])
def test_batch_with_left_padding_matches_the_reference(policy):
    make = functools.partial(tiny_llava, dtype=torch.float64)
    prompt = llava_prompt(make(), BATCH_PREFIXES, BATCH_SUFFIXES)
    options = {"policy": policy, "kv_budget": 0.4}
    _, got = compiled_greedy(make, prompt.inputs, {**options, "inner": "eager"}, 16)
    assert torch.equal(got.sequences, reference_greedy(make, prompt.inputs, options, 16))


@pytest.mark.parametrize("policy", ["full", "h2o", "streaming", "fastv", "random"])
def test_full_budget_generates_exactly_the_uncompiled_tokens(policy):
    prompt = llava_prompt(tiny_llava(), BATCH_PREFIXES, BATCH_SUFFIXES)
    expected = greedy(tiny_llava(), prompt.inputs, new_tokens=16).sequences
    options = {"policy": policy, "kv_budget": 1.0, "inner": "eager"}
    _, got = compiled_greedy(tiny_llava, prompt.inputs, options, 16)
    assert torch.equal(got.sequences, expected)


def _planned_rows(policy: str, layer: int, n_image: int, kv_budget: float = 0.5) -> int:
    """KV rows a layer holds after generate, from the policy's rules."""
    n_prompt = len(PREFIX) + n_image + len(SUFFIX)
    n_seen = n_prompt + NEW_TOKENS - 1  # the last generated token never enters the cache
    kept_images = n_prompt - n_image + int(kv_budget * n_image) + NEW_TOKENS - 1
    return {
        "full": n_seen,
        "h2o": int(kv_budget * n_seen),
        "streaming": int(kv_budget * n_seen),
        "fastv": n_seen if layer < 2 else kept_images,
        "random": kept_images,
    }[policy]


@pytest.mark.parametrize("policy", ["full", "h2o", "streaming", "fastv", "random"])
def test_cache_holds_the_planned_rows_and_attention_counts_them(policy):
    prompt = llava_prompt(tiny_llava(), [PREFIX], [SUFFIX])
    model, got = compiled_greedy(tiny_llava, prompt.inputs, {"policy": policy, "inner": "eager"})
    rows = avl_compile.kv_rows_in_use(generated_cache(got))
    planned = [_planned_rows(policy, i, prompt.image_tokens) for i in range(len(rows))]
    counters = model._avl_backend.runtime.counters
    if policy == "fastv" and rows != planned:
        # transformers that always pass an explicit mask (5.17) size it from layer 0's cache:
        # the later layers then keep that width, the dropped rows as empty slots
        assert rows == [planned[0]] * len(rows)
        dense_rows = counters["decode_sites"] * planned[0]
        assert counters["attended_rows"] < dense_rows - (NEW_TOKENS - 1) * (planned[0] - planned[2])
        planned = rows
    assert rows == planned
    assert counters["decode_sites"] == len(rows) * (NEW_TOKENS - 1)
    # the last step attends what the cache holds before eviction: at most one row more
    assert counters["attended_rows"] <= counters["decode_sites"] * (max(rows) + 1)
    assert counters["attended_rows"] > 0


def test_switched_options_never_run_another_policys_decode_graph():
    """A decode graph holds one policy's step: after set_options, a policy whose step it
    does not hold decodes through the runtime-call graph (and equals its reference), never
    through the graph of the policy compiled first."""
    make = functools.partial(tiny_llava, dtype=torch.float64)
    prompt = llava_prompt(make(), [PREFIX], [SUFFIX])
    model = avl_compile.compile(make(), options={"policy": "h2o", "inner": "eager"})
    backend = model._avl_backend
    greedy(model, prompt.inputs, 6)
    assert backend.decode_graphs_serve({"policy": "h2o", "kv_budget": 0.3, "inner": "eager"})
    for options in (
        {"policy": "streaming", "kv_budget": 0.5},  # same state tensors, another eviction
        {"policy": "avl"},  # another state
        {"policy": "avl", "vision_keep": 1.0, "vision_compute": 1.0, "text_keep": 1.0},
    ):
        options = {**options, "inner": "eager"}
        assert not backend.decode_graphs_serve(options)
        backend.set_options(options)
        counters = backend.runtime.counters
        before = counters["decode_graphs_in_python"], counters["decode_graphs_in_graph"]
        got = greedy(model, prompt.inputs, 12).sequences
        assert torch.equal(got, reference_greedy(make, prompt.inputs, options, 12)), options
        # the runtime-call graph, or a graph Dynamo compiled anew for these options (as on
        # transformers 5.17, whose explicit masks make it trace again)
        in_python = counters["decode_graphs_in_python"] - before[0]
        in_graph = counters["decode_graphs_in_graph"] - before[1]
        assert in_python + in_graph == 11, options
    # compiling again gives the new policy its own decode graph
    model = avl_compile.compile(model, options={"policy": "streaming", "inner": "eager"})
    assert model._avl_backend.decode_graphs_serve({"policy": "streaming", "inner": "eager"})
    greedy(model, prompt.inputs, 6)
    assert model._avl_backend.runtime.counters["decode_graphs_in_graph"] == 5
