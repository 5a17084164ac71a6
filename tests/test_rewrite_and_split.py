"""rewrite_attention_sites, record_image_mask and split_at_runtime_calls on captured graphs."""

import warnings

import pytest
import torch
from helpers import GraphCapture, capture_generate_graphs
from toy_decoder import ToyDecoder, toy_inputs

import avl_compile
from avl_compile import AvlBackend
from avl_compile.options import AvlOptions
from avl_compile.passes.find_attention_sites import SDPA_TARGETS, find_attention_sites
from avl_compile.passes.find_image_mask import find_image_scatters
from avl_compile.passes.record_image_mask import insert_image_mask_recorders
from avl_compile.passes.rewrite_attention_sites import rewrite_attention_sites
from avl_compile.passes.split_at_runtime_calls import is_runtime_call, split_at_runtime_calls
from avl_compile.policies.common import PrefillContext
from avl_compile.policies.decode_schedule import spare_slots
from avl_compile.runtime import AvlRuntime, ImageMaskRecorder, SiteCall, rows_in_use
from avl_compile.tiny_models import llava_prompt, tiny_llava


def _toy_graph(**kwargs):
    capture = GraphCapture()
    torch.compile(ToyDecoder(), backend=capture)(*toy_inputs(past=0), **kwargs)
    return capture.graphs[0]


def test_rewrite_replaces_the_decoder_sdpa_and_the_cache_write_back():
    gm = _toy_graph()
    sites = find_attention_sites(gm.graph)
    count = len(rewrite_attention_sites(gm.graph, sites, AvlOptions(), AvlRuntime()))
    assert count == 1
    calls = [n for n in gm.graph.nodes if isinstance(n.target, SiteCall)]
    assert len(calls) == 1
    remaining = [n for n in gm.graph.nodes if n.target in SDPA_TARGETS]
    assert len(remaining) == 1  # the encoder-style attention stays
    output = gm.graph.output_node()
    returned = output.args[0]
    assert [r.args for r in returned[1:]] == [(calls[0], 1), (calls[0], 2)]
    assert not [n for n in gm.graph.nodes if n.target is torch.cat]  # the concat is gone


def test_rewritten_toy_without_an_image_runs_dense_with_one_warning_per_prompt():
    model = ToyDecoder()
    inputs = toy_inputs(past=0)
    expected = model(*inputs)
    compiled = torch.compile(model, backend=AvlBackend({"inner": "eager"}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = compiled(*inputs)
        compiled(*inputs)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
    messages = [str(w.message) for w in caught if "avl" in str(w.message)]
    assert len(messages) == 2  # two prompts
    assert all("this prompt runs dense" in m and "no image tokens" in m for m in messages)


def test_a_text_only_generate_warns_once_not_once_per_layer():
    model = avl_compile.compile(tiny_llava(), options={"inner": "eager"})
    input_ids = torch.tensor([[1, 5, 6, 7, 8]])
    expected = tiny_llava().generate(input_ids=input_ids, max_new_tokens=4, do_sample=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = model.generate(input_ids=input_ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, expected)
    messages = [str(w.message) for w in caught if str(w.message).startswith("avl")]
    assert messages == [
        "avl: this prompt runs dense attention in every decoder layer: no image tokens were "
        "found for this prompt"
    ]


def test_a_batch_with_a_text_only_prompt_runs_dense_with_one_warning(monkeypatch):
    """Row 1 holds no image token: the prompt runs dense in every layer (the same tokens as
    the uncompiled model) and says why once; the mask is read by the first layer only."""
    model = tiny_llava()
    prompt = llava_prompt(model, [[1, 5]], [[7]])
    with_image = prompt.inputs["input_ids"][0]
    text_only = torch.full_like(with_image, 6)
    inputs = {**prompt.inputs, "input_ids": torch.stack([with_image, text_only])}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    expected = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    reads = []
    original = PrefillContext.rows_all_hold_images

    def counted(self):
        reads.append(self.every_row_has_image is None)
        return original(self)

    monkeypatch.setattr(PrefillContext, "rows_all_hold_images", counted)
    compiled = avl_compile.compile(tiny_llava(), options={"inner": "eager"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = compiled.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, expected)
    messages = [str(w.message) for w in caught if str(w.message).startswith("avl")]
    assert messages == [
        "avl: this prompt runs dense attention in every decoder layer: a prompt in the batch "
        "holds no image tokens"
    ]
    layers = model.config.text_config.num_hidden_layers
    assert reads == [True] + [False] * (layers - 1)  # one read of the mask, then the answer


def test_recorder_is_inserted_after_the_scatter_and_survives_dead_code_elimination():
    model = tiny_llava()
    graphs = capture_generate_graphs(model, llava_prompt(model, [[1]], [[7]]).inputs, 2)
    gm = next(g for g in graphs if find_image_scatters(g.graph))
    scatters = find_image_scatters(gm.graph)
    assert insert_image_mask_recorders(gm.graph, scatters, AvlRuntime()) == 1
    gm.graph.eliminate_dead_code()
    recorder = next(n for n in gm.graph.nodes if isinstance(n.target, ImageMaskRecorder))
    assert recorder.prev is scatters[0].node
    assert list(scatters[0].node.users) == [recorder]  # later users read the recorder's output


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_split_pieces_compile_and_reproduce_the_graph(inner):
    model = ToyDecoder()
    inputs = toy_inputs(past=0)
    expected = model(*inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = torch.compile(model, backend=AvlBackend({"inner": inner}))(*inputs)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


def test_split_graph_calls_its_pieces_without_module_or_dynamo_wrappers():
    """Each piece is a plain attribute of the split graph (no nn.Module lookup and call per
    piece) and runs without a ``torch._dynamo.disable`` of its own (Dynamo already runs the
    whole split graph under one): host work a 32-layer prefill pays ~65 times."""
    returned = []

    class KeepingBackend(AvlBackend):
        def __call__(self, gm, example_inputs, **kwargs):
            returned.append(super().__call__(gm, example_inputs, **kwargs))
            return returned[-1]

    model, inputs = ToyDecoder(), toy_inputs(past=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.compile(model, backend=KeepingBackend({"inner": "inductor"}))(*inputs)
    split = returned[0].__self__
    assert not list(split.children())
    pieces = [value for name, value in vars(split).items() if name.startswith("submod_")]
    assert len(pieces) == 3  # before the site, the site, after it
    for piece in pieces:
        assert not isinstance(piece, torch.nn.Module)
        assert not hasattr(getattr(piece, "compiled", None), "_torchdynamo_orig_callable")


def test_split_isolates_each_runtime_call_with_its_outputs():
    gm = _toy_graph()
    rewrite_attention_sites(gm.graph, find_attention_sites(gm.graph), AvlOptions(), AvlRuntime())
    gm.recompile()
    split, runtime_names = split_at_runtime_calls(gm)
    assert len(runtime_names) == 1
    for name, submodule in split.named_children():
        calls = [n for n in submodule.graph.nodes if is_runtime_call(n)]
        if name in runtime_names:
            assert len(calls) == 1
            others = [
                n for n in submodule.graph.nodes if n.op == "call_function" and n not in calls
            ]
            assert all(n.args[0] is calls[0] for n in others)  # only getitems of the call
        else:
            assert not calls


def test_image_mask_recorded_in_one_graph_drives_the_sites_of_another():
    decoder = ToyDecoder()
    embed = torch.nn.Embedding(300, 16)
    image_token = 299

    def forward(input_ids, features, past_keys, past_values):
        embeds = embed(input_ids)
        mask = (input_ids == image_token)[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(mask, features)
        torch._dynamo.graph_break()  # as LLaVA's get_placeholder_mask does without fullgraph
        return decoder(embeds, past_keys, past_values)

    n_image = 10
    input_ids = torch.tensor([[1, 2] + [image_token] * n_image + [5, 6, 7]])
    features = torch.randn(n_image, 16)
    empty = torch.zeros(1, 2, 0, 4)
    backend = AvlBackend({"inner": "eager", "text_min_budget": 1, "text_keep": 0.5})
    with torch.no_grad():
        _, keys, values = torch.compile(forward, backend=backend)(input_ids, features, empty, empty)
    graphs = backend.graphs
    assert any(g.recorders and not g.rewritten for g in graphs)
    assert any(g.rewritten and not g.recorders for g in graphs)
    # sink 2 + floor(0.5 * 10) image rows + max(round(0.5 * 3), 1) text rows
    assert rows_in_use(keys) == 2 + 5 + 2
    # free slots, but never more rows than the prompt's 15
    assert keys.shape[2] == values.shape[2] == min(2 + 5 + 2 + spare_slots(2 + 5 + 2), 15)
    assert backend.runtime.counters["prefill_sites"] == 1


@pytest.mark.parametrize("style", ["gqa", "repeat_kv"])
def test_rewrite_erases_only_what_it_orphaned(style):
    decoder = ToyDecoder(style)

    def step(x, past_keys, past_values, counter):
        counter.add_(1)  # an in-place write nobody reads: must survive the rewrite
        return decoder(x, past_keys, past_values)

    capture = GraphCapture()
    torch.compile(step, backend=capture)(*toy_inputs(past=0), torch.zeros(()))
    gm = capture.graphs[0]
    sites = find_attention_sites(gm.graph)
    assert len(rewrite_attention_sites(gm.graph, sites, AvlOptions(), AvlRuntime())) == 1
    targets = [n.target for n in gm.graph.nodes]
    assert "add_" in targets
    assert torch.cat not in targets and "expand" not in targets  # the cache concat, repeat_kv


def test_unrecognised_cached_site_runs_dense_with_one_warning_naming_it():
    model = ToyDecoder()
    inputs = toy_inputs(past=0)
    expected = model(*inputs, extra_user=True)  # the cache is read outside the attention
    compiled = torch.compile(model, backend=AvlBackend({"inner": "eager"}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = compiled(*inputs, extra_user=True)
        compiled(*inputs, extra_user=True)
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)  # exactly as without the backend
    messages = [str(w.message) for w in caught if "avl" in str(w.message)]
    assert messages == [
        "avl: dense attention in layers.0.self_attn: the KV cache has users other than "
        "this attention and the write-back"
    ]
