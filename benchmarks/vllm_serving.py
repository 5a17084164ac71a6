"""vLLM dense vs vLLM + A-VL on the bundled trained models: throughput, rows, KV, accuracy.

    python benchmarks/vllm_serving.py --quick            # reader, 16 requests, 1 and 8 at once
    python benchmarks/vllm_serving.py                    # the three models, 1/8/32 at once
    python benchmarks/vllm_serving.py --options '{"vision_keep": 0.25, "vision_compute": 0.15}'
    python benchmarks/vllm_serving.py --models reader --concurrency 32 --kv-blocks 64 \
        --block-size 32                                  # one small KV pool for both

Needs vLLM (``tools/install_vllm_cpu.sh``). For each model and each number of concurrent
requests (vLLM's ``max_num_seqs``) two engines are started, dense (vLLM's own backend) and
A-VL (``attention_backend="CUSTOM"``), both float32, greedy, eager (``enforce_eager``), no
prefix caching; after a warm-up, ``--repeats`` rounds alternate between them and each
``LLM.generate`` of all ``--requests`` held-out prompts is timed (best round reported: on a
shared machine interference only adds time). Output tokens/s is generated tokens over that
wall time (prefill included, as a serving engine's throughput is).

Columns: attended rows per decode token and layer (dense: the sequence so far); KV rows per
request and layer that A-VL keeps (rows in use), and vLLM KV blocks a request holds per
decode token (dense: every block of its tokens; A-VL: its storage blocks, the others given
back to vLLM: README "Serving with vLLM"); the most requests one step ran ("peak
running"); accuracy on the task, and the HF path's (``avl_compile.compile``, the same
options) on the same prompts. ``--kv-blocks N`` gives both engines the same pool of N
blocks (``num_gpu_blocks_override``; ``--block-size`` tokens each): where the pool, not
``max_num_seqs``, limits how many requests run, A-VL's given-back blocks admit more.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engines in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of paged KV per engine

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

MODELS = ("reader", "region-reader", "finder")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--requests", type=int, default=64, help="held-out prompts per run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--options", default="{}", help="A-VL options, JSON (default: A-VL's)")
    parser.add_argument("--no-hf", action="store_true", help="skip the HF path's accuracy")
    parser.add_argument("--kv-blocks", type=int, help="both engines' KV pool, in blocks")
    parser.add_argument("--block-size", type=int, help="tokens per KV block (vLLM's default)")
    parser.add_argument("--quick", action="store_true", help="reader, 16 requests, 1 and 8")
    parser.add_argument("--out", default="bench_results/vllm_serving.csv")
    args = parser.parse_args()
    if args.quick:
        args.models, args.requests, args.concurrency, args.repeats = ["reader"], 16, [1, 8], 2
    options = json.loads(args.options)

    from vllm.platforms import current_platform

    rows = []
    for model in args.models:
        hf_accuracy = None if args.no_hf else hf_path_accuracy(model, args.requests, options)
        for concurrency in args.concurrency:
            rows.extend(compare(model, concurrency, args, options, hf_accuracy))
            print(tabulate(rows, headers="keys", floatfmt=".3g"), flush=True)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"device: {current_platform.device_name}, torch threads {torch.get_num_threads()}")
    print(f"wrote {path}")


def compare(model: str, concurrency: int, args, options: dict, hf_accuracy) -> list[dict]:
    from vllm import SamplingParams

    from avl_compile.bench.evaluate import normalise_answer
    from avl_compile.bench.reader_task import BUNDLED_MODELS, answer_length
    from avl_compile.vllm_plugin.models import task_requests, vllm_model_dir
    from avl_compile.vllm_plugin.stats import count_batches, peak_batch, worker_stats

    prompts, answers = task_requests(model, args.requests)
    params = SamplingParams(temperature=0.0, max_tokens=answer_length(BUNDLED_MODELS[model][1]) + 1)
    folder = vllm_model_dir(model)
    from vllm.platforms import current_platform

    pool = {"num_gpu_blocks_override": args.kv_blocks, "block_size": args.block_size}
    pool = {k: v for k, v in pool.items() if v is not None}
    engines = {"vllm dense": make_engine(folder, concurrency, None, pool)}
    if current_platform.is_cpu():  # the plugin builds on vLLM's CPU kernel
        engines["vllm + A-VL"] = make_engine(folder, concurrency, options, pool)
    else:
        print(
            "A-VL rows skipped: the plugin runs on vLLM's CPU engine only, not "
            f"{current_platform.device_name}"
        )
    best: dict[str, float] = {}
    texts: dict[str, list[str]] = {}
    generated: dict[str, int] = {}
    for llm in engines.values():  # warm-up
        llm.generate(prompts[:2], params, use_tqdm=False)
    before = {name: llm.collective_rpc(worker_stats)[0] for name, llm in engines.items()}
    for llm in engines.values():
        llm.collective_rpc(count_batches)
    for round_ in range(args.repeats):
        order = list(engines) if round_ % 2 == 0 else list(engines)[::-1]
        for name in order:
            start = time.perf_counter()
            outs = engines[name].generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            best[name] = min(best.get(name, float("inf")), seconds)
            texts[name] = [o.outputs[0].text for o in outs]
            generated[name] = sum(len(o.outputs[0].token_ids) for o in outs)
    peaks = {name: max(llm.collective_rpc(peak_batch)) for name, llm in engines.items()}
    counts: dict[str, float] = {}
    if "vllm + A-VL" in engines:
        after = engines["vllm + A-VL"].collective_rpc(worker_stats)[0]
        counts = {k: after[k] - before["vllm + A-VL"].get(k, 0) for k in after}
    rows = []
    for name in engines:
        correct = sum(
            normalise_answer(t) == normalise_answer(a)
            for t, a in zip(texts[name], answers, strict=True)
        )
        row = {
            "model": model,
            "concurrent": concurrency,
            "engine": name,
            "requests": len(prompts),
            "tokens/s": generated[name] / best[name],
            "x dense": None,
            "accuracy %": 100.0 * correct / len(prompts),
            "HF path %": None,
            "attended rows": None,
            "kept KV rows": None,
            "blocks/request": None,
            "peak running": peaks[name],
        }
        if name == "vllm + A-VL" and counts.get("decode_layer_steps"):
            steps, tokens = counts["decode_layer_steps"], counts["decode_tokens"]
            row["x dense"] = best["vllm dense"] / best[name]
            row["HF path %"] = hf_accuracy
            row["attended rows"] = counts["attended_rows"] / steps
            row["kept KV rows"] = counts["kept_rows"] / steps
            row["blocks/request"] = counts["vllm_blocks"] / tokens
        elif name == "vllm dense" and counts.get("decode_tokens"):  # the same sequences
            row["attended rows"] = counts["dense_rows"] / counts["decode_tokens"]
            row["kept KV rows"] = row["attended rows"]
            row["blocks/request"] = counts["dense_blocks"] / counts["decode_tokens"]
        rows.append(row)
    for llm in engines.values():
        close(llm)
    return rows


def make_engine(folder: Path, concurrency: int, options: dict | None, pool: dict):
    from vllm import LLM

    avl = {}
    if options is not None:
        avl = {"attention_backend": "CUSTOM", "additional_config": {"avl": options}}
    return LLM(
        model=str(folder), dtype="float32", max_model_len=512, enforce_eager=True,
        enable_prefix_caching=False, max_num_seqs=concurrency, seed=0, **avl, **pool,
    )  # fmt: skip


def close(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # an engine that is gone already
        pass
    del llm
    gc.collect()


def hf_path_accuracy(model: str, n: int, options: dict) -> float:
    """Accuracy (%) of ``avl_compile.compile`` with ``options`` on the same prompts."""
    import avl_compile
    from avl_compile.bench.evaluate import load_model, normalise_answer
    from avl_compile.bench.reader_task import BUNDLED_MODELS, answer_length
    from avl_compile.vllm_plugin.models import task_requests

    folder, task = BUNDLED_MODELS[model]
    hf_model, processor = load_model(folder, torch.float32, "cpu")
    avl_compile.compile(hf_model, options={**options, "inner": "eager"})
    prompts, answers = task_requests(model, n)
    correct = 0
    for prompt, answer in zip(prompts, answers, strict=True):
        image, text = prompt["multi_modal_data"]["image"], prompt["prompt"]
        inputs = processor(images=image, text=text, return_tensors="pt")
        out = hf_model.generate(**inputs, max_new_tokens=answer_length(task) + 1, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :]
        correct += normalise_answer(
            processor.decode(new, skip_special_tokens=True)
        ) == normalise_answer(answer)
    return 100.0 * correct / n


if __name__ == "__main__":
    main()
