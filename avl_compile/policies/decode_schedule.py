"""The host's side of a slot cache's decode, shared by every policy whose decode step runs on
a fixed-capacity cache (A-VL and the baselines).

A layer's cache has free slots at its end: a decode token is written in place into its
row's first free slot; a full cache is re-allocated with ``spare_slots`` more. How many slots
each row holds follows from the budgets alone (not from scores), so the host knows when to
re-allocate without reading anything back from the device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from torch import Tensor

from avl_compile.policies.avl_decode import grow_cache

if TYPE_CHECKING:
    from avl_compile.policies.page_core import CorePages
    from avl_compile.policies.recall import RecallState


class SlotTensors(Protocol):
    """A layer's state tensors (``AvlSlots``, ``EvictionSlots``): slots along the cache's
    dim -2, passed to a compiled decode graph after Dynamo's inputs."""

    def tensors(self) -> tuple[Tensor, ...]: ...

    def grown(self, extra: int) -> SlotTensors: ...


def spare_slots(rows: int) -> int:
    """Free slots a cache of ``rows`` occupied rows gets when (re)allocated: about 3%, as a
    power of two of at least 8 (a bounded set of growth sizes keeps the compiled graphs
    few), so a re-allocation (one copy of the cache) comes once in rows / 32 tokens at most.
    The cache is never longer than the uncompressed sequence, so with nothing evicted (100%
    budgets) it is re-allocated at every step, as a concatenating cache would be."""
    return max(8, 1 << max(rows // 32 - 1, 0).bit_length())


@dataclasses.dataclass(kw_only=True)
class DecodeSchedule:
    """Counts of one prompt's decode on the host; subclasses say how rows come and go."""

    position: int  # position of the next decode token
    step: int = 0  # 0 after prefill; decode step t is the t-th decode forward
    write_rows: int = 0  # rows the current step needs (its token included)
    write_position: int = 0  # position of the current step's token

    @property
    def decode_kind(self) -> str:
        """Which decode step serves this schedule's cache ("avl" or an eviction rule): a
        compiled decode graph holds one kind."""
        raise NotImplementedError

    @property
    def rows_in_use(self) -> int:
        """Occupied slots of the fullest batch row (the cache also has free slots)."""
        raise NotImplementedError

    @property
    def attended_rows(self) -> float:
        """Rows the current step attends, mean over batch rows."""
        raise NotImplementedError

    @property
    def refresh(self) -> bool:
        """Whether the current step is a refresh step (a compiled variant of its own)."""
        return self.refresh_at(self.step)

    def refresh_at(self, step: int) -> bool:
        return False

    def begin_step(self) -> None:
        self.write_rows, self.write_position = self.rows_in_use + 1, self.position
        self.step += 1
        self.position += 1
        self.advance()

    def advance(self) -> None:
        """Update the per-row counts for the step just begun."""
        raise NotImplementedError

    def growth(self, capacity: int, started: bool = True) -> int:
        """Slots to add to a cache of ``capacity`` before the current step (the next one if
        not ``started``) writes its token; 0 if it fits. Never past the uncompressed length:
        HF pads its mask up to the cache length otherwise (and torch 2.11 cannot trace that
        pad with symbolic sizes)."""
        rows, position = (
            (self.write_rows, self.write_position)
            if started
            else (self.rows_in_use + 1, self.position)
        )
        if rows <= capacity:
            return 0
        return min(capacity + spare_slots(capacity), position + 1) - capacity

    def growth_between_steps(self, capacity: int) -> int:
        """Slots to add to a cache of ``capacity`` after a step so that the next one fits,
        as far as the uncompressed length allows (the next step then grows it by the one
        slot it still lacks: a prompt with nothing evicted)."""
        if self.rows_in_use + 1 <= capacity:
            return 0
        return max(min(capacity + spare_slots(capacity), self.position) - capacity, 0)


@dataclasses.dataclass
class LayerState:
    """One layer's decode state: its device tensors and the host schedule (which several
    layers may share: the first layer to reach a step starts it)."""

    slots: SlotTensors
    schedule: DecodeSchedule
    step: int = 0  # decode steps this layer has run
    # the query-aware core (A-VL's option): its page boxes
    core_pages: CorePages | None = None
    # recall (A-VL's option): the evicted rows' pages, the last token's query, ...
    recall: RecallState | None = None
    # tensor parallel: head means over every rank's heads (``PrefillContext.combine_heads``)
    combine_heads: Callable[[Tensor], Tensor] | None = None
    # every layer's state tensors as the last compiled step took them
    # (``compiled_decode.StateInputs``), kept by the first layer's state so that they
    # are freed with the states
    graph_inputs: list[Tensor] | None = dataclasses.field(default=None, repr=False, compare=False)

    def tensors(self) -> list[Tensor]:
        """The state tensors a compiled decode graph takes for this layer."""
        pages = () if self.core_pages is None else self.core_pages.tensors()
        recall = () if self.recall is None else self.recall.tensors()
        return [*self.slots.tensors(), *pages, *recall]

    @property
    def rows_in_use(self) -> int:
        return self.schedule.rows_in_use

    @property
    def attended_rows(self) -> float:
        return self.schedule.attended_rows

    def begin_step(self) -> DecodeSchedule:
        """The schedule of this layer's next step."""
        if not self.schedule_started:
            self.schedule.begin_step()
        self.step += 1
        return self.schedule

    @property
    def schedule_started(self) -> bool:
        """Whether another layer has begun this layer's next step already."""
        return self.step < self.schedule.step

    @property
    def next_refresh(self) -> bool:
        """Whether this layer's next step is a refresh step."""
        schedule = self.schedule
        return schedule.refresh if self.schedule_started else schedule.refresh_at(schedule.step + 1)

    def next_growth(self, capacity: int) -> int:
        """Slots this layer's next step will add to a cache of ``capacity``."""
        return self.schedule.growth(capacity, started=self.schedule_started)


def begin_step_and_grow(
    state: LayerState, keys: Tensor, values: Tensor
) -> tuple[DecodeSchedule, Tensor, Tensor]:
    """Begin a layer's step on the host and re-allocate its cache (and state) if the step's
    token does not fit: the runtime-call path's step, before the policy's tensor step."""
    schedule = state.begin_step()
    extra = schedule.growth(keys.shape[2])
    if extra:
        keys, values = grow_cache(keys, extra), grow_cache(values, extra)
        state.slots = state.slots.grown(extra)
    return schedule, keys, values
