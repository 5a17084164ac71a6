"""Where an A-VL decode step's time goes on the host-bound shape: the compiled graph, the
dispatcher's Python around it, and the rest of the forward (Dynamo's guards, generate).

    python benchmarks/decode_breakdown.py --threads 1
    python benchmarks/decode_breakdown.py --threads 1 --recommended  # recall + the query-aware core
"""

from __future__ import annotations

import argparse
import time

import torch
from end_to_end import PRESETS, RECOMMENDED, _generate, _TokenClock, build_model, make_inputs

import avl_compile
from avl_compile.compiled_decode import CompiledDecode


class _TimedGraph:
    """A decode graph whose calls are timed into ``spent["graph"]``, called the way the
    dispatcher calls the graph it wraps (``run`` where that graph has one: recall's graphs
    take the step's state list whole)."""

    def __init__(self, graph, spent: dict[str, float]) -> None:
        self.graph, self.spent = graph, spent
        if hasattr(graph, "run"):
            self.run = self._run

    def __call__(self, *args):
        start = time.perf_counter()
        result = self.graph(*args)
        self.spent["graph"] += time.perf_counter() - start
        return result

    def _run(self, args, inputs):
        start = time.perf_counter()
        result = self.graph.run(args, inputs)
        self.spent["graph"] += time.perf_counter() - start
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-host", choices=sorted(PRESETS))
    parser.add_argument("--threads", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--recommended",
        action="store_true",
        help="the recommended option set (avl-pages), not A-VL's defaults",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    inputs = make_inputs(preset, 1, "cpu")
    options = RECOMMENDED if args.recommended else None
    model = avl_compile.compile(build_model(preset, "cpu"), options=options)
    _generate(model, inputs, 8, {})  # compiles every graph
    spent = {"dispatcher + graph": 0.0, "graph": 0.0}
    steps = 0
    original = CompiledDecode.__call__

    def timed(self, *call_args):
        nonlocal steps
        for key, graph in list(self.graphs.items()):
            if not isinstance(graph, _TimedGraph):
                self.graphs[key] = _TimedGraph(graph, spent)
        start = time.perf_counter()
        result = original(self, *call_args)
        spent["dispatcher + graph"] += time.perf_counter() - start
        steps += 1
        return result

    CompiledDecode.__call__ = timed
    per_token = []
    for _ in range(args.repeats):
        clock = _TokenClock("cpu")
        _generate(model, inputs, preset["new_tokens"], {}, clock)
        per_token.append((clock.stamps[-1] - clock.stamps[0]) / (len(clock.stamps) - 1))
    graph_ms = 1e3 * spent["graph"] / steps
    dispatcher_ms = 1e3 * spent["dispatcher + graph"] / steps - graph_ms
    print(f"decode steps timed: {steps}")
    print(f"ms/token (best of {args.repeats}): {1e3 * min(per_token):.2f}")
    print(f"compiled graph: {graph_ms:.2f} ms/step, dispatcher's Python: {dispatcher_ms:.3f} ms")


if __name__ == "__main__":
    main()
