import torch
from helpers import GraphCapture, capture_generate_graphs

from avl_compile.passes.find_image_mask import find_image_scatters
from avl_compile.tiny_models import llava_prompt, tiny_llava


def test_llava_prefill_graph_has_the_image_scatter_and_decode_graphs_do_not():
    model = tiny_llava()
    prompt = llava_prompt(model, [[1, 5]], [[7, 8]])
    graphs = capture_generate_graphs(model, prompt.inputs, new_tokens=3)
    found = [find_image_scatters(g.graph) for g in graphs]
    assert sum(len(f) for f in found) == 1
    scatter = next(f[0] for f in found if f)
    assert scatter.inputs_embeds.meta["example_value"].dim() == 3


def test_masked_scatter_on_non_embedding_tensors_is_ignored():
    def scatter_flat(x, mask, source):
        return x.masked_scatter(mask, source)

    capture = GraphCapture()
    args = (torch.zeros(6), torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool), torch.ones(3))
    torch.compile(scatter_flat, backend=capture)(*args)
    assert find_image_scatters(capture.graphs[0].graph) == []
