"""Insert a runtime call that records the image-token mask right after it is scattered."""

from __future__ import annotations

from torch import fx

from avl_compile.passes.find_image_mask import ImageScatter
from avl_compile.runtime import AvlRuntime, ImageMaskRecorder


def insert_image_mask_recorders(
    graph: fx.Graph, scatters: list[ImageScatter], runtime: AvlRuntime
) -> int:
    """After each scatter: ``embeds = record_image_mask(mask, embeds)``; the graph's later
    users read the recorder's output."""
    recorder = ImageMaskRecorder(runtime)
    for scatter in scatters:
        with graph.inserting_after(scatter.node):
            recorded = graph.call_function(recorder, (scatter.mask, scatter.node))
        recorded.meta.update(scatter.node.meta)
        for user in list(scatter.node.users):
            if user is not recorded:
                user.replace_input_with(scatter.node, recorded)
    return len(scatters)
