"""The prefill's row selection in fixed shapes (``avl_prefill_rows``): its pieces equal the
data-dependent forms they replace (two top-k's, ``nonzero``, boolean indexing), ties
included, and the Inductor-compiled selection keeps the same rows as the eager one."""

import pytest
import torch
from helpers import PREFILL_OPTION_SETS

from avl_compile.options import AvlOptions
from avl_compile.policies import avl as avl_policy
from avl_compile.policies import avl_prefill_rows
from avl_compile.policies.avl import AvlPolicy
from avl_compile.policies.avl_prefill_rows import (
    RowPlan,
    first_marked,
    ranked_groups,
    scored_prefill_rows,
    without,
)
from avl_compile.policies.common import PrefillContext, topk_positions

LENGTH = 50


def _two_top_ks(scores, candidates, n_core, n_secondary):
    """What the selection did before: the secondary set, the core among it, the rest."""
    secondary = topk_positions(scores, candidates, n_secondary)
    core = topk_positions(scores, secondary, n_core)
    in_secondary = torch.isin(candidates, secondary)
    return core, secondary[~torch.isin(secondary, core)], candidates[~in_secondary]


@pytest.mark.parametrize("tied", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("counts", [(0, 0), (0, 7), (3, 7), (7, 7), (5, 20), (20, 20)])
def test_ranked_groups_are_two_top_ks(tied, counts):
    generator = torch.Generator().manual_seed(sum(counts) + tied)
    for _ in range(5):
        scores = torch.rand(LENGTH, generator=generator)
        if tied:  # a grid of quarters: the tie rule (the lower position) decides
            scores = (scores * 4).floor() / 4
        picked = torch.randperm(LENGTH, generator=generator)[:20]
        candidates = picked.sort().values
        n_core, n_secondary = counts
        got = ranked_groups(scores, candidates, n_core, n_secondary, LENGTH)
        expected = _two_top_ks(scores, candidates, n_core, n_secondary)
        for g, e in zip(got, expected, strict=True):
            assert torch.equal(g, e)


def test_first_marked_are_nonzeros_columns():
    generator = torch.Generator().manual_seed(0)
    mask = torch.zeros(3, LENGTH, dtype=torch.bool)
    for head in range(3):  # the same count in every head, at different places
        mask[head, torch.randperm(LENGTH, generator=generator)[:9]] = True
    expected = torch.nonzero(mask)[:, 1].view(3, -1)
    assert torch.equal(first_marked(mask, 9), expected)


def test_without_is_a_boolean_index():
    generator = torch.Generator().manual_seed(1)
    positions = torch.randperm(LENGTH, generator=generator)[:30].sort().values
    leaving = positions[torch.randperm(30, generator=generator)[:12]]
    expected = positions[~torch.isin(positions, leaving)]
    assert torch.equal(without(positions, leaving, LENGTH), expected)
    assert without(positions, leaving[:0], LENGTH).equal(positions)


def _prompt(length: int = 60, dtype=torch.float32):
    generator = torch.Generator().manual_seed(length)
    batch = 2
    query = torch.randn(batch, 4, length, 16, generator=generator, dtype=dtype)
    keys = torch.randn(batch, 2, length, 16, generator=generator, dtype=dtype)
    values = torch.randn_like(keys)
    image_mask = torch.zeros(batch, length, dtype=torch.bool)
    image_mask[0, 4 : length - 20] = True
    image_mask[1, 2 : length - 14] = True
    return query, keys, values, PrefillContext(image_mask=image_mask)


@pytest.mark.parametrize("name", list(PREFILL_OPTION_SETS))
def test_compiled_selection_keeps_the_eager_rows(name):
    """Inductor's compile of the whole selection (scores, ranking, gathers, pages) against
    the same function run op by op: the same rows, pages and state, for prompts of three
    lengths (the second compiles for any length), and in one graph."""
    options = AvlOptions(text_min_budget=4, text_keep=0.2, **PREFILL_OPTION_SETS[name])
    plan = RowPlan.of(options)
    for length in (60, 52, 71):
        query, keys, values, context = _prompt(length)
        layout = AvlPolicy(options, 0)._layout(query, keys, None, True, context)
        assert layout.scoring is not None
        _, lse = layout.scoring.attend(query, keys, values, 0.25)
        arguments = (query, keys, values, lse, 0.25, layout, plan)
        eager = scored_prefill_rows(*arguments)
        compiled = avl_prefill_rows.compiled_prefill_rows()(*arguments)
        if eager.recall_pages is not None:  # the count the runtime reports without a read
            assert int((eager.recall_pages[0] >= 0).sum()) == layout.evicted_rows > 0
        for field, want in eager._asdict().items():
            got = getattr(compiled, field)
            if want is None:
                assert got is None, field
                continue
            pairs = zip(got, want, strict=True) if isinstance(want, tuple) else [(got, want)]
            for g, w in pairs:
                if w.is_floating_point() and field in ("text_score", "last_qk"):
                    torch.testing.assert_close(g, w, msg=field)  # sums in another order
                else:
                    assert torch.equal(g, w), (field, length)
    assert torch._dynamo.explain(scored_prefill_rows)(*arguments).graph_break_count == 0


@pytest.mark.parametrize("inner", ["inductor", "eager"])
def test_the_compiled_selection_runs_where_inductor_is_the_inner_compiler(monkeypatch, inner):
    """On a CPU with Inductor as the inner compiler, where the C selection cannot run
    (``test_native_prefill_rows``: where it can), the prefill selects through the compiled
    function; with another inner compiler it runs op by op (no compile)."""
    calls = []

    def counted():
        calls.append(1)
        return scored_prefill_rows

    monkeypatch.setattr(avl_policy, "compiled_prefill_rows", counted)
    monkeypatch.setattr(avl_policy, "why_not_native", lambda *args: "no C compiler")
    query, keys, values, context = _prompt()
    options = AvlOptions(text_min_budget=4, inner=inner)
    AvlPolicy(options, 0).prefill(query, keys, values, None, True, 0.25, context)
    assert len(calls) == (inner == "inductor")
