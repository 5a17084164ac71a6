"""Decode attention over a kept fraction of a KV cache: gathered op vs the alternatives.

    python benchmarks/attention.py            # full grid (GPU)
    python benchmarks/attention.py --quick    # a CPU-sized grid

For each cache length L, kept fraction b and batch size, one decode query (32 query heads,
8 kv heads, D = 128) attends:
  dense      SDPA over the whole cache (what the model does without A-VL)
  gathered   avl gathered attention over the kept rows (Triton on GPU, PyTorch on CPU)
  select     index_select of the kept rows, then SDPA
  flex       FlexAttention with a mask of the kept rows (compiled), where available
  narrow     SDPA over a contiguous slice of b*L rows (the "core rows contiguous" layout)
  span       avl gathered attention given the same b*L rows as one contiguous range (what
             the A-VL decode path calls: its cache layout makes sink + core + text one span)
and, for the cost of HF's DynamicCache, the torch.cat of a new row onto the cache (K and V).
Times are medians; GB/s counts the K/V bytes each method must read, against a measured
device copy. Ratios are taken within one run (the machine may be shared).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate

from avl_compile.lowering import attend_selected_rows

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: str, repeats: int) -> float:
    fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def copy_bandwidth_gbs(device: str, dtype: torch.dtype, repeats: int) -> float:
    source = torch.empty(256 * 2**20 // torch.finfo(dtype).bits * 8, dtype=dtype, device=device)
    target = torch.empty_like(source)
    ms = time_ms(lambda: target.copy_(source), device, repeats)
    return 2 * source.numel() * source.element_size() / ms / 1e6  # read + write


def make_flex(length: int, index: torch.Tensor):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    batch = index.shape[0]
    kept = torch.zeros(batch, length, dtype=torch.bool, device=index.device)
    kept.scatter_(1, index[:, 0], True)

    def mask_mod(b, h, q_idx, kv_idx):
        return kept[b, kv_idx]

    block_mask = create_block_mask(mask_mod, batch, None, 1, length, device=index.device)
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, enable_gqa=True)


def run(args) -> list[dict]:
    device, dtype = args.device, getattr(torch, args.dtype)
    bandwidth = copy_bandwidth_gbs(device, dtype, args.repeats)
    print(f"device {device}, {args.dtype}: measured copy bandwidth {bandwidth:.1f} GB/s")
    rows = []
    for batch in args.batch:
        for length in args.lengths:
            shape = (batch, KV_HEADS, length, HEAD_DIM)
            keys = torch.randn(shape, dtype=dtype, device=device)
            values = torch.randn(shape, dtype=dtype, device=device)
            query = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, dtype=dtype, device=device)
            new_row = torch.randn(batch, KV_HEADS, 1, HEAD_DIM, dtype=dtype, device=device)
            scale = HEAD_DIM**-0.5
            row_bytes = 2 * KV_HEADS * HEAD_DIM * keys.element_size() * batch  # K and V
            dense = time_ms(
                lambda: F.scaled_dot_product_attention(
                    query, keys, values, scale=scale, enable_gqa=True
                ),
                device,
                args.repeats,
            )
            cat = time_ms(
                lambda: (torch.cat([keys, new_row], 2), torch.cat([values, new_row], 2)),
                device,
                args.repeats,
            )
            for fraction in args.fractions:
                kept = int(fraction * length)
                index = torch.stack(
                    [
                        torch.randperm(length, device=device)[:kept].sort().values
                        for _ in range(batch)
                    ]
                ).view(batch, 1, kept)
                flat = index[:, 0]
                span = torch.tensor([[[0, kept]]] * batch, device=device)

                def select_then_sdpa():
                    gather = flat[:, None, :, None].expand(-1, KV_HEADS, -1, HEAD_DIM)
                    k = keys.gather(2, gather)
                    v = values.gather(2, gather)
                    return F.scaled_dot_product_attention(query, k, v, scale=scale, enable_gqa=True)

                times = {
                    "gathered": time_ms(
                        lambda: attend_selected_rows(query, keys, values, index, scale),
                        device,
                        args.repeats,
                    ),
                    "select": time_ms(select_then_sdpa, device, args.repeats),
                    "span": time_ms(
                        lambda: attend_selected_rows(query, keys, values, None, scale, span),
                        device,
                        args.repeats,
                    ),
                    "narrow": time_ms(
                        lambda: F.scaled_dot_product_attention(
                            query,
                            keys[:, :, :kept],
                            values[:, :, :kept],
                            scale=scale,
                            enable_gqa=True,
                        ),
                        device,
                        args.repeats,
                    ),
                }
                flex = make_flex(length, index) if args.flex else None
                if flex is not None:
                    try:
                        times["flex"] = time_ms(
                            lambda: flex(query, keys, values), device, args.repeats
                        )
                    except Exception as error:  # FlexAttention support differs by device/version
                        print(f"flex attention unavailable: {type(error).__name__}: {error}")
                gathered_gbs = kept * row_bytes / times["gathered"] / 1e6
                span_gbs = kept * row_bytes / times["span"] / 1e6
                rows.append(
                    {
                        "batch": batch, "L": length, "b": fraction,
                        "dense ms": dense,
                        **{f"{k} ms": v for k, v in times.items()},
                        "gathered / (b*dense)": times["gathered"] / (fraction * dense),
                        "span / (b*dense)": times["span"] / (fraction * dense),
                        "span speedup vs dense": dense / times["span"],
                        "gathered GB/s": gathered_gbs,
                        "span GB/s": span_gbs,
                        "span % of copy BW": 100 * span_gbs / bandwidth,
                        "cache cat ms": cat,
                    }
                )  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-flex", dest="flex", action="store_false")
    parser.add_argument("--quick", action="store_true", help="CPU-sized: batch 1 and 4, 5 repeats")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.repeats = [1, 4], 5
    rows = run(args)
    print(tabulate(rows, headers="keys", floatfmt=".3g"))


if __name__ == "__main__":
    main()
