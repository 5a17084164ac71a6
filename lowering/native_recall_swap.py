"""``avl::recall_swap``: recall's swap for one layer as one call of C code, on a CPU.

Written as tensor operations (``policies.recall.recall_before_step``), a swap of 64 rows
cost Inductor's generated code ~100-200 us a layer and step on ``cpu-host`` (gathers with
index checks, N x N counts, ATen sorts and cumsums: docs/history.md, sessions 15-20), and
the recommended option set swaps at every step. The same swap in C (``recall_swap.c``:
a radix select of the rows ranked last, insertion sorts of at most R pages and M rows,
row copies) is the work itself. The op mutates its inputs in place; a graph calls it as an extern
kernel (no copies: ``Tensor(a!)`` arguments of graph inputs are written in place).

Its CPU kernel (``torch_kernels.cpp``) is built at first use (``native_build``). Where it
cannot be built, or the tensors are not float32 rows on the CPU, the swap stays the tensor
function (one warning says why).
"""

from __future__ import annotations

import torch
from torch import Tensor

from avl_compile.lowering import native_build

# whether the C kernels are loaded (built at the first call; one warning where not)
library = native_build.KERNELS.loaded


_SCHEMA = (
    "recall_swap(Tensor query, Tensor(a!) keys, Tensor(b!) values, Tensor(c!) role, "
    "Tensor(d!) position, Tensor last_qk, Tensor(e!) page_positions, Tensor(f!) page_keys, "
    "Tensor(g!) page_values, Tensor(h!) page_low, Tensor(i!) page_high, "
    "Tensor(j!)? image_ordinal, Tensor? image_positions, Tensor(k!)? core_low, "
    "Tensor(l!)? core_high, Tensor(m!)? members, Tensor? chosen, int recall_pages, "
    "float scale) -> ()"
)
# the op's namespace fragment (the ``avl`` namespace's other ops: ``custom_op``); its CPU
# kernel comes with the C library (``native_build``)
_OPS = torch.library.Library("avl", "FRAGMENT")
_OPS.define(_SCHEMA)


@torch.library.register_fake("avl::recall_swap")
def _recall_swap_fake(*args, **kwargs) -> None:
    return None


recall_swap = torch.ops.avl.recall_swap.default


def why_not_native(tensors: dict[str, Tensor | None]) -> str | None:
    """Why these tensors (by the op's argument names) cannot take the C swap, or None:
    every one on the CPU, contiguous, rows and scores float32, roles int8, the rest int64;
    and the C library loads."""
    return native_build.why_not_native(tensors, _dtype_of)


def _dtype_of(name: str) -> torch.dtype:
    if name == "role":
        return torch.int8
    return torch.int64 if name in _INDEX_NAMES else torch.float32


_INDEX_NAMES = ("position", "page_positions", "image_ordinal", "image_positions", "members",
                "chosen")  # fmt: skip
