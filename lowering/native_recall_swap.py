"""``avl::recall_swap``: recall's swap for one layer as one call of C code, on a CPU.

Written as tensor operations (``policies.recall.recall_before_step``), a swap of 64 rows
cost Inductor's generated code ~100-200 us a layer and step on ``cpu-host`` (gathers with
index checks, N x N counts, ATen sorts and cumsums: docs/history.md, sessions 15-20), and
the recommended option set swaps at every step. The same swap in C (``recall_swap.c``:
a heap for the rows ranked last, insertion sorts of at most R pages and M rows, row
copies) is the work itself. The op mutates its inputs in place; a graph calls it as an extern
kernel (no copies: ``Tensor(a!)`` arguments of graph inputs are written in place).

The C file is built at first use (``native_build``: the system C compiler, no torch
headers). Where it cannot be built, or the tensors are not float32 rows on
the CPU, the swap stays the tensor function (one warning says why).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import Tensor

from avl_compile.lowering import native_build

_SOURCE = Path(__file__).with_name("recall_swap.c")
_pointer_type, _size = ctypes.c_void_p, ctypes.c_int64
_SWAP = native_build.NativeFunction(
    _SOURCE,
    "avl_recall_swap",
    [_size] * 8 + [ctypes.c_double] + [_pointer_type] * 11 + [_pointer_type] * 2 + [_size]
    + [_pointer_type] * 3 + [_size, _size, _pointer_type],
    "recall's swap runs as tensor operations",
)  # fmt: skip


def library():
    """The loaded C swap function, or None (with one warning) where it cannot be built."""
    return _SWAP.get()


_SCHEMA = (
    "recall_swap(Tensor query, Tensor(a!) keys, Tensor(b!) values, Tensor(c!) role, "
    "Tensor(d!) position, Tensor last_qk, Tensor(e!) page_positions, Tensor(f!) page_keys, "
    "Tensor(g!) page_values, Tensor(h!) page_low, Tensor(i!) page_high, "
    "Tensor(j!)? image_ordinal, Tensor? image_positions, Tensor(k!)? core_low, "
    "Tensor(l!)? core_high, Tensor(m!)? members, Tensor? chosen, int recall_pages, "
    "float scale) -> ()"
)
# the op's namespace fragment (the ``avl`` namespace's other ops: ``custom_op``)
_OPS = torch.library.Library("avl", "FRAGMENT")
_OPS.define(_SCHEMA)


def _pointer(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _recall_swap_cpu(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    role: Tensor,
    position: Tensor,
    last_qk: Tensor,
    page_positions: Tensor,
    page_keys: Tensor,
    page_values: Tensor,
    page_low: Tensor,
    page_high: Tensor,
    image_ordinal: Tensor | None,
    image_positions: Tensor | None,
    core_low: Tensor | None,
    core_high: Tensor | None,
    members: Tensor | None,
    chosen: Tensor | None,
    recall_pages: int,
    scale: float,
) -> None:
    swap = library()
    if swap is None:
        raise RuntimeError("avl::recall_swap called where its C library could not be loaded")
    batch, q_heads, head_dim = query.shape
    kv_heads, capacity = keys.shape[1], keys.shape[2]
    n_pages, page_size = page_positions.shape[1], page_positions.shape[2]
    n_image = 0 if image_positions is None else image_positions.shape[1]
    n_core, core_size = (0, 0) if members is None else (members.shape[1], members.shape[2])
    status = swap(
        batch, q_heads, kv_heads, capacity, head_dim, n_pages, page_size,
        min(recall_pages, n_pages), scale,
        query.data_ptr(), keys.data_ptr(), values.data_ptr(), role.data_ptr(),
        position.data_ptr(), last_qk.data_ptr(), page_positions.data_ptr(),
        page_keys.data_ptr(), page_values.data_ptr(), page_low.data_ptr(),
        page_high.data_ptr(), _pointer(image_ordinal), _pointer(image_positions), n_image,
        _pointer(core_low), _pointer(core_high), _pointer(members), n_core, core_size,
        _pointer(chosen),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("avl::recall_swap: no memory for the swap's scratch rows")


_OPS.impl("recall_swap", _recall_swap_cpu, "CPU")


@torch.library.register_fake("avl::recall_swap")
def _recall_swap_fake(*args, **kwargs) -> None:
    return None


recall_swap = torch.ops.avl.recall_swap.default


def why_not_native(tensors: dict[str, Tensor | None]) -> str | None:
    """Why these tensors (by the op's argument names) cannot take the C swap, or None:
    every one on the CPU, contiguous, rows and scores float32, roles int8, the rest int64;
    and the C library loads."""
    reason = native_build.why_not_native(tensors, _dtype_of)
    if reason is None and library() is None:
        return "its C library could not be built"
    return reason


def _dtype_of(name: str) -> torch.dtype:
    if name == "role":
        return torch.int8
    return torch.int64 if name in _INDEX_NAMES else torch.float32


_INDEX_NAMES = ("position", "page_positions", "image_ordinal", "image_positions", "members",
                "chosen")  # fmt: skip
