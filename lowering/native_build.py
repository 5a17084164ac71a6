"""The C sources of ``lowering`` and their torch bindings built into one shared library at
first use.

``recall_swap.c``, ``core_choice.c`` and ``prefill_rows.c`` are compiled with the system C
compiler (``$CC``, else ``cc``; no torch headers), ``torch_kernels.cpp`` with the C++
compiler (``$CXX``, else ``c++``) against the running torch's headers, and linked into one
library per content, compilers and torch version in ``$AVL_CACHE_DIR`` (default
``~/.cache/avl_compile``). Loading it registers the CPU kernels of ``avl::recall_swap``,
``avl::core_choice`` and ``avl::prefill_rows`` (the schemas are defined in Python), so an
op's call goes through the dispatcher straight to the C code. Concurrent builders each
write a temporary file and rename it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

_HERE = Path(__file__).parent
C_SOURCES = (_HERE / "recall_swap.c", _HERE / "core_choice.c", _HERE / "prefill_rows.c")
# included by the sources
HEADERS = (_HERE / "native_helpers.h", _HERE / "native_parallel.h", _HERE / "prefill_rows.h")
BINDING = _HERE / "torch_kernels.cpp"
_C_FLAGS = ("-O3", "-std=c99", "-fPIC")
# torch 2.13's headers use C++20 (default member initializers of bit-fields)
_CXX_FLAGS = ("-O2", "-std=c++20", "-fPIC", "-w")


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "avl_compile"
    return Path(os.environ.get("AVL_CACHE_DIR", default))


def _compiler(variable: str, language: str, *names: str) -> str:
    found = os.environ.get(variable) or next(filter(None, map(shutil.which, names)), None)
    if found is None:
        raise RuntimeError(f"no {language} compiler found (set {variable})")
    return found


def compilers() -> tuple[str, str]:
    """The C and C++ compilers the library is built with ($CC and $CXX, else the usual
    names). Raises RuntimeError where one is missing."""
    return _compiler("CC", "C", "cc", "gcc"), _compiler("CXX", "C++", "c++", "g++")


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed: {done.stderr.strip()[:500]}")


def build(
    c_sources: tuple[Path, ...] = C_SOURCES,
    binding: Path = BINDING,
    headers: tuple[Path, ...] = HEADERS,
) -> Path:
    """The shared library of ``c_sources`` and ``binding`` (``<binding stem>_<digest>.so``
    in ``cache_dir()``), built if these sources, compilers and torch (version and install:
    the include path is among the flags) have not been. The binding is compiled with
    OpenMP where torch uses its bundled GNU OpenMP (``at::parallel_for`` then runs on
    torch's threads; without it, on one), and without where the compiler refuses it.
    Raises RuntimeError where a compiler is missing or fails."""
    # only where torch ships its libgomp as ``libgomp.so.1``: the binding's OpenMP then
    # resolves to that runtime (torch's lib is on its rpath), not a second one beside it
    bundled = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    openmp = ("-fopenmp",) if torch.backends.openmp.is_available() and bundled.exists() else ()
    try:
        return _build(c_sources, binding, headers, openmp)
    except RuntimeError:
        if not openmp:
            raise
        return _build(c_sources, binding, headers, ())


def _build(
    c_sources: tuple[Path, ...], binding: Path, headers: tuple[Path, ...], openmp: tuple[str, ...]
) -> Path:
    cc, cxx = compilers()
    torch_dir = Path(torch.__file__).parent
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    include, lib = torch_dir / "include", torch_dir / "lib"
    cxx_flags = (*_CXX_FLAGS, *openmp, abi, f"-I{include}")
    digest = hashlib.sha256()
    for source in (*c_sources, *headers, binding):
        digest.update(source.read_bytes())
    # the torch it binds to, by version and place (a library links that install's libc10)
    digest.update(" ".join((cc, *_C_FLAGS, cxx, *cxx_flags, torch.__version__)).encode())
    target = cache_dir() / f"{binding.stem}_{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        objects = []
        for source in c_sources:
            objects.append(str(Path(scratch) / f"{source.stem}.o"))
            _run([cc, *_C_FLAGS, "-c", str(source), "-o", objects[-1]])
        partial = str(Path(scratch) / target.name)
        # OpenMP's runtime resolves to the one torch loaded (same soname, torch's lib first)
        _run([cxx, *cxx_flags, "-shared", str(binding), *objects, "-o", partial,
              f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}", "-lm"])  # fmt: skip
        os.replace(partial, target)
    return target


class TorchKernels:
    """The library of ``build``, loaded at its first use (``loaded``); where building or
    loading fails, False from then on and one warning of what runs instead."""

    def __init__(self, fallback: str) -> None:
        self.fallback = fallback
        self._state: bool | None = None

    def loaded(self) -> bool:
        if self._state is None:
            try:
                torch.ops.load_library(str(build()))
                self._state = True
            except (OSError, RuntimeError) as error:
                self._state = False
                warnings.warn(
                    f"avl: {self.fallback} (slower on a CPU): their C kernels could not be "
                    f"built or loaded ({error})",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return self._state


# one library for the three ops: the first op that asks builds and loads it
KERNELS = TorchKernels(
    "the prefill's selection, recall's swap and the query-aware core's choice run as tensor "
    "operations"
)


def why_not_native(
    tensors: dict[str, Tensor | None],
    dtype_of: Callable[[str], torch.dtype],
    strided_ok: tuple[str, ...] = (),
) -> str | None:
    """Why these tensors (by a C op's argument names; None: absent) cannot go to C code, or
    None: every one on the CPU, contiguous (but ``strided_ok``), of ``dtype_of(name)``; and
    the C kernels load."""
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if tensor.device.type != "cpu":
            return f"{name} is on {tensor.device}"
        if name not in strided_ok and not tensor.is_contiguous():
            return f"{name} is not contiguous"
        if tensor.dtype != dtype_of(name):
            return f"{name} is {tensor.dtype}, not {dtype_of(name)}"
    return None if KERNELS.loaded() else "its C library could not be built"
