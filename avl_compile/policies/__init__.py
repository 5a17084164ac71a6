"""KV-cache policies: what each attention site keeps and attends (one module per policy)."""

from __future__ import annotations

from avl_compile.options import AvlOptions
from avl_compile.policies.avl import AvlPolicy, decode_kind_of
from avl_compile.policies.eviction import EvictionPolicy
from avl_compile.policies.eviction_decode import KEEP_ALL
from avl_compile.policies.fastv import FastVPolicy
from avl_compile.policies.full import FullCachePolicy
from avl_compile.policies.h2o import H2OPolicy
from avl_compile.policies.random_drop import RandomDropPolicy
from avl_compile.policies.streaming import StreamingPolicy

POLICY_CLASSES = {
    "avl": AvlPolicy,
    "full": FullCachePolicy,
    "h2o": H2OPolicy,
    "streaming": StreamingPolicy,
    "fastv": FastVPolicy,
    "random": RandomDropPolicy,
}


def make_policy(options: AvlOptions, layer_idx: int) -> AvlPolicy | EvictionPolicy:
    return POLICY_CLASSES[options.policy](options, layer_idx)


def decode_variant(opts: AvlOptions, layers: list[int | None]) -> tuple[str, frozenset[int]]:
    """What a decode graph for ``opts`` holds: the kind of its step ("avl" or an eviction
    rule, as ``DecodeSchedule.decode_kind``) and the sites (by index) that evict nothing."""
    if opts.policy == "avl":
        kind = decode_kind_of(opts)
    elif opts.keeps_everything:  # never evicts: as EvictionSchedule.decode_kind
        kind = KEEP_ALL
    else:
        kind = POLICY_CLASSES[opts.policy].eviction
    return kind, _sites_evicting_nothing(opts, layers)


def _sites_evicting_nothing(opts: AvlOptions, layers: list[int | None]) -> frozenset[int]:
    """The sites (of decoder ``layers``) whose layer keeps every token (their cache grows
    by one slot per step, inside the graph): all at budgets that evict nothing, FastV's
    layers before its filter."""
    if opts.policy == "avl":
        keeps = opts.text_keep == 1.0 and opts.prefill_filter_keep in (None, 1.0)
        if keeps and opts.vision_keep_layers is not None:  # the layers that keep every image
            return frozenset(
                index
                for index, layer in enumerate(layers)
                if layer is not None and opts.layer_budgets(layer)[0] == 1.0
            )
        keeps = keeps and opts.vision_keep == 1.0
    else:
        keeps = opts.keeps_everything
    if keeps:
        return frozenset(range(len(layers)))
    if opts.policy == "fastv":
        return frozenset(
            index
            for index, layer in enumerate(layers)
            if layer is not None and layer < opts.prefill_filter_layer
        )
    return frozenset()
