"""The A-VL decode step inside the compiled decode graph: no host sync, no runtime call, a
bounded number of graphs, and one tie rule shared with the reference."""

import functools
import operator

import pytest
import torch
import transformers
from helpers import compiled_greedy, greedy
from torch.utils._python_dispatch import TorchDispatchMode

import avl_compile
from avl_compile.backend import AvlBackend
from avl_compile.compiled_decode import CompiledDecode
from avl_compile.policies.avl_decode import CORE, OTHER, TEXT, AvlSlots, avl_decode_step
from avl_compile.policies.budgets import best_first, last_ranked
from avl_compile.tiny_models import llava_prompt, tiny_llava

PREFIX, SUFFIX = [1, 5, 6], [7, 8, 9, 10]
_TRANSFORMERS = tuple(int(part) for part in transformers.__version__.split(".")[:2])
# ops that read a device value back to the host, or whose output shape depends on data
SYNCING_OPS = {
    "_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "allclose",
    "masked_select", "unique", "_unique2", "unique_consecutive", "repeat_interleave",
}  # fmt: skip


class _OpCounter(TorchDispatchMode):
    # recall's C swap (``avl::recall_swap``) mutates its inputs: under aot_eager it runs
    # inside the ``auto_functionalized_v2`` higher-order operator
    supports_higher_order_operators = True

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = getattr(func, "overloadpacket", func)
        self.ops.append(packet.__name__)
        return func(*args, **(kwargs or {}))


# recall with the query-aware core, K = 1
RECALL_PAGES = {"policy": "avl", "refresh_every": 1, "recall_pages": 2, "recall_page_size": 2,
                "core_page_size": 2, "vision_keep": 0.3, "vision_compute": 0.2}  # fmt: skip
POLICIES = [
    {"policy": "avl", "refresh_every": 2},
    {"policy": "avl", "core_page_size": 3},  # the query-aware core, chosen at every step
    {"policy": "avl", "refresh_lse_drop": 0.05},  # adaptive refresh: a flag per batch row
    # recall: pages swapped in at the refresh steps, inside the graph
    {
        "policy": "avl",
        "refresh_every": 3,
        "recall_pages": 2,
        "recall_page_size": 4,
        "vision_keep": 0.3,
        "vision_compute": 0.2,
    },
    RECALL_PAGES,
    # the same, staged as on a GPU: the host copies the pages' rows around the graph
    {**RECALL_PAGES, "staged": True},
    {"policy": "avl", "vision_keep": 1.0, "vision_compute": 1.0, "text_keep": 1.0},
    {"policy": "h2o"},
    {"policy": "streaming"},
    {"policy": "random"},
    {"policy": "full"},
    {"policy": "fastv"},
]


@pytest.mark.parametrize(
    "options", POLICIES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())
)
def test_decode_steps_run_in_the_graph_with_no_host_sync(monkeypatch, options):
    counter = _OpCounter()
    original = CompiledDecode.__call__
    layouts: list[bool] = []

    def counted(self, *args):
        with counter:  # the dispatcher's host work and the compiled graph (aot_eager: aten ops)
            result = original(self, *args)
        # the next step's state tensors keep the layout of the graph's examples (Inductor's
        # input stride checks are off for decode graphs)
        states = [ref() for ref in self._last_states]
        layouts.extend(t.is_contiguous() for s in states for t in s.tensors())
        return result

    if options["policy"] == "fastv" and _TRANSFORMERS < (5, 23):
        pytest.xfail(
            "transformers < 5.23 passes an explicit mask at every prefill, sized from the "
            "first layer's cache: FastV's layers then grow in lockstep, in the runtime-call "
            "graph (README)"
        )
    monkeypatch.setattr(CompiledDecode, "__call__", counted)
    options = dict(options)
    if options.pop("staged", False):
        from avl_compile import backend
        from avl_compile.policies import recall_copies

        monkeypatch.setattr(backend, "_stages_recall", lambda device: True)
        monkeypatch.setattr(recall_copies, "_defers_write_back", lambda pages, device: True)
    model = avl_compile.compile(tiny_llava(), options={"inner": "aot_eager", **options})
    # a left-padded batch; FastV's layers must then keep the first layer's cache length,
    # which its decode graph does not grow in the graph: an unpadded one
    second_suffix = [7, 8, 9, 10, 11] if options["policy"] == "fastv" else [7, 8, 9, 10, 11, 12]
    prompt = llava_prompt(model, [PREFIX, [1, 9]], [SUFFIX, second_suffix])
    greedy(model, prompt.inputs, new_tokens=41)  # 40 decode steps
    counters = model._avl_backend.runtime.counters
    assert counters["decode_graphs_in_graph"] == 40
    assert counters["decode_graphs_in_python"] == 0
    assert len(counter.ops) > 40 * 100, "the graphs ran under the counter"
    assert not SYNCING_OPS & set(counter.ops)
    assert len(layouts) >= 40 * 3 * 5 and all(layouts)
    decode_graphs = [g for g in model._avl_backend.graphs if g.decode_in_graph]
    assert decode_graphs
    for record in decode_graphs:  # one graph: no runtime call left to split it
        assert "attention_site" not in record.code_after
        assert "_decode_site" in record.code_after


def test_recall_swaps_every_layer_before_the_first_layer(monkeypatch):
    """A refresh step's graph swaps every site's pages at its start, one ``avl_swap_site``
    call per site before anything else runs (a swap reads only its site's state after the
    last step); a plain step's graph swaps nothing."""
    from avl_compile import backend
    from avl_compile.passes.rewrite_decode_sites import avl_decode_site, avl_swap_site

    rewritten = []
    original = backend.rewrite_decode_sites

    def recorded(*args, **kwargs):
        rewritten.append(original(*args, **kwargs))
        return rewritten[-1]

    monkeypatch.setattr(backend, "rewrite_decode_sites", recorded)
    model = avl_compile.compile(tiny_llava(), options={"inner": "aot_eager", **RECALL_PAGES})
    greedy(model, llava_prompt(model, [PREFIX], [SUFFIX]).inputs, new_tokens=6)
    refreshing = 0
    for gm in rewritten:
        body = [node.target for node in gm.graph.nodes if node.op != "placeholder"]
        sites, swaps = body.count(avl_decode_site), body.count(avl_swap_site)
        assert sites > 0
        if "refresh = True" in gm.code:
            refreshing += 1
            assert swaps == sites and body[:swaps] == [avl_swap_site] * swaps
        else:
            assert swaps == 0
    assert refreshing > 0


@pytest.mark.parametrize(
    "options", [RECALL_PAGES, {**RECALL_PAGES, "staged": True}], ids=["in-graph", "staged"]
)
def test_a_step_passes_the_last_steps_state_list_while_its_tensors_are_the_same(
    monkeypatch, options
):
    """The decode graph's state inputs: the last step's list again while no layer's state
    was replaced, a new one after a cache re-allocation; staged recall's (new rows at every
    step) read afresh. Every step's list holds the very tensors the states hold."""
    from avl_compile.compiled_decode import StateInputs

    given: list[StateInputs] = []
    original = CompiledDecode._state_inputs

    def recorded(self, states):
        inputs = original(self, states)
        fresh = StateInputs.of(states)
        assert len(inputs) == len(fresh) and all(map(operator.is_, inputs, fresh))
        given.append(inputs)
        return inputs

    monkeypatch.setattr(CompiledDecode, "_state_inputs", recorded)
    options = dict(options)
    staged = options.pop("staged", False)
    if staged:  # as on a GPU (see test_decode_steps_run_in_the_graph_with_no_host_sync)
        from avl_compile import backend
        from avl_compile.policies import recall_copies

        monkeypatch.setattr(backend, "_stages_recall", lambda device: True)
        monkeypatch.setattr(recall_copies, "_defers_write_back", lambda pages, device: True)
    model = avl_compile.compile(tiny_llava(), options={"inner": "eager", **options})
    greedy(model, llava_prompt(model, [PREFIX], [SUFFIX]).inputs, new_tokens=20)
    lists = len({id(inputs) for inputs in given})
    assert model._avl_backend.runtime.counters["decode_graphs_in_python"] == 0
    if staged:
        assert lists == len(given)
    else:  # 19 steps; the cache grows once or twice in them (``spare_slots``)
        assert len(given) == 19 and 2 <= lists <= 3


def _generate_through_post_grad(monkeypatch, options: dict, new_tokens: int, inspect):
    """A compiled tiny LLaVA's greedy ``generate`` with Inductor's caches off (its passes
    must run), ``inspect`` called on every graph right after the post-grad re-inplacing
    pass. Returns the model."""
    from torch._inductor.fx_passes import post_grad

    original = post_grad.reinplace_inplaceable_ops

    def reinplace(*args):
        original(*args)
        inspect(args[-1])

    monkeypatch.setattr(post_grad, "reinplace_inplaceable_ops", reinplace)
    model = avl_compile.compile(tiny_llava(), options=options)
    uncached = {"fx_graph_cache": False, "fx_graph_remote_cache": False}
    with (
        torch._inductor.config.patch(uncached),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        greedy(model, llava_prompt(model, [PREFIX], [SUFFIX]).inputs, new_tokens=new_tokens)
    return model


@pytest.mark.parametrize("options", [{"refresh_every": 2}, RECALL_PAGES], ids=["avl", "recall"])
def test_inductor_writes_the_cache_in_place(monkeypatch, options):
    """Every write of the step into the cache stays in place after Inductor's passes: one
    it cannot re-inplace becomes a copy of the whole cache at every step (recall's swaps,
    at the start of the graph, write the cache too)."""
    functional_writes, graphs = [], []

    def inspect(graph):
        graphs.append(graph)
        functional_writes.extend(
            str(node) for node in graph.find_nodes(
                op="call_function", target=torch.ops.aten.index_put.default
            )
        )  # fmt: skip

    model = _generate_through_post_grad(monkeypatch, options, 6, inspect)
    assert model._avl_backend.runtime.counters["decode_graphs_in_graph"] == 5
    assert len(graphs) >= 3, "prefill, plain and refresh graphs went through the passes"
    assert functional_writes == []


@pytest.mark.parametrize("options", [{"refresh_every": 2}, RECALL_PAGES], ids=["avl", "recall"])
def test_decode_graphs_see_only_the_caches_lengths_as_dynamic(monkeypatch, options):
    """Inductor compiles a decode graph with the sizes Dynamo traced: the weights' and the
    caches' batch, head and head-dim sizes static, only the caches' lengths symbolic. Recall
    and the query-aware core compile theirs at a prompt's first step, after Dynamo's trace;
    fakes made there from the real tensors had every size symbolic (the generated loops then
    divide by the hidden size at every element)."""
    graph_inputs: list[list] = []

    def inspect(graph):
        graph_inputs.append([node.meta["val"] for node in graph.find_nodes(op="placeholder")])

    model = _generate_through_post_grad(monkeypatch, options, 4, inspect)
    assert model._avl_backend.runtime.counters["decode_graphs_in_graph"] == 3
    weight_shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}

    def symbolic(size) -> bool:
        return isinstance(size, torch.SymInt) and not size.node.is_constant()

    def hint(size) -> int:
        return size.node.hint if isinstance(size, torch.SymInt) else size

    weights = caches = 0
    for inputs in graph_inputs:
        for value in inputs:
            if not isinstance(value, torch.Tensor):
                continue
            shape = tuple(value.shape)
            if len(shape) == 2 and tuple(hint(s) for s in shape) in weight_shapes:
                weights += 1
                assert not any(symbolic(s) for s in shape), shape
            if len(shape) == 4 and symbolic(shape[2]):
                caches += 1
                assert not any(symbolic(shape[d]) for d in (0, 1, 3)), shape
    assert weights > 0 and caches > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_generates_what_the_plain_graph_does():
    """The GPU check of CUDA graphs (benchmarks/gpu_checks.sh tests): decode graphs
    recorded and replayed as CUDA graphs, none skipped, the same tokens."""
    from torch._dynamo.utils import counters

    def run(cudagraphs: bool):
        model = avl_compile.compile(
            tiny_llava().cuda(), options={"refresh_every": 2, "cudagraphs": cudagraphs}
        )
        prompt = llava_prompt(model, [PREFIX, [1, 9]], [SUFFIX, [7, 8, 9, 10, 11, 12]])
        inputs = {k: v.cuda() for k, v in prompt.inputs.items()}
        out = greedy(model, inputs, new_tokens=24)
        assert model._avl_backend.runtime.counters["decode_graphs_in_graph"] == 23
        return out.sequences

    plain = run(cudagraphs=False)
    counters.clear()
    replayed = run(cudagraphs=True)
    assert torch.equal(replayed, plain)
    inductor = dict(counters["inductor"])
    assert "cudagraph_recorded_non_static_inputs" in inductor, "no CUDA graph was recorded"
    assert not inductor.get("cudagraph_skips"), inductor


def test_a_decode_graph_that_fails_to_compile_decodes_through_runtime_calls(monkeypatch):
    """A failing decode-graph compile (as the Triton op's range check once did on a GPU)
    must not fall to Dynamo, which then compiles the layers one by one: the backend decodes
    through its runtime calls (the same policy), with one warning that says why."""
    options = {"refresh_every": 2, "inner": "eager"}
    prompt = llava_prompt(tiny_llava(), [PREFIX], [SUFFIX])
    expected = compiled_greedy(tiny_llava, prompt.inputs, options, 8)[1].sequences
    torch._dynamo.reset()

    def fail(*args, **kwargs):
        raise RuntimeError("planted failure\nsecond line")

    monkeypatch.setattr(AvlBackend, "_compile_decode", staticmethod(fail))
    with pytest.warns(UserWarning) as caught:
        model, out = compiled_greedy(tiny_llava, prompt.inputs, options, 8)
    ours = [str(w.message) for w in caught if str(w.message).startswith("avl:")]
    assert ours == [
        "avl: the decode step could not be compiled into the graph (RuntimeError: planted "
        "failure); decoding through one runtime call per layer instead (same tokens, slower)"
    ]
    counters = model._avl_backend.runtime.counters
    layers = model.config.text_config.num_hidden_layers
    assert counters["decode_graphs_in_graph"] == 0 and counters["decode_sites"] == 7 * layers
    assert torch.equal(out.sequences, expected)


def _graphs_of_one_generate(new_tokens: int) -> int:
    model = avl_compile.compile(tiny_llava(), options={"inner": "eager"})
    greedy(model, llava_prompt(model, [PREFIX], [SUFFIX]).inputs, new_tokens)
    assert model._avl_backend.runtime.counters["decode_graphs_in_python"] == 0
    return len(model._avl_backend.graphs)


def test_graphs_per_generate_do_not_grow_with_length():
    count_256 = _graphs_of_one_generate(256)
    torch._dynamo.reset()
    assert _graphs_of_one_generate(512) == count_256


def test_no_recompile_storm_across_prompts_of_different_lengths():
    model = avl_compile.compile(tiny_llava(), options={"inner": "eager"})
    counts = []
    for length in range(20):
        suffix = [7 + i % 20 for i in range(1 + length)]
        prefix = [1] + [5] * (length % 4)
        greedy(model, llava_prompt(model, [prefix], [suffix], seed=length).inputs, 6)
        counts.append(len(model._avl_backend.graphs))
    # the first prompts make the lengths dynamic; the other 17 compile nothing
    assert counts[-1] == counts[2], counts


def _slots(role: list[int], position: list[int], scores: list[float], n_core: int):
    capacity = len(role)
    counters = torch.tensor([[capacity, 0, 100, n_core, capacity]])
    return AvlSlots(
        role=torch.tensor([role], dtype=torch.int8),
        position=torch.tensor([[position]]),
        text_rank=torch.full((1, 1, capacity), -1),
        text_score=torch.zeros(1, 1, capacity, dtype=torch.float64),
        counters=counters,
        text_options=torch.tensor([1.0, 0.5, 100.0], dtype=torch.float64),
        last_qk=torch.zeros(1, capacity, dtype=torch.float64),
    ), torch.tensor([scores], dtype=torch.float64)


def test_core_re_pick_ties_keep_the_core_then_the_lower_position():
    from avl_compile.policies.avl_decode import _repick_core

    # four image rows of equal score for two core places: slot 2 (position 40) is in the
    # core and stays; then the lower position: slot 1 (position 10) beats slots 0 and 3
    slots, score = _slots([OTHER, OTHER, CORE, OTHER], [30, 10, 40, 20], [0.25] * 4, n_core=2)
    _repick_core(slots, score)
    assert slots.role[0].tolist() == [OTHER, CORE, CORE, OTHER]
    # a higher score still wins over the tie rule
    slots, score = _slots([OTHER, OTHER, CORE, OTHER], [30, 10, 40, 20], [0.3, 0.2, 0.2, 0.2], 2)
    _repick_core(slots, score)
    assert slots.role[0].tolist() == [CORE, OTHER, CORE, OTHER]


def test_the_reference_breaks_ties_the_same_way():
    scores = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    positions = torch.tensor([10, 20, 30, 40])  # the reference's candidates: positional order
    in_core = torch.tensor([False, False, True, False])
    assert best_first(scores, positions, in_core).tolist()[:2] == [2, 0]
    assert best_first(scores, positions).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_last_ranked_are_best_firsts_tail_reversed(dtype):
    # ties (equal scores: the higher position ranks later), -inf and +inf, both signs
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(-3, 4, (3, 50), generator=generator).to(dtype) / 4
    scores[0, :5] = float("-inf")
    scores[1, -5:] = float("inf")
    positions = torch.randperm(1000, generator=generator)[:50].expand(3, -1)
    last = last_ranked(scores, positions, 12)
    assert torch.equal(last, best_first(scores, positions).flip(-1)[:, :12])
    # row 0's -inf rows are ranked last, among them the higher position later
    assert sorted(last[0, :5].tolist()) == [0, 1, 2, 3, 4]
    assert positions[0, last[0, :5]].tolist() == sorted(positions[0, :5].tolist(), reverse=True)


def test_text_eviction_ties_drop_the_higher_position():
    # three text rows (positions 5, 7, 6; ranks 0, 2, 1), budget max(round(0.5 n), 3): 3
    # before the step, 3 after it for 4 text tokens, so one row goes: 1 heavy + 2 recent
    # (ranks 2 and 3 are recent). A zero query attends uniformly: the older rows (positions
    # 5 and 6) tie, and at equal scores the higher position goes
    capacity, dim = 6, 4
    keys = torch.zeros(1, 1, capacity, dim, dtype=torch.float64)
    values = torch.zeros_like(keys)
    slots = AvlSlots(
        role=torch.tensor([[TEXT, TEXT, TEXT, 0, 0, 0]], dtype=torch.int8),
        position=torch.tensor([[[5, 7, 6, -1, -1, -1]]]),
        text_rank=torch.tensor([[[0, 2, 1, -1, -1, -1]]]),
        text_score=torch.zeros(1, 1, capacity, dtype=torch.float64),
        counters=torch.tensor([[3, 3, 8, 0, 0]]),  # text_end, n_text, position, n_core, start
        text_options=torch.tensor([0.5, 0.5, 3.0], dtype=torch.float64),
        last_qk=torch.zeros(1, capacity, dtype=torch.float64),
    )
    query = torch.zeros(1, 1, 1, dim, dtype=torch.float64)
    new = torch.ones(1, 1, 1, dim, dtype=torch.float64)
    avl_decode_step(query, new, new, keys, values, slots, scale=1.0, refresh=False)
    assert slots.position[0, 0].tolist() == [5, 7, 8, -1, -1, -1]  # the last row filled the hole
    assert slots.text_rank[0, 0, :3].tolist() == [0, 2, 3]
    assert slots.role[0].tolist() == [TEXT, TEXT, TEXT, 0, 0, 0]
    assert int(slots.counters[0, 0]) == 3


def test_eager_decode_step_equals_the_compiled_graph():
    """inner=eager runs the step's Python; inductor compiles it: same tokens (float64)."""
    make = functools.partial(tiny_llava, dtype=torch.float64)
    prompt = llava_prompt(make(), [PREFIX], [SUFFIX])
    eager = greedy(avl_compile.compile(make(), options={"inner": "eager"}), prompt.inputs, 12)
    torch._dynamo.reset()
    model = avl_compile.compile(make(), options={"inner": "aot_eager"})
    assert torch.equal(greedy(model, prompt.inputs, 12).sequences, eager.sequences)


def test_the_one_key_sort_orders_as_the_three_sorts():
    generator = torch.Generator().manual_seed(0)
    # scores with many exact ties, -inf for non-candidates, shuffled positions
    scores = torch.randint(-3, 4, (3, 50), generator=generator).float() / 8
    scores[:, 3::11] = -0.0  # ties +0.0
    scores[:, 5::13] = torch.randn(scores[:, 5::13].shape, generator=generator) * 1e30
    scores[:, ::7] = float("-inf")
    positions = torch.stack([torch.randperm(50, generator=generator) for _ in range(3)])
    prefer = torch.rand(3, 50, generator=generator) < 0.3
    for flag in (prefer, None):
        one_key = best_first(scores, positions, flag)
        three_sorts = best_first(scores.double(), positions, flag)
        candidates = 50 - len(range(0, 50, 7))
        assert torch.equal(one_key[:, :candidates], three_sorts[:, :candidates])
