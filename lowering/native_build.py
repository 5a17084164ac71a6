"""The C sources of ``lowering`` built into shared libraries at first use.

Each source is compiled once per content and compiler with the system C compiler (``$CC``,
else ``cc``) into ``$AVL_CACHE_DIR`` (default ``~/.cache/avl_compile``) and loaded with
``ctypes``; no torch headers, so any torch. Concurrent builders each write a temporary
file and rename it.
"""

from __future__ import annotations

import ctypes
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

_FLAGS = ("-O3", "-std=c99", "-shared", "-fPIC")


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "avl_compile"
    return Path(os.environ.get("AVL_CACHE_DIR", default))


def build(source: Path) -> Path:
    """The shared library of ``source`` (``<stem>_<digest>.so`` in ``cache_dir()``),
    compiled if this source and compiler have not been. Raises RuntimeError where no
    compiler runs it."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    text = source.read_bytes()
    digest = hashlib.sha256(text + " ".join((compiler, *_FLAGS)).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}_{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        done = subprocess.run(
            [compiler, *_FLAGS, str(source), "-o", partial, "-lm"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[:500]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def load(source: Path) -> ctypes.CDLL:
    """``source`` built (``build``) and loaded; raises OSError or RuntimeError."""
    return ctypes.CDLL(str(build(source)))


class NativeFunction:
    """One C function of one source, built and loaded at its first use (``get``); where
    that fails, None from then on and one warning that ``fallback`` runs instead."""

    def __init__(self, source: Path, name: str, argtypes: list, fallback: str) -> None:
        self.source, self.name, self.argtypes, self.fallback = source, name, argtypes, fallback
        self._function = None
        self._failed = False

    def get(self):
        """The ``ctypes`` function (returning a C int), or None where it cannot be had."""
        if self._function is None and not self._failed:
            try:
                function = getattr(load(self.source), self.name)
            except (OSError, RuntimeError, AttributeError) as error:
                self._failed = True
                warnings.warn(
                    f"avl: {self.fallback} (slower on a CPU): its C version could not be "
                    f"built or loaded ({error})",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return None
            function.restype = ctypes.c_int
            function.argtypes = self.argtypes
            self._function = function
        return self._function


def why_not_native(
    tensors: dict[str, Tensor | None],
    dtype_of: Callable[[str], torch.dtype],
    strided_ok: tuple[str, ...] = (),
) -> str | None:
    """Why these tensors (by a C op's argument names; None: absent) cannot go to C code, or
    None: every one on the CPU, contiguous (but ``strided_ok``), of ``dtype_of(name)``."""
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if tensor.device.type != "cpu":
            return f"{name} is on {tensor.device}"
        if name not in strided_ok and not tensor.is_contiguous():
            return f"{name} is not contiguous"
        if tensor.dtype != dtype_of(name):
            return f"{name} is {tensor.dtype}, not {dtype_of(name)}"
    return None
