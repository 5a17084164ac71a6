"""``avl::prefill_rows``: one layer's A-VL prefill selection as one call of C code, on a CPU.

As one Inductor-compiled call (``policies.avl_prefill_rows.compiled_prefill_rows``) the
selection cost ~0.55 ms a layer inside a prefill on ``cpu-host``: the compiled call's own
host work (guards, the generated wrapper's Python), four sorts and a dozen small kernels
(docs/history.md, sessions 22-25), about a sixth of the first token's time there.
``prefill_rows.c`` does the same work (the scores from the attention's log-sum-exp, the
ranking by radix select, H2O's keep, the slots' rows, recall's and the core's pages) in
one pass per batch row. The op allocates its outputs; the prefill calls it eagerly (it is
never traced: it has no fake kernel, its output sizes come from the layout). It also returns
the layer's own copies of the layout's ``role``, ``counters`` and ``text_options`` and of
the last query row (the decode state's), made in C++: as four calls from Python they cost
~1 ms a prefill on ``cpu-host`` in place (docs/history.md, session 28).

Its CPU kernel (``torch_kernels.cpp``) is built at first use (``native_build``). Where it
cannot be built, or the tensors are not float32 rows on the CPU, the selection stays the
compiled tensor function (one warning says why).
"""

from __future__ import annotations

import torch
from torch import Tensor

from avl_compile.lowering import native_build

_SCHEMA = (
    "prefill_rows(Tensor query, Tensor keys, Tensor values, Tensor lse, Tensor plan, "
    "Tensor candidates, Tensor sink, Tensor text_slots, Tensor recent, Tensor text_rank, "
    "Tensor not_text, Tensor image_slot, Tensor image_positions, Tensor query_valid, "
    "Tensor last_bias, Tensor columns, Tensor column_bias, int first_row, float scale, "
    "int capacity, int recall_page_size, int recall_n_pages, int core_page_size, "
    "int core_n_pages, Tensor role, Tensor counters, Tensor text_options) -> (Tensor, "
    "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
    "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
# its CPU kernel comes with the C library (``native_build``)
_OPS = torch.library.Library("avl", "FRAGMENT")
_OPS.define(_SCHEMA)

prefill_rows = torch.ops.avl.prefill_rows.default

_ROWS = ("query", "keys", "values")  # [B, H, L, D] views: any strides but the last


def why_not_native(tensors: dict[str, Tensor]) -> str | None:
    """Why these tensors (by the op's argument names) cannot take the C selection, or
    None: every one on the CPU; rows with a contiguous last dimension, the rest
    contiguous (but the log-sum-exp: the op reads it through its strides); floats float32,
    bools bool, the rest int64; and the C library loads."""
    for name in _ROWS:
        if name in tensors and tensors[name].stride(-1) != 1:
            return f"{name}'s last dimension is not contiguous"
    return native_build.why_not_native(tensors, _dtype_of, strided_ok=(*_ROWS, "lse"))


_BOOLS = ("text_slots", "recent", "not_text", "image_slot", "query_valid")
_FLOATS = ("query", "keys", "values", "lse", "last_bias", "column_bias")


def _dtype_of(name: str) -> torch.dtype:
    if name in _BOOLS:
        return torch.bool
    return torch.float32 if name in _FLOATS else torch.int64
