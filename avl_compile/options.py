"""User options of the ``avl`` backend: names, defaults and validation."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch

POLICIES = ("avl", "full", "h2o", "streaming", "fastv", "random")
INNER_COMPILERS = ("inductor", "aot_eager", "eager")


@dataclasses.dataclass(frozen=True)
class AvlOptions:
    """Options accepted through ``torch.compile(..., backend="avl", options={...})``.

    Fractions are of the ORIGINAL number of image tokens N (vision) or of the text tokens
    seen so far (text), as in the A-VL paper; counts are floors (see README).
    """

    policy: str = "avl"
    vision_keep: float = 0.5  # S: image rows kept in the KV cache after prefill
    vision_compute: float = 0.3  # C: image rows attended on non-refresh decode steps
    refresh_every: int = 3  # K: every K-th decode step attends all kept image rows; -1 = always
    text_keep: float = 0.6  # T: text budget = max(round(T * n_text), text_min_budget)
    text_heavy_share: float = 0.7  # share of the text budget given to heavy hitters
    text_min_budget: int = 20
    # beyond the paper (off by default): image scores from the last w prompt tokens' attention
    # (1: the last token, as A-VL), and a per-layer S (C keeps its share C/S in every layer)
    score_window: int = 1
    vision_keep_layers: tuple[float, ...] | None = None
    # recall: evicted image rows kept in host pages of recall_page_size rows; before each
    # refresh step up to recall_pages pages come back (0: off)
    recall_pages: int = 0
    recall_page_size: int = 16
    # query-aware core (0: off): at every decode step the core is chosen from the step's own
    # query, by a min/max key digest per page of core_page_size image tokens (no step
    # attends the whole secondary set; refresh_every then only paces recall)
    core_page_size: int = 0
    # adaptive refresh (None: off): a step also refreshes, in each batch row apart, when the
    # core's log-sum-exp (head-averaged) falls more than this many nats below its value at
    # the last refresh, besides every refresh_every-th step (a large K: instead of them)
    refresh_lse_drop: float | None = None
    prefill_filter_keep: float | None = None  # P: FastV-style prefill filter, None = off
    prefill_filter_layer: int = 2  # also FastV's layer K
    # baselines (policy != "avl"): the kept share of the cache they evict from
    kv_budget: float = 0.5  # h2o/streaming: of the current length; fastv/random: of N
    h2o_heavy_share: float = 0.25  # share of the H2O budget given to heavy hitters
    streaming_sink: int = 4  # first tokens StreamingLLM never evicts
    seed: int = 0  # random: which image tokens are dropped
    inner: str = "inductor"
    # decode graphs through Inductor's CUDA-graph trees; None: on for CUDA with inner=inductor
    cudagraphs: bool | None = None

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> AvlOptions:
        options = dict(options or {})
        if isinstance(options.get("vision_keep_layers"), list):  # frozen options hash
            options["vision_keep_layers"] = tuple(options["vision_keep_layers"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"avl backend: unknown option(s) {unknown}; allowed options are {sorted(known)}"
            )
        result = cls(**options)
        result.validate()
        return result

    def validate(self) -> None:
        if self.policy not in POLICIES:
            _fail("policy", self.policy, f"one of {list(POLICIES)}")
        if self.inner not in INNER_COMPILERS:
            _fail("inner", self.inner, f"one of {list(INNER_COMPILERS)}")
        if self.cudagraphs not in (None, True, False):
            _fail("cudagraphs", self.cudagraphs, "True, False or None (on for CUDA with inductor)")
        for name in ("vision_keep", "vision_compute", "text_keep"):
            _check_fraction(name, getattr(self, name))
        _check_fraction("text_heavy_share", self.text_heavy_share, allow_zero=True)
        if self.vision_compute > self.vision_keep:
            _fail(
                "vision_compute",
                self.vision_compute,
                f"a fraction no larger than vision_keep={self.vision_keep} (C <= S)",
            )
        if not _is_int(self.refresh_every) or not (
            self.refresh_every == -1 or self.refresh_every >= 1
        ):
            _fail(
                "refresh_every", self.refresh_every, "an integer >= 1, or -1 (no core restriction)"
            )
        if not _is_int(self.score_window) or self.score_window < 1:
            _fail("score_window", self.score_window, "an integer >= 1 (1: the last prompt token)")
        if self.vision_keep_layers is not None:
            layers = self.vision_keep_layers
            if not isinstance(layers, tuple) or not layers:
                _fail("vision_keep_layers", layers, "a non-empty list of fractions, one per layer")
            for keep in layers:
                _check_fraction("vision_keep_layers", keep)
        if not _is_int(self.recall_pages) or self.recall_pages < 0:
            _fail("recall_pages", self.recall_pages, "an integer >= 0 (0: no recall)")
        if not _is_int(self.recall_page_size) or self.recall_page_size < 1:
            _fail("recall_page_size", self.recall_page_size, "an integer >= 1")
        if self.recall_pages and self.refresh_every == -1:  # recall acts before refreshes
            _fail("recall_pages", self.recall_pages, "0 with refresh_every=-1 (no refresh steps)")
        if not _is_int(self.core_page_size) or self.core_page_size < 0:
            _fail("core_page_size", self.core_page_size, "an integer >= 0 (0: A-VL's core)")
        if self.core_page_size and self.refresh_every == -1:  # -1: no core at all
            _fail("core_page_size", self.core_page_size, "0 with refresh_every=-1 (no core)")
        if self.refresh_lse_drop is not None:
            self._check_adaptive_refresh()
        if not _is_int(self.text_min_budget) or self.text_min_budget < 0:
            _fail("text_min_budget", self.text_min_budget, "an integer >= 0")
        if not _is_int(self.prefill_filter_layer) or self.prefill_filter_layer < 1:
            _fail("prefill_filter_layer", self.prefill_filter_layer, "an integer >= 1")
        _check_fraction("kv_budget", self.kv_budget)
        _check_fraction("h2o_heavy_share", self.h2o_heavy_share, allow_zero=True)
        if not _is_int(self.streaming_sink) or self.streaming_sink < 0:
            _fail("streaming_sink", self.streaming_sink, "an integer >= 0")
        if not _is_int(self.seed) or self.seed < 0:
            _fail("seed", self.seed, "an integer >= 0")
        if self.prefill_filter_keep is not None:
            _check_fraction("prefill_filter_keep", self.prefill_filter_keep)
            if max(self.vision_keep_layers or (self.vision_keep,)) > self.prefill_filter_keep:
                _fail(
                    "vision_keep",
                    self.vision_keep,
                    f"a fraction no larger than prefill_filter_keep={self.prefill_filter_keep}"
                    " when the prefill filter is on (S <= P)",
                )

    def _check_adaptive_refresh(self) -> None:
        drop = self.refresh_lse_drop
        is_number = isinstance(drop, (int, float)) and not isinstance(drop, bool)
        if not (is_number and math.isfinite(drop) and drop >= 0):
            _fail("refresh_lse_drop", drop, "a number of nats >= 0, or None (off)")
        if self.refresh_every == -1:
            _fail("refresh_lse_drop", drop, "None with refresh_every=-1 (no core to watch)")
        if self.core_page_size:
            _fail("refresh_lse_drop", drop, "None with core_page_size > 0 (no refresh steps)")
        if self.recall_pages:  # recall is decided on the host before scheduled refreshes
            _fail("refresh_lse_drop", drop, "None with recall_pages > 0")

    def layer_budgets(self, layer: int) -> tuple[float, float]:
        """(S, C) of decoder layer ``layer``: ``vision_keep_layers[layer]`` if given, with
        the core's share of the kept rows (C / S) as in every layer."""
        layers = self.vision_keep_layers
        if layers is None or layers[_checked_layer(layers, layer)] == self.vision_keep:
            return self.vision_keep, self.vision_compute
        keep = layers[layer]
        return keep, self.vision_compute * keep / self.vision_keep

    @property
    def keeps_everything(self) -> bool:
        """True when every budget is 100%: the policy must then reproduce dense attention."""
        if self.policy == "full":
            return True
        if self.policy != "avl":
            return self.kv_budget == 1.0
        return (
            self.vision_keep == 1.0
            and self.vision_compute == 1.0
            and all(keep == 1.0 for keep in self.vision_keep_layers or ())
            and self.text_keep == 1.0
            and self.prefill_filter_keep in (None, 1.0)
        )


# torch.compile's modes the backend understands (HF's CompileConfig passes "reduce-overhead"
# by default): None and "default" change nothing, "reduce-overhead" turns CUDA graphs on
COMPILE_MODES = (None, "default", "reduce-overhead")


def with_compile_mode(options: AvlOptions, mode: str | None) -> AvlOptions:
    """``options`` as ``torch.compile(..., backend="avl", mode=mode)`` asks for them."""
    if mode not in COMPILE_MODES:
        raise ValueError(
            f"avl backend: mode={mode!r} is not supported; it must be one of "
            f"{list(COMPILE_MODES)} (CUDA graphs are the option cudagraphs)"
        )
    if mode == "reduce-overhead":
        return dataclasses.replace(options, cudagraphs=True)
    return options


def uses_cudagraphs(options: AvlOptions, device) -> bool:
    """Whether decode graphs on ``device`` run through CUDA-graph trees."""
    wanted = options.cudagraphs is not False
    return wanted and options.inner == "inductor" and torch.device(device).type == "cuda"


def _checked_layer(layers: tuple[float, ...], layer: int) -> int:
    if not 0 <= layer < len(layers):
        raise ValueError(
            f"avl backend: option vision_keep_layers has {len(layers)} entries, but the model "
            f"has a decoder layer {layer}; give one fraction per decoder layer"
        )
    return layer


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fraction(name: str, value: Any, allow_zero: bool = False) -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    low_ok = is_number and (value >= 0 if allow_zero else value > 0)
    if not (is_number and math.isfinite(value) and low_ok and value <= 1):
        _fail(name, value, "a fraction in [0, 1]" if allow_zero else "a fraction in (0, 1]")


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"avl backend: option {name}={value!r} is invalid; it must be {allowed}")
