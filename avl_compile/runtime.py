"""Runtime side of the rewritten graphs: the functions the FX passes insert, and the state
that must outlive one graph call (image positions, per-layer cache bookkeeping).

Per-layer state is keyed by the KV-cache tensor the site returned: the next decode graph
receives that very tensor as its past keys. So state follows the cache: a new ``generate``
(new cache) starts fresh, two models never share it, and it is freed with the cache. The
store is process-wide because Dynamo may run a graph compiled by one backend instance for
another model of the same class; keyed by cache tensors, sharing the store is safe, and it
holds only live caches.

The graphs call the runtime through objects they hold (``SiteCall``, ``ImageMaskRecorder``):
no registry keyed by name grows with every compile; what a graph needs dies with it.
"""

from __future__ import annotations

import collections
import logging
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.utils.weak import WeakTensorKeyDictionary

from avl_compile.options import AvlOptions
from avl_compile.policies import make_policy
from avl_compile.policies.avl_decode import ADAPTIVE_REFRESHES, AdaptiveAvlSlots
from avl_compile.policies.common import PrefillContext
from avl_compile.policies.decode_schedule import LayerState

log = logging.getLogger("avl_compile")


class SiteCall:
    """A rewritten decoder attention site as its graph calls it: the facts read off the
    graph, and the call into the runtime (FX calls the object itself: it is the node's
    target, named so that the graph's code reads ``attention_site_<layer>``)."""

    def __init__(
        self,
        name: str,
        layer_idx: int,
        scale: float | None,
        is_causal: bool,
        options: AvlOptions,
        runtime: AvlRuntime,
    ) -> None:
        self.name, self.layer_idx, self.scale, self.is_causal = name, layer_idx, scale, is_causal
        self.options, self.runtime = options, runtime
        self.__name__ = self.__qualname__ = f"attention_site_{layer_idx}"
        self.__module__ = __name__

    def __call__(
        self,
        query: Tensor,
        past_keys: Tensor,
        new_keys: Tensor,
        past_values: Tensor,
        new_values: Tensor,
        attn_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (attention output, new keys, new values)."""
        if is_fake(query):  # the backend is propagating shapes through the split graph
            keys = torch.cat([past_keys, new_keys], dim=-2)
            values = torch.cat([past_values, new_values], dim=-2)
            output = query.new_empty((*query.shape[:-1], values.shape[-1]))
            return token_major(output), keys, values
        output, keys, values = self.runtime.run_site(
            self, query, past_keys, new_keys, past_values, new_values, attn_mask
        )
        # Compiled pieces downstream were specialised on these layouts (see the fake path).
        return token_major(output), keys.contiguous(), values.contiguous()


def token_major(output: Tensor) -> Tensor:
    """The attention output [B, H, L, D] laid out [B, L, H, D], as SDPA's CPU kernel writes
    it: the model reads it back as [B, L, H * D], a view of this layout, where a contiguous
    one costs two copies per layer at prefill (here, then the model's transpose)."""
    return output.transpose(1, 2).contiguous().transpose(1, 2)


class ImageMaskRecorder:
    """Called right after the image features are scattered into the embeddings: records
    the image-token mask and returns the embeddings, which the graph then uses (so no
    dead-code pass can drop the call)."""

    def __init__(self, runtime: AvlRuntime) -> None:
        self.runtime = runtime
        self.__name__ = self.__qualname__ = "record_image_mask"
        self.__module__ = __name__

    def __call__(self, mask: Tensor, inputs_embeds: Tensor) -> Tensor:
        if not is_fake(mask):
            self.runtime.record_image_mask(mask, inputs_embeds)
        return inputs_embeds


# KV-cache keys tensor -> bookkeeping of that layer's compacted cache
_LAYER_STATES: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
# KV-cache keys tensors whose decode stays dense -> why (None: the backend left the prompt
# dense, and warned at its prefill)
_DENSE_CACHES: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
PREFILLED_OUTSIDE_REASON = (
    "the prompt was prefilled outside the avl backend (HF's compile_config compiles the decode "
    "steps only): compile the forward first, avl_compile.compile(model, options=...)"
)


class _PrefillSlot:
    """The image mask of the prompt being prefilled, from the graph that scattered it, and
    the layers that ran this prompt dense (one warning per prompt, not per layer)."""

    def __init__(self) -> None:
        self.context: PrefillContext | None = None
        self.dense_layers: set[int | None] = set()


_PREFILL = _PrefillSlot()


class AvlRuntime:
    """Counters and warnings of the graphs one backend compiles; state lives in the stores."""

    def __init__(self) -> None:
        self.counters: collections.Counter[str] = collections.Counter()
        self._warned: set[str] = set()

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=3)

    def collect_device_counts(self, cache) -> None:
        """Add what the decode steps counted on the device to ``counters``: the batch rows'
        adaptive refreshes (``refresh_lse_drop``; a fraction of a site when some rows of a
        batch refresh) and the image rows those refreshes attended. One read of the device
        for the whole ``cache`` (a finished ``generate``'s); the device counts restart."""
        states = [_LAYER_STATES.get(layer.keys) for layer in cache.layers]
        adaptive = [
            s for s in states if isinstance(s, LayerState) and isinstance(s.slots, AdaptiveAvlSlots)
        ]
        if not adaptive:
            return
        counts = torch.stack([s.slots.refresh_state[:, ADAPTIVE_REFRESHES] for s in adaptive])
        for state, fired in zip(adaptive, counts.tolist(), strict=True):
            others = state.schedule.others  # attended by a refresh beyond the core
            self.counters["refresh_sites"] += sum(fired) / len(fired)
            extra = sum(f * o for f, o in zip(fired, others, strict=True))
            self.counters["attended_rows"] += extra / len(fired)
            state.slots.refresh_state[:, ADAPTIVE_REFRESHES] = 0.0

    # Called from the graph right after the image features are scattered into the embeddings.
    def record_image_mask(self, mask: Tensor, inputs_embeds: Tensor) -> None:
        image_mask = mask.expand(inputs_embeds.shape).any(dim=-1)
        previous = _PREFILL.context
        if (
            previous is not None
            and not previous.used_by_layers
            and previous.image_mask.shape == image_mask.shape
        ):
            # one prefill may scatter several modalities (images, then video frames), maybe
            # in graphs split by a break: every scattered position is an image token
            image_mask = image_mask | previous.image_mask
        _PREFILL.context = PrefillContext(image_mask=image_mask.clone())
        self.counters["image_masks_recorded"] += 1

    def run_site(
        self,
        site: SiteCall,
        query: Tensor,
        past_keys: Tensor,
        new_keys: Tensor,
        past_values: Tensor,
        new_values: Tensor,
        attn_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        scale = site.scale if site.scale is not None else query.shape[-1] ** -0.5
        if past_keys.numel() == 0:
            return self._prefill(site, query, new_keys, new_values, attn_mask, scale)
        state = _LAYER_STATES.get(past_keys)
        end_prefill()
        if state is None:
            if past_keys not in _DENSE_CACHES:
                raise RuntimeError(
                    f"avl: {site.name} got a KV cache that the avl backend did not produce. "
                    "A cache edited between steps (beam search reorders it; use num_beams=1) or "
                    "filled by another model cannot be matched to its compacted rows."
                )
            if _DENSE_CACHES[past_keys] is not None:
                self.warn_once(f"avl: decoding runs dense attention: {_DENSE_CACHES[past_keys]}")
            output, keys, values = self._dense(
                site, query, past_keys, new_keys, past_values, new_values, attn_mask, scale,
                is_causal=False,
            )  # fmt: skip
            self.counters["decode_sites"] += 1
            self.counters["attended_rows"] += keys.shape[2]
            return output, keys, values
        if query.shape[2] != 1:
            raise NotImplementedError(
                f"avl: {site.name} got {query.shape[2]} new tokens on a compacted KV cache; only "
                "one token per decode step is supported (assisted or speculative decoding is not)"
            )
        policy = make_policy(site.options, site.layer_idx)
        output, keys, values = policy.decode(
            query, past_keys, new_keys, past_values, new_values, scale, state
        )
        _LAYER_STATES[keys] = state
        self.counters["decode_sites"] += 1
        self.counters["attended_rows"] += state.attended_rows
        self.counters["refresh_sites"] += state.schedule.refresh
        if state.recall is not None and state.schedule.refresh:
            # a swap run from Python (a GPU's route): its host copies
            self.counters["recall_swaps_in_python"] += 1
        if state.recall is not None and state.recall.copies is not None:
            # copies to or from the host that were still running when the host needed them
            self.counters["recall_host_waits"] += state.recall.copies.take_host_waits()
        return output, keys, values

    def _prefill(self, site, query, keys, values, attn_mask, scale):
        context = _PREFILL.context
        batch, q_len = query.shape[0], query.shape[2]
        reason = None
        if context is None or site.layer_idx in context.used_by_layers:
            reason = "no image tokens were found for this prompt"
        elif tuple(context.image_mask.shape) != (batch, q_len):
            reason = (
                f"the recorded image mask {tuple(context.image_mask.shape)} does not match the "
                f"prompt {(batch, q_len)}"
            )
        elif not context.rows_all_hold_images():
            reason = "a prompt in the batch holds no image tokens"
        if reason is not None:
            if context is not None:  # spent on this prompt, even though it runs dense
                context.used_by_layers.add(site.layer_idx)
            self._warn_dense_prompt(site.layer_idx, reason)
            output, keys, values = self._dense(
                site, query, None, keys, None, values, attn_mask, scale, site.is_causal
            )
            self.counters["prefill_kv_bytes"] += keys.nbytes + values.nbytes
            return output, keys, values
        context.used_by_layers.add(site.layer_idx)
        policy = make_policy(site.options, site.layer_idx)
        policy.prepare_prefill(query, keys, attn_mask, site.is_causal, scale, context)
        output, kept_keys, kept_values, state = policy.prefill(
            query, keys, values, attn_mask, site.is_causal, scale, context
        )
        _LAYER_STATES[kept_keys] = state
        # decode graphs then compile for any cache length: the cache grows without a recompile
        for cache in (kept_keys, kept_values):
            torch._dynamo.maybe_mark_dynamic(cache, 2)
            if cache.is_cuda:  # written in place: CUDA-graph trees need not copy it per replay
                torch._dynamo.mark_static_address(cache, guard=False)
        self.counters["prefill_sites"] += 1
        self.counters["prefill_kv_bytes"] += kept_keys.nbytes + kept_values.nbytes
        if state.recall is not None:
            self.counters["prefill_host_kv_bytes"] += state.recall.pages.nbytes
        log.debug("%s: prefill kept %d of %d KV rows", site.name, kept_keys.shape[2], q_len)
        return output, kept_keys, kept_values

    @staticmethod
    def _warn_dense_prompt(layer_idx: int | None, reason: str) -> None:
        """Warn at the first layer of a prompt that runs dense: a layer already seen
        means a new prompt."""
        seen = _PREFILL.dense_layers
        if layer_idx in seen:
            seen.clear()
        if not seen:
            warnings.warn(
                f"avl: this prompt runs dense attention in every decoder layer: {reason}",
                stacklevel=4,
            )
        seen.add(layer_idx)

    @staticmethod
    def _dense(
        site, query, past_keys, new_keys, past_values, new_values, attn_mask, scale, is_causal
    ):
        keys = new_keys if past_keys is None else torch.cat([past_keys, new_keys], dim=-2)
        values = new_values if past_values is None else torch.cat([past_values, new_values], -2)
        # contiguous here, not later: the tensor registered must be the one the cache keeps
        keys, values = keys.contiguous(), values.contiguous()
        # decode steps on this cache stay dense; one that began outside keeps its reason
        _DENSE_CACHES[keys] = _DENSE_CACHES.get(past_keys) if past_keys is not None else None
        output = F.scaled_dot_product_attention(
            query,
            keys,
            values,
            attn_mask=attn_mask,
            is_causal=is_causal,
            scale=site.scale,
            enable_gqa=query.shape[1] != keys.shape[1],
        )
        return output, keys, values


def layer_state(keys: Tensor):
    """The policy state of the layer whose cache keys are ``keys``, None if unknown."""
    return _LAYER_STATES.get(keys)


def set_layer_state(keys: Tensor, state) -> None:
    _LAYER_STATES[keys] = state


def mark_prefilled_outside_backend(keys: Tensor) -> None:
    """``keys`` (a cache layer's) were filled by a prefill that never reached the backend:
    their decode steps run dense."""
    _DENSE_CACHES[keys] = PREFILLED_OUTSIDE_REASON


def end_prefill() -> None:
    """Decoding has begun: the prompt's image mask is spent."""
    _PREFILL.context = None
    _PREFILL.dense_layers.clear()


def rows_in_use(keys: Tensor) -> int:
    """Rows of one layer's cache tensor that hold tokens (the fullest batch row): an A-VL
    cache also has free slots at its end, reserved for the next decode tokens."""
    state = _LAYER_STATES.get(keys)
    return state.rows_in_use if hasattr(state, "rows_in_use") else keys.shape[-2]
