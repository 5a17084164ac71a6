"""The callable the backend returns for a decode graph whose policy step (A-VL's or a
baseline's) runs in the graph.

Per forward it does host work only, once per graph (per layer only where layers hold
different counts, as the baselines' may): it finds the layers' state by their cache tensors
(an identity check when they are the tensors of the last step), starts the step on the host
schedule (which step refreshes, whether a cache must grow), and calls the compiled graph
with the state tensors appended to Dynamo's inputs (the last step's list of them while no
layer's state was replaced: recall writes its tensors in place). Nothing is read back from
the device.

A cache grows between steps, here, by a power of two of slots, so that Dynamo's guards see
its new length at the next forward. The runtime-call graph, which handles every case in
Python, takes the steps the in-graph step does not serve: a prompt that ran dense, and a
cache that must grow inside the step (a layer with nothing evicted: its cache is as long as
the sequence, which it may not outgrow, as with 100% budgets or FastV's first layers).
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Sequence

import torch

from avl_compile.options import AvlOptions
from avl_compile.policies import decode_variant
from avl_compile.policies.avl_decode import grow_cache
from avl_compile.policies.decode_schedule import LayerState
from avl_compile.policies.recall_copies import finish_after_graph, stage_before_graph
from avl_compile.runtime import AvlRuntime, end_prefill, layer_state, set_layer_state


class StateInputs(list):
    """Every layer's state tensors, flat, in the order a compiled decode graph takes them
    after Dynamo's inputs. ``sources`` are the objects they were read from (each layer's
    slots, core pages and recall state, whose tensor fields are never reassigned): while
    those are the same objects, so are the tensors, and a step passes the last step's list
    again. Weakly referable, so a graph can recognise it without keeping a finished
    generate's state alive."""

    __slots__ = ("__weakref__", "sources")

    @classmethod
    def of(cls, states: list[LayerState], sources: list | None = None) -> StateInputs:
        """The list of ``states``' tensors (``sources``: their ``state_sources``, where the
        caller has them already)."""
        inputs = cls(t for state in states for t in state.tensors())
        inputs.sources = state_sources(states) if sources is None else sources
        return inputs


def state_sources(states: list[LayerState]) -> list:
    return [part for state in states for part in (state.slots, state.core_pages, state.recall)]


class GraphPerStateShape:
    """A decode graph whose state holds tensors shaped by the prompt, not by the cache
    (recall's pages: pages per row, image tokens): one compiled graph per shape of those,
    compiled by ``compile`` (given that state's tensors, one list per site) at the first
    step that brings it; a model whose prompts share an image size compiles one."""

    def __init__(
        self,
        compile: Callable[[list[list[torch.Tensor]]], Callable],
        first_state: int,
        per_site: int,
        extra: int,
    ) -> None:
        self.compile = compile
        self.first_state = first_state  # index of the first state tensor among the inputs
        self.per_site, self.extra = per_site, extra  # tensors per site; the last extra vary
        self.compiled: dict[tuple, Callable] = {}
        # the last step's varying tensors (weakly) and their graph: recall writes them in
        # place, so a generate's steps pass the same tensors and skip the shape key
        self._last_tensors: list[weakref.ref] = []
        self._last_graph: Callable | None = None
        # the last ``StateInputs`` given to ``run`` (weakly): the same list, the same graph
        self._last_inputs: weakref.ref | None = None

    def __call__(self, *args):
        self._last_inputs = None  # the last graph may change: no list stands for it now
        return self._graph_for(args[self.first_state :])(*args)

    def run(self, args: tuple, state: StateInputs):
        """The graph called on Dynamo's inputs ``args`` and the state tensors: a step that
        passes the last step's list skips the per-tensor check (~110 us a step for the
        recommended set's 576 tensors on a 32-layer model)."""
        last = self._last_inputs
        if last is None or last() is not state:
            self._graph_for(state)
            self._last_inputs = weakref.ref(state)
        assert self._last_graph is not None
        return self._last_graph(*args, *state)

    def _graph_for(self, state: Sequence[torch.Tensor]) -> Callable:
        extra = [
            state[start + self.per_site - self.extra : start + self.per_site]
            for start in range(0, len(state), self.per_site)
        ]
        tensors = [t for site in extra for t in site]
        last = self._last_tensors
        same = len(tensors) == len(last)
        if same and all(t is ref() for t, ref in zip(tensors, last, strict=True)):
            assert self._last_graph is not None
            return self._last_graph
        key = tuple((t.shape, t.stride(), t.dtype) for t in tensors)
        graph = self.compiled.get(key)
        if graph is None:
            graph = self.compiled[key] = self.compile([list(site) for site in extra])
        self._last_tensors = [weakref.ref(t) for t in tensors]
        self._last_graph = graph
        return graph


class CompiledDecode:
    """Dispatch one decode forward to its compiled graph (plain or refresh step), or to the
    fallback."""

    def __init__(
        self,
        key_inputs: list[int],
        key_outputs: list[int],
        value_outputs: list[int],
        graphs: dict[tuple[str, bool, frozenset[int]], Callable],
        fallback: Callable,
        runtime: AvlRuntime,
        layers: list[int | None],
        staged_recall: int = 0,
    ) -> None:
        self.key_inputs = key_inputs  # Dynamo input index of each site's past keys
        self.key_outputs = key_outputs  # output index of each site's cache write-back
        self.value_outputs = value_outputs
        # (decode kind, refresh step?, layers whose cache grows in the step) -> graph taking
        # the state tensors last
        self.graphs = graphs
        self.layers = layers  # decoder layer of each site
        self.fallback = fallback
        self.runtime = runtime
        # recall's pages per swap where its graphs are staged (the host copies its rows
        # around the graph: ``recall_copies``); 0 otherwise
        self.staged_recall = staged_recall
        # the caches of the last step, weakly (a finished generate's cache must be freed)
        self._last_keys: tuple[weakref.ref, ...] = ()
        self._last_states: list[weakref.ref] = []
        self._shared_schedule = False  # the last states' layers share one schedule (A-VL)

    def __call__(self, *args):
        end_prefill()
        states = self._states(args)
        graph, growing = None, ()
        if states is not None:
            growing = self._growing_in_step(states, args)
            if growing is not None:  # the graph of this cache's decode step, if compiled
                kind = states[0].schedule.decode_kind
                graph = self.graphs.get((kind, states[0].next_refresh, frozenset(growing)))
        if graph is None:
            self.runtime.counters["decode_graphs_in_python"] += 1
            return self.fallback(*args)
        for state in states:
            state.begin_step()
        for layer in growing:  # the graph grows the cache by one slot: the state too
            states[layer].slots = states[layer].slots.grown(1)
        if self.staged_recall:
            for state in states:
                assert state.recall is not None
                stage_before_graph(
                    state.recall, state.step, state.schedule.refresh, self.staged_recall
                )
        inputs = self._state_inputs(states)
        run = getattr(graph, "run", None)  # a graph that takes the list whole (by identity)
        result = run(args, inputs) if run is not None else graph(*args, *inputs)
        if self.staged_recall:
            self._finish_staged_recall(states)
        if growing:  # new cache tensors, from the graph's concatenation
            for layer in growing:
                set_layer_state(result[self.key_outputs[layer]], states[layer])
            self._remember([result[i] for i in self.key_outputs], states)
        result = self._grow_between_steps(result, states)
        counters = self.runtime.counters
        counters["decode_graphs_in_graph"] += 1
        counters["decode_sites"] += len(states)
        if self._shared_schedule:
            counters["attended_rows"] += states[0].attended_rows * len(states)
            counters["refresh_sites"] += states[0].schedule.refresh * len(states)
        else:
            counters["attended_rows"] += sum(state.attended_rows for state in states)
            counters["refresh_sites"] += sum(state.schedule.refresh for state in states)
        return result

    def _state_inputs(self, states: list[LayerState]) -> StateInputs:
        """The layers' state tensors, flat: the last step's list while every layer's slots,
        core pages and recall state are the objects it was read from (a re-allocation or a
        step in Python replaces the slots); kept with the first layer's state, so freed
        with it. Staged recall's tensors change at every step: read again."""
        if self.staged_recall:
            return StateInputs.of(states)
        last, sources = states[0].graph_inputs, state_sources(states)
        same = last is not None and len(sources) == len(last.sources)
        if same and all(map(operator.is_, sources, last.sources)):
            return last
        inputs = states[0].graph_inputs = StateInputs.of(states, sources)
        return inputs

    def _finish_staged_recall(self, states: list[LayerState]) -> None:
        waits = 0
        for state in states:
            recall = state.recall
            assert recall is not None and recall.copies is not None
            finish_after_graph(recall, state.step + 1, state.next_refresh)
            waits += recall.copies.take_host_waits()
        self.runtime.counters["recall_host_waits"] += waits

    def serves(self, options: AvlOptions) -> bool:
        """Whether a graph here holds the decode step that ``options`` need."""
        kind, growing = decode_variant(options, self.layers)
        return any(key[0] == kind and key[2] == growing for key in self.graphs)

    def _growing_in_step(self, states: list[LayerState], args) -> tuple[int, ...] | None:
        """The layers whose cache must grow by one slot inside this step (those that evict
        nothing); None if one must grow by more (the fallback's case)."""
        if self._shared_schedule:  # every layer holds as many rows: ask the first
            extra = states[0].next_growth(args[self.key_inputs[0]].shape[2])
            return None if extra > 1 else tuple(range(len(states))) if extra else ()
        growth = [
            state.next_growth(args[index].shape[2])
            for state, index in zip(states, self.key_inputs, strict=True)
        ]
        if any(extra > 1 for extra in growth):
            return None
        return tuple(layer for layer, extra in enumerate(growth) if extra)

    def _grow_between_steps(self, result, states: list[LayerState]):
        """Re-allocate the caches the next step would overflow."""
        grown = None
        for layer, state in enumerate(states):
            capacity = result[self.key_outputs[layer]].shape[2]
            extra = state.schedule.growth_between_steps(capacity)
            if extra:
                grown = list(result) if grown is None else grown
                self._grow(grown, layer, state, extra)
            elif self._shared_schedule:
                break  # every layer holds as many rows as the first
        if grown is None:
            return result
        self._remember([grown[i] for i in self.key_outputs], states)
        return grown

    def _states(self, args) -> list[LayerState] | None:
        """The decode state of each site's cache, or None if some cache has none."""
        keys = [args[i] for i in self.key_inputs]
        if len(keys) == len(self._last_keys) and all(
            a is b() for a, b in zip(keys, self._last_keys, strict=True)
        ):
            states = [ref() for ref in self._last_states]
            if all(s is not None for s in states):
                return states
        states = [layer_state(k) for k in keys]
        if not all(isinstance(s, LayerState) for s in states):
            return None
        if any(type(s.slots) is not type(states[0].slots) for s in states):
            return None
        self._shared_schedule = all(s.schedule is states[0].schedule for s in states)
        self._remember(keys, states)
        return states

    def _remember(self, keys: list, states: list[LayerState]) -> None:
        self._last_keys = tuple(weakref.ref(k) for k in keys)
        self._last_states = [weakref.ref(s) for s in states]

    def _grow(self, result: list, layer: int, state: LayerState, extra: int) -> None:
        """Re-allocate one site's cache with ``extra`` free slots; the model's cache takes
        the new tensors from the graph's outputs."""
        key_output, value_output = self.key_outputs[layer], self.value_outputs[layer]
        for index in (key_output, value_output):
            result[index] = grow_cache(result[index], extra)
            if result[index].is_cuda:  # CUDA-graph trees: written in place, never copied
                torch._dynamo.mark_static_address(result[index], guard=False)
        state.slots = state.slots.grown(extra)
        set_layer_state(result[key_output], state)
