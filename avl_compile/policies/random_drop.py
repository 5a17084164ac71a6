"""Random drop: the same number of image rows as A-VL's secondary set, chosen at random.
The control that shows whether a policy's choice of image tokens matters."""

from __future__ import annotations

import torch
from torch import Tensor

from avl_compile.policies.budgets import fraction_count
from avl_compile.policies.common import PrefillContext
from avl_compile.policies.eviction import EvictionPolicy


def random_image_choice(n_images: int, kv_budget: float, seed: int, layer: int, row: int):
    """Which of a row's N image tokens (0..N-1, in order) stay: floor(kv_budget * N) of them,
    drawn per (seed, layer, batch row) on the CPU so every device draws the same."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + layer * 1_009 + row)
    count = fraction_count(kv_budget, n_images)
    return torch.randperm(n_images, generator=generator)[:count].sort().values


class RandomDropPolicy(EvictionPolicy):
    """Keeps all text; keeps a random floor(kv_budget * N) image tokens per layer and row."""

    def prefill_keep(
        self, slots: Tensor, scores: Tensor, n_seen: list[int], context: PrefillContext
    ) -> Tensor:
        image_mask = context.image_mask
        keep = ~image_mask
        for row in range(image_mask.shape[0]):
            image_pos = torch.nonzero(image_mask[row]).flatten()
            chosen = random_image_choice(
                image_pos.numel(), self.options.kv_budget, self.options.seed, self.layer_idx, row
            )
            keep[row, image_pos[chosen.to(image_pos.device)]] = True
        return slots & keep[:, None, :]
