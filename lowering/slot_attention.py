"""Decode attention over the flagged slots of a fixed-capacity KV cache.

One query row per batch row attends the slots ``attend`` marks (the same slots in every kv
head of a row); the probabilities come back beside the output because A-VL's text scores
and core re-pick need them. Everything has fixed shapes ([B, C] flags, no index lists of
data-dependent length), so the whole decode step traces into one graph with no host sync.

On CUDA the Triton kernel of ``avl::gathered_attention`` reads only the flagged K/V rows
(masked loads); elsewhere plain PyTorch ops, which Inductor fuses with the rest of the step.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from avl_compile.lowering.gathered_attention import TRITON_DTYPES, score_dtype
from avl_compile.lowering.materialize import materialized


def slot_attention(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    attend: Tensor,
    scale: float,
    logits: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``query`` [B, Hq, 1, D] over the slots of ``keys``/``values`` [B, Hkv, C, D] flagged in
    ``attend`` [B, C] (bool). Returns (output [B, Hq, 1, D] in query dtype, probabilities
    [B, Hq, C] in the accumulation dtype, 0 at slots not attended). ``logits``: the step's
    ``slot_logits``, where the caller has them already (not computed twice)."""
    if _use_triton(query):
        return _slot_attention_triton(query, keys, values, attend, scale, logits)
    batch, q_heads, _, head_dim = query.shape
    kv_heads, capacity = keys.shape[1], keys.shape[2]
    if logits is None:
        logits = _grouped_logits(query, keys, scale)
    else:
        logits = logits.view(batch, kv_heads, q_heads // kv_heads, capacity)
    logits = logits.masked_fill(~attend[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    output = torch.matmul(probs, values.to(logits.dtype))
    output = output.reshape(batch, q_heads, 1, head_dim).to(query.dtype)
    return output, probs.reshape(batch, q_heads, capacity)


def slot_logits(query: Tensor, keys: Tensor, scale: float) -> Tensor:
    """Scaled q.k of ``query`` [B, Hq, 1, D] with every slot of ``keys`` [B, Hkv, C, D]:
    [B, Hq, C] in the accumulation dtype."""
    logits = _grouped_logits(query, keys, scale)
    return logits.reshape(query.shape[0], query.shape[1], keys.shape[2])


def _grouped_logits(query: Tensor, keys: Tensor, scale: float) -> Tensor:
    """[B, Hkv, Hq / Hkv, C]: the query heads grouped by the kv head they read."""
    batch, q_heads, _, head_dim = query.shape
    kv_heads = keys.shape[1]
    acc = score_dtype(query.dtype)
    grouped = materialized(query.reshape(batch, kv_heads, q_heads // kv_heads, head_dim).to(acc))
    return torch.matmul(grouped, keys.to(acc).transpose(-1, -2)) * scale


def _use_triton(query: Tensor) -> bool:
    forced = os.environ.get("AVL_GATHERED_ATTENTION")
    if forced == "torch":
        return False
    if forced != "triton" and not (query.is_cuda and query.dtype in TRITON_DTYPES):
        return False
    try:
        import avl_compile.lowering.triton_gathered_attention  # noqa: F401
    except ImportError as error:  # triton is an optional dependency
        if forced == "triton":
            message = "AVL_GATHERED_ATTENTION=triton, but triton is not installed"
            raise RuntimeError(message) from error
        return False
    return True


def _slot_attention_triton(query, keys, values, attend, scale, logits):
    """The kernel reads only the flagged rows (an index list padded with -1); the
    probabilities are recomputed from its log-sum-exp for the slots that need them (from
    the caller's ``logits`` if they are in the kernel's accumulation dtype)."""
    from avl_compile.lowering.triton_gathered_attention import gathered_attention_triton

    batch, q_heads, _, head_dim = query.shape
    kv_heads, capacity = keys.shape[1], keys.shape[2]
    slots = torch.arange(capacity, device=query.device)
    index = torch.where(attend, slots, -1).unsqueeze(1)  # [B, 1, C]
    output, lse = gathered_attention_triton(query, keys, values, index, scale, None)
    acc = lse.dtype
    if logits is None or logits.dtype != acc:
        grouped = query.reshape(batch, kv_heads, q_heads // kv_heads, head_dim).to(acc)
        logits = torch.matmul(grouped, keys.to(acc).transpose(-1, -2)) * scale
        logits = logits.reshape(batch, q_heads, capacity)
    probs = torch.exp(logits - lse.reshape(batch, q_heads, 1))
    return output, probs.masked_fill(~attend[:, None, :], 0.0)
