"""Time to first token alone: one-token ``generate`` calls of dense Inductor, A-VL's defaults
and the recommended set, interleaved round by round in one process (as end_to_end.py runs
its rows), after two warm-ups each.

    python benchmarks/first_token.py --rounds 20
    python benchmarks/first_token.py --text-only --configs dense avl

``--text-only`` gives every model the same prompt length without image tokens: each avl
site then runs dense attention through the avl route (one warning), so the ratio is the
route's own cost (its split graph and runtime calls) before any selection. Prints each
configuration's median and best time, the median over rounds of its ratio to dense
Inductor within a round, and the minor page faults of the process per call (a model alone
in a process may fault its buffers in at every call, ~1,400 faults a prefill for dense
Inductor on ``cpu-host``, where models that share a process reuse freed memory: compare
configurations within one process only).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from end_to_end import PRESETS, RECOMMENDED, _generate, build_model, make_inputs, paired_ratio

import avl_compile


def _dense_inductor(model):
    model.forward = torch.compile(model.forward)
    return model


CONFIGS: dict[str, Callable] = {
    "dense": _dense_inductor,
    "avl": avl_compile.compile,
    "recommended": lambda model: avl_compile.compile(model, options=RECOMMENDED),
}


def text_only(inputs: dict) -> dict:
    """The prompt's length and batch with random text tokens in place of the image."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 30000, inputs["input_ids"].shape, generator=generator)
    ids = ids.to(inputs["input_ids"].device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-host", choices=sorted(PRESETS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--text-only", action="store_true", help="prompts without images")
    args = parser.parse_args()
    if args.configs[0] != "dense":
        parser.error("--configs: the first must be dense (the ratios' baseline)")
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64
    preset = PRESETS[args.preset]
    inputs = make_inputs(preset, args.batch, "cpu")
    if args.text_only:
        inputs = text_only(inputs)
        warnings.filterwarnings("ignore", message="avl: this prompt runs dense attention")
    models = {name: CONFIGS[name](build_model(preset, "cpu")) for name in args.configs}
    for model in models.values():
        for _ in range(2):  # compiles every graph a one-token generate needs
            _generate(model, inputs, 1, {})
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    faults: dict[str, list[int]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        for i in range(len(names)):  # each round starts one configuration later
            name = names[(i + round_) % len(names)]
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            _generate(models[name], inputs, 1, {})
            times[name].append(time.perf_counter() - start)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    for name in names:
        ratio = paired_ratio(times[name], times["dense"])
        print(
            f"{name:12s} median {1e3 * statistics.median(times[name]):7.1f} ms  "
            f"best {1e3 * min(times[name]):7.1f} ms  vs dense {ratio:.3f}  "
            f"page faults {statistics.median(faults[name]):.0f}"
        )


if __name__ == "__main__":
    main()
