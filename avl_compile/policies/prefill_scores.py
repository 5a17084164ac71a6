"""A-VL's prefill scores from the attention's log-sum-exp, without the L x L probabilities.

The policy needs two things from the prefill attention: the last prompt row's probabilities
(the image score) and the column sums of the text columns (H2O's accumulated attention of
the text tokens). Given each query row's log-sum-exp, a probability is
``exp(q . k * scale + bias - lse)``: the last row costs one row of logits, the text columns
a few columns, instead of a second pass over the whole attention.

On CPUs the log-sum-exp comes from the same flash kernel that ``F.scaled_dot_product_attention``
runs there (its output is bit for bit the dense one); elsewhere the caller falls back to the
blocked recomputation in ``common.py``. The biases are the prompt's, the same in every
layer: ``LseScoring`` makes them once per prompt.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor

from avl_compile.policies.common import score_dtype, window_sum

_QUERY_BLOCK = 1024  # query rows per block of the column sums


@dataclasses.dataclass
class LseScoring:
    """One prompt's prefill masks for the flash kernel and the scores, shared by its layers
    (of one prefill filter): the kernel's additive mask (None: causal or none), the last
    ``window`` rows' bias over every key, and the text ``columns``' bias per block of query
    rows."""

    kernel_mask: Tensor | None  # [B or 1, 1, Lq, Lk] in the query's dtype
    is_causal: bool
    last_rows: Tensor  # [window]
    last_bias: Tensor  # [B or 1, 1, window, Lk] in the scores' dtype
    columns: Tensor  # [n] key columns that hold some row's text
    # (query rows, bias [B or 1, 1, rows, n]) per block, from the first row that sees a column
    blocks: list[tuple[slice, Tensor]]

    @classmethod
    def prepare(
        cls,
        attn_mask: Tensor | None,
        is_causal: bool,
        visible: Tensor | None,
        q_len: int,
        k_len: int,
        window: int,
        columns: Tensor,
        dtype: torch.dtype,
    ) -> LseScoring | None:
        """The masks on a CPU (``visible`` [B, Lk] hides keys from every query row: the
        prefill filter); None elsewhere (no log-sum-exp there)."""
        if columns.device.type != "cpu":
            return None
        every_key, acc = torch.arange(k_len), score_dtype(dtype)

        def bias(rows: Tensor, keys: Tensor, to: torch.dtype = acc) -> Tensor:
            return logits_bias(attn_mask, is_causal, visible, rows, keys, q_len, k_len).to(to)

        kernel_mask = None
        if attn_mask is not None or visible is not None:
            kernel_mask = bias(torch.arange(q_len), every_key, dtype)
        last_rows = torch.arange(q_len - window, q_len)
        # rows that see no text column add zeros (under a causal mask: every row before the
        # first text token, most of a prompt whose text follows its image): left out. A
        # mask's hidden entries are -inf or the dtype's least (HF), exp() of either is 0
        column_bias = bias(torch.arange(q_len), columns)
        sees = column_bias > torch.finfo(acc).min / 2
        seeing = torch.nonzero(sees.any(-1).any(0)[0])
        first = int(seeing[0, 0]) if seeing.numel() else q_len
        blocks = [
            (slice(start, stop), column_bias[:, :, start:stop])
            for start in range(first, q_len, _QUERY_BLOCK)
            for stop in [min(start + _QUERY_BLOCK, q_len)]
        ]
        return cls(kernel_mask, is_causal and kernel_mask is None, last_rows,
                   bias(last_rows, every_key), columns, blocks)  # fmt: skip

    def attend(
        self, query: Tensor, keys: Tensor, values: Tensor, scale: float
    ) -> tuple[Tensor, Tensor]:
        """(output, lse [B, Hq, Lq]) of the prefill attention."""
        group = query.shape[1] // keys.shape[1]
        if group > 1 and not _kernel_reads_grouped_heads():
            keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, keys, values, 0.0, self.is_causal, attn_mask=self.kernel_mask, scale=scale
        )
        return output, lse

    def last_row_score(
        self, query: Tensor, keys: Tensor, lse: Tensor, scale: float, query_valid: Tensor
    ) -> Tensor:
        """[B, Lk]: the attention of the last ``window`` prompt tokens (the valid ones of
        ``query_valid`` [B, Lq]) over the whole row, summed over the tokens, head-averaged."""
        rows = self.last_rows
        probs = _probabilities(query[:, :, rows], keys, self.last_bias, lse[:, :, rows], scale)
        return window_sum(probs, query_valid, rows.numel()).mean(dim=1)

    def column_sums(
        self, query: Tensor, keys: Tensor, lse: Tensor, scale: float, query_valid: Tensor
    ) -> Tensor:
        """Accumulated attention per kv head [B, Hkv, Lk] of the text columns (summed over
        the valid query rows [B, Lq]); 0 in every other column."""
        batch, q_heads, _, _ = query.shape
        kv_heads, k_len = keys.shape[1], keys.shape[2]
        acc = score_dtype(query.dtype)
        picked = keys[:, :, self.columns]
        sums = torch.zeros(batch, q_heads, self.columns.numel(), dtype=acc, device=query.device)
        for rows, bias in self.blocks:
            probs = _probabilities(query[:, :, rows], picked, bias, lse[:, :, rows], scale)
            sums += (probs * query_valid[:, None, rows, None].to(acc)).sum(dim=2)
        per_kv_head = sums.view(batch, kv_heads, q_heads // kv_heads, -1).sum(dim=2)
        total = torch.zeros(batch, kv_heads, k_len, dtype=acc, device=query.device)
        return total.index_copy_(2, self.columns, per_kv_head)


@functools.cache
def _kernel_reads_grouped_heads() -> bool:
    """Whether this torch's CPU flash kernel takes fewer key/value heads than query heads
    (torch 2.13's does, with the same output and log-sum-exp as repeated heads): the
    repeat's two copies cost ~1.5 ms a prefill on ``cpu-host`` (32 layers)."""
    query, keys = torch.zeros(1, 2, 2, 8), torch.zeros(1, 1, 2, 8)
    try:
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, keys, keys, 0.0, True)
    except (RuntimeError, ValueError):  # TORCH_CHECK's errors
        return False
    return True


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
