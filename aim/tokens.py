"""Token bookkeeping for the engine: the slots of a chunk, their masks, and the KV-cache state.

`TokenSet` holds, per prompt, the original position of every slot, whether it is valid (not
padding, not removed) and whether it is visual. In ``"remove"`` mode, removal compacts the
slots into a shorter, left-padded tensor; in ``"mask"`` mode they are only marked invalid.
`CacheState` remembers, per layer, which cached entries are valid keys, so decoding steps
attend to exactly what each layer kept (and, with proportional attention, how many input tokens
each entry stands for).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers.cache_utils import DynamicCache


@dataclass
class CacheState:
    """What a KV cache filled by AIM must remember: tokens seen in original positions and,
    per layer, which of its cached slots are valid keys (``(batch, entries)`` bool) and, where the
    prompt ran with proportional attention, the log of each entry's size.

    `owner_active` tells whether the model that filled the cache still runs AIM: after
    `remove_aim` the unpatched model cannot continue such a cache (its layers hold different
    numbers of entries), and `AIMCache` says so instead of failing on a size mismatch."""

    seen_tokens: int
    layer_valid: list[torch.Tensor]
    owner_active: Callable[[], bool] = lambda: True
    # per prompt, how far later positions move (``merged_positions="contiguous"``, `aim.positions`)
    position_shift: torch.Tensor | None = None
    # per layer, log of how many input tokens each cached entry stands for (``(batch, entries)``),
    # kept where the prompt ran with proportional attention: later steps add it to their logits
    layer_log_sizes: list[torch.Tensor] | None = None

    def select_rows(self, index: torch.Tensor) -> None:
        self.layer_valid = [v.index_select(0, index.to(v.device)) for v in self.layer_valid]
        if self.layer_log_sizes is not None:
            self.layer_log_sizes = [v.index_select(0, index.to(v.device)) for v in self.layer_log_sizes]
        if self.position_shift is not None:
            self.position_shift = self.position_shift.index_select(0, index.to(self.position_shift.device))

    def repeat_rows(self, repeats: int) -> None:
        self.layer_valid = [v.repeat_interleave(repeats, dim=0) for v in self.layer_valid]
        if self.layer_log_sizes is not None:
            self.layer_log_sizes = [v.repeat_interleave(repeats, dim=0) for v in self.layer_log_sizes]
        if self.position_shift is not None:
            self.position_shift = self.position_shift.repeat_interleave(repeats, dim=0)

    def crop(self, tokens_to_remove: int) -> None:
        # transformers only crops from the end (negative counts): the same decoded tokens in every layer
        if tokens_to_remove < 0:
            self.layer_valid = [v[:, :tokens_to_remove] for v in self.layer_valid]
            if self.layer_log_sizes is not None:
                self.layer_log_sizes = [v[:, :tokens_to_remove] for v in self.layer_log_sizes]
            self.seen_tokens += tokens_to_remove


class AIMCache(DynamicCache):
    """A `DynamicCache` whose layers hold different numbers of entries (what each layer kept).

    Written for transformers 5.21-5.24 caches. Its length is reported in original positions:
    generate() and Qwen2-VL's rope deltas read ``get_seq_length()`` as a position, not as an entry
    count. Batch edits (beam reordering, batch expansion, cropping) keep the per-layer validity
    masks (and log sizes) in step. The engine turns the `DynamicCache` a call brings into one of these in place
    (`as_aim_cache`), so every holder of that object (generate, the caller) sees the same cache.
    """

    aim_state: CacheState

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.aim_state.seen_tokens

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if not self.aim_state.owner_active():
            raise RuntimeError(
                "this KV cache was filled while AIM was applied (each layer holds the tokens it kept) and "
                "cannot be continued by the model after remove_aim(); start from a new cache (a new "
                "conversation), or apply_aim(model) again to continue this one"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def reset(self) -> None:
        # an emptied cache has no per-layer state to keep: it is a plain DynamicCache again
        super().reset()
        del self.aim_state
        self.__class__ = DynamicCache

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.aim_state.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.aim_state.select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.aim_state.repeat_rows(repeats)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.aim_state.crop(tokens_to_remove)


def aim_state_of(cache) -> CacheState | None:
    """The AIM state of a cache AIM filled (None for any other cache)."""
    return cache.aim_state if isinstance(cache, AIMCache) else None


def as_aim_cache(cache: DynamicCache, state: CacheState) -> AIMCache:
    """Give `cache` (a plain `DynamicCache` or an `AIMCache`) the state `state`, as an `AIMCache`:
    the same object, so generate() and the caller keep using it."""
    if type(cache) is DynamicCache:
        cache.__class__ = AIMCache  # adds behaviour only: AIMCache has no fields of its own but aim_state
    elif not isinstance(cache, AIMCache):
        raise NotImplementedError(
            f"AIM keeps a different number of tokens per layer and needs a DynamicCache; got {type(cache).__name__}"
        )
    cache.aim_state = state
    return cache


class TokenSet:
    """The slots of the current chunk, ``(batch, width)`` each."""

    def __init__(self, hidden, cos, sin, valid, visual, remove: bool, extras: torch.Tensor | None = None):
        batch, width = valid.shape
        self.hidden, self.cos, self.sin = hidden, cos, sin
        self.valid, self.visual = valid, visual
        # how many input tokens each slot stands for (merging adds up), and per-slot features that
        # follow the tokens (Qwen3-VL's DeepStack features, (batch, width, extra))
        self.sizes = torch.ones(batch, width, dtype=torch.float32, device=valid.device)
        self.extras = extras
        self.origin = torch.arange(width, device=valid.device).expand(batch, width)
        self.remove = remove
        self.version = 0  # bumped whenever the slots change
        self.compacted = False
        # whether every slot is valid, where the host knows it without asking the device (None: unknown)
        self.all_valid: bool | None = None
        self.input_width = width
        # outputs of removed slots at their input positions, plus one spare column that padding
        # slots write to (a scatter instead of boolean indexing: no device sync)
        self.finished = hidden.new_zeros(batch, width + 1, hidden.shape[-1]) if remove else None

    def keep(self, keep: torch.Tensor, counts: list[int] | None = None) -> None:
        """Keep only the slots where `keep` is True (text tokens are never passed as False).

        `counts`: how many slots each row keeps, where the caller knows it on the host (the
        pruning schedule does): compacting then waits for the device nowhere, which on a GPU
        lets the host queue the next layer's kernels while this one runs.
        """
        self.version += 1
        if not self.remove:
            self.valid = self.valid & keep
            self.all_valid = None
            return
        self._save_outputs()
        kept = keep.sum(dim=1)
        if counts is None:
            width = int(kept.max()) if kept.numel() else 0
            self.all_valid = None
        else:
            if keep.device.type == "cpu" and kept.tolist() != list(counts):  # on the CPU nothing waits for a device
                raise RuntimeError(f"keep() was told the rows keep {list(counts)} slots, the mask keeps {kept.tolist()}")
            width = max(counts, default=0)
            self.all_valid = len(set(counts)) <= 1  # equal rows: no left padding
        order = kept_first(keep)
        rank = torch.arange(width, device=keep.device) - (width - kept).unsqueeze(1)  # left padding
        pad = rank < 0
        gather = order.gather(1, rank.clamp_min(0)).masked_fill(pad, 0)
        self.hidden = _take(self.hidden, gather)
        self.cos, self.sin = _take(self.cos, gather), _take(self.sin, gather)
        self.sizes = self.sizes.gather(1, gather)
        if self.extras is not None:
            self.extras = _take(self.extras, gather)
        self.origin = self.origin.gather(1, gather)
        self.visual = self.visual.gather(1, gather) & ~pad
        self.valid = ~pad
        self.compacted = True

    def set_rope(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Replace the rotary embeddings by ``(batch, seq, dim)`` ones given per input slot."""
        self.cos, self.sin = _take(cos, self.origin), _take(sin, self.origin)

    def stays(self) -> torch.Tensor:
        """``(batch, seq)``: the input slots still present."""
        present = torch.zeros(self.origin.shape[0], self.input_width,
                              dtype=torch.int32, device=self.valid.device)
        return present.scatter_add_(1, self.origin, self.valid.int()) > 0

    def _save_outputs(self) -> None:
        # every valid slot has its own input position; padding slots all write to the spare column
        index = self.origin.masked_fill(~self.valid, self.input_width)
        self.finished.scatter_(1, index.unsqueeze(-1).expand_as(self.hidden), self.hidden)

    def outputs(self) -> torch.Tensor:
        """Hidden states in the chunk's original positions. Text tokens are exact; a removed
        visual token reports the hidden state it had when it was removed."""
        if not self.compacted:
            return self.hidden
        self._save_outputs()
        return self.finished[:, : self.input_width]


def kept_first(keep: torch.Tensor) -> torch.Tensor:
    """``(rows, n)`` indices of each row's True entries of `keep` first, in order, then its False
    ones: gathering by it compacts rows without boolean indexing (which would wait for the device
    to learn each row's count)."""
    return torch.argsort((~keep).to(torch.int8), dim=1, stable=True)


def _take(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return tensor.gather(1, index.unsqueeze(-1).expand(*index.shape, tensor.shape[-1]))


def attention_mask_4d(key_valid: torch.Tensor, query_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive ``(batch, 1, query, key)`` mask: causal over slot order, invalid keys hidden.

    The queries are the last `query_len` key slots. A finite minimum (not -inf) keeps rows
    without any visible key (padding) finite in both eager and sdpa attention.
    """
    allowed = _allowed(key_valid, query_len)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=key_valid.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def _allowed(key_valid: torch.Tensor, query_len: int) -> torch.Tensor:
    """``(batch, query, key)``: which keys each of the last `query_len` slots may attend to."""
    keys = key_valid.shape[1]
    key_pos = torch.arange(keys, device=key_valid.device)
    query_pos = torch.arange(keys - query_len, keys, device=key_valid.device)
    return (key_pos[None, :] <= query_pos[:, None])[None] & key_valid[:, None, :]


def proportional_mask(key_valid: torch.Tensor, log_sizes: torch.Tensor, query_len: int, dtype: torch.dtype) -> torch.Tensor:
    """`attention_mask_4d` with ToMe's proportional attention: each visible key's logits get the
    log of how many input tokens it stands for (``log_sizes``, ``(batch, keys)``), so that a
    token merged from ``s`` draws the attention its ``s`` tokens would have drawn together."""
    allowed = _allowed(key_valid, query_len)
    bias = log_sizes.to(device=allowed.device, dtype=dtype)[:, None, :]
    return torch.where(allowed, bias, torch.finfo(dtype).min).unsqueeze(1)


def key_log_sizes(tokens: "TokenSet", layer_past: torch.Tensor | None, past_log_sizes: torch.Tensor | None) -> torch.Tensor:
    """Log of how many input tokens each of a layer's keys stands for: the cached entries' (0 for
    a cache filled without proportional attention), then this chunk's slots'."""
    current = tokens.sizes.log()
    if layer_past is None:
        return current
    if past_log_sizes is None:
        past_log_sizes = torch.zeros(layer_past.shape, dtype=current.dtype, device=current.device)
    return torch.cat([past_log_sizes.to(current.device), current], dim=1)
