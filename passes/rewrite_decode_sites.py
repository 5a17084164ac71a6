"""Put a policy's decode step inside a decode graph: each decoder site's cache concat and
SDPA become one call of the pure tensor step (A-VL's or a baseline's), which writes the
token into the layer's fixed-capacity cache in place; the graph gets the layers' state
tensors as extra inputs.

Before:  keys = cat([past_k, k_new], -2); out = sdpa(q, keys, ...); return (.., keys, ..)
After:   out = avl_decode_site(q, k_new, v_new, past_k, past_v, *state); return (.., past_k, ..)

With recall, a refresh step's swap is a call of its own per site (``avl_swap_site``), all
of them at the start of the graph, before the first layer: a swap reads only its site's
state after the last step, and there Inductor can fuse the layers' swaps with one another.

The result is a new GraphModule (Dynamo's own graph is left as it was: Dynamo reads its
placeholders after the backend returns); whoever calls it appends the step's state
tensors per site, in site order, after Dynamo's inputs. (One stacked tensor per field for
all sites would mean fewer inputs, but AOTAutograd turns each in-place write into a view of
an input into a copy of the whole stack: measured twice as slow.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, fx

from avl_compile.lowering.slot_attention import score_dtype
from avl_compile.passes.find_attention_sites import AttentionSite
from avl_compile.passes.rewrite_attention_sites import erase_unused
from avl_compile.policies.avl_decode import (
    AdaptiveAvlSlots,
    AvlSlots,
    PagedAvlSlots,
    avl_decode_step,
)
from avl_compile.policies.eviction_decode import EvictionSlots, eviction_decode_step
from avl_compile.policies.page_core import CorePages
from avl_compile.policies.recall import RecallState


def _avl_state(
    state: tuple[Tensor, ...], paged: bool, adaptive: bool, recall_pages: int, staged: bool
) -> tuple[AvlSlots, CorePages | None, RecallState | None]:
    """One A-VL site's flat state tensors (``avl_decode_site``'s order) as its objects."""
    kind = PagedAvlSlots if paged else AdaptiveAvlSlots if adaptive else AvlSlots
    names = [field.name for field in dataclasses.fields(kind)]
    slots = kind(**dict(zip(names, state, strict=False)))
    rest = state[len(names) :]
    core_pages = None
    if paged:
        core_pages = CorePages(*rest[: len(CorePages.NAMES)])
        rest = rest[len(CorePages.NAMES) :]
    recall = RecallState.from_tensors(rest, staged) if recall_pages else None
    return slots, core_pages, recall


def avl_swap_site(
    keys: Tensor,
    values: Tensor,
    *state: Tensor,
    scale: float | None,
    paged: bool = False,
    recall_pages: int,
    staged: bool = False,
) -> None:
    """Recall's swap of one A-VL site before a refresh step, as its own call at the start of
    the decode graph (``rewrite_decode_sites``): it reads only the site's state after the
    last step (the query it decides on is the last token's), so every layer's swap can run
    before the first layer, where Inductor can fuse the layers' swaps with one another."""
    scale = scale if scale is not None else keys.shape[-1] ** -0.5
    slots, core_pages, recall = _avl_state(state, paged, False, recall_pages, staged)
    assert recall is not None
    recall.swap(keys, values, slots, recall_pages, scale, core_pages)


def avl_decode_site(
    query: Tensor,
    new_keys: Tensor,
    new_values: Tensor,
    keys: Tensor,
    values: Tensor,
    *state: Tensor,
    scale: float | None,
    refresh: bool,
    paged: bool = False,
    adaptive: bool = False,
    recall_pages: int = 0,
    staged: bool = False,
    swapped: bool = False,
) -> Tensor:
    """The graph's entry to one A-VL site's decode step (flat tensors, as FX passes them:
    the fields of the slots class, ``PagedAvlSlots`` for the query-aware core (``paged``;
    then ``CorePages``' tensors), ``AdaptiveAvlSlots`` for adaptive refresh, then with
    recall (``recall_pages``) ``RecallState``'s tensors, ``staged`` where the host copies
    its pages' rows around the graph; a refresh step swaps pages in before the step, here
    or, ``swapped``, by the site's ``avl_swap_site`` call at the start of the graph)."""
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    slots, core_pages, recall = _avl_state(state, paged, adaptive, recall_pages, staged)
    if recall is not None and refresh and not swapped:
        recall.swap(keys, values, slots, recall_pages, scale, core_pages)
    output = avl_decode_step(
        query, new_keys, new_values, keys, values, slots, scale, refresh, core_pages,
        keep_qk=recall is not None,
    )  # fmt: skip
    if recall is not None:
        recall.after_step(query, recall_pages)
    return output


def eviction_decode_site(
    query: Tensor,
    new_keys: Tensor,
    new_values: Tensor,
    keys: Tensor,
    values: Tensor,
    *state: Tensor,
    scale: float | None,
    eviction: str,
) -> Tensor:
    """The graph's entry to one baseline site's decode step."""
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    slots = EvictionSlots(*state)
    return eviction_decode_step(query, new_keys, new_values, keys, values, slots, scale, eviction)


@dataclasses.dataclass(frozen=True)
class DecodeStep:
    """What every decode site of a graph becomes: a step function, its keyword arguments
    (fixed when the graph is built) and the class of its state tensors."""

    function: Callable[..., Tensor]
    kwargs: dict[str, Any]
    state: type  # AvlSlots or EvictionSlots: its fields are the state tensors, in order
    # the query-aware core's and recall's tensors after the slots' (``CorePages.NAMES``,
    # ``RecallState.names``); their shapes vary by prompt (image tokens, pages per row),
    # so examples of them come from a prompt's state
    extra_state: tuple[str, ...] = ()
    # recall's swap, a call of its own per site at the start of the graph (refresh steps)
    swap: Callable[..., None] | None = None

    @property
    def state_names(self) -> list[str]:
        return [*(field.name for field in dataclasses.fields(self.state)), *self.extra_state]


def avl_step(
    refresh: bool,
    paged: bool = False,
    adaptive: bool = False,
    recall_pages: int = 0,
    staged: bool = False,
) -> DecodeStep:
    """A-VL's decode step (``refresh``: a step that attends every kept image row;
    ``paged``: the query-aware core, chosen at every step; ``adaptive``: a batch row also
    refreshes when its signal fires; ``recall_pages``: recall swaps pages in at the start
    of a refresh step, which with the query-aware core attends no more than another;
    ``staged``: recall's rows copied by the host around the graph, a GPU's)."""
    pages = CorePages.NAMES if paged else ()
    if recall_pages:
        kwargs = {"refresh": refresh, "paged": paged, "recall_pages": recall_pages,
                  "staged": staged}  # fmt: skip
        state = PagedAvlSlots if paged else AvlSlots
        names = (*pages, *RecallState.names(staged, refresh))
        swap = avl_swap_site if refresh else None
        return DecodeStep(avl_decode_site, kwargs, state, names, swap)
    if paged:
        kwargs = {"refresh": False, "paged": True}  # the page size: ``CorePages``' shape
        return DecodeStep(avl_decode_site, kwargs, PagedAvlSlots, pages)
    if adaptive:
        kwargs = {"refresh": refresh, "adaptive": True}
        return DecodeStep(avl_decode_site, kwargs, AdaptiveAvlSlots)
    return DecodeStep(avl_decode_site, {"refresh": refresh}, AvlSlots)


def eviction_step(eviction: str) -> DecodeStep:
    """A baseline's decode step (``eviction``: what leaves the cache after it)."""
    return DecodeStep(eviction_decode_site, {"eviction": eviction}, EvictionSlots)


def past_cache_inputs(site: AttentionSite) -> tuple[fx.Node, fx.Node] | None:
    """The site's past keys and values if they are graph inputs (a cache layer's tensors
    that Dynamo lifted), else None."""
    past_keys, past_values = site.key_cat.args[0][0], site.value_cat.args[0][0]
    if past_keys.op != "placeholder" or past_values.op != "placeholder":
        return None
    return past_keys, past_values


def is_decode_site(site: AttentionSite) -> bool:
    """A rewritable site that attends one new token over a non-empty past cache held in
    graph inputs (Dynamo specialises a length of 0, so prefill graphs never match)."""
    if not site.rewritable or past_cache_inputs(site) is None:
        return False
    past = site.key_cat.args[0][0].meta.get("example_value")
    query = site.arguments["query"].meta.get("example_value")
    if past is None or query is None:
        return False
    return past.shape[2] != 0 and query.shape[2] == 1


def state_examples(site: AttentionSite, step: DecodeStep, grows: bool = False) -> list[Tensor]:
    """Example (fake) state tensors of the slots class for one site, sized from its past
    keys' (maybe symbolic) shape, one slot more where the cache ``grows`` in the step:
    create them under the graph's fake mode. (Not the ``extra_state``: ``like``.)"""
    past = site.key_cat.args[0][0].meta["example_value"]
    query = site.arguments["query"].meta["example_value"]
    batch, kv_heads, capacity = past.shape[:3]
    capacity = capacity + 1 if grows else capacity
    empty = step.state.empty(batch, kv_heads, capacity, score_dtype(query.dtype), past.device)
    return list(empty.tensors())


def like(tensors: list[Tensor]) -> list[Tensor]:
    """Uninitialised tensors of the shapes, strides and dtypes of ``tensors`` (under a fake
    mode: examples of a prompt's ``extra_state``)."""
    return [
        torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device) for t in tensors
    ]


def mark_state_inputs_static(gm: fx.GraphModule) -> None:
    """Tell AOTAutograd (hence CUDA-graph trees) that the state inputs keep their address
    from step to step: they are updated in place, never copied into a graph's pool."""
    for node in gm.graph.find_nodes(op="placeholder"):
        if node.meta.get("avl_state"):
            node.meta.setdefault("tensor_dict", {})["_dynamo_static_input_type"] = "unguarded"


def cache_outputs(gm: fx.GraphModule, sites: list[AttentionSite]) -> tuple[list[int], list[int]]:
    """Where each site's cache write-back (keys, values) sits among the graph's outputs."""
    returned = list(gm.graph.output_node().args[0])
    return (
        [returned.index(site.key_cat) for site in sites],
        [returned.index(site.value_cat) for site in sites],
    )


def rewrite_decode_sites(
    gm: fx.GraphModule,
    sites: list[AttentionSite],
    step: DecodeStep,
    growing: frozenset[int] = frozenset(),
) -> fx.GraphModule:
    """A copy of ``gm`` whose ``sites`` (all decode sites) run ``step`` in the graph. The
    caches of the sites numbered in ``growing`` (layers that evict nothing, so their cache
    is as long as the sequence) grow by the token's slot in the graph, by Dynamo's own
    concatenation, as a dense cache does; the step writes into the new slot."""
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, copies))
    for old, new in copies.items():
        if old.op == "placeholder" and hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source  # AOTAutograd reads it on Dynamo graphs
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
    output = graph.output_node()
    swaps: list[tuple[fx.Node, fx.Node, list[fx.Node], dict[str, Any]]] = []
    for index, site in enumerate(sites):
        state = []
        for name in step.state_names:
            with graph.inserting_after(last_input):
                last_input = graph.placeholder(f"avl_{name}_{index}")
            last_input._dynamo_source = None  # fed by the backend's wrapper, not by Dynamo
            last_input.meta["avl_state"] = True
            state.append(last_input)
        past_keys, new_keys = (copies[n] for n in site.key_cat.args[0])
        past_values, new_values = (copies[n] for n in site.value_cat.args[0])
        keys, values = past_keys, past_values
        if index in growing:  # the concatenated cache, one slot longer
            keys, values = copies[site.key_cat], copies[site.value_cat]
        sdpa = copies[site.sdpa]
        scale = site.arguments["scale"]
        # a number or None: the backend has Dynamo specialise a scale the graph computes, or
        # leaves that site dense (``_retrace_with_constant_scales``)
        assert not isinstance(scale, fx.Node), f"{site.name}: its scale is computed in the graph"
        kwargs = {"scale": scale, **step.kwargs}
        # hoisted unless the cache is made in the graph: then at the site
        if step.swap is not None and keys is past_keys:
            swap_kwargs = {k: v for k, v in kwargs.items() if k != "refresh"}
            swaps.append((keys, values, state, swap_kwargs))
            kwargs["swapped"] = True
        with graph.inserting_before(sdpa):
            call = graph.call_function(
                step.function,
                (copies[site.arguments["query"]], new_keys, new_values, keys, values, *state),
                kwargs,
            )
        call.meta.update(sdpa.meta)
        sdpa.replace_all_uses_with(call)
        output.replace_input_with(copies[site.key_cat], keys)
        output.replace_input_with(copies[site.value_cat], values)
        graph.erase_node(sdpa)
        chain = [*site.key_chain, *site.value_chain, site.key_cat, site.value_cat]
        erase_unused([copies[n] for n in chain])
    # every site's swap before the first layer, in site order (after the last input)
    for keys, values, state, swap_kwargs in reversed(swaps):
        with graph.inserting_after(last_input):
            graph.call_function(step.swap, (keys, values, *state), swap_kwargs)
    rewritten = fx.GraphModule(gm, graph)
    rewritten.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        rewritten._param_name_to_source = gm._param_name_to_source
    return rewritten


torch.fx.node.has_side_effect(avl_decode_site)
torch.fx.node.has_side_effect(avl_swap_site)
torch.fx.node.has_side_effect(eviction_decode_site)
