"""Triton kernel of ``avl::gathered_attention``: reads the selected KV rows in place.

One program per (batch row, kv head) holds all the query rows of that head group (the
grouped-query heads times the few decode positions) and walks the index list in blocks:
it loads the selected K/V rows straight from the cache through the index, then the rows of
each contiguous span (no copy of the rows first), and keeps an online softmax, so it
returns the output and the log-sum-exp.

Registered with ``torch.library.triton_op`` so Inductor sees the kernel inside compiled
graphs. On a CPU the kernel runs under ``TRITON_INTERPRET=1`` (tests); the backend uses the
PyTorch implementation there.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from avl_compile.lowering.gathered_attention import (
    TRITON_DTYPES,
    check_gathered_attention_inputs,
)


@triton.jit
def _attend_rows(
    q, m_i, l_i, acc, row, valid, keys_base, values_base, sk_l, sv_l, dims, dim_valid, scale,
    IEEE_FP32: tl.constexpr,
):  # fmt: skip
    """One block of the online softmax over cache rows ``row`` (where ``valid``)."""
    kv_mask = valid[:, None] & dim_valid[None, :]
    k = tl.load(keys_base + row[:, None] * sk_l + dims[None, :], mask=kv_mask, other=0.0)
    if IEEE_FP32:
        scores = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        scores = tl.dot(q, tl.trans(k))
    scores = tl.where(valid[None, :], scores * scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid yet
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(values_base + row[:, None] * sv_l + dims[None, :], mask=kv_mask, other=0.0)
    if IEEE_FP32:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _gathered_attention_kernel(
    query, keys, values, index, ranges, out, lse,
    sq_b, sq_h, sq_l, sq_d,
    sk_b, sk_h, sk_l,
    sv_b, sv_h, sv_l,
    si_b, si_h, si_n,
    sr_b, sr_r,
    so_b, so_h, so_l, so_d,
    sl_b, sl_h, sl_l,
    n_index, n_ranges, q_len, group, kv_heads, head_dim, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE_FP32: tl.constexpr,
):  # fmt: skip
    program = tl.program_id(0)
    b = program // kv_heads
    h = program % kv_heads
    rows = tl.arange(0, BLOCK_M)  # row r: query head h * group + r // q_len, position r % q_len
    row_valid = rows < group * q_len
    q_head = h * group + rows // q_len
    q_pos = rows % q_len
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < head_dim
    q_ptrs = (
        query + b * sq_b + q_head[:, None] * sq_h + q_pos[:, None] * sq_l + dims[None, :] * sq_d
    )
    q = tl.load(q_ptrs, mask=row_valid[:, None] & dim_valid[None, :], other=0.0)
    keys_base = keys + b * sk_b + h * sk_h  # the last dim is contiguous (checked on launch)
    values_base = values + b * sv_b + h * sv_h

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    blocks = tl.arange(0, BLOCK_N)
    start = 0
    while start < n_index:  # a while loop: Triton 3.6's interpreter rejects range(n_index)
        offsets = start + blocks
        idx = tl.load(
            index + b * si_b + h * si_h + offsets * si_n, mask=offsets < n_index, other=-1
        )
        valid = idx >= 0
        m_i, l_i, acc = _attend_rows(
            q, m_i, l_i, acc, tl.where(valid, idx, 0), valid, keys_base, values_base,
            sk_l, sv_l, dims, dim_valid, scale, IEEE_FP32,
        )  # fmt: skip
        start += BLOCK_N
    r = 0
    while r < n_ranges:  # contiguous spans: consecutive rows, no index to read
        span_start = tl.load(ranges + b * sr_b + r * sr_r)
        span_stop = tl.load(ranges + b * sr_b + r * sr_r + 1)
        position = span_start
        while position < span_stop:
            row = position + blocks
            m_i, l_i, acc = _attend_rows(
                q, m_i, l_i, acc, row, row < span_stop, keys_base, values_base,
                sk_l, sv_l, dims, dim_valid, scale, IEEE_FP32,
            )  # fmt: skip
            position += BLOCK_N
        r += 1

    has_rows = l_i > 0
    result = acc / tl.where(has_rows, l_i, 1.0)[:, None]
    o_ptrs = out + b * so_b + q_head[:, None] * so_h + q_pos[:, None] * so_l + dims[None, :] * so_d
    tl.store(o_ptrs, result.to(out.dtype.element_ty), mask=row_valid[:, None] & dim_valid[None, :])
    log_sum = tl.where(has_rows, m_i + tl.log(tl.where(has_rows, l_i, 1.0)), float("-inf"))
    tl.store(lse + b * sl_b + q_head * sl_h + q_pos * sl_l, log_sum, mask=row_valid)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _launch(kernel, query, keys, values, index, ranges, scale, out, lse) -> None:
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads = keys.shape[1]
    group = q_heads // kv_heads
    if index is None:  # a placeholder the kernel never reads (n_index = 0)
        index = torch.full((batch, 1, 1), -1, dtype=torch.int64, device=query.device)
        n_index = 0
    else:
        n_index = index.shape[-1]
    if ranges is None:
        ranges = torch.zeros((batch, 1, 2), dtype=torch.int64, device=query.device)
        n_ranges = 0
    else:
        ranges = ranges.contiguous()
        n_ranges = ranges.shape[1]
    index_head_stride = 0 if index.shape[1] == 1 else index.stride(1)  # shared by the heads
    kernel[(batch * kv_heads,)](
        query, keys, values, index, ranges, out, lse,
        *query.stride(), *keys.stride()[:3], *values.stride()[:3],
        index.stride(0), index_head_stride, index.stride(2),
        ranges.stride(0), ranges.stride(1),
        *out.stride(), *lse.stride(),
        n_index, n_ranges, q_len, group, kv_heads, head_dim, scale,
        BLOCK_M=max(16, triton.next_power_of_2(group * q_len)),
        BLOCK_N=64,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        IEEE_FP32=query.dtype == torch.float32,
    )  # fmt: skip


@torch.library.triton_op("avl::gathered_attention_triton", mutates_args=())
def gathered_attention_triton(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    index: Tensor | None,
    scale: float,
    ranges: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Same contract as ``avl::gathered_attention``; lse is float32."""
    check_gathered_attention_inputs(query, keys, values, index, ranges, check_range=True)
    if query.dtype not in TRITON_DTYPES:
        raise TypeError(
            f"avl::gathered_attention_triton supports {TRITON_DTYPES}, got {query.dtype}"
        )
    # rows are read as contiguous vectors of D elements
    keys = keys if keys.stride(-1) == 1 else keys.contiguous()
    values = values if values.stride(-1) == 1 else values.contiguous()
    out = torch.empty_like(query)
    lse = torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)
    kernel = _gathered_attention_kernel
    if not interpreting():
        kernel = torch.library.wrap_triton(kernel)
    _launch(kernel, query, keys, values, index, ranges, scale, out, lse)
    return out, lse
