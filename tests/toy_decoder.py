"""A toy cached decoder in the two shapes HF transformers emits (5.17 and 5.23+)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ToyAttention(nn.Module):
    def __init__(self, style: str, hidden: int = 16, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.style, self.heads, self.kv_heads = style, heads, kv_heads
        self.dim = hidden // heads
        self.q_proj = nn.Linear(hidden, heads * self.dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.dim, bias=False)

    def forward(self, x, past_keys, past_values, mask=None, extra_user=False):
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.heads, self.dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.kv_heads, self.dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.kv_heads, self.dim).transpose(1, 2)
        keys = torch.cat([past_keys, k], dim=-2)
        values = torch.cat([past_values, v], dim=-2)
        if self.style == "repeat_kv":  # transformers 5.17: repeat_kv and an explicit mask
            group = self.heads // self.kv_heads
            shape = (batch, self.kv_heads, group, keys.shape[2], self.dim)
            k_rep = keys[:, :, None, :, :].expand(shape).reshape(batch, self.heads, -1, self.dim)
            v_rep = values[:, :, None, :, :].expand(shape).reshape(batch, self.heads, -1, self.dim)
            out = F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=mask, is_causal=False)
        else:  # transformers 5.23+: GQA inside SDPA, causal flag
            out = F.scaled_dot_product_attention(
                q, keys, values, is_causal=length > 1, enable_gqa=True
            )
        if extra_user:
            out = out + keys.sum()
        return out, keys, values


class ToyLayer(nn.Module):
    def __init__(self, style: str) -> None:
        super().__init__()
        self.self_attn = ToyAttention(style)


class ToyDecoder(nn.Module):
    def __init__(self, style: str = "gqa") -> None:
        super().__init__()
        self.layers = nn.ModuleList([ToyLayer(style)])
        self.encoder_attn = ToyAttention(style)

    def forward(self, x, past_keys, past_values, mask=None, extra_user=False):
        out, keys, values = self.layers[0].self_attn(x, past_keys, past_values, mask, extra_user)
        q = x.view(x.shape[0], x.shape[1], 4, 4).transpose(1, 2)
        encoded = F.scaled_dot_product_attention(q, q, q)  # no cache: an encoder-style site
        return out + encoded, keys, values


def toy_inputs(batch: int = 1, length: int = 5, past: int = 3):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, length, 16, generator=generator)
    past_keys = torch.randn(batch, 2, past, 4, generator=generator)
    past_values = torch.randn(batch, 2, past, 4, generator=generator)
    return x, past_keys, past_values
