"""FastV (Chen et al., 2024): after layer K, the image tokens the last prompt token attends
least are dropped from every later layer (their hidden states and their KV rows)."""

from __future__ import annotations

from torch import Tensor

from avl_compile.policies.common import PrefillContext, last_token_image_filter
from avl_compile.policies.eviction import EvictionPolicy


class FastVPolicy(EvictionPolicy):
    """Layer K - 1 (K = prefill_filter_layer) ranks the image tokens by the last prompt
    token's head-averaged attention; layers >= K keep the best floor(kv_budget * N) of them
    and attend nothing else of the image, at prefill and decode. Layers < K keep everything."""

    def prepare_prefill(self, query, keys, attn_mask, is_causal, scale, context) -> None:
        if self.layer_idx == self.options.prefill_filter_layer - 1:
            context.filter_keep = last_token_image_filter(
                query, keys, attn_mask, is_causal, scale, context.image_mask,
                self.options.kv_budget,
            )  # fmt: skip

    def min_cache_width(self, not_padding: Tensor, attn_mask: Tensor | None) -> int:
        # HF builds one attention mask for all layers from the first layer's cache length;
        # when it builds one (a padded batch), later layers keep that length with empty slots
        return int(not_padding.sum(-1).max()) if attn_mask is not None else 0

    def visible_keys(self, context: PrefillContext) -> Tensor | None:
        if context.filter_keep is None or self.layer_idx < self.options.prefill_filter_layer:
            return None
        return ~context.image_mask | context.filter_keep
