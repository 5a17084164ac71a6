"""End-to-end decode speed and resident KV: dense eager, dense Inductor and avl, side by side.

    python benchmarks/end_to_end.py --preset cpu       # a small LLaVA-1.5-shaped model (CPU)
    python benchmarks/end_to_end.py --preset cpu-long  # 2,880 image tokens, narrower (CPU)
    python benchmarks/end_to_end.py --preset llava16   # LLaVA-1.6-7B shape, bf16 (GPU)
    python benchmarks/end_to_end.py --preset cpu-host --threads 1  # host-bound: 32 thin layers

Rows: dense eager, dense Inductor (the forward compiled), avl, and both through HF's own
compiled decode loop (``compile_config``: a static cache for dense, ``AvlCache`` for avl).
Random weights (speed needs no trained weights). Each configuration generates the same
prompt greedily; a logits processor stamps the time of every new token, and decode time per
token is (last stamp - first stamp) / (N - 1): the prefill is excluded. Time to first token
(prefill, vision tower included) is from the call of generate to the first stamp. Every
configuration is compiled and warmed up first, then the repeats run interleaved in rounds
(A B C, B C A, ...), since whichever runs first in a process is slower. Times are the best
of the repeats (interference only adds time). Ratios to dense Inductor are the median over
rounds of the ratio within a round: this machine's speed drifts by tens of percent over
seconds (a fixed matmul loop: 50 to 75 ms), so two configurations' best times may come from
different phases; neighbours in one round share a phase. Resident KV is the bytes of the
cache tensors after generate.
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback
from collections.abc import Callable

import torch
from tabulate import tabulate
from transformers import (
    CLIPVisionConfig,
    CompileConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LogitsProcessorList,
)

import avl_compile
from avl_compile.bench.evaluate import AVL_PAGES as RECOMMENDED  # the bench's avl-pages row
from avl_compile.cache import cache_argument, generated_cache

IMAGE_TOKEN_ID = 32000

PRESETS = {
    # 576 image tokens as LLaVA-1.5, a narrow 4-layer decoder so a CPU finishes in minutes
    "cpu": dict(hidden=512, layers=4, heads=8, kv_heads=8, intermediate=1024, image=336,
                patch=14, dtype="float32", new_tokens=32, prompt_text=40),
    # LLaVA-1.6's 2,880 image tokens (5 tiles of 576) before a narrow 4-layer decoder with
    # 128-wide heads: the cache outweighs the weights at batch 4, as at 7B with batch 16
    "cpu-long": dict(hidden=1024, layers=4, heads=8, kv_heads=8, intermediate=2816, image=336,
                     patch=14, tiles=5, dtype="float32", new_tokens=32, prompt_text=40),
    # 32 layers of width 128: host work (Python, op dispatch, syncs), not arithmetic, sets
    # the time per token, as on a GPU at small batch; run it with --threads 1
    "cpu-host": dict(hidden=128, layers=32, heads=4, kv_heads=2, intermediate=256, image=336,
                     patch=14, dtype="float32", new_tokens=32, prompt_text=40),
    # LLaVA-1.6-7B decoder; 2,880 image tokens (5 tiles of 576) laid out as one block
    "llava16": dict(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008,
                    image=336, patch=14, tiles=5, dtype="bfloat16", new_tokens=64,
                    prompt_text=60),
}  # fmt: skip


def build_model(preset: dict, device: str) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        image_size=preset["image"], patch_size=preset["patch"],
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=preset["hidden"], intermediate_size=preset["intermediate"],
        num_hidden_layers=preset["layers"], num_attention_heads=preset["heads"],
        num_key_value_heads=preset["kv_heads"], vocab_size=32064,
        max_position_embeddings=8192,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )  # fmt: skip
    # built on the target device in the target dtype: a 7B model initialised on a CPU in
    # float32 would take minutes and 28 GB
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, preset["dtype"]))
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def make_inputs(preset: dict, batch: int, device: str) -> dict:
    per_image = (preset["image"] // preset["patch"]) ** 2
    tiles = preset.get("tiles", 1)
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(3, 30000, (batch, preset["prompt_text"]), generator=generator)
    image = torch.full((batch, per_image * tiles), IMAGE_TOKEN_ID)
    input_ids = torch.cat([text[:, :5], image, text[:, 5:]], dim=1)
    pixels = torch.randn(batch * tiles, 3, preset["image"], preset["image"], generator=generator)
    dtype = getattr(torch, preset["dtype"])
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": pixels.to(device=device, dtype=dtype),
    }


class _TokenClock:
    """A logits processor that only records when each new token's logits are ready."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return scores


def _generate(model, inputs, new_tokens: int, extra: dict, clock: _TokenClock | None = None):
    processors = LogitsProcessorList([clock] if clock else [])
    with torch.no_grad():
        return model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            return_dict_in_generate=True, logits_processor=processors, **extra,
        )  # fmt: skip


def _hf_compile_path(config: CompileConfig, cache: Callable[[], dict]) -> Callable[[], dict]:
    """generate's arguments for HF's compiled decode loop, a fresh cache per call."""
    config._compile_all_devices = True  # transformers compiles on GPUs only by default
    return lambda: {"compile_config": config, **cache()}


class Prepared:
    """One configuration, compiled and warmed up, with its timed runs so far."""

    def __init__(self, name: str, model, extra: Callable[[], dict], inputs, preset, device):
        self.name, self.model, self.extra = name, model, extra
        self.inputs, self.preset, self.device = inputs, preset, device
        out = self._run(None)  # warm-up: compiles every graph the run needs
        self.kv_bytes = sum(
            layer.keys.nbytes + layer.values.nbytes for layer in generated_cache(out).layers
        )
        self.decode: list[float] = []
        self.first_token: list[float] = []

    def _run(self, clock: _TokenClock | None):
        return _generate(self.model, self.inputs, self.preset["new_tokens"], self.extra(), clock)

    def time_once(self) -> None:
        clock = _TokenClock(self.device)
        start = time.perf_counter()
        self._run(clock)
        self.decode.append((clock.stamps[-1] - clock.stamps[0]) / (len(clock.stamps) - 1))
        self.first_token.append(clock.stamps[0] - start)

    def row(self) -> dict:
        ms = 1e3 * min(self.decode)  # the machine may be shared: interference only adds time
        batch = self.inputs["input_ids"].shape[0]
        return {"config": self.name, "batch": batch, "ms/token": ms,
                "tokens/s": 1e3 * batch / ms,
                "first token ms": 1e3 * min(self.first_token),
                "resident KV MB": self.kv_bytes / 2**20}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], help="configs to leave out")
    parser.add_argument("--only", nargs="*", help="configs to run, in this order (default: all)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # the configurations live side by side (interleaved repeats), each with its own graphs
    torch._dynamo.config.recompile_limit = 64
    preset = PRESETS[args.preset]
    rows = []
    for batch in args.batch:
        inputs = make_inputs(preset, batch, args.device)
        configs = {
            "dense eager": lambda m: m,
            "dense inductor": lambda m: setattr(m, "forward", torch.compile(m.forward)) or m,
            "avl (inductor)": lambda m: avl_compile.compile(m),
            "avl (aot_eager)": lambda m: avl_compile.compile(m, options={"inner": "aot_eager"}),
            # the README's recommended set (recall + the query-aware core, K = 1)
            "avl recommended (inductor)": lambda m: avl_compile.compile(m, options=RECOMMENDED),
            # HF's compiled decode loop (compile_config, decode steps only): its static cache
            # and CUDA graphs for dense; AvlCache on the avl-compiled forward for avl
            "dense, HF compile_config": lambda m: (
                m,
                _hf_compile_path(CompileConfig(), lambda: {"cache_implementation": "static"}),
            ),
            "avl, HF compile_config": lambda m: (
                avl_compile.compile(m),
                _hf_compile_path(
                    CompileConfig(backend="avl", mode=None),
                    lambda: {cache_argument(m): avl_compile.AvlCache()},
                ),
            ),
        }
        if args.device == "cuda":  # avl's decode graphs use CUDA graphs by default there
            configs["dense inductor (cudagraphs)"] = lambda m: (
                setattr(m, "forward", torch.compile(m.forward, mode="reduce-overhead")) or m
            )
            configs["avl (inductor, no cudagraphs)"] = lambda m: avl_compile.compile(
                m, options={"cudagraphs": False}
            )
        torch._dynamo.reset()
        prepared = []
        for name in args.only or list(configs):
            if name in args.skip:
                continue
            model, extra = configs[name](build_model(preset, args.device)), dict
            if isinstance(model, tuple):  # (model, generate's extra arguments per call)
                model, extra = model
            try:  # one failing configuration must not cost the others' rows (a GPU lease)
                prepared.append(Prepared(name, model, extra, inputs, preset, args.device))
            except Exception:
                traceback.print_exc()
                print(f"FAILED: {name} at batch {batch}", flush=True)
                del model
                if args.device == "cuda":
                    torch.cuda.empty_cache()
            else:
                print(f"compiled and warmed up: {name} at batch {batch}", flush=True)
        # interleaved, each repeat starting one configuration later: whichever runs first in
        # a process is slower, so a block per configuration would favour the later ones
        for repeat in range(args.repeats):
            for i in range(len(prepared)):
                prepared[(i + repeat) % len(prepared)].time_once()
        baseline = _compiled_baseline(prepared)
        for p in prepared:
            row = p.row()
            if baseline is not None:
                row["speedup vs dense inductor"] = paired_ratio(baseline.decode, p.decode)
                # this machine's rounds spread by tens of percent: the range says how much
                row["speedup rounds' range"] = ratio_range(baseline.decode, p.decode)
                row["first token vs dense inductor"] = paired_ratio(
                    p.first_token, baseline.first_token
                )
            rows.append(row)
            print(row, flush=True)
        del prepared
        if args.device == "cuda":
            torch.cuda.empty_cache()
    dense = {r["batch"]: r for r in rows if r["config"] == "dense eager"}
    for row in rows:
        base = dense.get(row["batch"])
        if base:
            row["speedup vs dense eager"] = base["ms/token"] / row["ms/token"]
            row["KV vs dense"] = row["resident KV MB"] / base["resident KV MB"]
    print(tabulate(rows, headers="keys", floatfmt=".3g"))


def _compiled_baseline(prepared: list[Prepared]) -> Prepared | None:
    """Dense Inductor, or on a GPU dense Inductor with CUDA graphs where it ran."""
    by_name = {p.name: p for p in prepared}
    return by_name.get("dense inductor (cudagraphs)") or by_name.get("dense inductor")


def round_ratios(numerators: list[float], denominators: list[float]) -> list[float]:
    """numerator / denominator within each round (the repeats of two configurations, index
    by index, ran next to each other)."""
    return [n / d for n, d in zip(numerators, denominators, strict=True)]


def paired_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median over rounds of the ratio within a round."""
    return statistics.median(round_ratios(numerators, denominators))


def ratio_range(numerators: list[float], denominators: list[float]) -> str:
    """The lowest and highest ratio within a round, as "low-high"."""
    ratios = round_ratios(numerators, denominators)
    return f"{min(ratios):.2f}-{max(ratios):.2f}"


if __name__ == "__main__":
    main()
