"""Shared helpers of the tests: greedy generation with and without the backend."""

from __future__ import annotations

import torch

import avl_compile
from avl_compile.reference import reference_generate

NEW_TOKENS = 32

# the prefill selection's option sets (A-VL, recall, recall + the core's pages), as
# ``AvlOptions`` keywords
PREFILL_OPTION_SETS = {
    "a-vl": {},
    "recall": {"recall_pages": 2, "recall_page_size": 4, "refresh_every": 1},
    "recall + pages": {
        "recall_pages": 2,
        "recall_page_size": 4,
        "refresh_every": 1,
        "core_page_size": 4,
    },
}


def greedy(model, inputs, new_tokens: int = NEW_TOKENS, **kwargs):
    return model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
        **kwargs,
    )


def compiled_greedy(make_model, inputs, options, new_tokens: int = NEW_TOKENS):
    model = avl_compile.compile(make_model(), options=options)
    return model, greedy(model, inputs, new_tokens)


def reference_greedy(make_model, inputs, options, new_tokens: int = NEW_TOKENS) -> torch.Tensor:
    return reference_generate(
        make_model(),
        inputs,
        options,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
    )


def row_alone(inputs: dict, row: int) -> dict:
    """Batch row ``row`` as a batch of one, its left padding removed."""
    single = {k: v[row : row + 1] for k, v in inputs.items()}
    keep = single["attention_mask"][0].bool()
    for name in ("input_ids", "attention_mask"):
        single[name] = single[name][:, keep]
    return single


class GraphCapture:
    """A Dynamo backend that keeps the graphs it is given and runs them eagerly."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def capture_generate_graphs(model, inputs: dict, new_tokens: int) -> list[torch.fx.GraphModule]:
    """The Dynamo graphs of ``model.generate`` (compiled forward), run eagerly."""
    capture = GraphCapture()
    model.forward = torch.compile(model.forward, backend=capture)
    model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return capture.graphs
