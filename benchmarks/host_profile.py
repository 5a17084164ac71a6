"""Where the host time of a decode goes: ``cProfile`` over a few generates on the host-bound
shape, dense Inductor or avl, after two warm-ups (compiles excluded).

    python benchmarks/host_profile.py avl --generates 3 --top 35
    python benchmarks/host_profile.py dense

Prints the functions with the most time of their own: the compiled graphs' ``call``
(Inductor's Python wrapper), input asserts (``assert_size_stride``), buffer allocations
(``_empty_strided_cpu``), Dynamo's frame (``compile_wrapper``: guard checks). cProfile adds
time to every Python call, so compare counts and per-call shares, not absolute times.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import torch
from end_to_end import PRESETS, _generate, build_model, make_inputs

import avl_compile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", choices=["dense", "avl"])
    parser.add_argument("--preset", default="cpu-host", choices=sorted(PRESETS))
    parser.add_argument("--generates", type=int, default=3)
    parser.add_argument("--top", type=int, default=35)
    args = parser.parse_args()
    torch.set_num_threads(1)
    preset = PRESETS[args.preset]
    model, inputs = build_model(preset, "cpu"), make_inputs(preset, 1, "cpu")
    if args.config == "dense":
        model.forward = torch.compile(model.forward)
    else:
        model = avl_compile.compile(model)
    tokens = preset["new_tokens"]
    for _ in range(2):  # compiles every graph the generate needs
        _generate(model, inputs, tokens, {})
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.generates):
        _generate(model, inputs, tokens, {})
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
