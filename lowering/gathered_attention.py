"""``avl::gathered_attention``: attention of a few query rows over selected rows of a KV cache.

The op reads only the selected rows: index lists and contiguous spans (the PyTorch
implementation gathers the listed rows and slices the spans; the Triton kernel reads both in
place) and returns the log-sum-exp beside the output,
so that partial attentions over disjoint row sets (sink + text, core image rows) merge exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

# dtypes the Triton kernel handles; float64 stays on the PyTorch implementation
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of attention logits, probabilities and scores (the policies' one
    rule: float64 stays float64, every other dtype accumulates in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("avl::gathered_attention", mutates_args=())
def gathered_attention(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    index: Tensor | None,
    scale: float,
    ranges: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of ``query`` [B, Hq, Lq, D] over selected rows of ``keys``/``values``
    [B, Hkv, L, D]: the rows listed in ``index`` plus the rows of the contiguous ``ranges``.

    ``index`` is [B, Hkv, n] (a list per kv head) or [B, 1, n] (shared by the heads of the
    layer); entries of -1 are padding and ignored. ``ranges`` is [B, R, 2] of (start, stop)
    row spans per batch row, shared by the kv heads (sink prefix, text window; stop <= start
    is an empty span); they are read as slices, not through an index. The caller keeps the
    index rows and the spans disjoint. Query head h reads kv head h // (Hq // Hkv).
    Returns ``(output [B, Hq, Lq, D] in query dtype, lse [B, Hq, Lq] in float32, float64 for
    float64 inputs)``; a row with nothing selected gets output 0 and lse -inf.
    """
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads = keys.shape[1]
    check_gathered_attention_inputs(query, keys, values, index, ranges, check_range=True)
    acc = score_dtype(query.dtype)
    group = q_heads // kv_heads
    grouped_query = query.reshape(batch, kv_heads, group * q_len, head_dim).to(acc)
    # one (logits, values) part per index list or span; values are read in place (slices),
    # only the small logits are concatenated for the softmax
    logit_parts: list[Tensor] = []
    value_parts: list[Tensor] = []
    if index is not None:
        rows = index.expand(batch, kv_heads, index.shape[-1])
        picked_keys = pick_rows(keys, rows).to(acc)
        logits = torch.matmul(grouped_query, picked_keys.transpose(-1, -2)) * scale
        logit_parts.append(logits.masked_fill((rows < 0).unsqueeze(-2), float("-inf")))
        value_parts.append(pick_rows(values, rows).to(acc))
    if ranges is not None:
        # span r of every batch row is read as one slice covering it in all rows, masked per row
        bounds = ranges.tolist()
        for r in range(ranges.shape[1]):
            spans = [(start, stop) for start, stop in (row[r] for row in bounds) if stop > start]
            if not spans:
                continue
            first, last = min(s for s, _ in spans), max(e for _, e in spans)
            logits = torch.matmul(grouped_query, keys[:, :, first:last].to(acc).mT) * scale
            if any((start, stop) != (first, last) for start, stop in (row[r] for row in bounds)):
                position = torch.arange(first, last, device=ranges.device)
                inside = (position >= ranges[:, r, :1]) & (position < ranges[:, r, 1:])
                logits = logits.masked_fill(~inside[:, None, None, :], float("-inf"))
            logit_parts.append(logits)
            value_parts.append(values[:, :, first:last])
    lse_shape = (batch, kv_heads, group * q_len, 1)
    if not logit_parts:  # only empty spans
        lse = grouped_query.new_full(lse_shape, float("-inf"))
        output = grouped_query.new_zeros(grouped_query.shape)
    else:
        lse = torch.logsumexp(torch.cat(logit_parts, dim=-1), dim=-1, keepdim=True)
        shift = lse.nan_to_num(neginf=0.0)
        output = sum(
            torch.matmul(torch.exp(logits - shift), part.to(acc))
            for logits, part in zip(logit_parts, value_parts, strict=True)
        )
    output = output.reshape(batch, q_heads, q_len, head_dim).to(query.dtype)
    return output, lse.reshape(batch, q_heads, q_len)


@gathered_attention.register_fake
def _(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    index: Tensor | None,
    scale: float,
    ranges: Tensor | None = None,
):
    check_gathered_attention_inputs(query, keys, values, index, ranges)
    lse = query.new_empty(query.shape[:-1], dtype=score_dtype(query.dtype))
    return torch.empty_like(query), lse


def pick_rows(cache: Tensor, rows: Tensor) -> Tensor:
    """cache [B, H, L, D] at rows [B, H, n] (-1 read as row 0) -> [B, H, n, D].

    One index_select over the cache's rows: on CPUs much faster than ``gather`` with an
    index expanded over D. A cache laid out [B, L, H, D] under its [B, H, L, D] view (a
    prefill's keys straight from the projection) is read in place, not copied first."""
    batch, heads, length, dim = cache.shape
    table = _row_table(cache)
    if table is None:
        base = torch.arange(batch * heads, device=rows.device).view(batch, heads, 1) * length
        flat = (base + rows.clamp(min=0)).flatten()
        table = cache.reshape(batch * heads * length, dim)
    else:
        table, (row_b, row_h, row_l) = table
        b = torch.arange(batch, device=rows.device).view(batch, 1, 1) * row_b
        h = torch.arange(heads, device=rows.device).view(1, heads, 1) * row_h
        flat = (b + h + rows.clamp(min=0) * row_l).flatten()
    return table.index_select(0, flat).view(*rows.shape, dim)


def _row_table(cache: Tensor) -> tuple[Tensor, tuple[int, int, int]] | None:
    """A non-contiguous cache [B, H, L, D] whose rows are whole D-vectors of its storage, as
    a [rows, D] view and the row strides of B, H and L; None if contiguous (its reshape is
    a view) or not so laid out."""
    if cache.is_contiguous() or cache.stride(3) != 1 or any(s < 0 for s in cache.stride()):
        return None
    dim = cache.shape[3]
    strides = cache.stride()[:3]
    if any(s % dim for s in strides):
        return None
    last = sum((n - 1) * s for n, s in zip(cache.shape[:3], strides, strict=True))
    table = cache.as_strided((last // dim + 1, dim), (dim, 1))
    return table, (strides[0] // dim, strides[1] // dim, strides[2] // dim)


def check_gathered_attention_inputs(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    index: Tensor | None,
    ranges: Tensor | None = None,
    check_range: bool = False,
) -> None:
    """Shape and dtype checks; ``check_range`` also reads the index and spans (a device sync)."""
    name = "avl::gathered_attention"
    if query.dim() != 4 or keys.dim() != 4 or values.shape != keys.shape:
        raise ValueError(
            f"{name}: expected query [B, Hq, Lq, D] and keys/values "
            f"[B, Hkv, L, D] of one shape, got {tuple(query.shape)}, {tuple(keys.shape)}, "
            f"{tuple(values.shape)}"
        )
    if query.shape[1] % keys.shape[1]:
        raise ValueError(
            f"{name}: {query.shape[1]} query heads is not a multiple of {keys.shape[1]} kv heads"
        )
    if index is None and ranges is None:
        raise ValueError(f"{name}: nothing selected; give an index, ranges, or both")
    if index is not None:
        if index.dim() != 3 or index.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"{name}: index must be an int32/int64 tensor [B, Hkv or 1, n], "
                f"got {index.dtype} {tuple(index.shape)}"
            )
        if index.shape[-1] == 0:
            raise ValueError(f"{name}: the row selection is empty (n = 0); pass index=None")
        if index.shape[0] != query.shape[0] or index.shape[1] not in (1, keys.shape[1]):
            raise ValueError(
                f"{name}: index {tuple(index.shape)} must be [B, 1 or Hkv, n] for "
                f"B={query.shape[0]}, Hkv={keys.shape[1]}"
            )
    if ranges is not None and (
        ranges.dim() != 3
        or ranges.shape[0] != query.shape[0]
        or ranges.shape[2] != 2
        or ranges.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError(
            f"{name}: ranges must be an int32/int64 tensor [B, R, 2] of (start, stop) for "
            f"B={query.shape[0]}, got {ranges.dtype} {tuple(ranges.shape)}"
        )
    # a traced call (Dynamo or Inductor running the op's body on fake tensors) has no values
    # to read: the check is for eager calls
    if not check_range or any(is_fake(t) for t in (keys, index, ranges) if t is not None):
        return
    length = keys.shape[2]
    if index is not None and index.numel() and int(index.max()) >= length:
        raise IndexError(
            f"{name}: index {int(index.max())} is out of range for a cache of {length} rows"
        )
    if ranges is not None and ranges.numel():
        used = ranges[..., 1] > ranges[..., 0]
        if bool((used & ((ranges[..., 0] < 0) | (ranges[..., 1] > length))).any()):
            raise IndexError(
                f"{name}: a range {ranges.tolist()} falls outside the cache's {length} rows "
                "(each span must satisfy 0 <= start < stop <= L)"
            )


def merge_partial_attention(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Exact softmax merge of attentions over disjoint row sets: returns (output, total lse)."""
    lses = torch.stack([lse for _, lse in parts])
    total = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - total.nan_to_num(neginf=0.0)).nan_to_num(0.0)
    pairs = zip(weights, parts, strict=True)
    merged = sum(w.unsqueeze(-1) * out.to(w.dtype) for w, (out, _) in pairs)
    return merged.to(parts[0][0].dtype), total
