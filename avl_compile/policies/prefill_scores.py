"""A-VL's prefill scores from the attention's log-sum-exp, without the L x L probabilities.

The policy needs two things from the prefill attention: the last prompt row's probabilities
(the image score) and the column sums of the text columns (H2O's accumulated attention of
the text tokens). Given each query row's log-sum-exp, a probability is
``exp(q . k * scale + bias - lse)``: the last row costs one row of logits, the text columns
a few columns, instead of a second pass over the whole attention.

On CPUs the log-sum-exp comes from the same flash kernel that ``F.scaled_dot_product_attention``
runs there (its output is bit for bit the dense one); elsewhere the caller falls back to the
blocked recomputation in ``common.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from avl_compile.policies.common import score_dtype, window_sum

_QUERY_BLOCK = 1024  # query rows per block of the column sums


def attention_and_lse(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float,
    visible: Tensor | None,
) -> tuple[Tensor, Tensor] | None:
    """(output, lse [B, Hq, Lq]) of the prefill attention on a CPU, None elsewhere.
    ``visible`` [B, Lk] hides keys from every query row (the prefill filter)."""
    if query.device.type != "cpu":
        return None
    group = query.shape[1] // keys.shape[1]
    if group > 1:  # the kernel has no grouped-query form; F.sdpa repeats the heads too
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    mask = None
    if attn_mask is not None or visible is not None:
        q_len, k_len = query.shape[2], keys.shape[2]
        rows, columns = torch.arange(q_len), torch.arange(k_len)
        bias = logits_bias(attn_mask, is_causal, visible, rows, columns, q_len, k_len)
        mask, is_causal = bias.to(query.dtype), False
    output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, keys, values, 0.0, is_causal, attn_mask=mask, scale=scale
    )
    return output, lse


def logits_bias(
    attn_mask: Tensor | None,
    is_causal: bool,
    visible: Tensor | None,
    rows: Tensor,
    columns: Tensor,
    q_len: int,
    k_len: int,
) -> Tensor:
    """Additive bias [B or 1, 1, len(rows), len(columns)] (float64) that SDPA applies to
    the given query rows and key columns."""
    device = rows.device
    bias = torch.zeros(1, 1, rows.numel(), columns.numel(), dtype=torch.float64, device=device)
    if is_causal:
        allowed = columns[None, :] <= (rows + k_len - q_len)[:, None]
        bias = bias.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        block = attn_mask[:, :, rows][..., columns]
        if attn_mask.dtype == torch.bool:
            bias = bias.masked_fill(~block, float("-inf"))
        else:
            bias = bias + block.to(torch.float64)
    if visible is not None:
        bias = bias.masked_fill(~visible[:, None, None, columns], float("-inf"))
    return bias


def _probabilities(query: Tensor, keys: Tensor, bias: Tensor, lse: Tensor, scale: float):
    """[B, Hq, r, c]: softmax probabilities of query rows [B, Hq, r, D] over key columns
    [B, Hkv, c, D], given the rows' log-sum-exp [B, Hq, r]."""
    acc = score_dtype(query.dtype)
    group = query.shape[1] // keys.shape[1]
    expanded = keys.to(acc)
    if group > 1:  # (a repeat by 1 would copy the keys)
        expanded = expanded.repeat_interleave(group, dim=1)
    logits = torch.matmul(query.to(acc), expanded.transpose(-1, -2)) * scale
    logits = logits + bias.to(acc) - lse.to(acc).unsqueeze(-1)
    return torch.exp(logits).nan_to_num(0.0)  # rows with nothing to attend (padding)


def last_row_score(
    query: Tensor,
    keys: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float,
    visible: Tensor | None,
    lse: Tensor,
    window: int = 1,
    query_valid: Tensor | None = None,
) -> Tensor:
    """[B, Lk]: the attention of the last ``window`` prompt tokens (the valid ones of
    ``query_valid`` [B, Lq]) over the whole row, summed over the tokens, head-averaged."""
    q_len, k_len = query.shape[2], keys.shape[2]
    rows, columns = torch.arange(q_len - window, q_len), torch.arange(k_len)
    bias = logits_bias(attn_mask, is_causal, visible, rows, columns, q_len, k_len)
    probs = _probabilities(query[:, :, rows], keys, bias, lse[:, :, rows], scale)
    return window_sum(probs, query_valid, window).mean(dim=1)


def column_sums_of(
    query: Tensor,
    keys: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float,
    visible: Tensor | None,
    lse: Tensor,
    columns: Tensor,
    query_valid: Tensor,
) -> Tensor:
    """Accumulated attention per kv head [B, Hkv, Lk] of the key ``columns`` (summed over
    the valid query rows [B, Lq]); 0 in every other column."""
    batch, q_heads, q_len, _ = query.shape
    kv_heads, k_len = keys.shape[1], keys.shape[2]
    acc = score_dtype(query.dtype)
    picked = keys[:, :, columns]
    sums = torch.zeros(batch, q_heads, columns.numel(), dtype=acc, device=query.device)
    for start in range(0, q_len, _QUERY_BLOCK):
        rows = torch.arange(start, min(start + _QUERY_BLOCK, q_len))
        bias = logits_bias(attn_mask, is_causal, visible, rows, columns, q_len, k_len)
        probs = _probabilities(query[:, :, rows], picked, bias, lse[:, :, rows], scale)
        sums += (probs * query_valid[:, None, rows, None].to(acc)).sum(dim=2)
    per_kv_head = sums.view(batch, kv_heads, q_heads // kv_heads, -1).sum(dim=2)
    total = torch.zeros(batch, kv_heads, k_len, dtype=acc, device=query.device)
    return total.index_copy_(2, columns, per_kv_head)
