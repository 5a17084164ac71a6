"""Options past the paper (issue 16), each off by default: the image scores from a window of
the last prompt tokens (``score_window``), per-layer image budgets (``vision_keep_layers``),
recall of evicted image rows from host pages (``recall_pages``), the query-aware core
(``core_page_size``) and adaptive refresh (``refresh_lse_drop``). Both oracles hold for
each: exact at 100% budgets, and the compiled path equals the eager reference (float64, a
left-padded batch)."""

import functools
import weakref

import pytest
import torch
import transformers
from helpers import NEW_TOKENS, compiled_greedy, greedy, reference_greedy

import avl_compile
from avl_compile import kv_rows_in_use
from avl_compile.cache import generated_cache
from avl_compile.options import AvlOptions
from avl_compile.policies.avl_decode import ADAPTIVE_REFRESHES
from avl_compile.policies.budgets import fraction_count, sloped_layer_budgets, text_budget
from avl_compile.reference import AvlReference, reference_attention
from avl_compile.runtime import layer_state
from avl_compile.tiny_models import llava_prompt, tiny_llava

FULL = {"vision_keep": 1.0, "vision_compute": 1.0, "text_keep": 1.0}
PREFIXES, SUFFIXES = [[1, 5, 6], [1, 9]], [[7, 8, 9, 10], [7, 8, 9, 10, 11, 12, 13]]
LAYERS = 3  # tiny_llava's decoder
# recall with the query-aware core, K = 1 (the recommended set's shape, small)
PAGE_CORE_RECALL = {"core_page_size": 2, "vision_keep": 0.3, "vision_compute": 0.2,
                    "refresh_every": 1, "recall_pages": 2, "recall_page_size": 4}  # fmt: skip
_TRANSFORMERS = tuple(int(part) for part in transformers.__version__.split(".")[:2])


def _make():
    return tiny_llava(dtype=torch.float64)


@pytest.mark.parametrize(
    "options",
    [
        {"score_window": 4},
        # a layer that keeps every image row grows in the step; the others evict
        {"vision_keep_layers": [1.0, 0.5, 0.3], "score_window": 3, "refresh_every": 2,
         "text_keep": 0.3, "text_min_budget": 2},
    ],
    ids=["window", "window-layers"],
)  # fmt: skip
def test_new_options_match_the_reference_on_a_padded_batch(options):
    prompt = llava_prompt(_make(), PREFIXES, SUFFIXES)
    assert (prompt.inputs["attention_mask"] == 0).any(), "the test needs left padding"
    model, got = compiled_greedy(_make, prompt.inputs, {**options, "inner": "eager"})
    assert torch.equal(got.sequences, reference_greedy(_make, prompt.inputs, options))
    counters = model._avl_backend.runtime.counters  # the decode ran in the compiled graph
    assert counters["decode_graphs_in_graph"] == NEW_TOKENS - 1
    assert counters["decode_graphs_in_python"] == 0


def test_full_budgets_with_the_new_options_generate_the_uncompiled_tokens():
    make = functools.partial(tiny_llava, dtype=torch.float32)
    prompt = llava_prompt(make(), PREFIXES[:1], SUFFIXES[:1])
    options = {**FULL, "score_window": 5, "vision_keep_layers": [1.0] * LAYERS}
    _, got = compiled_greedy(make, prompt.inputs, {**options, "inner": "eager"})
    assert torch.equal(got.sequences, greedy(make(), prompt.inputs).sequences)


def test_each_layer_keeps_its_own_share_of_the_image():
    keeps = [0.9, 0.5, 0.2]
    prompt = llava_prompt(_make(), PREFIXES[:1], SUFFIXES[:1])
    _, got = compiled_greedy(
        _make, prompt.inputs, {"vision_keep_layers": keeps, "text_keep": 1.0, "inner": "eager"}
    )
    n_text = len(SUFFIXES[0]) + NEW_TOKENS - 1
    planned = [
        len(PREFIXES[0]) + fraction_count(keep, prompt.image_tokens) + text_budget(n_text, 1, 20)
        for keep in keeps
    ]
    if _TRANSFORMERS < (5, 23):  # an explicit mask at every prefill: text at the widest
        planned = [max(planned)] * len(keeps)  # layer's place, as in a padded batch (README)
    assert kv_rows_in_use(generated_cache(got)) == planned


def _secondary_sets(options: dict) -> list[torch.Tensor]:
    """The image rows each layer keeps after the prefill under the reference."""
    model = _make()
    prompt = llava_prompt(model, PREFIXES[:1], SUFFIXES[:1])
    opts = AvlOptions.from_mapping(options)
    reference = AvlReference(opts, prompt.inputs["input_ids"] == model.config.image_token_id)
    with reference_attention(model, reference):
        greedy(model, prompt.inputs, new_tokens=1)
    return [reference.layers[layer].secondary for layer in range(LAYERS)]


def test_a_wider_score_window_changes_which_image_rows_stay():
    last_token = _secondary_sets({})
    window = _secondary_sets({"score_window": 6})
    assert any(not torch.equal(a, b) for a, b in zip(last_token, window, strict=True))


def test_sloped_layer_budgets_keep_the_mean():
    budgets = sloped_layer_budgets(0.5, 4, 0.6)
    assert budgets[0] == pytest.approx(0.8) and budgets[-1] == pytest.approx(0.2)
    assert sum(budgets) / 4 == pytest.approx(0.5)
    assert list(budgets) == sorted(budgets, reverse=True)
    assert sloped_layer_budgets(0.5, 1, 0.6) == (0.5,)
    with pytest.raises(ValueError, match=r"slope=1.0 .* \[0, 1\)"):
        sloped_layer_budgets(0.5, 4, 1.0)
    with pytest.raises(ValueError, match="first layer 1.2"):
        sloped_layer_budgets(0.8, 4, 0.5)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"score_window": 0}, r"score_window=0 .* integer >= 1"),
        ({"score_window": 2.0}, r"score_window=2.0"),
        ({"vision_keep_layers": []}, r"vision_keep_layers=\(\) .* one per layer"),
        ({"vision_keep_layers": [0.5, 1.5, 0.5]}, r"vision_keep_layers=1.5 .* \(0, 1\]"),
        ({"vision_keep_layers": [0.5, 0.6], "prefill_filter_keep": 0.55}, "S <= P"),
    ],
)
def test_bad_values_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        AvlOptions.from_mapping(options)


def test_a_layer_list_of_the_wrong_length_is_refused_at_compile():
    with pytest.raises(ValueError, match="2 entries; this model has 3 decoder layers"):
        avl_compile.compile(tiny_llava(), options={"vision_keep_layers": [0.5, 0.5]})
    with pytest.raises(ValueError, match="2 entries, but the model has a decoder layer 2"):
        AvlOptions(vision_keep_layers=(0.5, 0.5)).layer_budgets(2)


# -- recall (eager reference only, for now)


def test_recall_swaps_the_best_rows_back_and_the_rest_out():
    """One layer, one batch row, 8 image tokens: 4 resident (secondary), two host pages.
    The page of the higher bound comes back; the 4 best of the 6 rows by q.k stay."""
    opts = AvlOptions(recall_pages=1, recall_page_size=2, refresh_every=1)
    reference = AvlReference(opts, torch.ones(1, 8, dtype=torch.bool))
    secondary = torch.tensor([[True] * 4 + [False] * 4])
    reference.layers[0] = _memory(secondary, core=torch.tensor([[True, True] + [False] * 6]))
    reference.layers[0].pages = [[[4, 5], [6, 7]]]
    query = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)  # [B, Hq, D]: scores = k[0]
    first = torch.tensor([0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.9, 0.25], dtype=torch.float64)
    keys = torch.stack([first, torch.zeros(8, dtype=torch.float64)], -1)[None, None]
    reference._recall(0, query, keys)
    memory = reference.layers[0]
    # page [6, 7] (bound 0.9) came back; of {0, 1, 2, 3, 6, 7}, 7 (0.25) and 3 (0.2) left
    assert memory.secondary[0].nonzero().flatten().tolist() == [0, 1, 2, 6]
    assert memory.pages == [[[4, 5], [3, 7]]]
    assert memory.core[0].nonzero().flatten().tolist() == [0, 1]  # core rows that stayed


def _memory(secondary, core):
    from avl_compile.reference import _LayerMemory

    length = secondary.shape[-1]
    return _LayerMemory(
        sink=torch.zeros_like(secondary), image=torch.ones_like(secondary), secondary=secondary,
        core=core, text_kept=torch.zeros(1, 1, length, dtype=torch.bool),
        text_score=torch.zeros(1, 1, length), n_text=[0], n_core=[2],
    )  # fmt: skip


def test_recall_keeps_the_resident_count_and_every_image_row_somewhere(monkeypatch):
    checked = []
    original = AvlReference._recall

    def checked_recall(self, layer, query, keys):
        original(self, layer, query, keys)
        memory = self.layers[layer]
        for b, pages in enumerate(memory.pages):
            resident = set(memory.secondary[b].nonzero().flatten().tolist())
            on_host = [j for page in pages for j in page]
            image = set(self.image_mask[b].nonzero().flatten().tolist())
            assert len(resident) == fraction_count(0.3, len(image))
            assert resident.isdisjoint(on_host) and len(set(on_host)) == len(on_host)
            assert resident | set(on_host) == image
            assert set(memory.core[b].nonzero().flatten().tolist()) <= resident
            checked.append(resident)

    monkeypatch.setattr(AvlReference, "_recall", checked_recall)
    prompt = llava_prompt(_make(), PREFIXES, SUFFIXES)
    options = {"vision_keep": 0.3, "vision_compute": 0.2, "refresh_every": 1, "recall_pages": 2,
               "recall_page_size": 4}  # fmt: skip
    with_recall = reference_greedy(_make, prompt.inputs, options)
    assert len(checked) >= LAYERS * 2 * NEW_TOKENS - LAYERS * 2  # every layer, row and step
    assert len({frozenset(r) for r in checked}) > 2 * LAYERS, "recall never moved a row"
    without = reference_greedy(_make, prompt.inputs, {**options, "recall_pages": 0})
    assert with_recall.shape == without.shape


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_the_swap_ranks_resident_rows_by_the_last_steps_qk(inner):
    """After a step, ``AvlSlots.last_qk`` holds that step's scaled q.k, averaged over query
    heads, with every resident image row (the next swap ranks them by it and makes no pass
    of its own over the cache): in the runtime-call route and in the decode graph."""
    from avl_compile.policies.avl_decode import CORE, OTHER

    prompt = llava_prompt(_make(), PREFIXES, SUFFIXES)
    _, got = compiled_greedy(_make, prompt.inputs, {**PAGE_CORE_RECALL, "inner": inner})
    checked = 0
    for layer in generated_cache(got).layers:
        state = layer_state(layer.keys)
        query = state.recall.last_query  # [B, Hq, D], the last step's
        keys = layer.keys.repeat_interleave(query.shape[1] // layer.keys.shape[1], 1)
        qk = torch.einsum("bhd,bhcd->bhc", query, keys) * query.shape[-1] ** -0.5
        resident = (state.slots.role == OTHER) | (state.slots.role == CORE)
        expected = qk.mean(1)[resident]
        torch.testing.assert_close(state.slots.last_qk[resident], expected)
        checked += int(resident.sum())
    assert checked > 0


def test_recall_keeps_its_own_last_query_not_the_prompts():
    """The recall state's last query is a tensor of its own: at batch 1 the prompt's last
    query row is a contiguous view of the whole projection, which a view would keep alive
    for the whole generation (every layer's prompt queries)."""
    prompt = llava_prompt(_make(), PREFIXES[:1], SUFFIXES[:1])
    _, got = compiled_greedy(_make, prompt.inputs, {**PAGE_CORE_RECALL, "inner": "eager"})
    for layer in generated_cache(got).layers:
        query = layer_state(layer.keys).recall.last_query
        assert query.untyped_storage().nbytes() == query.numel() * query.element_size()


def test_recall_at_full_budgets_generates_the_uncompiled_tokens():
    prompt = llava_prompt(_make(), PREFIXES[:1], SUFFIXES[:1])
    options = {**FULL, "refresh_every": 1, "recall_pages": 3}
    expected = greedy(_make(), prompt.inputs).sequences
    assert torch.equal(reference_greedy(_make, prompt.inputs, options), expected)
    # and compiled, with the query-aware core too (nothing evicted: empty pages only)
    for extra in ({}, {"core_page_size": 2}):
        _, got = compiled_greedy(_make, prompt.inputs, {**options, **extra, "inner": "eager"})
        assert torch.equal(got.sequences, expected)


def test_recall_options_are_checked():
    with pytest.raises(ValueError, match=r"recall_pages=-1 .* integer >= 0"):
        AvlOptions.from_mapping({"recall_pages": -1})
    with pytest.raises(ValueError, match=r"recall_page_size=0 .* integer >= 1"):
        AvlOptions.from_mapping({"recall_page_size": 0})
    with pytest.raises(ValueError, match=r"recall_pages=2 .* refresh_every=-1"):
        AvlOptions.from_mapping({"recall_pages": 2, "refresh_every": -1})


def test_recall_through_runtime_calls_reads_nothing_back_to_the_host(monkeypatch):
    """A GPU's route (host pages cannot be indexed inside a graph): the decode graph with a
    runtime call per layer, recall's swap before the step. It runs in fixed shapes, every
    batch row at once: no syncing op at any step (counted per layer step, where the
    policy's decode runs), refresh steps included (on a GPU the chosen pages' numbers are
    read to index the host pages). The compiled decode graph has no sync either
    (tests/test_decode_in_graph.py)."""
    from test_decode_in_graph import SYNCING_OPS, _OpCounter

    from avl_compile import backend
    from avl_compile.policies.avl import AvlPolicy

    monkeypatch.setattr(backend, "_decode_steps", lambda kind, opts, device: {})

    syncs: list[tuple[bool, int]] = []  # (refresh step?, syncing ops) per layer and step
    original = AvlPolicy.decode

    def counted(self, query, past_keys, new_keys, past_values, new_values, scale, state):
        refresh, counter = state.next_refresh, _OpCounter()
        with counter:
            result = original(self, query, past_keys, new_keys, past_values, new_values,
                              scale, state)  # fmt: skip
        syncs.append((refresh, sum(op in SYNCING_OPS for op in counter.ops)))
        return result

    monkeypatch.setattr(AvlPolicy, "decode", counted)
    prompt = llava_prompt(_make(), PREFIXES[:1], SUFFIXES[:1])
    options = {"vision_keep": 0.3, "vision_compute": 0.2, "refresh_every": 3, "recall_pages": 2,
               "recall_page_size": 4, "inner": "eager"}  # fmt: skip
    model, _ = compiled_greedy(_make, prompt.inputs, options, new_tokens=10)
    assert len(syncs) == 9 * LAYERS and sum(r for r, _ in syncs) == 9  # 3 refresh steps
    assert [n for _, n in syncs] == [0] * 9 * LAYERS
    # the swaps that would read the device on a GPU are counted
    assert model._avl_backend.runtime.counters["recall_swaps_in_python"] == 9


@pytest.mark.parametrize("deferred", [False, True], ids=["immediate", "deferred-as-on-cuda"])
def test_recall_through_runtime_calls_matches_the_reference(monkeypatch, deferred):
    """A GPU's route on a padded batch: each swap's pages are chosen right after the step
    before (the plan is what the swap uses, not a second choice), and with ``deferred``
    the rows that leave reach the host pages only at the layer's next swap, as CUDA's
    asynchronous copies do."""
    from avl_compile import backend
    from avl_compile.policies import recall_copies

    monkeypatch.setattr(backend, "_decode_steps", lambda kind, opts, device: {})
    monkeypatch.setattr(recall_copies, "_defers_write_back", lambda pages, device: deferred)
    plans = []
    original = recall_copies.RecallCopies.plan

    def counted(self, step, query, pages, recall_pages):
        plans.append(step)
        original(self, step, query, pages, recall_pages)

    monkeypatch.setattr(recall_copies.RecallCopies, "plan", counted)
    prompt = llava_prompt(_make(), PREFIXES, SUFFIXES)
    options = {**PAGE_CORE_RECALL, "inner": "eager"}
    model, got = compiled_greedy(_make, prompt.inputs, options)
    assert torch.equal(got.sequences, reference_greedy(_make, prompt.inputs, PAGE_CORE_RECALL))
    counters = model._avl_backend.runtime.counters
    assert counters["decode_graphs_in_graph"] == 0
    swaps = counters["recall_swaps_in_python"]
    assert swaps == LAYERS * (NEW_TOKENS - 1)  # K = 1
    # one choice per swap (the first step's made at its swap) and one per layer for the
    # step after the last, which never runs
    assert len(plans) == swaps + LAYERS
    assert counters["recall_host_waits"] == 0  # a CPU has no copy in flight


@pytest.mark.parametrize(
    "options",
    [
        {**PAGE_CORE_RECALL, "inner": "eager"},
        {**PAGE_CORE_RECALL, "refresh_every": 2, "core_page_size": 0, "inner": "eager"},
        {**PAGE_CORE_RECALL, "inner": "inductor"},  # as a GPU runs them
    ],
    ids=["pages-k1", "k2", "pages-k1-inductor"],
)
def test_staged_recall_graphs_match_the_reference(monkeypatch, options):
    """A GPU's recall inside the compiled decode graph, staged on a CPU: the graph takes
    the pages' positions and digests, not their rows; before a refresh step the host
    uploads the pages the graph chose at the step before, after it the rows that left go
    back, reaching the host pages at the layer's next swap (as CUDA's copies do)."""
    from avl_compile import backend
    from avl_compile.policies import recall_copies

    monkeypatch.setattr(backend, "_stages_recall", lambda device: True)
    monkeypatch.setattr(recall_copies, "_defers_write_back", lambda pages, device: True)
    prompt = llava_prompt(_make(), PREFIXES, SUFFIXES)
    model, got = compiled_greedy(_make, prompt.inputs, options)
    assert torch.equal(got.sequences, reference_greedy(_make, prompt.inputs, options))
    counters = model._avl_backend.runtime.counters
    assert counters["decode_graphs_in_graph"] == NEW_TOKENS - 1
    assert counters["decode_graphs_in_python"] == 0
    assert counters["recall_swaps_in_python"] == 0
    assert counters["recall_host_waits"] == 0
    for layer in generated_cache(got).layers:  # the graphs chose, the host copied
        recall = layer_state(layer.keys).recall
        assert recall.chosen is not None and recall.staged is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="recall's CUDA copies need a GPU")
@pytest.mark.parametrize("route", ["staged-graph", "runtime-calls"])
def test_recall_on_a_gpu_matches_the_reference(monkeypatch, route):
    """The GPU check of recall (benchmarks/gpu_checks.sh): host pages in pinned memory,
    uploads and write-backs on side streams, the same tokens as the CPU reference, through
    the staged decode graphs (Inductor) and through the runtime-call graph."""
    from avl_compile import backend

    inner = "inductor"
    if route == "runtime-calls":
        monkeypatch.setattr(backend, "_decode_steps", lambda kind, opts, device: {})
        inner = "eager"
    prompt = llava_prompt(_make(), PREFIXES, SUFFIXES)
    model = avl_compile.compile(_make().cuda(), options={**PAGE_CORE_RECALL, "inner": inner})
    inputs = {k: v.cuda() for k, v in prompt.inputs.items()}
    out = greedy(model, inputs)
    expected = reference_greedy(_make, prompt.inputs, PAGE_CORE_RECALL)
    assert torch.equal(out.sequences.cpu(), expected)
    counters = model._avl_backend.runtime.counters
    in_python = LAYERS * (NEW_TOKENS - 1) if route == "runtime-calls" else 0
    assert counters["recall_swaps_in_python"] == in_python
    for layer in generated_cache(out).layers:
        recall = layer_state(layer.keys).recall
        assert recall.pages.keys.is_pinned() and recall.copies.upload is not None


def test_recall_on_hfs_compile_path_matches_the_reference():
    from test_hf_compile_path import NEW_TOKENS as HF_TOKENS
    from test_hf_compile_path import _hf_compiled_greedy

    prompt = llava_prompt(_make(), PREFIXES, SUFFIXES)
    options = {"inner": "aot_eager", "refresh_every": 1, "recall_pages": 2,
               "recall_page_size": 4, "vision_keep": 0.3, "vision_compute": 0.2}  # fmt: skip
    model = avl_compile.compile(_make(), options=options)
    got = _hf_compiled_greedy(model, prompt.inputs, mode=None, options=options)
    expected = reference_greedy(_make, prompt.inputs, options, HF_TOKENS)
    assert torch.equal(got.sequences, expected)
    assert hasattr(model, "_compiled_call"), "generate did not take HF's compile path"
    assert model._avl_backend.runtime.counters["refresh_sites"] == LAYERS * (HF_TOKENS - 1)


# -- the query-aware core (core_page_size)

PAGE_CORE = {"core_page_size": 3, "vision_keep": 0.5, "vision_compute": 0.3, "refresh_every": 4,
             "text_keep": 0.5, "text_min_budget": 2}  # fmt: skip


@pytest.mark.parametrize(
    "options, inner",
    [
        (PAGE_CORE, "eager"),
        (PAGE_CORE_RECALL, "eager"),
        # the README's recommended set as users run it: the decode graphs compiled by
        # Inductor, recall's swap inside them (compiled at the first step, for the
        # prompt's page shapes)
        ({**PAGE_CORE_RECALL, "refresh_every": 2}, "inductor"),
    ],
    ids=["pages", "pages-recall", "pages-recall-inductor"],
)
def test_query_aware_core_matches_the_reference_on_a_padded_batch(options, inner):
    prompt = llava_prompt(_make(), PREFIXES, SUFFIXES)
    model, got = compiled_greedy(_make, prompt.inputs, {**options, "inner": inner})
    assert torch.equal(got.sequences, reference_greedy(_make, prompt.inputs, options))
    counters = model._avl_backend.runtime.counters
    # every step runs in the compiled decode graph, recall's swap too (no host sync there:
    # tests/test_decode_in_graph.py)
    assert counters["decode_graphs_in_graph"] == NEW_TOKENS - 1
    assert counters["decode_graphs_in_python"] == 0
    assert counters["recall_swaps_in_python"] == 0
    # sink + core + text at every step, never the whole secondary set
    n_image = prompt.image_tokens
    core = fraction_count(options["vision_compute"], n_image)
    steps = counters["decode_sites"]
    assert counters["attended_rows"] / steps < len(PREFIXES[0]) + core + len(SUFFIXES[1]) + 12


def test_a_decode_graph_per_shape_of_the_prompts_pages():
    """Recall's pages are shaped by the prompt (pages per row, image tokens), not by the
    cache: one compiled graph per shape of them, the same graph while they keep it."""
    from avl_compile.compiled_decode import GraphPerStateShape, StateInputs

    compiled: list[list[tuple]] = []

    def compile_for(extra):
        compiled.append([tuple(t.shape) for site in extra for t in site])
        number = len(compiled)
        return lambda *args: number

    # one Dynamo input, then per site 1 slot tensor and 2 tensors shaped by the prompt
    graph = GraphPerStateShape(compile_for, first_state=1, per_site=3, extra=2)

    def call(pages: int, capacity: int = 8):
        site = [torch.zeros(capacity), torch.zeros(2, pages), torch.zeros(2, 4)]
        return graph(torch.zeros(1), *site, *site)

    assert [call(3), call(3), call(3, capacity=16), call(5), call(3)] == [1, 1, 1, 2, 1]
    assert compiled == [[(2, 3), (2, 4)] * 2, [(2, 5), (2, 4)] * 2]
    # a generate's steps pass the same tensors (written in place): the last graph again
    site = [torch.zeros(8), torch.zeros(2, 5), torch.zeros(2, 4)]
    assert [graph(torch.zeros(1), *site, *site) for _ in range(3)] == [2, 2, 2]
    other = [site[0], torch.zeros(2, 6), site[2]]
    assert graph(torch.zeros(1), *other, *other) == 3 and len(compiled) == 3

    # a decode step hands over its state as one list: the same list, the same graph, not
    # kept alive by the graph
    state = StateInputs([*site, *site])
    assert [graph.run((torch.zeros(1),), state) for _ in range(2)] == [2, 2]
    bigger = StateInputs([site[0], torch.zeros(2, 7), site[2]] * 2)
    assert graph.run((torch.zeros(1),), bigger) == 4 and len(compiled) == 4
    assert graph.run((torch.zeros(1),), state) == 2 and len(compiled) == 4
    alive = weakref.ref(state)
    del state
    assert alive() is None


def test_query_aware_core_at_full_budgets_generates_the_uncompiled_tokens():
    prompt = llava_prompt(_make(), PREFIXES[:1], SUFFIXES[:1])
    options = {**FULL, "core_page_size": 2, "inner": "eager"}
    _, got = compiled_greedy(_make, prompt.inputs, options)
    assert torch.equal(got.sequences, greedy(_make(), prompt.inputs).sequences)


def test_query_aware_core_moves_between_refresh_steps(monkeypatch):
    """With no refresh in sight (K = 100) A-VL's core never changes; the query-aware core
    is chosen again at every step."""
    cores: list[frozenset] = []
    original = AvlReference._pick_core_by_pages

    def recorded(self, memory, query, keys):
        original(self, memory, query, keys)
        if memory is self.layers[LAYERS - 1]:
            cores.append(frozenset(memory.core[0].nonzero().flatten().tolist()))

    monkeypatch.setattr(AvlReference, "_pick_core_by_pages", recorded)
    prompt = llava_prompt(_make(), PREFIXES[:1], SUFFIXES[:1])
    reference_greedy(_make, prompt.inputs, {**PAGE_CORE, "refresh_every": 100})
    assert len(cores) == NEW_TOKENS - 1 and len(set(cores)) > 1


def test_page_bound_is_an_upper_bound_and_exact_for_one_row_pages():
    from avl_compile.policies.page_core import CorePages, image_ordinals

    torch.manual_seed(0)
    batch, q_heads, kv_heads, capacity, dim = 2, 4, 2, 12, 8
    query = torch.randn(batch, q_heads, dim, dtype=torch.float64)
    keys = torch.randn(batch, kv_heads, capacity, dim, dtype=torch.float64)
    # slots hold positions 20, 19, ..., 9; the image tokens are positions 10 ... 17
    positions = torch.arange(20, 20 - capacity, -1).expand(batch, capacity)
    image_positions = torch.arange(10, 18).expand(batch, 8)
    candidate = (positions >= 10) & (positions < 18)
    grouped = query.view(batch, kv_heads, q_heads // kv_heads, dim)
    exact = torch.einsum("bhgd,bhcd->bhgc", grouped, keys).reshape(batch, q_heads, -1).mean(1)
    ordinal = image_ordinals(positions, candidate, image_positions)
    assert torch.equal(
        ordinal, image_ordinals(positions, candidate, image_positions, in_graph=True)
    )
    assert (ordinal[~candidate] == -1).all()
    assert ordinal[0, 3:11].tolist() == list(range(7, -1, -1))
    for size in (1, 3):
        pages = CorePages.build(keys, ordinal, image_positions, size, torch.float64)
        assert pages.members.shape == (batch, -(-8 // size), size)
        bound = pages.bound_per_slot(query, ordinal, candidate)
        assert torch.isinf(bound[~candidate]).all()
        assert (bound[candidate] >= exact[candidate] - 1e-12).all()
        if size == 1:
            torch.testing.assert_close(bound[candidate], exact[candidate])
        else:  # image tokens 0-2 (positions 10-12, slots 8-10) are one page
            assert torch.equal(bound[:, 8], bound[:, 9]) and torch.equal(bound[:, 8], bound[:, 10])
            assert not torch.equal(bound[:, 7], bound[:, 8])


def test_group_bounds_are_the_largest_q_k_in_each_box_averaged_over_query_heads():
    """``group_bounds`` (two sums of each kv head's queries, split by sign) gives the box
    bound written directly: max(q * low, q * high) summed over the head dimension, per
    query head against its kv head's box, averaged over the query heads; for grouped and
    one-to-one heads, and for boxes of one key (then it is the exact mean q.k)."""
    from avl_compile.policies.page_core import group_bounds

    torch.manual_seed(3)
    for q_heads, kv_heads in ((4, 2), (6, 1), (3, 3)):
        query = torch.randn(2, q_heads, 16, dtype=torch.float64)
        corners = torch.randn(2, 2, kv_heads, 5, 16, dtype=torch.float64)
        low, high = corners.amin(0), corners.amax(0)  # [B, Hkv, P, D]
        per_query_head = (
            low.repeat_interleave(q_heads // kv_heads, 1),
            high.repeat_interleave(q_heads // kv_heads, 1),
        )
        q = query[:, :, None, :]
        direct = torch.maximum(q * per_query_head[0], q * per_query_head[1]).sum(-1).mean(1)
        torch.testing.assert_close(group_bounds(query, low, high), direct)
        key = corners[0]  # boxes of one key: the bound is the head-averaged q.k
        exact = torch.einsum("bhd,bhpd->bhp", query, key.repeat_interleave(q_heads // kv_heads, 1))
        torch.testing.assert_close(group_bounds(query, key, key), exact.mean(1))


def test_image_ordinals_searched_in_a_graph_are_searchsorteds():
    """The swap's search (gathers that halve the range, in a graph) gives ``searchsorted``'s
    ordinals: rows of 1 to 13 image tokens (powers of two and not), a row padded past every
    position, positions before, between, on and past the image tokens, and -1."""
    from avl_compile.policies.page_core import image_ordinals

    torch.manual_seed(2)
    searched = torch.compile(image_ordinals, backend="eager", fullgraph=True)
    for n in (1, 2, 5, 8, 13):
        rows = [torch.randperm(40)[:n].sort().values for _ in range(3)]
        rows[2][n // 2 :] = 1000 + torch.arange(n - n // 2)  # fewer image tokens: padded
        image_positions = torch.stack(rows)
        positions = torch.randint(-1, 45, (3, 30))
        image = torch.rand(3, 30) < 0.7
        expected = image_ordinals(positions.clamp(min=0), image, image_positions)
        got = searched(positions.clamp(min=0), image, image_positions, in_graph=True)
        assert torch.equal(got, expected)
        assert torch.equal(
            image_ordinals(positions, image, image_positions, in_graph=True)[image],
            (image_positions[:, None, :] < positions[:, :, None]).sum(-1)[image],
        )


def test_page_boxes_after_a_move_are_the_boxes_made_again_from_scratch():
    """A swap's ``CorePages.move`` (members out and in, the touched pages boxed again)
    leaves the state a build from the new slots would make, in every batch row, with the
    fixed-shape padding (entries repeated; a row that moves nothing)."""
    from avl_compile.policies.page_core import CorePages, image_ordinals

    torch.manual_seed(1)
    batch, kv_heads, capacity, dim, size = 3, 2, 10, 4, 2
    keys = torch.randn(batch, kv_heads, capacity, dim)
    image_positions = torch.arange(5, 17).expand(batch, 12)  # 12 image tokens, 6 pages
    # slots 0-7 hold image tokens (ordinals) 0, 2, 3, 5, 6, 8, 9, 11; 8-9 are text
    resident = torch.tensor([0, 2, 3, 5, 6, 8, 9, 11])
    positions = torch.cat([resident + 5, torch.tensor([30, 31])]).expand(batch, -1)
    image = positions < 17
    ordinal = image_ordinals(positions, image, image_positions)
    pages = CorePages.build(keys, ordinal, image_positions, size, torch.float32)
    # row 0: slots 1 and 6 (ordinals 2, 9) leave, ordinals 1 and 10 come in (padded to 3
    # entries by repeating the last); row 1: slot 0 (ordinal 0) for 4; row 2: nothing
    slot = torch.tensor([[1, 6, 6], [0, 0, 0], [0, 0, 0]])
    left = torch.tensor([[2, 9, 9], [0, 0, 0], [0, 0, 0]])
    came = torch.tensor([[1, 10, 10], [4, 4, 4], [0, 0, 0]])
    moving = torch.tensor([[True], [True], [False]])
    new_keys = keys.clone()
    for b, s, c in ((0, 1, 1), (0, 6, 10), (1, 0, 4)):
        new_keys[b, :, s] = torch.randn(kv_heads, dim)
        ordinal[b, s] = c
    pages.move(new_keys, left, came, slot, moving)
    expected = CorePages.build(new_keys, ordinal, image_positions, size, torch.float32)
    assert torch.equal(pages.members, expected.members)
    assert torch.equal(pages.low, expected.low) and torch.equal(pages.high, expected.high)
    assert pages.members[0, 0].tolist() == [0, 1] and pages.members[2, 0].tolist() == [0, -1]


def test_query_aware_core_options_are_checked():
    with pytest.raises(ValueError, match=r"core_page_size=-1 .* integer >= 0"):
        AvlOptions.from_mapping({"core_page_size": -1})
    with pytest.raises(ValueError, match=r"core_page_size=4 .* refresh_every=-1"):
        AvlOptions.from_mapping({"core_page_size": 4, "refresh_every": -1})


def test_query_aware_core_on_hfs_compile_path_matches_the_reference():
    from test_hf_compile_path import NEW_TOKENS as HF_TOKENS
    from test_hf_compile_path import _hf_compiled_greedy

    prompt = llava_prompt(_make(), PREFIXES, SUFFIXES)
    options = {**PAGE_CORE, "inner": "aot_eager"}
    model = avl_compile.compile(_make(), options=options)
    got = _hf_compiled_greedy(model, prompt.inputs, mode=None, options=options)
    expected = reference_greedy(_make, prompt.inputs, options, HF_TOKENS)
    assert torch.equal(got.sequences, expected)
    assert hasattr(model, "_compiled_call"), "generate did not take HF's compile path"
    counters = model._avl_backend.runtime.counters  # every decode step in the avl graph
    assert counters["decode_graphs_in_graph"] == HF_TOKENS - 1


# -- adaptive refresh (refresh_lse_drop)

ADAPTIVE = {"refresh_lse_drop": 0.1, "refresh_every": 100, "vision_keep": 0.5,
            "vision_compute": 0.3, "text_keep": 0.5, "text_min_budget": 2}  # fmt: skip


def _fired_per_layer(reference: AvlReference) -> list[list[int]]:
    return [reference.layers[layer].adaptive_refreshes.tolist() for layer in range(LAYERS)]


@pytest.mark.parametrize(
    "options",
    [ADAPTIVE, {**ADAPTIVE, "refresh_every": 3, "refresh_lse_drop": 0.02}],
    ids=["instead-of-K", "besides-K"],
)
def test_adaptive_refresh_matches_the_reference_on_a_padded_batch(options):
    """Same tokens, and the same refreshes fired in every layer and batch row."""
    prompt = llava_prompt(_make(), PREFIXES, SUFFIXES)
    model, got = compiled_greedy(_make, prompt.inputs, {**options, "inner": "eager"})
    image_mask = prompt.inputs["input_ids"] == model.config.image_token_id
    reference = AvlReference(AvlOptions.from_mapping(options), image_mask)
    plain_model = _make()
    with reference_attention(plain_model, reference):
        expected = plain_model.generate(
            **prompt.inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            do_sample=False,
        )  # fmt: skip
    assert torch.equal(got.sequences, expected)
    cache = generated_cache(got)
    fired = [
        layer_state(layer.keys).slots.refresh_state[:, ADAPTIVE_REFRESHES].long().tolist()
        for layer in cache.layers
    ]
    assert fired == _fired_per_layer(reference)
    total = sum(map(sum, fired))
    assert 0 < total < LAYERS * len(PREFIXES) * (NEW_TOKENS - 1), "the signal must discriminate"
    counters = model._avl_backend.runtime.counters  # every step in the compiled graph
    assert counters["decode_graphs_in_graph"] == NEW_TOKENS - 1


def test_adaptive_refreshes_are_counted_once_after_generate():
    prompt = llava_prompt(_make(), PREFIXES, SUFFIXES)
    model, got = compiled_greedy(_make, prompt.inputs, {**ADAPTIVE, "inner": "eager"})
    runtime, cache = model._avl_backend.runtime, generated_cache(got)
    counters = runtime.counters
    assert counters["refresh_sites"] == 0  # K = 100: nothing scheduled; fired not read yet
    before = counters["attended_rows"]
    fired = [
        layer_state(layer.keys).slots.refresh_state[:, ADAPTIVE_REFRESHES] for layer in cache.layers
    ]
    total = float(sum(f.sum() for f in fired))
    runtime.collect_device_counts(cache)
    assert counters["refresh_sites"] == pytest.approx(total / len(PREFIXES))
    assert counters["attended_rows"] > before  # the refreshes attended the other image rows
    runtime.collect_device_counts(cache)  # counted once
    assert counters["refresh_sites"] == pytest.approx(total / len(PREFIXES))


def test_adaptive_refresh_that_never_fires_is_avl_at_the_same_k():
    """With a threshold no drop reaches, the tokens are A-VL's at the same K."""
    prompt = llava_prompt(_make(), PREFIXES, SUFFIXES)
    plain = {k: v for k, v in ADAPTIVE.items() if k != "refresh_lse_drop"}
    options = {**ADAPTIVE, "refresh_lse_drop": 1e6, "refresh_every": 3}
    _, got = compiled_greedy(_make, prompt.inputs, {**options, "inner": "eager"})
    plain_tokens = reference_greedy(_make, prompt.inputs, {**plain, "refresh_every": 3})
    assert torch.equal(got.sequences, plain_tokens)


def test_adaptive_refresh_at_full_budgets_generates_the_uncompiled_tokens():
    prompt = llava_prompt(_make(), PREFIXES[:1], SUFFIXES[:1])
    options = {**FULL, "refresh_lse_drop": 0.0, "inner": "eager"}
    _, got = compiled_greedy(_make, prompt.inputs, options)
    assert torch.equal(got.sequences, greedy(_make(), prompt.inputs).sequences)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"refresh_lse_drop": -0.1}, r"refresh_lse_drop=-0.1 .* nats >= 0"),
        ({"refresh_lse_drop": float("nan")}, r"refresh_lse_drop=nan .* nats >= 0"),
        ({"refresh_lse_drop": True}, r"refresh_lse_drop=True .* nats >= 0"),
        ({"refresh_lse_drop": 0.1, "refresh_every": -1}, r"None with refresh_every=-1"),
        ({"refresh_lse_drop": 0.1, "core_page_size": 4}, r"None with core_page_size > 0"),
        ({"refresh_lse_drop": 0.1, "recall_pages": 2}, r"None with recall_pages > 0"),
    ],
)
def test_adaptive_refresh_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        AvlOptions.from_mapping(options)


def test_switched_recall_and_page_sizes_never_run_a_graph_built_for_others():
    """A decode graph holds its recall count and the query-aware core's page size: after
    set_options changes them, the decode equals the new options' reference."""
    prompt = llava_prompt(_make(), PREFIXES, SUFFIXES)
    model = avl_compile.compile(_make(), options={**PAGE_CORE_RECALL, "inner": "eager"})
    backend = model._avl_backend
    greedy(model, prompt.inputs, 6)
    for change in ({"recall_pages": 1}, {"core_page_size": 4}):
        options = {**PAGE_CORE_RECALL, **change}
        assert not backend.decode_graphs_serve(options), change
        backend.set_options({**options, "inner": "eager"})
        got = greedy(model, prompt.inputs, 12).sequences
        assert torch.equal(got, reference_greedy(_make, prompt.inputs, options, 12)), change


def test_page_boxes_are_the_min_and_max_of_the_held_rows_alone():
    """Boxes gathered at held members (no fill of the rows) are the masked min and max:
    partial pages ignore their empty entries, an empty page is (+inf, -inf), and the
    widening to the score's dtype changes no value."""
    from avl_compile.policies.page_core import page_boxes
    from avl_compile.policies.recall import build_pages

    torch.manual_seed(2)
    keys = torch.randn(2, 3, 9, 5)
    members = torch.tensor(
        [[[4, -1, 0], [-1, -1, -1], [8, 7, 6]], [[-1, 2, -1], [1, 3, 5], [-1, -1, 0]]]
    )
    low, high = page_boxes(keys, members, torch.float64)
    assert low.dtype == torch.float64
    for b in range(2):
        for p in range(3):
            held = members[b, p][members[b, p] >= 0]
            if held.numel() == 0:
                assert torch.isinf(low[b, :, p]).all() and (low[b, :, p] > 0).all()
                assert torch.isinf(high[b, :, p]).all() and (high[b, :, p] < 0).all()
                continue
            rows = keys[b][:, held].double()
            assert torch.equal(low[b, :, p], rows.amin(1)) and torch.equal(
                high[b, :, p], rows.amax(1)
            )
    # recall's pages: a row with fewer evicted rows holds an empty page; the digests are
    # the same boxes, and every slot that names a row holds that row's key
    evicted = [torch.tensor([1, 2, 4, 6, 8]), torch.tensor([0, 3])]
    pages = build_pages(keys, keys + 1, evicted, 2)
    assert pages.positions.tolist() == [[[1, 2], [4, 6], [8, -1]], [[0, 3], [-1, -1], [-1, -1]]]
    low, high = page_boxes(keys, pages.positions, keys.dtype)
    assert torch.equal(pages.low, low) and torch.equal(pages.high, high)
    for b, rows in enumerate(evicted):
        named = pages.keys[b].flatten(1, 2)[:, : rows.numel()]
        assert torch.equal(named, keys[b][:, rows])
        assert torch.equal(pages.values[b].flatten(1, 2)[:, : rows.numel()], keys[b][:, rows] + 1)


def test_nth_true_finds_each_set_flag_in_order_and_the_length_past_the_last():
    from avl_compile.policies.recall import _nth_true

    generator = torch.Generator().manual_seed(0)
    flags = torch.rand(4, 9, generator=generator) < torch.tensor([[0.0], [0.3], [0.7], [1.0]])
    nth = torch.tensor([0, 1, 2, 5, 8, 12]).expand(4, -1)
    for row, wanted in zip(flags.tolist(), _nth_true(flags, nth).tolist(), strict=True):
        indices = [i for i, flag in enumerate(row) if flag]
        assert wanted == [indices[n] if n < len(indices) else 9 for n in nth[0].tolist()]
