"""Kernels and ops the rewritten graphs call (imported as ``avl_compile.lowering``)."""

from __future__ import annotations

import functools
import os

from torch import Tensor

from avl_compile.lowering.gathered_attention import (
    TRITON_DTYPES,
    gathered_attention,
    merge_partial_attention,
)

__all__ = ["attend_selected_rows", "gathered_attention", "merge_partial_attention"]


@functools.cache
def _triton_op():
    try:
        from avl_compile.lowering.triton_gathered_attention import gathered_attention_triton
    except ImportError:  # triton is an optional dependency
        return None
    return gathered_attention_triton


def attend_selected_rows(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    index: Tensor | None,
    scale: float,
    ranges: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Gathered attention on the best implementation for the device: the Triton kernel on
    GPUs, the PyTorch op elsewhere. Returns (output, log-sum-exp).

    ``AVL_GATHERED_ATTENTION=triton`` forces the kernel (on a CPU under TRITON_INTERPRET=1,
    for tests) and ``=torch`` the PyTorch op."""
    forced = os.environ.get("AVL_GATHERED_ATTENTION")
    if forced == "triton":
        if _triton_op() is None:
            raise RuntimeError("AVL_GATHERED_ATTENTION=triton, but triton is not installed")
        return _triton_op()(query, keys, values, index, scale, ranges)
    if forced != "torch" and query.is_cuda and query.dtype in TRITON_DTYPES and _triton_op():
        return _triton_op()(query, keys, values, index, scale, ranges)
    return gathered_attention(query, keys, values, index, scale, ranges)
