"""avl-compile: A-VL adaptive attention for vision-language models through ``torch.compile``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from avl_compile.backend import AvlBackend, BackendHandle
from avl_compile.cache import AvlCache
from avl_compile.options import AvlOptions

__version__ = "0.1.0"
__all__ = ["AvlBackend", "AvlCache", "AvlOptions", "avl_backend", "compile", "kv_rows_in_use"]

# quiet unless the application configures logging: INFO summarises each compile's rewrites
logging.getLogger("avl_compile").addHandler(logging.NullHandler())

_default_backend: AvlBackend | None = None
DEFAULT_BACKEND_RECORDS = 64  # graph records the shared backend keeps (the latest)


def avl_backend(
    gm: torch.fx.GraphModule,
    example_inputs: list,
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
):
    """The function behind ``torch.compile(..., backend="avl", options={...})`` (or
    ``mode="reduce-overhead"``, which turns CUDA graphs on)."""
    global _default_backend
    if _default_backend is None:  # shared by every model compiled with backend="avl"
        _default_backend = AvlBackend(max_records=DEFAULT_BACKEND_RECORDS)
    return _default_backend(gm, example_inputs, options=options or {}, mode=mode)


def compile(
    model: torch.nn.Module, options: Mapping[str, Any] | None = None, **compile_kwargs: Any
):
    """Compile ``model.forward`` in place with the ``avl`` backend and return the model.

    ``generate`` calls ``self.forward``, so compiling the forward (not wrapping the module)
    is what makes ``model.generate(...)`` run the compiled graphs. Options are checked here.
    Compiling a model again replaces the first compile (new options, new backend).
    """
    backend = AvlBackend(options)
    config = getattr(model, "config", None)
    layers = backend.options.vision_keep_layers
    if layers is not None and hasattr(config, "get_text_config"):
        n_layers = config.get_text_config().num_hidden_layers
        if len(layers) != n_layers:
            raise ValueError(
                f"avl backend: option vision_keep_layers has {len(layers)} entries; this "
                f"model has {n_layers} decoder layers (give one fraction per layer)"
            )
    # compiling again starts from the plain forward: around a compiled one the new compile
    # would never run (PyTorch runs the innermost compiled function)
    forward = getattr(model, "_avl_plain_forward", None) or model.forward
    # the model holds its backend; Dynamo, which keeps backends for good, a weak handle
    model.forward = torch.compile(forward, backend=BackendHandle(backend), **compile_kwargs)
    model._avl_plain_forward = forward
    model._avl_backend = backend
    return model


def kv_rows_in_use(cache) -> list[int]:
    """Occupied KV rows per decoder layer of a ``generate`` cache (its fullest batch row).

    An avl-compacted layer's tensors also hold a few free rows, reserved so that decode
    tokens are written in place; ``layer.keys.nbytes`` is what is resident."""
    from avl_compile.runtime import rows_in_use

    return [rows_in_use(layer.keys) for layer in cache.layers]
