"""``avl::gathered_attention``: attention of a few query rows over selected rows of a KV cache.

The op reads only the selected rows (the PyTorch implementation gathers them; the Triton
kernel of a later issue reads them in place) and returns the log-sum-exp beside the output,
so that partial attentions over disjoint row sets (sink + text, core image rows) merge exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

# dtypes the Triton kernel handles; float64 stays on the PyTorch implementation
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("avl::gathered_attention", mutates_args=())
def gathered_attention(
    query: Tensor, keys: Tensor, values: Tensor, index: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """Attention of ``query`` [B, Hq, Lq, D] over rows ``index`` of ``keys``/``values``.

    ``keys``/``values`` are [B, Hkv, L, D].

    ``index`` is [B, Hkv, n] (a list per kv head) or [B, 1, n] (shared by the heads of the
    layer); entries of -1 are padding and ignored. Query head h reads kv head h // (Hq // Hkv).
    Returns ``(output [B, Hq, Lq, D] in query dtype, lse [B, Hq, Lq] in float32, float64 for
    float64 inputs)``; a row with no valid index gets output 0 and lse -inf.
    """
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads = keys.shape[1]
    check_gathered_attention_inputs(query, keys, values, index, check_range=True)
    acc = _accumulate_dtype(query.dtype)
    group = q_heads // kv_heads
    rows = index.expand(batch, kv_heads, index.shape[-1])
    valid = rows >= 0
    picked_keys = pick_rows(keys, rows).to(acc)
    picked_values = pick_rows(values, rows).to(acc)
    grouped_query = query.reshape(batch, kv_heads, group * q_len, head_dim).to(acc)
    logits = torch.matmul(grouped_query, picked_keys.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~valid.unsqueeze(-2), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    probs = torch.exp(logits - lse.nan_to_num(neginf=0.0))
    output = torch.matmul(probs, picked_values)
    output = output.reshape(batch, q_heads, q_len, head_dim).to(query.dtype)
    return output, lse.reshape(batch, q_heads, q_len)


@gathered_attention.register_fake
def _(query: Tensor, keys: Tensor, values: Tensor, index: Tensor, scale: float):
    check_gathered_attention_inputs(query, keys, values, index)
    lse = query.new_empty(query.shape[:-1], dtype=_accumulate_dtype(query.dtype))
    return torch.empty_like(query), lse


def pick_rows(cache: Tensor, rows: Tensor) -> Tensor:
    """cache [B, H, L, D] at rows [B, H, n] (-1 read as row 0) -> [B, H, n, D].

    One index_select over the flattened cache: on CPUs much faster than ``gather`` with an
    index expanded over D."""
    batch, heads, length, dim = cache.shape
    base = torch.arange(batch * heads, device=rows.device).view(batch, heads, 1) * length
    flat = (base + rows.clamp(min=0)).flatten()
    return cache.reshape(batch * heads * length, dim).index_select(0, flat).view(*rows.shape, dim)


def check_gathered_attention_inputs(
    query: Tensor, keys: Tensor, values: Tensor, index: Tensor, check_range: bool = False
) -> None:
    """Shape and dtype checks; ``check_range`` also reads the index (a device sync)."""
    if query.dim() != 4 or keys.dim() != 4 or values.shape != keys.shape:
        raise ValueError(
            "avl::gathered_attention: expected query [B, Hq, Lq, D] and keys/values "
            f"[B, Hkv, L, D] of one shape, got {tuple(query.shape)}, {tuple(keys.shape)}, "
            f"{tuple(values.shape)}"
        )
    if query.shape[1] % keys.shape[1]:
        raise ValueError(
            f"avl::gathered_attention: {query.shape[1]} query heads is not a multiple of "
            f"{keys.shape[1]} kv heads"
        )
    if index.dim() != 3 or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            "avl::gathered_attention: index must be an int32/int64 tensor [B, Hkv or 1, n], "
            f"got {index.dtype} {tuple(index.shape)}"
        )
    if index.shape[-1] == 0:
        raise ValueError("avl::gathered_attention: the row selection is empty (n = 0)")
    if index.shape[0] != query.shape[0] or index.shape[1] not in (1, keys.shape[1]):
        raise ValueError(
            f"avl::gathered_attention: index {tuple(index.shape)} must be [B, 1 or Hkv, n] for "
            f"B={query.shape[0]}, Hkv={keys.shape[1]}"
        )
    if check_range and index.numel() and int(index.max()) >= keys.shape[2]:
        raise IndexError(
            f"avl::gathered_attention: index {int(index.max())} is out of range for a cache of "
            f"{keys.shape[2]} rows"
        )


def merge_partial_attention(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Exact softmax merge of attentions over disjoint row sets: returns (output, total lse)."""
    lses = torch.stack([lse for _, lse in parts])
    total = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - total.nan_to_num(neginf=0.0)).nan_to_num(0.0)
    pairs = zip(weights, parts, strict=True)
    merged = sum(w.unsqueeze(-1) * out.to(w.dtype) for w, (out, _) in pairs)
    return merged.to(parts[0][0].dtype), total
