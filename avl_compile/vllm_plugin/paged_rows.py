"""A-VL's rows in its storage blocks of vLLM's KV cache: read them into the policy's layout
([1, Hkv, rows, D]) and write slots back.

A layer's CPU cache is [blocks, Hkv, block_size, 2 * D]; vLLM packs the tokens it writes in
a layout of its instruction set, and reads a block only for the request that owns it. A
storage block is read and written by A-VL alone (vLLM's write of an A-VL decode token is
skipped, and its kernel never attends an A-VL request), so the plugin keeps its rows there
in a layout of its own, chosen for one gather per read: per head, the block's keys
[block_size, D] then its values [block_size, D], row-major, slot s in the
s // block_size-th storage block.
"""

from __future__ import annotations

import torch
from torch import Tensor


class PagedRows:
    """Reads and writes A-VL's slots in one layer's KV cache [blocks, Hkv, block, 2 * D]."""

    def __init__(self, block_size: int, head_size: int) -> None:
        self.block_size, self.head_size = block_size, head_size

    def _slabs(self, kv_cache: Tensor) -> Tensor:
        """[blocks, Hkv, 2 (keys, values), block, D]: the plugin's view of its blocks."""
        blocks, heads = kv_cache.shape[:2]
        return kv_cache.view(blocks, heads, 2, self.block_size, self.head_size)

    def read(self, kv_cache: Tensor, blocks: Tensor, rows: int) -> tuple[Tensor, Tensor]:
        """Slots [0, rows) of the storage ``blocks``, as keys and values [1, Hkv, rows, D]."""
        used = blocks[: -(-rows // self.block_size)]
        slabs = self._slabs(kv_cache).index_select(0, used)  # [n, Hkv, 2, block, D]
        rows_first = slabs.permute(2, 1, 0, 3, 4).flatten(2, 3)[:, :, :rows]  # [2, Hkv, rows, D]
        return rows_first[0].unsqueeze(0), rows_first[1].unsqueeze(0)

    def write(
        self, kv_cache: Tensor, blocks: Tensor, slots: Tensor, keys: Tensor, values: Tensor
    ) -> None:
        """Writes ``keys``/``values`` [1, Hkv, n, D] into storage slots ``slots`` [n]."""
        slabs = self._slabs(kv_cache)
        block = blocks[slots // self.block_size][:, None]  # [n, 1]
        heads = torch.arange(slabs.shape[1])[None, :]  # [1, Hkv]
        within = (slots % self.block_size)[:, None]
        slabs[block, heads, 0, within] = keys[0].transpose(0, 1).to(slabs.dtype)
        slabs[block, heads, 1, within] = values[0].transpose(0, 1).to(slabs.dtype)
