"""Kernels and ops the rewritten graphs call (imported as ``avl_compile.lowering``)."""

from avl_compile.lowering.gathered_attention import gathered_attention, merge_partial_attention

__all__ = ["gathered_attention", "merge_partial_attention"]
