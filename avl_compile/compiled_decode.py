"""The callable the backend returns for a decode graph whose A-VL step runs in the graph.

Per forward it does host work only, once per graph, never per layer: it finds the layers'
state by their cache tensors (an identity check when they are the tensors of the last step),
starts the step on the host schedule (which step refreshes, whether the cache must grow),
and calls the compiled graph with the state tensors appended to Dynamo's inputs. Nothing is
read back from the device.

A cache grows between steps, here, by a power of two of slots, so that Dynamo's guards see
its new length at the next forward. The runtime-call graph, which handles every case in
Python, takes the steps the in-graph step does not serve: a prompt that ran dense, a baseline
policy's cache, and a cache that must grow inside the step (a prompt with nothing evicted yet:
its cache is as long as the sequence, which it may not outgrow, as with 100% budgets).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from avl_compile.policies.avl import AvlLayerState
from avl_compile.policies.avl_decode import grow_cache
from avl_compile.runtime import AvlRuntime, end_prefill, layer_state, set_layer_state


class CompiledDecode:
    """Dispatch one decode forward to its compiled graph (plain or refresh step), or to the
    fallback."""

    def __init__(
        self,
        key_inputs: list[int],
        key_outputs: list[int],
        value_outputs: list[int],
        graphs: dict[bool, Callable],
        fallback: Callable,
        runtime: AvlRuntime,
    ) -> None:
        self.key_inputs = key_inputs  # Dynamo input index of each site's past keys
        self.key_outputs = key_outputs  # output index of each site's cache write-back
        self.value_outputs = value_outputs
        self.graphs = graphs  # refresh step? -> graph taking the state tensors last
        self.fallback = fallback
        self.runtime = runtime
        # the caches of the last step, weakly (a finished generate's cache must be freed)
        self._last_keys: tuple[weakref.ref, ...] = ()
        self._last_states: list[weakref.ref] = []

    def __call__(self, *args):
        end_prefill()
        states = self._states(args)
        if states is None or states[0].next_growth(args[self.key_inputs[0]].shape[2]):
            self.runtime.counters["decode_graphs_in_python"] += 1
            return self.fallback(*args)
        first = states[0]
        schedule = first.schedule
        for state in states:
            state.begin_step()
        tensors = [t for state in states for t in state.slots.tensors()]
        result = self.graphs[schedule.refresh](*args, *tensors)
        extra = schedule.growth_between_steps(result[self.key_outputs[0]].shape[2])
        if extra:
            result = self._grow(result, states, extra)
        counters = self.runtime.counters
        counters["decode_graphs_in_graph"] += 1
        counters["decode_sites"] += len(states)
        counters["attended_rows"] += schedule.attended_rows * len(states)
        return result

    def _states(self, args) -> list[AvlLayerState] | None:
        """The A-VL state of each site's cache, or None if some cache has none."""
        keys = [args[i] for i in self.key_inputs]
        if len(keys) == len(self._last_keys) and all(
            a is b() for a, b in zip(keys, self._last_keys, strict=True)
        ):
            states = [ref() for ref in self._last_states]
            if all(s is not None for s in states):
                return states
        states = [layer_state(k) for k in keys]
        if not all(isinstance(s, AvlLayerState) for s in states):
            return None
        if any(s.schedule is not states[0].schedule for s in states):
            return None
        self._remember(keys, states)
        return states

    def _remember(self, keys: list, states: list[AvlLayerState]) -> None:
        self._last_keys = tuple(weakref.ref(k) for k in keys)
        self._last_states = [weakref.ref(s) for s in states]

    def _grow(self, result, states: list[AvlLayerState], extra: int) -> list:
        """Re-allocate every site's cache with ``extra`` free slots; the model's cache takes
        the new tensors from the graph's outputs."""
        result = list(result)
        for key_output, value_output, state in zip(
            self.key_outputs, self.value_outputs, states, strict=True
        ):
            for index in (key_output, value_output):
                result[index] = grow_cache(result[index], extra)
                if result[index].is_cuda:  # CUDA-graph trees: written in place, never copied
                    torch._dynamo.mark_static_address(result[index], guard=False)
            state.slots = state.slots.grown(extra)
            set_layer_state(result[key_output], state)
        self._remember([result[i] for i in self.key_outputs], states)
        return result
