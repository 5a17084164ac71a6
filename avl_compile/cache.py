"""``AvlCache``: the KV cache to pass to ``generate`` for HF's own compile path
(``compile_config=CompileConfig(...)``).

HF compiles the decode steps only for a cache that says it is compileable and is not a plain
``DynamicCache``; its ``StaticCache`` is written in place at absolute positions, so its rows
cannot be evicted. ``AvlCache`` is a ``DynamicCache`` (the layout the avl backend compacts
and writes in place) that says it is compileable. HF runs the prefill uncompiled, so the
prefill reaches the avl backend only through a forward compiled with it
(``avl_compile.compile(model, ...)``); a prefill that ran outside it is marked here, and
its decode steps then run dense, with one warning that says why.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache

from avl_compile.runtime import mark_prefilled_outside_backend


class AvlCache(DynamicCache):
    """A ``DynamicCache`` that HF's ``generate`` treats as compileable.

    Pass it as ``cache=`` (transformers >= 5.24) or ``past_key_values=`` together with
    ``compile_config``; it takes ``DynamicCache``'s arguments (``config=model.config`` for
    models with sliding-window layers)."""

    is_compileable = True  # what HF's generate asks before it compiles the decode steps

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        prefill = len(self.layers) <= layer_idx or not self.layers[layer_idx].is_initialized
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if prefill and not torch.compiler.is_compiling():  # a forward the backend never saw
            mark_prefilled_outside_backend(keys)
        return keys, values


def cache_argument(model: torch.nn.Module) -> str:
    """The name under which ``model.generate`` takes a cache: ``cache`` from transformers
    5.24 on, ``past_key_values`` before."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def generated_cache(output: Any):
    """The cache of a ``generate(..., return_dict_in_generate=True)`` output: ``cache``
    from transformers 5.24 on (``past_key_values`` is then a deprecated alias), else
    ``past_key_values``."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
