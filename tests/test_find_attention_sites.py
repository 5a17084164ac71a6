import torch
from helpers import GraphCapture, capture_generate_graphs
from toy_decoder import ToyDecoder, toy_inputs

from avl_compile.passes.find_attention_sites import find_attention_sites
from avl_compile.tiny_models import llava_prompt, tiny_llava


def _capture(module, *args, **kwargs):
    capture = GraphCapture()
    torch.compile(module, backend=capture)(*args, **kwargs)
    return capture.graphs


def test_gqa_form_is_a_decoder_site_and_the_encoder_attention_is_not():
    (graph,) = _capture(ToyDecoder("gqa"), *toy_inputs())
    sites = find_attention_sites(graph.graph)
    assert len(sites) == 2
    decoder = next(s for s in sites if s.rewritable)
    assert decoder.layer_idx == 0 and decoder.name.endswith("layers.0.self_attn")
    assert decoder.key_cat.target is torch.cat and decoder.value_cat.target is torch.cat
    encoder = next(s for s in sites if not s.rewritable)
    assert "not a decoder site" in encoder.reason


def test_repeat_kv_form_with_an_explicit_mask_is_a_decoder_site():
    x, past_keys, past_values = toy_inputs()
    mask = torch.ones(1, 1, 5, 8, dtype=torch.bool)
    (graph,) = _capture(ToyDecoder("repeat_kv"), x, past_keys, past_values, mask)
    decoder = [s for s in find_attention_sites(graph.graph) if s.rewritable]
    assert len(decoder) == 1
    assert decoder[0].arguments["attn_mask"] is not None


def test_a_cache_with_other_users_is_left_dense_with_the_reason():
    (graph,) = _capture(ToyDecoder("gqa"), *toy_inputs(), extra_user=True)
    reasons = [s.reason for s in find_attention_sites(graph.graph)]
    assert any(r and "users other than" in r for r in reasons)


def test_llava_decoder_sites_are_found_by_structure_in_every_graph():
    model = tiny_llava()
    prompt = llava_prompt(model, [[1, 5]], [[7, 8]])
    graphs = capture_generate_graphs(model, prompt.inputs, new_tokens=4)
    per_graph = [find_attention_sites(g.graph) for g in graphs]
    decoder_graphs = [sites for sites in per_graph if any(s.rewritable for s in sites)]
    assert len(decoder_graphs) >= 3  # prefill, then decode graphs
    for sites in decoder_graphs:
        assert [s.layer_idx for s in sites if s.rewritable] == [0, 1, 2]
    # transformers 5.17 captures the CLIP tower's own attention: it must be left alone
    for sites in per_graph:
        if not any(s.rewritable for s in sites):
            assert all("not a decoder site" in s.reason for s in sites)


def _traced_site_reading_the_cache_length(shape_used_elsewhere: bool) -> torch.fx.Graph:
    """A decode site whose repeat_kv sizes itself by ``keys.size()[2]``, as Dynamo traces
    HF's repeat_kv when the cache length is symbolic (HF's compile path)."""

    def attend(query, past_keys, new_keys, past_values, new_values):
        keys = torch.cat([past_keys, new_keys], dim=-2)
        values = torch.cat([past_values, new_values], dim=-2)
        length = keys.size()[2]
        keys_rep = keys[:, :, None, :, :].expand(1, 2, 2, length, 4).reshape(1, 4, length, 4)
        values_rep = values[:, :, None, :, :].expand(1, 2, 2, length, 4).reshape(1, 4, -1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(query, keys_rep, values_rep)
        if shape_used_elsewhere:
            out = out * length
        return out, keys, values

    graph = torch.fx.symbolic_trace(attend).graph
    for node in graph.nodes:
        node.meta["nn_module_stack"] = {"attn": ("model.layers.0.self_attn", None)}
    return graph


def test_a_read_of_the_cache_length_that_only_sizes_repeat_kv_goes_with_the_site():
    (site,) = find_attention_sites(_traced_site_reading_the_cache_length(False))
    assert site.rewritable, site.reason
    assert any(node.target == "size" for node in site.key_chain)
    (site,) = find_attention_sites(_traced_site_reading_the_cache_length(True))
    assert "users other than" in site.reason
