"""Replace each decoder SDPA site and its cache concat by one call into the A-VL runtime.

Before:  keys = cat([past_k, k_new], -2); out = sdpa(q, keys, values, ...); return (.., keys, ..)
After:   site = attention_site_<layer>(q, past_k, k_new, past_v, v_new, mask)  # a SiteCall
         out = site[0]; return (.., site[1], ..)

The write-back of the cache now returns the compacted keys/values chosen by the policy,
so eviction happens in the user's own ``DynamicCache``.
"""

from __future__ import annotations

import operator

from torch import fx

from avl_compile.options import AvlOptions
from avl_compile.passes.find_attention_sites import AttentionSite
from avl_compile.runtime import AvlRuntime, SiteCall


def rewrite_attention_sites(
    graph: fx.Graph, sites: list[AttentionSite], options: AvlOptions, runtime: AvlRuntime
) -> list[SiteCall]:
    """Rewrites the rewritable ``sites``; returns the calls the graph now makes."""
    rewritten = []
    for site in sites:
        if not site.rewritable:
            continue
        args = site.arguments
        info = SiteCall(
            name=site.name,
            layer_idx=site.layer_idx,
            scale=args["scale"],
            is_causal=bool(args["is_causal"]),
            options=options,
            runtime=runtime,
        )
        past_keys, new_keys = site.key_cat.args[0]
        past_values, new_values = site.value_cat.args[0]
        with graph.inserting_before(site.sdpa):
            call = graph.call_function(
                info,
                (
                    args["query"],
                    past_keys,
                    new_keys,
                    past_values,
                    new_values,
                    args["attn_mask"],
                ),
            )
            outputs = [graph.call_function(operator.getitem, (call, i)) for i in range(3)]
        site.sdpa.replace_all_uses_with(outputs[0])
        output = graph.output_node()
        output.replace_input_with(site.key_cat, outputs[1])
        output.replace_input_with(site.value_cat, outputs[2])
        if "example_value" in site.sdpa.meta:
            outputs[0].meta["example_value"] = site.sdpa.meta["example_value"]
            outputs[1].meta["example_value"] = site.key_cat.meta.get("example_value")
            outputs[2].meta["example_value"] = site.value_cat.meta.get("example_value")
        graph.erase_node(site.sdpa)
        erase_unused([*site.key_chain, *site.value_chain, site.key_cat, site.value_cat])
        rewritten.append(info)
    return rewritten


def erase_unused(nodes: list[fx.Node]) -> None:
    """Erase the nodes the rewrite orphaned (not a graph-wide dead-code pass, which would
    also drop in-place writes whose results nobody reads)."""
    pending = list(dict.fromkeys(nodes))
    changed = True
    while changed:
        changed = False
        for node in list(pending):
            if not node.users:
                node.graph.erase_node(node)
                pending.remove(node)
                changed = True
