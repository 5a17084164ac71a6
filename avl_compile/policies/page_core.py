"""The query-aware core (A-VL's option ``core_page_size``): at every decode step the core is
chosen from the step's own query instead of being re-picked every K steps.

The prompt's image tokens fall into pages of ``core_page_size`` consecutive image tokens.
A page's digest, per kv head, is the element-wise min and max of the keys of its rows that
are still in the cache (the secondary set); the largest q.k a key inside that box can give,
summed over the head dimension and averaged over the query heads (as A-VL's score), bounds
the page's attention from above (Quest's bound). Every secondary row scores its page's bound;
the best ``n_core`` rows are the step's core (the one tie rule: rows already in the core
stay, then the lower position), so a step attends sink + core + text and never the whole
secondary set. Fixed shapes and no host sync: the score is one tensor function.

The boxes are decode state (``CorePages``): made at prefill, and changed only where a
recall swap moves rows (the pages of the rows that leave or come back are boxed again from
their members), so a step reads one box per page and sorts nothing to find them.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from avl_compile.lowering.materialize import materialized


def group_bounds(query: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Each box's bound under ``query`` [B, Hq, D]: the largest q.k a key inside [``low``,
    ``high``] (each [B, Hkv, P, D]; query head h reads kv head h // (Hq / Hkv)) can give,
    the head dimension summed, averaged over the query heads. Returns [B, P] in the boxes'
    dtype (a box with no rows, +inf and -inf: NaN or infinite; its callers mask it).

    max(q * low, q * high) is q * high where q >= 0 and q * low where q < 0, so a kv head's
    sum over its query heads is positive . high + negative . low, where ``positive`` sums
    max(q, 0) over the group and ``negative`` min(q, 0): two products a dimension and kv
    head, where the max per query head took four (the eager reference's ``_box_bound`` is
    that max, the same value up to float rounding)."""
    batch, q_heads, head_dim = query.shape
    kv_heads = low.shape[1]
    q = query.reshape(batch, kv_heads, q_heads // kv_heads, head_dim).to(low.dtype)
    # read for every page: computed once (the query's rotary embedding with them)
    positive = materialized(q.clamp(min=0).sum(2))[:, :, None, :]  # [B, Hkv, 1, D]
    negative = materialized(q.clamp(max=0).sum(2))[:, :, None, :]
    return (positive * high + negative * low).sum(-1).sum(1) / q_heads


def pages_of(image_tokens: int, page_size: int) -> int:
    """Pages of ``page_size`` of a prompt of ``image_tokens``."""
    return -(-image_tokens // page_size)


@dataclasses.dataclass
class CorePages:
    """One layer's page boxes. Page j holds the prompt's image tokens j*P ... (j+1)*P - 1
    (their ordinals among the row's image tokens; P = ``core_page_size``); ``members``
    says which slot holds each of them, so a page's box can be made again from its rows
    alone. Shapes follow the prompt (image tokens), not the cache."""

    image_positions: Tensor  # [B, N] each row's image positions ascending, padded past all
    low: Tensor  # [B, Hkv, pages, D] element-wise min of the page's resident keys (+inf: none)
    high: Tensor  # [B, Hkv, pages, D] element-wise max (-inf: none)
    members: Tensor  # [B, pages, P] int64: the slot of image token j*P + i, -1: not resident

    NAMES = ("core_image_positions", "core_low", "core_high", "core_members")

    def tensors(self) -> tuple[Tensor, ...]:
        return self.image_positions, self.low, self.high, self.members

    @property
    def page_size(self) -> int:
        return self.members.shape[2]

    @classmethod
    def build(
        cls, keys: Tensor, ordinal: Tensor, image_positions: Tensor, page_size: int, dtype
    ) -> CorePages:
        """The pages of the slots whose ``ordinal`` [B, C] (``image_ordinals``) is >= 0, from
        the cache's ``keys`` [B, Hkv, C, D]; boxes in ``dtype`` (the score's)."""
        tensors = core_page_tensors(keys, ordinal, image_positions.shape[1], page_size, dtype)
        return cls(image_positions, *tensors)

    def page_bounds(self, query: Tensor) -> Tensor:
        """Every page's digest bound under ``query`` [B, Hq, D], averaged over the query
        heads: [B, pages] in the boxes' dtype (``group_bounds``)."""
        return group_bounds(query, self.low, self.high)

    def bound_per_slot(self, query: Tensor, ordinal: Tensor, candidate: Tensor) -> Tensor:
        """For every ``candidate`` slot [B, C] (bool), its page's digest bound under
        ``query`` [B, Hq, D] (``ordinal`` [B, C] the slot's image token); -inf elsewhere.
        Returns [B, C] in the boxes' dtype."""
        bound = self.page_bounds(query)
        # pages with no resident row hold inf/nan, but no candidate reads them
        page = (ordinal // self.page_size).clamp(min=0, max=bound.shape[1] - 1)
        score = bound.gather(1, page)
        return score.masked_fill(~candidate, -math.inf)  # float32-born: one sort (best_first)

    def move(self, keys: Tensor, left: Tensor, came: Tensor, slot: Tensor, moving: Tensor) -> None:
        """A recall swap's rows: the image tokens ``left`` [B, M] (ordinals) are no longer
        resident, ``came`` [B, M] (ordinals) now are, in ``slot`` [B, M] of ``keys`` [B, Hkv,
        C, D] (written already); batch rows not ``moving`` [B, 1] keep their members. The
        boxes of every page either touches are made again from its members."""
        size = self.page_size
        rows = torch.arange(left.shape[0], device=left.device)[:, None]
        for ordinal, value in ((left, torch.full_like(slot, -1)), (came, slot)):
            at = (rows, ordinal // size, ordinal % size)
            self.members.index_put_(at, torch.where(moving, value, self.members[at]))
        touched = torch.cat([left, came], dim=1) // size  # [B, 2M]; a page twice: one value
        members = self.members.gather(1, touched[:, :, None].expand(-1, -1, size))
        low, high = page_boxes(keys, members, self.low.dtype)
        heads = torch.arange(keys.shape[1], device=keys.device)[None, :, None]
        at = (rows[:, :, None], heads, touched[:, None, :])
        self.low.index_put_(at, low)
        self.high.index_put_(at, high)


def core_page_tensors(
    keys: Tensor, ordinal: Tensor, image_tokens: int, page_size: int, dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """``CorePages``' low, high and members (its fields' order) for ``image_tokens`` per
    row (``build``)."""
    batch, capacity = ordinal.shape
    n_pages = pages_of(image_tokens, page_size)
    members = torch.full((batch, n_pages * page_size + 1), -1, dtype=torch.long,
                         device=keys.device)  # fmt: skip
    # slots in no page write the extra column, dropped after
    column = torch.where(ordinal >= 0, ordinal, n_pages * page_size)
    slot = torch.arange(capacity, device=keys.device).expand(batch, -1)
    members.scatter_(1, column, slot)
    members = members[:, :-1].reshape(batch, n_pages, page_size).contiguous()
    low, high = page_boxes(keys, members, dtype)
    return low, high, members


def page_boxes(keys: Tensor, members: Tensor, dtype) -> tuple[Tensor, Tensor]:
    """The boxes [B, Hkv, A, D] of pages whose slots are ``members`` [B, A, P] (-1: none)
    in ``keys`` [B, Hkv, C, D] (+inf and -inf for a page with none)."""
    batch, n_pages, size = members.shape
    kv_heads, head_dim = keys.shape[1], keys.shape[3]
    index = held_members(members).view(batch, 1, -1, 1).expand(-1, kv_heads, -1, head_dim)
    paged = keys.gather(2, index).view(batch, kv_heads, n_pages, size, head_dim)
    return box_of_held(paged, members >= 0, dtype)


def held_members(members: Tensor) -> Tensor:
    """``members`` [B, P, S] (-1: none) with each -1 replaced by a member its page holds
    (0 in a page that holds none): rows gathered at these hold only the page's own rows,
    so their min and max need no fill (at prefill the fill was two copies of the rows)."""
    return torch.where(members >= 0, members, members.amax(dim=-1, keepdim=True).clamp(min=0))


def box_of_held(rows: Tensor, held: Tensor, dtype) -> tuple[Tensor, Tensor]:
    """``box_of`` for ``rows`` [B, Hkv, P, S, D] gathered at ``held_members``: the min and
    max over S in ``dtype`` (a widening cast: the same values), +inf and -inf for a page
    whose ``held`` [B, P, S] are all False."""
    empty = ~held.any(dim=-1)[:, None, :, None]
    low = rows.amin(dim=3).to(dtype).masked_fill(empty, math.inf)
    return low, rows.amax(dim=3).to(dtype).masked_fill(empty, -math.inf)


def box_of(rows: Tensor, held: Tensor) -> tuple[Tensor, Tensor]:
    """Element-wise min and max over the ``held`` [B, P, S] rows of ``rows`` [B, Hkv, P, S,
    D]: [B, Hkv, P, D] each (+inf and -inf for a page that holds none). For rows gathered
    with no care for the empty entries (a recall swap's leaving rows, inside the decode
    graph, where the fill fuses into the reduction); ``box_of_held`` where they were
    gathered at held members (no fill)."""
    held = held[:, None, :, :, None]
    low = rows.masked_fill(~held, math.inf).amin(dim=3)
    return low, rows.masked_fill(~held, -math.inf).amax(dim=3)


def image_ordinals(
    positions: Tensor, image: Tensor, image_positions: Tensor, in_graph: bool = False
) -> Tensor:
    """The ordinal among the row's image tokens (``image_positions`` [B, N] ascending,
    padded past every position) of each of ``positions`` [B, M] flagged ``image`` [B, M];
    -1 elsewhere. ``in_graph``: a branch-free binary search of gathers, which fuses into
    one small kernel (a swap's few rows; ``searchsorted`` is an ATen fallback in a CPU
    graph, and counting by comparisons read all N image positions per row); eager (the
    cache's slots at prefill): ``searchsorted``."""
    if in_graph:
        before = _count_below(image_positions, positions)
    else:
        before = torch.searchsorted(image_positions.contiguous(), positions.contiguous())
    return torch.where(image, before, -1)


def _count_below(ascending: Tensor, values: Tensor) -> Tensor:
    """How many entries of each row of ``ascending`` [B, N] are below each of ``values``
    [B, M] (``searchsorted``'s left index): log2(N) + 1 halving steps, each a gather."""
    length = ascending.shape[1]
    below = torch.zeros_like(values)
    step = 1 << (length.bit_length() - 1) if length else 0
    while step:  # ``below`` entries are known to be below; try ``step`` more
        probe = below + step
        entry = ascending.gather(1, (probe - 1).clamp(max=length - 1))
        below = torch.where((probe <= length) & (entry < values), probe, below)
        step //= 2
    return below
