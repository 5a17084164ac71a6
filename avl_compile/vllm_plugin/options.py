"""A-VL's options as vLLM receives them: ``additional_config={"avl": {...}}``.

The names and ranges are the backend's (``avl_compile.options``); a few do not apply where
vLLM owns compilation and the policy runs per request, and are refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from avl_compile.options import AvlOptions

CONFIG_KEY = "avl"  # the key of A-VL's options in vLLM's additional_config

# options that say how the backend compiles a Hugging Face graph: vLLM compiles the model
_COMPILER_OPTIONS = ("inner", "cudagraphs")
# options whose head averages are not combined across tensor-parallel ranks yet
_SINGLE_RANK_OPTIONS = ("recall_pages", "core_page_size", "refresh_lse_drop", "prefill_filter_keep")


def serving_options(additional_config: Mapping[str, Any] | None, tp_size: int = 1) -> AvlOptions:
    """The A-VL options of a vLLM engine (defaults where none are given); a ``ValueError``
    naming the option for anything the plugin cannot serve."""
    raw = (additional_config or {}).get(CONFIG_KEY, {})
    if not isinstance(raw, Mapping):
        raise ValueError(
            f"additional_config[{CONFIG_KEY!r}] must be a mapping of A-VL options, got {raw!r}"
        )
    for name in _COMPILER_OPTIONS:
        if name in raw:
            raise ValueError(
                f"avl vLLM plugin: option {name!r} does not apply (vLLM compiles the model; "
                "its own compilation_config and enforce_eager decide); remove it"
            )
    options = AvlOptions.from_mapping(raw)
    if options.policy != "avl":
        raise ValueError(
            f"avl vLLM plugin: policy={options.policy!r} is not served; allowed: 'avl' "
            "(the baselines run through avl_compile.compile and avl-bench)"
        )
    if tp_size > 1:
        defaults = AvlOptions()
        for name in _SINGLE_RANK_OPTIONS:
            if getattr(options, name) != getattr(defaults, name):
                raise ValueError(
                    f"avl vLLM plugin: option {name!r} with tensor_parallel_size={tp_size} is "
                    f"not supported yet; allowed: its default {getattr(defaults, name)!r}, or "
                    "tensor_parallel_size=1"
                )
    return options
