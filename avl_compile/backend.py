"""The ``avl`` TorchDynamo backend: run the passes, then hand the pieces to the inner compiler."""

from __future__ import annotations

import collections
import dataclasses
import logging
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, fx
from torch._dispatch.python import enable_python_dispatcher
from torch.utils._sympy.symbol import SymT, symbol_is_type

from avl_compile.compiled_decode import CompiledDecode, GraphPerStateShape
from avl_compile.options import AvlOptions, uses_cudagraphs, with_compile_mode
from avl_compile.passes.find_attention_sites import (
    NOT_DECODER_REASON,
    STATIC_CACHE_REASON,
    AttentionSite,
    find_attention_sites,
)
from avl_compile.passes.find_image_mask import find_image_scatters
from avl_compile.passes.record_image_mask import insert_image_mask_recorders
from avl_compile.passes.rewrite_attention_sites import rewrite_attention_sites
from avl_compile.passes.rewrite_decode_sites import (
    DecodeStep,
    avl_step,
    cache_outputs,
    eviction_step,
    is_decode_site,
    like,
    mark_state_inputs_static,
    past_cache_inputs,
    rewrite_decode_sites,
    state_examples,
)
from avl_compile.passes.split_at_runtime_calls import split_at_runtime_calls
from avl_compile.policies import decode_variant
from avl_compile.policies.avl import decode_kind_base
from avl_compile.runtime import AvlRuntime, SiteCall

try:  # Dynamo's record of the floats to specialise at a restart (private, torch >= 2.6)
    from torch.fx.passes._tensorify_python_scalars import TensorifyState
except ImportError:  # then a site with a symbolic scale stays dense
    TensorifyState = None

log = logging.getLogger("avl_compile")


class AvlBackend:
    """A Dynamo backend holding its runtime state; one instance per compiled model is best.

    ``backend="avl"`` uses one process-wide instance; the per-layer state lives with each
    KV cache, so models compiled through it still never share state.
    """

    def __init__(
        self, options: Mapping[str, Any] | None = None, max_records: int | None = None
    ) -> None:
        self.options = AvlOptions.from_mapping(options)
        self.runtime = AvlRuntime()
        # records of the graphs compiled (the latest ``max_records``: a backend shared by
        # every model of a process must not keep every graph it ever compiled)
        self.graphs: collections.deque[CompiledGraphRecord] = collections.deque(maxlen=max_records)
        self._compiled = 0
        self._sites: weakref.WeakSet[SiteCall] = weakref.WeakSet()  # live graphs' sites
        self._decodes: weakref.WeakSet[CompiledDecode] = weakref.WeakSet()  # their decodes

    def set_options(self, options: Mapping[str, Any] | None) -> None:
        """Switch the policy and budgets of the graphs already compiled, without recompiling.
        Call it between ``generate`` calls; ``inner`` only takes effect at compile time.
        Prefill graphs read the options at each call; a decode graph holds one policy's
        decode step, and options that need another (``decode_graphs_serve`` says) decode
        through the runtime-call graph, which reads them at each call, until the model is
        compiled again."""
        new = AvlOptions.from_mapping(options)
        if new.inner != self.options.inner:
            raise ValueError(
                f"avl backend: option inner={new.inner!r} cannot change after compiling with "
                f"inner={self.options.inner!r}; compile the model again instead"
            )
        self.options = new
        for site in self._sites:
            site.options = new
        if not self.decode_graphs_serve(new):
            log.info(
                "avl: the compiled decode graphs hold another decode step than policy=%s "
                "needs: its decode runs through the runtime-call graph until recompiled",
                new.policy,
            )

    def __call__(
        self,
        gm: fx.GraphModule,
        example_inputs: list[Any],
        options: Mapping[str, Any] | None = None,
        mode: str | None = None,
    ) -> Callable:
        opts = AvlOptions.from_mapping(options) if options is not None else self.options
        opts = with_compile_mode(opts, mode)
        _raise_recompile_limit()
        code_before = gm.code
        sites = find_attention_sites(gm.graph)
        _retrace_with_constant_scales(sites)
        if any(site.reason == STATIC_CACHE_REASON for site in sites):
            raise NotImplementedError(
                "avl backend: this graph updates a static KV cache in place "
                "(generate(..., cache_implementation='static') or a StaticCache); A-VL evicts "
                "rows, which a static cache cannot. Compile the forward with "
                "avl_compile.compile(model, options=...) and generate with HF's default cache, "
                "or, for HF's compile path, with cache=avl_compile.AvlCache() and "
                "compile_config=CompileConfig(...)."
            )
        scatters = find_image_scatters(gm.graph)
        rewritable = [site for site in sites if site.rewritable]
        # the A-VL step inside the graph: built before the runtime-call rewrite below
        # changes gm, which stays as the fallback for caches the step does not serve
        in_graph = None
        caches = [past_cache_inputs(site) for site in rewritable]  # before erased by the rewrite
        layers = [site.layer_idx for site in rewritable]
        kind, growing = decode_variant(opts, layers)
        steps = {}
        if not scatters and rewritable and all(is_decode_site(site) for site in rewritable):
            device = rewritable[0].key_cat.args[0][0].meta["example_value"].device
            steps = _decode_steps(kind, opts, device)
            if kind.startswith("avl-recall") and _stages_recall(device):
                log.info(
                    "avl: recall's host pages cannot be indexed inside a %s graph: the host "
                    "copies the recalled rows around the decode graph",
                    device.type,
                )
        if steps:
            try:
                in_graph = {
                    (kind, refresh, growing): self._compile_decode(
                        gm, rewritable, step, growing, example_inputs, opts
                    )
                    for refresh, step in steps.items()
                }
                key_outputs, value_outputs = cache_outputs(gm, rewritable)
            except torch._dynamo.exc.RestartAnalysis:  # Dynamo's request to trace again
                raise
            except Exception as error:  # the runtime-call graph below is the same policy
                log.debug("avl: decode graph compile failed", exc_info=True)
                self.runtime.warn_once(
                    f"avl: the decode step could not be compiled into the graph "
                    f"({_first_line(error)}); decoding "
                    "through one runtime call per layer instead (same tokens, slower)"
                )
                in_graph = None
        recorders = insert_image_mask_recorders(gm.graph, scatters, self.runtime)
        site_calls = rewrite_attention_sites(gm.graph, sites, opts, self.runtime)
        self._sites.update(site_calls)
        rewritten = len(site_calls)
        gm.recompile()
        record = CompiledGraphRecord(
            index=self._compiled,
            sites=sites,
            recorders=recorders,
            rewritten=rewritten,
            options=opts,
            code_before=code_before,
            code_after=next(iter(in_graph.values()))[0].code if in_graph else gm.code,
            decode_in_graph=in_graph is not None,
            modules=modules_run_by(gm.graph),
        )
        self.graphs.append(record)
        self._compiled += 1
        if rewritten or recorders:
            log.info(
                "avl: graph %d: rewrote %d of %d attention sites (policy=%s%s), %d image-mask "
                "recorder(s)",
                record.index,
                rewritten,
                len(sites),
                opts.policy,
                ", decode step inside the graph" if in_graph else "",
                recorders,
            )
        dense_by_reason: dict[str, list[str]] = {}
        for site in sites:
            if site.reason == NOT_DECODER_REASON:  # vision encoders and the like: by design
                log.debug("avl: graph %d: %s left dense: %s", record.index, site.name, site.reason)
            elif site.reason is not None:  # a cached attention of a form the passes do not know
                dense_by_reason.setdefault(site.reason, []).append(site.name)
        for reason, names in dense_by_reason.items():  # one warning per reason, not per layer
            self.runtime.warn_once(f"avl: dense attention in {', '.join(names)}: {reason}")
        if not (rewritten or recorders):
            return _inner_backend(opts.inner)(gm, example_inputs)
        fallback = _compile_pieces(gm, example_inputs, opts.inner)
        if in_graph is None:
            return fallback
        inputs = [node for node in gm.graph.nodes if node.op == "placeholder"]
        staged = any(step.kwargs.get("staged", False) for step in steps.values())
        decode = CompiledDecode(
            key_inputs=[inputs.index(keys) for keys, _ in caches],
            key_outputs=key_outputs,
            value_outputs=value_outputs,
            graphs={key: compiled for key, (_, compiled) in in_graph.items()},
            fallback=fallback,
            runtime=self.runtime,
            layers=layers,
            staged_recall=opts.recall_pages if staged else 0,
        )
        self._decodes.add(decode)
        return decode

    def decode_graphs_serve(self, options: Mapping[str, Any] | AvlOptions) -> bool:
        """Whether the live decode graphs hold the decode step that ``options`` need (the
        policy's step, and which layers evict nothing); if not, decoding under them takes
        the runtime-call graph until the model is compiled again."""
        if not isinstance(options, AvlOptions):
            options = AvlOptions.from_mapping(options)
        return all(decode.serves(options) for decode in self._decodes)

    @staticmethod
    def _compile_decode(
        gm: fx.GraphModule,
        sites: list[AttentionSite],
        step: DecodeStep,
        growing: frozenset[int],
        example_inputs: list[Any],
        opts: AvlOptions,
    ) -> tuple[fx.GraphModule, Callable]:
        """The decode graph with the policy's step inside, and its compiled form."""
        traced_inputs = _traced_examples(gm, example_inputs)
        graph = rewrite_decode_sites(gm, sites, step, growing)
        if opts.inner == "eager":
            return graph, graph.forward
        fake_mode = _fake_mode_of(traced_inputs)
        with fake_mode:
            states = [
                state_examples(site, step, grows=index in growing)
                for index, site in enumerate(sites)
            ]

        def compile_with(extra_state: list[list[Tensor]] | None = None) -> Callable:
            inputs = [*traced_inputs]
            for index, examples in enumerate(states):
                inputs.extend(examples)
                if extra_state is not None:
                    with fake_mode:
                        inputs.extend(like(extra_state[index]))
            if opts.inner != "inductor":
                return _inner_backend(opts.inner)(graph, inputs)
            from torch._inductor.compile_fx import compile_fx

            # staged recall: rows made for each step go in and out (no CUDA graph)
            cudagraphs = not step.kwargs.get("staged", False)
            patches = _decode_patches(graph, opts, growing, states[0][0].device, cudagraphs)
            return compile_fx(graph, inputs, config_patches=patches)

        if step.extra_state:  # shaped by the prompt: compiled at a prompt's first step
            per_site = len(step.state_names)
            compiled = GraphPerStateShape(
                compile_with, len(example_inputs), per_site, len(step.extra_state)
            )
            return graph, compiled
        return graph, compile_with()


def _traced_examples(gm: fx.GraphModule, example_inputs: list[Any]) -> list[Any]:
    """The graph's inputs as Dynamo traced them: its fake tensors and SymInts, with symbolic
    sizes only where it made them dynamic (the caches' lengths). A graph compiled after
    Dynamo's trace (at a prompt's first step: ``GraphPerStateShape``) from the real tensors
    would see every size of every input as dynamic, the weights' and head sizes' too, and
    Inductor's loops then divide by them (measured: the recommended set's attention kernel
    took 2x its time on ``cpu-long`` at batch 4)."""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    traced = [node.meta.get("example_value") for node in placeholders]
    if len(traced) != len(example_inputs) or any(value is None for value in traced):
        return list(example_inputs)
    return traced


def _fake_mode_of(inputs: list[Any]) -> Any:
    """The fake mode of the first fake tensor among ``inputs`` (Dynamo's, where they are its
    traced examples; ``detect_fake_mode`` would answer the tracing context's, a backend's
    fresh one), else the tracing context's."""
    for value in inputs:
        if isinstance(value, torch._subclasses.fake_tensor.FakeTensor):
            return value.fake_mode
    return torch._guards.detect_fake_mode(inputs)


def _decode_patches(
    graph: fx.GraphModule,
    opts: AvlOptions,
    growing: frozenset[int],
    device: torch.device,
    cudagraphs: bool = True,
) -> dict:
    """Inductor's settings for a decode graph."""
    # Inductor's locality pass may move a read of the cache (the values' matmul) after
    # the eviction's write into it; the write then cannot be done in place and every
    # step copies the whole cache twice (measured: 2x the graph's time at batch 16)
    patches: dict[str, Any] = {"reorder_for_locality": False}
    # Inductor checks every input's sizes and strides in Python at every call: Dynamo's
    # guards check its inputs already, and the state inputs are contiguous, as their
    # examples, by construction (tested); on a host-bound shape the checks cost ~6%
    patches["size_asserts"] = False
    # a cache that grows at every step would be a new CUDA graph at every step
    if cudagraphs and uses_cudagraphs(opts, device) and not growing:
        mark_state_inputs_static(graph)
        patches["triton.cudagraphs"] = True
    return patches


def _stages_recall(device: torch.device) -> bool:
    """Whether recall's decode graphs are staged on ``device``: the host pages are not in
    the device's memory, so the host copies their rows around the graph."""
    return device.type != "cpu"


def _decode_steps(kind: str, opts: AvlOptions, device: torch.device) -> dict[bool, DecodeStep]:
    """The decode step of a ``decode_variant`` kind; A-VL's refresh step is a graph of its
    own. Recall's is staged on a GPU (a graph cannot index its host pages)."""
    kind = decode_kind_base(kind)
    if kind in ("avl-recall", "avl-recall-pages"):
        paged, staged = kind == "avl-recall-pages", _stages_recall(device)
        return {
            refresh: avl_step(refresh, paged, recall_pages=opts.recall_pages, staged=staged)
            for refresh in (False, True)
        }  # fmt: skip
    if kind == "avl":
        return {refresh: avl_step(refresh) for refresh in (False, True)}
    if kind == "avl-adaptive":  # a scheduled refresh step is a graph of its own too
        return {refresh: avl_step(refresh, adaptive=True) for refresh in (False, True)}
    if kind == "avl-pages":  # the core is chosen at every step: no refresh step
        return {False: avl_step(False, paged=True)}
    return {False: eviction_step(kind)}


class BackendHandle:
    """What ``torch.compile`` gets: Dynamo keeps every backend it is given for the life of
    the process (``torch._dynamo.eval_frame.cached_backends``), so it gets this forwarder
    and the backend, its graphs and records are freed with the model and its compiled code
    (which hold it)."""

    def __init__(self, backend: AvlBackend) -> None:
        self._backend = weakref.ref(backend)

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> Callable:
        backend = self._backend()
        if backend is None:
            raise RuntimeError("avl: the backend this function was compiled with is gone")
        return backend(gm, example_inputs, **kwargs)


@dataclasses.dataclass
class CompiledGraphRecord:
    """What the backend did to one graph Dynamo handed it (kept for inspection and tests)."""

    index: int
    sites: list[AttentionSite]
    recorders: int
    rewritten: int
    options: AvlOptions
    code_before: str  # the graph's Python code as Dynamo handed it over
    code_after: str  # after the passes, before the split for the inner compiler
    decode_in_graph: bool = False  # the A-VL decode step runs inside this graph
    modules: list[str] = dataclasses.field(default_factory=list)  # what the graph runs


def modules_run_by(graph: fx.Graph, depth: int = 2) -> list[str]:
    """The model's parts a graph runs (module paths cut at ``depth`` names or at a layer
    index: ``model.vision_tower``, ``model.language_model.layers``), in order of first use."""
    parts: dict[str, None] = {}
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        path = list(stack.values())[-1][0]
        names = path.removeprefix("L['self'].").split(".")
        kept = []
        for name in names:
            if name.isdigit() or len(kept) == depth:
                break
            kept.append(name)
        parts.setdefault(".".join(kept))
    # a module's own code beside its children's: its children say more
    return [p for p in parts if not any(q.startswith(p + ".") for q in parts)]


# Dynamo's accumulated_recompile_limit: the most compiles of one frame it allows anyway
RECOMPILE_LIMIT = 256


def _raise_recompile_limit() -> None:
    """Each compiled model adds a few entries (prefill graphs, decode graph) to the code
    caches of transformers' forward wrappers, shared by all models, and the entries of a
    model that is gone still count. Past Dynamo's limit (8) a forward would run uncompiled,
    possibly on a cache a compiled prefill compacted, which is wrong: so the limit is raised
    to Dynamo's own ceiling (about 80 models per process), and reaching it raises instead."""
    config = torch._dynamo.config
    if config.recompile_limit < RECOMPILE_LIMIT:
        log.info("avl: raising torch._dynamo.config.recompile_limit to %d", RECOMPILE_LIMIT)
        config.recompile_limit = RECOMPILE_LIMIT
    if not config.fail_on_recompile_limit_hit:
        log.info("avl: setting torch._dynamo.config.fail_on_recompile_limit_hit")
        config.fail_on_recompile_limit_hit = True


def _inner_backend(name: str) -> Callable:
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend(name)


def _compile_pieces(gm: fx.GraphModule, example_inputs: list[Any], inner: str) -> Callable:
    """Compile every piece between runtime calls with the inner compiler.

    Like Dynamo's DDPOptimizer, an interpreter walks the split graph with fake tensors to get
    each piece's example inputs.
    """
    if inner == "eager":
        return gm.forward
    split, runtime_names = split_at_runtime_calls(gm)
    compile_piece = _inner_backend(inner)
    # Dynamo hands backends a fresh fake mode (not the one of the nodes' example values).
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    fake_mode = fake_mode or torch._subclasses.fake_tensor.FakeTensorMode()
    fake_inputs = [
        fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs
    ]

    pieces: dict[str, _Piece] = {}

    class PieceCompiler(torch.fx.Interpreter):
        def call_module(self, target, args, kwargs):
            submodule = self.fetch_attr(target)
            if target in runtime_names:
                return submodule(*args)  # runtime calls answer fake inputs with fake outputs
            with fake_mode:
                result = submodule(*args)
            single = _make_tuple_output(submodule)
            compiled = compile_piece(submodule, list(args))
            pieces[target] = _Piece(_without_dynamo_disable(compiled), single)
            return result

    # the Python dispatcher, as in Dynamo's own fake runs: some meta kernels (masked_scatter's
    # broadcast) call C++ composites that take only concrete sizes without it
    with fake_mode, enable_python_dispatcher():
        PieceCompiler(split).run(*fake_inputs)
    split.recompile()
    # the compiled pieces and the runtime calls' forwards as plain attributes: the forward's
    # ``self.submod_<n>(...)`` then finds them without nn.Module's lookup and call machinery
    # (three Python calls each, ~65 a prefill on a 32-layer model)
    for name, submodule in list(split.named_children()):
        delattr(split, name)
        setattr(split, name, pieces.get(name, submodule.forward))
    return split.forward


def _without_dynamo_disable(compiled: Callable) -> Callable:
    """An AOTAutograd-compiled piece without its own ``torch._dynamo.disable`` wrapper:
    Dynamo runs the whole split graph under one (the backend's output), so a piece's own
    only adds Python calls (four a piece, ~33 pieces a prefill on a 32-layer model)."""
    return getattr(compiled, "_torchdynamo_orig_callable", compiled)


def _make_tuple_output(gm: fx.GraphModule) -> bool:
    """AOTAutograd-based compilers want tuple outputs; returns True if one was made."""
    output = gm.graph.output_node()
    if isinstance(output.args[0], (tuple, list)):
        return False
    output.args = ((output.args[0],),)
    gm.recompile()
    return True


class _Piece:
    """A compiled piece, called like the submodule it replaces."""

    __slots__ = ("compiled", "single_output")

    def __init__(self, compiled: Callable, single_output: bool) -> None:
        self.compiled = compiled
        self.single_output = single_output

    def __call__(self, *args):
        result = self.compiled(*args)
        return result[0] if self.single_output else tuple(result)


def _first_line(error: Exception) -> str:
    """The error's type and the first line of its message (an error may have none)."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def _retrace_with_constant_scales(sites: list[AttentionSite]) -> None:
    """Have Dynamo trace the frame again with the sites' scales as constants where it traced
    them as symbolic floats. A float attribute (an attention module's ``scaling``) that held
    another value when this frame, or a transformers wrapper frame that models share, was
    traced before becomes a graph value; the sites' runtime calls and decode steps need a
    number. Dynamo does the same for SDPA's own scale under Inductor (AOTAutograd's
    tensorify pass raises this restart); a scale it would not specialise leaves its site
    dense."""
    pending: set[str] = set()
    for site in sites:
        scale = site.arguments["scale"]
        if not isinstance(scale, fx.Node):
            continue
        value = scale.meta.get("example_value")
        names = set()
        if isinstance(value, torch.SymFloat):  # its symbols before the shape env's guards
            symbols = getattr(value.node, "_expr", value.node.expr).free_symbols
            names = {str(s) for s in symbols if symbol_is_type(s, SymT.FLOAT)}
        if (
            names
            and TensorifyState is not None
            and not all(TensorifyState.should_specialize(name) for name in names)
        ):
            pending |= names
        elif site.rewritable:
            site.reason = "its scale is computed in the graph, not a constant"
    if pending:
        assert TensorifyState is not None
        for name in pending:
            TensorifyState.specialize(name)
        log.debug("avl: tracing again with the attention scales %s as constants", sorted(pending))
        raise torch._dynamo.exc.TensorifyScalarRestartAnalysis
