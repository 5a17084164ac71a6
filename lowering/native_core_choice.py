"""``avl::core_choice``: the query-aware core's per-step choice for one layer as one call
of C code, on a CPU.

As tensor operations (``page_core.CorePages.bound_per_slot``, then a sort of every slot's
rule key, a scatter of ranks and a role write) the choice cost Inductor's generated code
~70 us a layer and step on ``cpu-host`` (docs/history.md, session 23), and the recommended
option set chooses at every step. ``core_choice.c`` bounds only the pages that hold a
candidate and finds the ``n_core``-th score by a radix select (rows above it are in, ties
at it go by the tie rule). The op writes the roles in place; a graph calls it as an extern
kernel. Where the pages' boxes are large (``cpu-long``: 3 MB a layer) the graph's own
parallel kernel bounds the pages and the op takes the bounds.

Its CPU kernel (``torch_kernels.cpp``) is built at first use (``native_build``); where it
cannot be built, or the tensors are not float32 on the CPU, the choice stays the tensor
function (one warning says why).
"""

from __future__ import annotations

import torch
from torch import Tensor

from avl_compile.lowering import native_build

# whether the C kernels are loaded (built at the first call; one warning where not)
library = native_build.KERNELS.loaded


_SCHEMA = (
    "core_choice(Tensor query, Tensor low, Tensor high, Tensor? page_bound, "
    "Tensor image_ordinal, Tensor(a!) role, Tensor position, Tensor counters, "
    "int page_size) -> ()"
)
# its CPU kernel comes with the C library (``native_build``)
_OPS = torch.library.Library("avl", "FRAGMENT")
_OPS.define(_SCHEMA)


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
    return native_build.why_not_native(tensors, _dtype_of, strided_ok=("query",))


def _dtype_of(name: str) -> torch.dtype:
    if name == "role":
        return torch.int8
    return torch.int64 if name in ("image_ordinal", "position", "counters") else torch.float32
