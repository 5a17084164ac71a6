"""What A-VL did inside a vLLM worker, for ``LLM.collective_rpc(worker_stats)``.

``collective_rpc`` runs a function in every worker process (each tensor-parallel rank) and
returns what each returned: here the counters of that worker's A-VL request book, summed
over its attention groups.
"""

from __future__ import annotations

from typing import Any

from avl_compile.vllm_plugin.runner_hook import avl_builders_of


def worker_stats(worker: Any) -> dict[str, float]:
    """This worker's A-VL counters (empty if A-VL is not its attention backend)."""
    runner = getattr(worker, "model_runner", worker)
    totals: dict[str, float] = {}
    for builder in avl_builders_of(runner):
        book = builder.book
        for name, value in book.counters.items():
            totals[name] = totals.get(name, 0) + value
        totals["live_states"] = totals.get("live_states", 0) + len(book.states)
    return totals
