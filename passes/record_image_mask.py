"""Insert a runtime call that records the image-token mask right after it is scattered."""

from __future__ import annotations

from torch import fx

from avl_compile.passes.find_image_mask import ImageScatter
from avl_compile.runtime import record_image_mask


def insert_image_mask_recorders(
    graph: fx.Graph, scatters: list[ImageScatter], runtime_key: str
) -> int:
    for scatter in scatters:
        with graph.inserting_after(scatter.node):
            graph.call_function(
                record_image_mask, (runtime_key, scatter.mask, scatter.inputs_embeds)
            )
    return len(scatters)
