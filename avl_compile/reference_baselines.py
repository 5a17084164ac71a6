"""Plain eager references of the baseline policies (full, h2o, streaming, fastv, random).

Like the A-VL reference: the full KV cache is kept and each policy's choice is a mask over
it, decided with plain Python loops over rows and heads, written from the policy's rules
(README), not from the compiled implementation.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from avl_compile.policies.random_drop import random_image_choice
from avl_compile.reference import AvlReference


@dataclasses.dataclass
class _BaselineMemory:
    kept: Tensor  # [B, Hkv, L] bool, rows still in the (emulated) cache
    score: Tensor  # [B, Hkv, L] accumulated attention
    protected: list[set[int]]  # per row, positions never evicted (StreamingLLM's sink)
    n_seen: list[int]

    def grow(self) -> None:
        pad = torch.ones_like(self.kept[..., :1])
        self.kept = torch.cat([self.kept, pad], dim=-1)
        self.score = torch.cat([self.score, torch.zeros_like(self.score[..., :1])], dim=-1)
        self.n_seen = [n + 1 for n in self.n_seen]


class BaselineReference(AvlReference):
    """Masks of one baseline over the full cache, for one generate call."""

    def _filter_fraction(self) -> float | None:
        return self.options.kv_budget if self.options.policy == "fastv" else None

    def _budget(self, n_seen: int) -> int:
        return max(int(self.options.kv_budget * n_seen), 1)

    def _after_prefill(self, layer: int, probs: Tensor, allowed: Tensor, group: int) -> None:
        opts = self.options
        batch, q_heads, length, _ = probs.shape
        kv_heads = q_heads // group
        key_valid = allowed[:, 0, -1, :]  # not padding, not hidden by FastV
        weighted = probs * key_valid[:, None, :, None]  # only real query rows count
        score = weighted.sum(dim=2).view(batch, kv_heads, group, length).sum(dim=2)
        kept = key_valid[:, None, :].repeat(1, kv_heads, 1)
        memory = _BaselineMemory(kept, score, [set() for _ in range(batch)], [])
        for b in range(batch):
            valid = [j for j in range(length) if key_valid[b, j]]
            memory.n_seen.append(len(valid))
            if opts.policy == "streaming":
                memory.protected[b] = set(valid[: opts.streaming_sink])
            if opts.policy == "random":
                image_pos = self.image_mask[b].nonzero().flatten().tolist()
                chosen = random_image_choice(
                    len(image_pos), opts.kv_budget, opts.seed, layer, b
                ).tolist()
                keep_images = {image_pos[i] for i in chosen}
                for j in image_pos:
                    if j not in keep_images:
                        memory.kept[b, :, j] = False
        self._evict(memory)
        self.layers[layer] = memory

    def _decode_mask(
        self, layer: int, query: Tensor, key: Tensor, group: int, scale: float
    ) -> Tensor:
        memory = self.layers[layer]
        memory.grow()
        assert memory.kept.shape[-1] == key.shape[2], "reference: cache and memory disagree"
        return memory.kept.repeat_interleave(group, dim=1)[:, :, None, :]

    def _after_decode(self, layer: int, probs: Tensor, group: int) -> None:
        memory = self.layers[layer]
        batch, q_heads, _, length = probs.shape
        per_kv_head = probs[:, :, 0, :].view(batch, q_heads // group, group, length).sum(dim=2)
        memory.score += per_kv_head * memory.kept
        self._evict(memory)

    def _evict(self, memory: _BaselineMemory) -> None:
        """Apply H2O's or StreamingLLM's budget to every (row, kv head)."""
        policy = self.options.policy
        if policy not in ("h2o", "streaming"):
            return
        batch, kv_heads, _ = memory.kept.shape
        for b in range(batch):
            budget = self._budget(memory.n_seen[b])
            for h in range(kv_heads):
                kept = memory.kept[b, h].nonzero().flatten().tolist()
                if policy == "h2o":
                    keep = self._heavy_and_recent(kept, memory.score[b, h], budget)
                else:
                    keep = self._sink_and_window(kept, memory.protected[b], budget)
                for j in kept:
                    memory.kept[b, h, j] = j in keep

    def _heavy_and_recent(self, kept: list[int], score: Tensor, budget: int) -> set[int]:
        if len(kept) <= budget:
            return set(kept)
        n_heavy = int(self.options.h2o_heavy_share * budget)
        n_recent = budget - n_heavy
        older, recent = kept[: len(kept) - n_recent], kept[len(kept) - n_recent :]
        ranked = sorted(older, key=lambda j: float(score[j]), reverse=True)
        return set(recent) | set(ranked[:n_heavy])

    @staticmethod
    def _sink_and_window(kept: list[int], protected: set[int], budget: int) -> set[int]:
        sink = [j for j in kept if j in protected]
        others = [j for j in kept if j not in protected]
        window = max(budget - len(sink), 0)
        return set(sink) | set(others[len(others) - window :] if window else [])
