"""A-VL's rows in vLLM's CPU KV cache: read a request's storage blocks into the policy's
layout ([1, Hkv, rows, D]) and write rows back.

vLLM's CPU cache packs each block's keys and values in a layout of its instruction set
(fp32 "vec": a head's keys transposed, values row-major; others differ). The plugin writes
with vLLM's own op (``cpu_attn_reshape_and_cache``), so the packing stays vLLM's; to read,
it learns the packing once per (isa, dtype, block size, head size) by writing a block of
known values with that op and seeing where each (row, dim) landed: a permutation, checked
to be one, then an index gather per read.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


class PagedRows:
    """Reads and writes slots of one layer's CPU KV cache [blocks, Hkv, block, 2 * D]."""

    def __init__(self, isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> None:
        self.isa, self.block_size, self.head_size = isa, block_size, head_size
        self.key_order, self.value_order = packing_of(isa, dtype, block_size, head_size)

    @staticmethod
    def halves(kv_cache: Tensor) -> tuple[Tensor, Tensor]:
        """The key and value caches, [blocks, Hkv, block, D] each (vLLM's views)."""
        blocks, heads, block, _ = kv_cache.shape
        return kv_cache.view(blocks, heads, 2 * block, -1).chunk(2, dim=2)

    def read(self, kv_cache: Tensor, blocks: Tensor, rows: int) -> tuple[Tensor, Tensor]:
        """Slots [0, rows) of the storage ``blocks`` (slot s in blocks[s // block]), as
        keys and values [1, Hkv, rows, D]."""
        used = blocks[: -(-rows // self.block_size)]
        out = []
        halves = zip(self.halves(kv_cache), (self.key_order, self.value_order), strict=True)
        for cache, order in halves:
            packed = cache[used].flatten(2)  # [n, Hkv, block * D]
            unpacked = packed.index_select(2, order).view(*packed.shape[:2], self.block_size, -1)
            out.append(unpacked.transpose(0, 1).flatten(1, 2)[None, :, :rows])
        return out[0], out[1]

    def write(
        self, kv_cache: Tensor, blocks: Tensor, slots: Tensor, keys: Tensor, values: Tensor
    ) -> None:
        """Writes ``keys``/``values`` [1, Hkv, n, D] into storage slots ``slots`` [n]."""
        from vllm import _custom_ops as ops

        where = blocks[slots // self.block_size] * self.block_size + slots % self.block_size
        key_cache, value_cache = self.halves(kv_cache)
        ops.cpu_attn_reshape_and_cache(
            keys[0].transpose(0, 1).contiguous(), values[0].transpose(0, 1).contiguous(),
            key_cache, value_cache, where, self.isa,
            k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto",
        )  # fmt: skip


@functools.cache
def packing_of(
    isa: str, dtype: torch.dtype, block_size: int, head_size: int
) -> tuple[Tensor, Tensor]:
    """For keys and values: the packed index, within one block and head, of (row r, dim d)
    at r * head_size + d. Learnt by writing rows of known values with vLLM's op."""
    from vllm import _custom_ops as ops

    found = []
    for fill in ("row", "dim"):
        cache = torch.zeros(1, 1, block_size, 2 * head_size, dtype=dtype)
        row = torch.arange(block_size, dtype=torch.float64)[:, None].expand(-1, head_size)
        dim = torch.arange(head_size, dtype=torch.float64)[None, :].expand(block_size, -1)
        marks = (row if fill == "row" else dim) + 1  # 0 is "not written"
        marks = marks.to(dtype)[:, None, :]  # [rows, 1 head, D]
        key_cache, value_cache = PagedRows.halves(cache)
        ops.cpu_attn_reshape_and_cache(
            marks, marks, key_cache, value_cache, torch.arange(block_size), isa,
            k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto",
        )  # fmt: skip
        found.append([c[0, 0].flatten().to(torch.float64) - 1 for c in (key_cache, value_cache)])
    orders = []
    for rows, dims in zip(found[0], found[1], strict=True):
        flat = (rows * head_size + dims).round().to(torch.long)
        order = torch.full((block_size * head_size,), -1, dtype=torch.long)
        order[flat.clamp(0, order.numel() - 1)] = torch.arange(flat.numel())
        if not torch.equal(flat.sort().values, torch.arange(flat.numel())):
            raise NotImplementedError(
                f"avl vLLM plugin: vLLM's CPU cache layout for isa={isa!r}, dtype={dtype}, "
                f"block_size={block_size}, head_size={head_size} is not a permutation of a "
                "block's rows the plugin can read back"
            )
        orders.append(order)
    return orders[0], orders[1]
