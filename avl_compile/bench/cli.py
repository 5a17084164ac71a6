"""``avl-bench`` / ``python -m avl_compile.bench``: the evaluation bench from the command line.

avl-bench --quick                                   # bundled model, short run (CPU: ~2 min)
avl-bench                                           # bundled model, every policy and budget
avl-bench --model region-reader                     # the other bundled model
avl-bench --model llava-hf/llava-1.5-7b-hf --data my_vqa/ --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from avl_compile.bench.evaluate import (
    BUDGETS,
    POLICIES,
    configurations,
    evaluate,
    format_table,
    load_examples,
    load_model,
    plot_accuracy,
    write_csv,
)
from avl_compile.console import hide_library_notices

QUICK_LIMIT, QUICK_BUDGETS = 20, (0.1, 0.25, 0.5, 1.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from avl_compile.bench.reader_task import BUNDLED_MODELS

    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(
        prog="avl-bench",
        description="Accuracy, resident KV bytes, attended rows and decode ms/token of each KV "
        "policy and budget on one model and dataset.",
    )
    parser.add_argument(
        "--model",
        default="reader",
        help=f"a bundled model ({', '.join(BUNDLED_MODELS)}; default reader) "
        "or a Hugging Face model id or folder",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="folder with data.jsonl lines {image, question, answers} "
        "(default: the held-out split of the bundled model's task; required for other models)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="examples to use (default all, or 100 of the bundled task)",
    )
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="default: the longest answer's token count + 1",
    )
    parser.add_argument(
        "--avl-refresh-every",
        type=int,
        default=None,
        help="A-VL's core refresh period K (default: the backend's, 3; -1: no core set)",
    )
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument(
        "--dtype",
        default="bfloat16" if cuda else "float32",
        choices=["float32", "float16", "bfloat16"],
    )
    parser.add_argument(
        "--inner",
        default="inductor" if cuda else "eager",
        choices=["inductor", "aot_eager", "eager"],
        help="compiler of the graph pieces around the attention sites",
    )
    parser.add_argument(
        "--out", default="bench_results", help="folder for results.csv and accuracy.png"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_LIMIT} examples, budgets {list(QUICK_BUDGETS)}",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)  # fmt: skip
    if args.quick:
        args.limit = args.limit or QUICK_LIMIT
        args.budgets = list(QUICK_BUDGETS)
    if args.avl_refresh_every is not None:
        from avl_compile.options import AvlOptions

        try:  # the backend's own check, so the message names the option and its range
            AvlOptions.from_mapping({"refresh_every": args.avl_refresh_every})
        except ValueError as error:
            parser.error(f"--avl-refresh-every: {error}")
    args.model_path, args.task = bundled_model(args.model)
    if args.task is None and args.data is None:
        parser.error(f"--data is required with --model {args.model} (not a bundled model)")
    return args


def bundled_model(model: str) -> tuple[str | Path, str | None]:
    """(folder or id, task): a bundled model's task, by name or by its folder; else None."""
    from avl_compile.bench.reader_task import BUNDLED_MODELS

    if model in BUNDLED_MODELS:
        return BUNDLED_MODELS[model]
    if Path(model).is_dir():
        folder = Path(model).resolve()
        for bundled, task in BUNDLED_MODELS.values():
            if folder == bundled.resolve():
                return bundled, task
    return model, None


def answer_token_budget(processor, records) -> int:
    tokenizer = getattr(processor, "tokenizer", processor)
    longest = max(
        len(tokenizer(answer, add_special_tokens=False)["input_ids"])
        for record in records
        for answer in record["answers"]
    )
    return longest + 1  # and the end-of-sequence token


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("avl_compile").setLevel(logging.WARNING)
    hide_library_notices()
    configs = configurations(args.policies, args.budgets)
    start = time.perf_counter()
    model, processor = load_model(args.model_path, getattr(torch, args.dtype), args.device)
    records = load_examples(args.data, args.limit, args.task or "read")
    if not records:
        raise SystemExit(f"avl-bench: no examples in {args.data}")
    max_new_tokens = args.max_new_tokens or answer_token_budget(processor, records)
    print(
        f"avl-bench: {args.model} on {len(records)} examples, {len(configs)} configurations, "
        f"{args.device} {args.dtype}, inner={args.inner}, max_new_tokens={max_new_tokens}"
        f"{'' if args.avl_refresh_every is None else f', avl K={args.avl_refresh_every}'}"
    )
    rows = evaluate(
        model,
        processor,
        records,
        configs,
        max_new_tokens,
        args.inner,
        args.progress,
        args.avl_refresh_every,
    )
    print(format_table(rows))
    out = Path(args.out)
    csv_path = write_csv(rows, out / "results.csv")
    png_path = plot_accuracy(
        rows, out / "accuracy.png", f"{args.model}: {len(records)} examples, {args.device}"
    )
    print(f"wrote {csv_path} and {png_path} in {time.perf_counter() - start:.0f} s")
    return 0
