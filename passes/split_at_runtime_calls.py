"""Split a rewritten graph so that the runtime calls (sites, recorders) run eagerly between
pieces that the inner compiler (Inductor, aot_eager) compiles.

The runtime calls have data-dependent output shapes (how many rows a policy keeps) and
keep state between calls, so they cannot live inside an Inductor graph; everything around
them (projections, RoPE, MLPs, norms) can.
"""

from __future__ import annotations

import operator

from torch import fx
from torch.fx.passes.split_module import split_module

from avl_compile.runtime import ImageMaskRecorder, SiteCall


def is_runtime_call(node: fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, (SiteCall, ImageMaskRecorder))


def split_at_runtime_calls(gm: fx.GraphModule) -> tuple[fx.GraphModule, set[str]]:
    """Returns the split module and the names of its submodules that hold runtime calls."""
    partition_of: dict[fx.Node, int] = {}
    runtime_partitions: set[int] = set()
    partition = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if is_runtime_call(node):
            partition += 1
            runtime_partitions.add(partition)
            partition_of[node] = partition
            partition += 1
        elif (
            node.target is operator.getitem
            and node.args[0] in partition_of
            and is_runtime_call(node.args[0])
        ):
            partition_of[node] = partition_of[node.args[0]]  # unpack outputs beside the call
        else:
            partition_of[node] = partition
    split = split_module(gm, gm, lambda node: partition_of[node], keep_original_order=True)
    runtime_names = {f"submod_{p}" for p in runtime_partitions}
    return split, runtime_names
