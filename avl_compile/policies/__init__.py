"""KV-cache policies: what each attention site keeps and attends (one module per policy)."""

from __future__ import annotations

from avl_compile.options import AvlOptions
from avl_compile.policies.avl import AvlPolicy
from avl_compile.policies.eviction import EvictionPolicy
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
