"""Find the decoder attention sites of a Dynamo graph.

A decoder site is an SDPA call whose keys and values come from a KV-cache concat
``torch.cat([past, new], dim=-2)`` that the graph also returns (the cache write-back),
optionally through HF's ``repeat_kv`` (getitem -> expand -> reshape). Every other SDPA call
(a vision encoder's, a non-cached attention) is reported with the reason it is left dense.
Sites are told apart by structure, never by position or count.
"""

from __future__ import annotations

import dataclasses
import operator
import re

import torch
import torch.nn.functional as F
from torch import fx

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_LAYER_RE = re.compile(r"layers\.(\d+)\.")
_IN_PLACE_WRITES = ("index_copy_", "copy_", "index_put_", "scatter_", "slice_scatter_")
NOT_DECODER_REASON = "keys/values do not come from a KV-cache concat (not a decoder site)"
STATIC_CACHE_REASON = (
    "the KV cache is written in place (a static cache): its rows cannot be evicted"
)


@dataclasses.dataclass
class AttentionSite:
    sdpa: fx.Node
    name: str  # module path of the attention module, or the node name
    layer_idx: int | None
    arguments: dict  # SDPA arguments by name
    key_cat: fx.Node | None = None
    value_cat: fx.Node | None = None
    key_chain: list[fx.Node] = dataclasses.field(default_factory=list)  # repeat_kv nodes
    value_chain: list[fx.Node] = dataclasses.field(default_factory=list)
    reason: str | None = None  # why the site stays dense; None = rewritable

    @property
    def rewritable(self) -> bool:
        return self.reason is None


def sdpa_arguments(node: fx.Node) -> dict:
    arguments = dict(zip(_SDPA_ARGS, node.args, strict=False))
    arguments.update(node.kwargs)
    for name, default in (
        ("attn_mask", None),
        ("dropout_p", 0.0),
        ("is_causal", False),
        ("scale", None),
        ("enable_gqa", False),
    ):
        arguments.setdefault(name, default)
    return arguments


def _module_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path.removeprefix("L['self'].")


def _strip_repeat_kv(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Walk from an SDPA key/value input back through repeat_kv to its source node."""
    chain = []
    while node.op in ("call_method", "call_function") and node.target in (
        "reshape",
        "expand",
        "contiguous",
        operator.getitem,
        torch.reshape,
    ):
        if node.target is operator.getitem and not _is_unsqueeze_index(node.args[1]):
            break
        chain.append(node)
        node = node.args[0]
    return node, chain


def _is_unsqueeze_index(index) -> bool:
    # repeat_kv indexes with hidden[:, :, None, :, :]
    return (
        isinstance(index, tuple)
        and None in index
        and all(i is None or i == slice(None) or i is Ellipsis for i in index)
    )


def _shape_reads(source: fx.Node, chain: set[fx.Node]) -> list[fx.Node]:
    """The reads of ``source``'s shape that only size the site's repeat_kv (``keys.size()``
    and its items, as HF's repeat_kv traces when Dynamo did not fold the length): they go
    with the chain when the site is rewritten."""
    reads = []
    for user in source.users:
        if not (user.op == "call_method" and user.target == "size"):
            continue
        items = list(user.users)
        if all(
            item.target is operator.getitem and all(u in chain for u in item.users)
            for item in items
        ):
            reads += [user, *items]
    return reads


def _is_cache_concat(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target is not torch.cat:
        return False
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return isinstance(tensors, (list, tuple)) and len(tensors) == 2 and dim in (-2, 2)


def _returned_nodes(graph: fx.Graph) -> set[fx.Node]:
    returned: set[fx.Node] = set()
    fx.node.map_arg(graph.output_node().args, returned.add)
    return returned


def _written_in_place(graph: fx.Graph) -> set[fx.Node]:
    """Tensors an in-place write updates (a static cache's index_copy_ at cache_position)."""
    written = set()
    for node in graph.nodes:
        if node.op == "call_method" and node.target in _IN_PLACE_WRITES:
            written.add(node.args[0])
        elif node.op == "call_function" and getattr(node.target, "__name__", "") in (
            _IN_PLACE_WRITES
        ):
            written.add(node.args[0])
    return written


def find_attention_sites(graph: fx.Graph) -> list[AttentionSite]:
    returned = _returned_nodes(graph)
    written = _written_in_place(graph)
    sites = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in SDPA_TARGETS:
            continue
        arguments = sdpa_arguments(node)
        path = _module_path(node)
        match = _LAYER_RE.search(path or "")
        site = AttentionSite(
            sdpa=node,
            name=path or node.name,
            layer_idx=int(match.group(1)) if match else None,
            arguments=arguments,
        )
        sites.append(site)
        key_source, key_chain = _strip_repeat_kv(arguments["key"])
        value_source, value_chain = _strip_repeat_kv(arguments["value"])
        if key_source in written or value_source in written:
            site.reason = STATIC_CACHE_REASON
            continue
        if not (_is_cache_concat(key_source) and _is_cache_concat(value_source)):
            site.reason = NOT_DECODER_REASON
            continue
        if key_source not in returned or value_source not in returned:
            site.reason = "the KV-cache concat is not written back by this graph"
            continue
        chains = {*key_chain, *value_chain}
        key_chain += _shape_reads(key_source, chains)
        value_chain += _shape_reads(value_source, chains)
        allowed_users = {node, *key_chain, *value_chain, graph.output_node()}
        if any(u not in allowed_users for u in (*key_source.users, *value_source.users)):
            site.reason = "the KV cache has users other than this attention and the write-back"
            continue
        if arguments["dropout_p"] not in (0, 0.0):
            site.reason = "attention dropout is on"
            continue
        if site.layer_idx is None:
            site.reason = "cannot tell which decoder layer this attention belongs to"
            continue
        site.key_cat, site.value_cat = key_source, value_source
        site.key_chain, site.value_chain = key_chain, value_chain
    return sites
