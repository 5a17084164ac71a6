"""A tensor Inductor writes once into a buffer instead of recomputing it in every loop that
reads it.

Inductor inlines a pointwise producer (the query's rotary embedding: a cos and a sin per
element) into each consumer. Where the consumer is a reduction over many rows, the
producer runs again for every row: a one-row ``bmm`` on a CPU is lowered to such a
reduction (q.k over every slot of the cache, ``slot_attention``), and so is an element-wise
bound over every page (``page_core``). Measured on ``cpu-long``'s decode graph: the cos and
sin of the query, recomputed for each of ~1,500 slots per head and layer.

``materialized`` asks for the tensor's own layout (Inductor's ``force_stride_order``
prim): in eager mode a copy at most; in a graph nothing for a tensor that is a buffer
already, else one copy kernel that the consumers then read.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # a private module of Inductor's (torch 2.1 to at least 2.13): without it, no hint
    import torch._inductor.inductor_prims  # noqa: F401  (registers the prim)

    _FORCE_STRIDE = torch.ops.prims.inductor_force_stride_order
except (ImportError, AttributeError):
    _FORCE_STRIDE = None


def materialized(tensor: Tensor) -> Tensor:
    """``tensor``, computed once into a buffer of its layout inside an Inductor graph
    (``tensor`` itself where this torch has no such prim: slower, the same values; and in
    eager mode, where nothing recomputes it and the prim's copy cost ~90 us a call)."""
    if _FORCE_STRIDE is None or (_is_eager(tensor) and not torch.compiler.is_compiling()):
        return tensor
    # a view with gaps (a slice's) gets a dense layout: the prim's eager form (a traced
    # graph run by aot_eager) allocates exactly the strides it is given
    return _FORCE_STRIDE(tensor, torch.empty_like(tensor).stride())


def _is_eager(tensor: Tensor) -> bool:
    """A plain tensor: not a fake or functional one of a graph being traced (AOTAutograd's
    trace of a decode step runs no Dynamo, so ``is_compiling`` alone cannot tell)."""
    return type(tensor) is torch.Tensor
