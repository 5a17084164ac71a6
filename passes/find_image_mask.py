"""Find where image features are scattered into the token embeddings.

LLaVA-style models build ``inputs_embeds.masked_scatter(image_mask, image_features)``; the
mask marks the image-token positions. It may be computed in an earlier graph (LLaVA without
``fullgraph`` breaks at ``get_placeholder_mask``) and arrive here as an input, so the runtime
records it when the graph runs rather than the pass reading it off the graph.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx


@dataclasses.dataclass
class ImageScatter:
    node: fx.Node  # the masked_scatter
    inputs_embeds: fx.Node
    mask: fx.Node


def find_image_scatters(graph: fx.Graph) -> list[ImageScatter]:
    found = []
    for node in graph.nodes:
        is_method = node.op == "call_method" and node.target == "masked_scatter"
        is_function = node.op == "call_function" and node.target is torch.masked_scatter
        if not (is_method or is_function):
            continue
        embeds, mask = node.args[0], node.args[1]
        value = embeds.meta.get("example_value") if isinstance(embeds, fx.Node) else None
        if value is None or value.dim() != 3:
            continue  # not [batch, sequence, hidden] embeddings
        found.append(ImageScatter(node=node, inputs_embeds=embeds, mask=mask))
    return found
