"""What A-VL did inside a vLLM worker, for ``LLM.collective_rpc(worker_stats)``.

``collective_rpc`` runs a function in every worker process (each tensor-parallel rank) and
returns what each returned: here the counters of that worker's A-VL request book, summed
over its attention groups. ``count_batches`` / ``peak_batch`` measure any engine, dense
included: the most requests one step ran.
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


def count_batches(worker: Any) -> None:
    """Starts counting this worker's step sizes (requests per model step)."""
    runner = getattr(worker, "model_runner", worker)
    if getattr(runner, "_avl_peak_batch", None) is not None:
        runner._avl_peak_batch = 0
        return
    execute = runner.execute_model

    def execute_model(scheduler_output, *args: Any, **kwargs: Any):
        scheduled = len(scheduler_output.num_scheduled_tokens)
        runner._avl_peak_batch = max(runner._avl_peak_batch, scheduled)
        return execute(scheduler_output, *args, **kwargs)

    runner._avl_peak_batch = 0
    runner.execute_model = execute_model


def peak_batch(worker: Any) -> int:
    """The most requests one step ran since ``count_batches``."""
    return getattr(getattr(worker, "model_runner", worker), "_avl_peak_batch", 0) or 0
