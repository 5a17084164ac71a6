"""``native_build``: the C kernels' library is built once per content, and where it cannot
be built the ops are not used and one warning says what runs instead."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from avl_compile.lowering import native_build

needs_kernels = pytest.mark.skipif(
    not native_build.KERNELS.loaded(), reason="no C/C++ compiler for the C kernels"
)


def _compilers_found() -> bool:
    try:
        native_build.compilers()
    except RuntimeError:
        return False
    return True


@pytest.mark.skipif(not _compilers_found(), reason="no C/C++ compiler on this machine")
def test_the_library_builds_wherever_the_compilers_are_found():
    """The C kernels' tests skip where the library is not loaded (no compiler), so a source
    that fails to compile would pass them silently: where the compilers are, it must load."""
    assert native_build.KERNELS.loaded()
    native_build.build()  # raises with the compiler's message where a source is broken


@needs_kernels
def test_the_library_is_built_once_and_registers_every_kernel():
    first = native_build.build()
    built_at = first.stat().st_mtime_ns
    assert native_build.build() == first
    assert first.stat().st_mtime_ns == built_at  # found in the cache, not built again
    from avl_compile.lowering import native_prefill_rows

    ops = (torch.ops.avl.recall_swap.default, torch.ops.avl.core_choice.default,
           native_prefill_rows.prefill_rows)  # fmt: skip
    for op in ops:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU")


@needs_kernels
def test_a_missing_compiler_gives_one_warning_and_no_kernels(tmp_path):
    code = (
        "import warnings\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    from avl_compile.lowering import native_core_choice, native_recall_swap\n"
        "    print(native_recall_swap.library(), native_core_choice.library())\n"
        "print(len([w for w in caught if 'could not be built' in str(w.message)]))\n"
        "print([str(w.message) for w in caught if 'could not be built' in str(w.message)][0])\n"
    )
    env = {**os.environ, "AVL_CACHE_DIR": str(tmp_path), "CXX": str(tmp_path / "no-such-c++")}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    loaded, count, message = result.stdout.strip().splitlines()
    assert loaded == "False False"
    assert count == "1"
    assert (
        "the prefill's selection, recall's swap and the query-aware core's choice run as "
        "tensor operations" in message
    )
    assert "no-such-c++" in message
    assert not list(tmp_path.glob("*.so"))
