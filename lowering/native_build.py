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
from pathlib import Path

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
