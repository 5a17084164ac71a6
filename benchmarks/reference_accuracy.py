"""Accuracy of option sets through the eager reference policy, on a bundled model's held-out
split: for options the compiled path does not run yet (recall), and to check a new option
before it is built.

    python benchmarks/reference_accuracy.py --model reader --limit 50 \
        --options '{"paper": {}, "recall": {"refresh_every": 1, "recall_pages": 4}}' \
        --budgets 0.25 0.5

Each option set is merged over the bench's A-VL options for the budget (S = b, C = 0.6 b,
T = b); a set with "policy" other than "avl" is taken as it is (once). Prints one line per
option set and budget: exact-match accuracy and seconds.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from avl_compile.bench import evaluate
from avl_compile.bench.cli import answer_token_budget
from avl_compile.bench.reader_task import BUNDLED_MODELS
from avl_compile.reference import reference_generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reader", choices=sorted(BUNDLED_MODELS))
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5])
    parser.add_argument("--options", default='{"paper": {}}', help="JSON: name -> options")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path, task = BUNDLED_MODELS[args.model]
    model, processor = evaluate.load_model(path, torch.float32, "cpu")
    records = evaluate.load_examples(None, args.limit, task)
    max_new_tokens = answer_token_budget(processor, records)
    prompts = [evaluate.prompt_inputs(processor, record, "cpu") for record in records]
    for name, extra in json.loads(args.options).items():
        own_policy = extra.get("policy", "avl") != "avl"
        for budget in args.budgets[:1] if own_policy else args.budgets:
            options = extra if own_policy else {**evaluate.policy_options("avl", budget), **extra}
            start, hits = time.perf_counter(), 0
            for prompt, record in zip(prompts, records, strict=True):
                out = reference_generate(
                    model, prompt, options, max_new_tokens=max_new_tokens, do_sample=False
                )
                new = out[:, prompt["input_ids"].shape[1] :]
                text = processor.batch_decode(new, skip_special_tokens=True)[0]
                answers = {evaluate.normalise_answer(a) for a in record["answers"]}
                hits += evaluate.normalise_answer(text) in answers
            seconds = time.perf_counter() - start
            print(
                f"{args.model} {name} budget={'-' if own_policy else budget}: "
                f"{hits / len(records):.1%} of {len(records)} ({seconds:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
