"""avl-compile: A-VL adaptive attention for vision-language models through ``torch.compile``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from avl_compile.backend import AvlBackend
from avl_compile.options import AvlOptions

__version__ = "0.1.0"
__all__ = ["AvlBackend", "AvlOptions", "avl_backend", "compile"]

# quiet unless the application configures logging: INFO summarises each compile's rewrites
logging.getLogger("avl_compile").addHandler(logging.NullHandler())

_default_backend: AvlBackend | None = None


def avl_backend(
    gm: torch.fx.GraphModule, example_inputs: list, options: Mapping[str, Any] | None = None
):
    """The function behind ``torch.compile(..., backend="avl", options={...})``."""
    global _default_backend
    if _default_backend is None:
        _default_backend = AvlBackend()
    return _default_backend(gm, example_inputs, options=options or {})


def compile(
    model: torch.nn.Module, options: Mapping[str, Any] | None = None, **compile_kwargs: Any
):
    """Compile ``model.forward`` in place with the ``avl`` backend and return the model.

    ``generate`` calls ``self.forward``, so compiling the forward (not wrapping the module)
    is what makes ``model.generate(...)`` run the compiled graphs. Options are checked here.
    """
    backend = AvlBackend(options)
    model.forward = torch.compile(model.forward, backend=backend, **compile_kwargs)
    model._avl_backend = backend
    return model
