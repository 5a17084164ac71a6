"""``avl::core_choice``: the query-aware core's per-step choice for one layer as one call
of C code, on a CPU.

As tensor operations (``page_core.CorePages.bound_per_slot``, then a sort of every slot's
rule key, a scatter of ranks and a role write) the choice cost Inductor's generated code
~70 us a layer and step on ``cpu-host`` (docs/history.md, session 23), and the recommended
option set chooses at every step. ``core_choice.c`` bounds only the pages that hold a
candidate and keeps the core's rows in a heap of ``n_core``. The op writes the roles in
place; a graph calls it as an extern kernel. Where the pages' boxes are large (``cpu-long``:
3 MB a layer) the graph's own parallel kernel bounds the pages and the op takes the bounds.

Built at first use (``native_build``); where it cannot be built, or the tensors are not
float32 on the CPU, the choice stays the tensor function (one warning says why).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import Tensor

from avl_compile.lowering import native_build

_SOURCE = Path(__file__).with_name("core_choice.c")
_CHOICE = native_build.NativeFunction(
    _SOURCE,
    "avl_core_choice",
    [ctypes.c_int64] * 7 + [ctypes.c_void_p] * 8,
    "the query-aware core's choice runs as tensor operations",
)


def library():
    """The loaded C choice function, or None (with one warning) where it cannot be built."""
    return _CHOICE.get()


_SCHEMA = (
    "core_choice(Tensor query, Tensor low, Tensor high, Tensor? page_bound, "
    "Tensor image_ordinal, Tensor(a!) role, Tensor position, Tensor counters, "
    "int page_size) -> ()"
)
_OPS = torch.library.Library("avl", "FRAGMENT")
_OPS.define(_SCHEMA)


def _core_choice_cpu(
    query: Tensor,
    low: Tensor,
    high: Tensor,
    page_bound: Tensor | None,
    image_ordinal: Tensor,
    role: Tensor,
    position: Tensor,
    counters: Tensor,
    page_size: int,
) -> None:
    choice = library()
    if choice is None:
        raise RuntimeError("avl::core_choice called where its C library could not be loaded")
    query = query.contiguous()  # a graph may hand over a view of the step's query
    batch, q_heads, head_dim = query.shape
    kv_heads, n_pages = low.shape[1], low.shape[2]
    status = choice(
        batch, q_heads, kv_heads, role.shape[1], head_dim, n_pages, page_size,
        query.data_ptr(), low.data_ptr(), high.data_ptr(),
        None if page_bound is None else page_bound.contiguous().data_ptr(),
        image_ordinal.data_ptr(), role.data_ptr(), position.data_ptr(), counters.data_ptr(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("avl::core_choice: no memory for its scratch")


_OPS.impl("core_choice", _core_choice_cpu, "CPU")


@torch.library.register_fake("avl::core_choice")
def _core_choice_fake(*args, **kwargs) -> None:
    return None


core_choice = torch.ops.avl.core_choice.default

# past about an L2's worth of boxes (``cpu-long``: 3 MB a layer) the graph's parallel,
# vectorized kernel bounds the pages faster than the C loop on one thread (as recall's
# choice of pages: docs/history.md, session 21)
C_BOUND_BOX_BYTES = 512 * 1024  # per batch row and layer


def why_not_native(tensors: dict[str, Tensor]) -> str | None:
    """Why these tensors (by the op's argument names) cannot take the C choice, or None:
    every one on the CPU and contiguous (the query may be a view: the op copies it), the
    query, boxes and bounds float32, roles int8, the rest int64; and the C library loads."""
    reason = native_build.why_not_native(tensors, _dtype_of, strided_ok=("query",))
    if reason is None and library() is None:
        return "its C library could not be built"
    return reason


def _dtype_of(name: str) -> torch.dtype:
    if name == "role":
        return torch.int8
    return torch.int64 if name in ("image_ordinal", "position", "counters") else torch.float32
