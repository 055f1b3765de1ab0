"""The LLM forward that merges and prunes visual tokens.

It replaces the forward of the model's text decoder (``model.model.language_model``)
while AIM is applied. Written for transformers 5.x decoder stacks (tested on 5.21-5.25,
`aim.compat.TESTED_TRANSFORMERS`; the cache argument's name differs across them, see `aim.compat`):
``embed_tokens``, ``layers``, ``norm``, ``rotary_emb`` returning ``(cos, sin)`` of shape
``(batch, seq, head_dim)``, layers taking ``position_embeddings`` and a 4-D mask.

Token bookkeeping lives in `aim.tokens`. In ``"remove"`` mode removed tokens leave the
hidden states and every later layer runs on the shorter sequence; its KV cache holds only
those tokens. In ``"mask"`` mode nothing is removed: removed tokens are masked as keys (the
reference). Positions are always the original ones, so a decoding step continues where the
full prompt would end, whatever was removed.
"""

from __future__ import annotations

import contextlib
import weakref
import torch
from einops import rearrange
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

from . import compat

from .baselines import last_token_importance
from .config import AIMConfig, visual_tokens_kept
from .positions import contiguous_positions
from .layout import VisualLayout
from .prune import pagerank_importance, select_tokens
from .reduce import merge_before_llm, merge_pruned
from .stats import AIMStats
from .context import capture_request, current_call
from .deepstack import add_visual, scatter_additions
from .tokens import CacheState, TokenSet, aim_state_of, as_aim_cache, attention_mask_4d, key_log_sizes, proportional_mask

# outputs that would need every layer at full length (MoE router logits: their auxiliary loss)
_OUTPUT_FLAGS = ("output_attentions", "output_hidden_states", "output_router_logits")
_DROPPED_KWARGS = ("return_dict", "output_attentions", "output_hidden_states", "cache_position")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _heads_with_rope(states: torch.Tensor, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if states.ndim == 4:  # (batch, seq, heads, dim): q/k norms' outputs (Family.qk_modules)
        x = rearrange(states, "batch seq heads dim -> batch heads seq dim")
    else:
        x = rearrange(states, "batch seq (heads dim) -> batch heads seq dim", dim=head_dim)
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


class AIMTextForward:
    """Callable installed as the text decoder's ``forward`` while AIM is applied."""

    def __init__(self, text_model: torch.nn.Module, controller) -> None:
        self.text_model = text_model
        self.controller = controller
        # the names this release gives the cache argument (see aim.compat): read once, here
        self.text_cache_arg = compat.cache_argument(controller.original_text_forward)
        self.layer_cache_arg = compat.cache_argument(type(text_model.layers[0]).forward)

    def __call__(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        # the cache arrives as `cache` (transformers >= 5.24) or `past_key_values` (before)
        cache = compat.given_cache(kwargs)
        controller = self.controller
        call = current_call(controller)  # None when the text decoder is called on its own
        layout: VisualLayout | None = controller.take_layout(call)
        config: AIMConfig = call.config if call is not None else controller.config_in_effect()
        if call is not None and call.budget is not None and layout is not None:
            config = controller.choose(call, layout, _prompt_valid(attention_mask, input_ids, inputs_embeds))
        model = self.text_model
        num_layers = len(model.layers)
        # frames the vision tower did not encode (frame_keep) hold zeros: they must leave, whatever the config
        drops_frames = layout is not None and layout.dropped is not None
        if config.is_identity(num_layers) and aim_state_of(cache) is None and not drops_frames:
            output = controller.original_text_forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **{self.text_cache_arg: cache},
                **kwargs,
            )
            if layout is not None:
                _publish(controller, call, _unchanged_stats(layout, attention_mask, output, num_layers))
            return output
        for flag in _OUTPUT_FLAGS:
            if kwargs.get(flag):
                raise NotImplementedError(
                    f"{flag}=True is not available while AIM removes tokens (layers see different "
                    "sequence lengths); call remove_aim(model) or apply_aim(model, enabled=False) first"
                )
        layer_kwargs = {k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS}
        additions = controller.family.take_visual_additions(layer_kwargs)

        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = model.embed_tokens(input_ids)
        if use_cache is None:
            use_cache = getattr(model.config, "use_cache", True)
        if use_cache and cache is None:
            cache = DynamicCache(config=model.config)
        if cache is not None and not isinstance(cache, DynamicCache):
            raise NotImplementedError(
                f"AIM keeps a different number of tokens per layer and needs a DynamicCache; got "
                f"{type(cache).__name__} (static / sliding caches are not supported)"
            )
        batch, length, _ = inputs_embeds.shape
        device = inputs_embeds.device
        state: CacheState | None = aim_state_of(cache)
        continues_aim_cache = state is not None
        past_len = state.seen_tokens if state else (cache.get_seq_length() if cache else 0)

        chunk_valid, past_valid = _split_padding_mask(attention_mask, batch, length, past_len, device)
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + length, device=device).expand(batch, length)
        shift = state.position_shift if state else None
        if shift is not None:  # positions after a contiguously renumbered prompt (aim.positions)
            position_ids = position_ids + (shift.view(-1, 1) if position_ids.ndim == 2 else shift.view(1, -1, 1))
        cos, sin = model.rotary_emb(inputs_embeds, controller.family.rope_position_ids(position_ids))
        cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)

        visual = layout.visual.to(device) & chunk_valid if layout is not None else torch.zeros_like(chunk_valid)
        if layout is not None:
            _check_text_after_visual(visual, chunk_valid)
        extras = scatter_additions(additions, layout, inputs_embeds) if additions else None
        tokens = TokenSet(inputs_embeds, cos, sin, chunk_valid, visual, remove=config.prune_mode == "remove", extras=extras)
        visual_before = visual.sum(dim=1)
        # the visual tokens the vision tower produced (frames it did not encode never existed)
        visual_encoded = (visual & ~layout.dropped.to(device)).sum(dim=1) if drops_frames else visual_before
        generator = torch.Generator().manual_seed(config.seed)  # the random baselines only
        if layout is not None and (config.merges_before_llm or drops_frames):
            merge_before_llm(tokens, layout, config, generator)
            if config.merged_positions == "contiguous":
                shift = _renumber(model, controller.family, tokens, position_ids, chunk_valid, visual, layout, shift)
        recording = call is not None and call.record_positions
        kept_positions = [("merge", _visual_origins(tokens))] if recording else None
        # random ranking: one fixed random priority per prompt position, so removing and masking
        # choose alike and each layer keeps a subset of the previous one
        random_priority = (
            torch.rand(chunk_valid.shape, generator=generator).to(device) if config.prune_method == "random" else None
        )
        # counts live on the host: one device sync here, none per layer (decoding has no visual tokens)
        visual_counts = (tokens.valid & tokens.visual).sum(dim=1).tolist()
        text_counts = (tokens.valid & ~tokens.visual).sum(dim=1).tolist()
        ratios = config.keep_ratios(num_layers) if config.enabled else (1.0,) * num_layers
        targets = [[visual_tokens_kept(n, ratio) for n in visual_counts] for ratio in ratios]

        # the schedule on the device, copied at the first pruning layer: one copy, and so one wait
        # for the device, per call instead of one per pruning layer
        visual_targets: torch.Tensor | None = None

        def fewer(layer_idx: int, counts: list[int]) -> bool:
            return any(t < c for t, c in zip(targets[layer_idx], counts))

        stats_rows: list[tuple[list[int], list[int], int]] = []
        new_layer_valid: list[torch.Tensor] = []
        # proportional attention: asked for by a call that merges (elsewhere every size is 1, and
        # sdpa keeps its causal kernels), or kept by the cache its prompt filled, which then
        # decides for every later step and chunk, whatever their config says
        proportional = (config.proportional_attention and config.merges_tokens) or bool(
            state and state.layer_log_sizes is not None)
        new_layer_log_sizes: list[torch.Tensor] = []
        masks: dict = {}  # (layout version, cached part) -> (key validity, key log sizes, 4-D mask), shared by layers
        sdpa = getattr(model.config, "_attn_implementation", "eager") == "sdpa"
        captured: dict = {}
        head_dim = 0
        current = visual_counts
        for idx, layer in enumerate(model.layers):
            if idx > 0 and fewer(idx, current):
                if captured:
                    importance = _importance(config, captured, head_dim, tokens)
                elif random_priority is not None:
                    importance = random_priority.gather(1, tokens.origin)
                else:  # every visual token goes: no ranking needed
                    importance = torch.zeros(tokens.valid.shape, device=device)
                if visual_targets is None:
                    visual_targets = torch.tensor(targets, device=device)
                keep = select_tokens(importance, tokens.valid, tokens.visual, visual_targets[idx])
                if config.prune_action == "merge":
                    merge_pruned(tokens, keep)
                # every text token stays; a row keeps at most the visual tokens it has
                tokens.keep(keep, [t + min(k, c) for t, k, c in zip(text_counts, targets[idx], current)])
                current = targets[idx]
                if kept_positions is not None:
                    kept_positions.append((idx, _visual_origins(tokens)))
            wants_ranking = (
                config.prune_method != "random" and idx + 1 < num_layers and fewer(idx + 1, current) and any(targets[idx + 1])
            )

            layer_past = state.layer_valid[idx] if state else past_valid
            past_log_sizes = state.layer_log_sizes[idx] if state and state.layer_log_sizes else None
            # layer_past and past_log_sizes stay referenced: ids are stable
            mask_key = (tokens.version, id(layer_past), id(past_log_sizes))
            if mask_key not in masks:
                key_valid = tokens.valid if layer_past is None else torch.cat([layer_past, tokens.valid], dim=1)
                if proportional:
                    log_sizes = key_log_sizes(tokens, layer_past, past_log_sizes)
                    masks[mask_key] = (key_valid, log_sizes, proportional_mask(key_valid, log_sizes, tokens.valid.shape[1], tokens.hidden.dtype))
                else:
                    implicit_ok = sdpa and layer_past is None
                    mask = _layer_mask(key_valid, tokens.valid.shape[1], tokens.hidden.dtype, implicit_ok, tokens.all_valid)
                    masks[mask_key] = (key_valid, None, mask)
            key_valid, log_sizes, mask = masks[mask_key]
            if wants_ranking:
                head_dim = layer.self_attn.head_dim
            recorder = (
                capture_request(*controller.family.qk_modules(layer.self_attn)) if wants_ranking else contextlib.nullcontext({})
            )
            with recorder as captured:
                out = layer(
                    tokens.hidden,
                    attention_mask=mask,
                    position_embeddings=(tokens.cos, tokens.sin),
                    use_cache=use_cache,
                    **{self.layer_cache_arg: cache if use_cache else None},
                    **layer_kwargs,
                )
            tokens.hidden = out[0] if isinstance(out, tuple) else out
            if extras is not None and idx < len(additions):
                add_visual(tokens, idx)
            new_layer_valid.append(key_valid)
            if proportional:
                new_layer_log_sizes.append(log_sizes)
            stats_rows.append(([t + v for t, v in zip(text_counts, current)], list(current), tokens.valid.shape[1]))

        hidden = model.norm(tokens.outputs())
        if use_cache:
            if state is None:
                state = CacheState(past_len, [], owner_active=_patched(controller.multimodal))
            state.seen_tokens, state.layer_valid = past_len + length, new_layer_valid
            state.position_shift = shift
            state.layer_log_sizes = new_layer_log_sizes if proportional else None
            cache = as_aim_cache(cache, state)
        if layout is not None or not continues_aim_cache:
            _publish(controller, call, _stats(
                chunk_valid.sum(1).tolist(), visual_before.tolist(), visual_counts, stats_rows,
                cache if use_cache else None, config.prune_mode, kept_positions,
                _group_positions(layout) if kept_positions is not None else None, visual_encoded.tolist(),
            ))
        return compat.model_output(hidden, cache if use_cache else None)


def _renumber(model, family, tokens: TokenSet, position_ids, valid, visual, layout: VisualLayout, shift):
    """Give the slots merging left contiguous positions (``merged_positions="contiguous"``); returns
    the prompts' position shift for later chunks (added to the one they already had)."""
    batch = visual.shape[0]
    rope_ids = family.rope_position_ids(position_ids)
    rope_ids = rope_ids.expand(batch, -1) if rope_ids.ndim == 2 else rope_ids.expand(-1, batch, -1)
    renumbered, moved = contiguous_positions(rope_ids, tokens.stays(), valid, visual, layout.groups)
    cos, sin = model.rotary_emb(tokens.hidden, renumbered)
    tokens.set_rope(cos.expand(batch, -1, -1), sin.expand(batch, -1, -1))
    return moved if shift is None else shift + moved


def _prompt_valid(attention_mask, input_ids, inputs_embeds) -> torch.Tensor:
    """The chunk's ``(batch, seq)`` padding mask (all valid without one)."""
    ids = input_ids if input_ids is not None else inputs_embeds
    batch, length = ids.shape[:2]
    if attention_mask is None or attention_mask.ndim != 2:
        return torch.ones(batch, length, dtype=torch.bool, device=ids.device)
    return attention_mask[:, -length:].to(device=ids.device, dtype=torch.bool)


def _check_text_after_visual(visual: torch.Tensor, valid: torch.Tensor) -> None:
    """The last token of each prompt gives the next-token logits, so it must run through every
    layer: AIM may merge or prune it away if it is visual. Chat prompts end in text (the question,
    the assistant turn); a prompt that ends on an image / video is refused with what to do."""
    last = valid.shape[1] - 1 - valid.flip(1).int().argmax(1)
    ends_visual = visual.gather(1, last.unsqueeze(1)).squeeze(1) & valid.any(1)
    if bool(ends_visual.any()):
        rows = ends_visual.nonzero().flatten().tolist()
        raise ValueError(
            f"prompt(s) {rows} of the batch end with a visual token: AIM merges and prunes visual tokens, "
            "but the last token gives the next-token logits and must stay. Put text after the image / "
            "video (the question, or the chat template's assistant prompt), or call the model with "
            "apply_aim(model, enabled=False) for such prompts"
        )


def _patched(module: torch.nn.Module):
    """Whether `module` (a multimodal model) is still patched, without keeping it alive."""
    ref = weakref.ref(module)
    return lambda: getattr(ref(), "_aim", None) is not None


def _publish(controller, call, stats: AIMStats) -> None:
    """Hand a prefill's stats to its call (the patched forward passes them on), or, when the text
    decoder was called on its own, straight to the model's per-thread last stats."""
    if call is not None:
        call.stats = stats
    else:
        controller.remember(stats)


def _layer_mask(
    key_valid: torch.Tensor, query_len: int, dtype: torch.dtype, implicit_ok: bool, all_valid: bool | None = None
) -> torch.Tensor | None:
    """The layer's 4-D mask, or None where sdpa's own causal mask is the same thing.

    `implicit_ok`: sdpa attention and nothing cached before this chunk in this layer (a
    prefill). If every key is then valid, the mask is plain causal: None lets transformers'
    sdpa call use ``is_causal``, whose kernels skip the upper triangle, as the unpatched
    model's do. Not for eager (None means no mask there) and not with a cache (sdpa's
    ``is_causal`` is top-left aligned and transformers then slices the keys). The check costs
    one device sync per distinct mask of a prefill, unless `all_valid` says what the host
    already knows (`TokenSet.all_valid`, after pruning); decoding steps never make it.
    """
    if implicit_ok and query_len == key_valid.shape[1] and (all_valid if all_valid is not None else bool(key_valid.all())):
        return None
    return attention_mask_4d(key_valid, query_len, dtype)


def _split_padding_mask(attention_mask, batch, length, past_len, device):
    """The chunk's padding mask and, for a cache AIM did not fill, the cached part's."""
    if attention_mask is None:
        # a cache AIM did not fill holds past_len valid entries in every layer
        past = torch.ones(batch, past_len, dtype=torch.bool, device=device) if past_len else None
        return torch.ones(batch, length, dtype=torch.bool, device=device), past
    if isinstance(attention_mask, dict) or attention_mask.ndim != 2:
        raise ValueError(
            "AIM builds its own attention masks and needs the 2-D padding mask (batch, sequence) "
            f"as attention_mask; got {type(attention_mask).__name__} "
            f"{tuple(attention_mask.shape) if hasattr(attention_mask, 'shape') else ''}"
        )
    mask = attention_mask.to(device=device, dtype=torch.bool)
    if mask.shape[1] < length:
        raise ValueError(f"attention_mask has {mask.shape[1]} columns, fewer than the {length} input tokens")
    past = mask[:, : mask.shape[1] - length] if past_len else None
    if past is not None and past.shape[1] != past_len:
        past = torch.ones(batch, past_len, dtype=torch.bool, device=device)
    return mask[:, mask.shape[1] - length :], past


def _importance(config: AIMConfig, captured: dict, head_dim: int, tokens: TokenSet) -> torch.Tensor:
    """Rank the current tokens from the previous layer's query / key states."""
    query = _heads_with_rope(captured["q"], head_dim, tokens.cos, tokens.sin)
    key = _heads_with_rope(captured["k"], head_dim, tokens.cos, tokens.sin)
    if config.prune_method == "last_token":
        return last_token_importance(query, key, tokens.valid)
    return pagerank_importance(query, key, tokens.valid, tau=config.tau, iterations=config.pagerank_iterations)


def _visual_origins(tokens: TokenSet) -> list[list[int]]:
    """Input positions of each sample's visual tokens still present."""
    present = tokens.valid & tokens.visual
    return [tokens.origin[b][present[b]].tolist() for b in range(present.shape[0])]


def _group_positions(layout: VisualLayout | None) -> list[list[list[int]]] | None:
    if layout is None:
        return None
    return [[positions.tolist() for positions in sample] for sample in layout.groups]


def _cache_entries(cache) -> list[int]:
    return [int(layer.keys.shape[-2]) if getattr(layer, "keys", None) is not None else 0 for layer in cache.layers]


def _unchanged_stats(layout: VisualLayout, attention_mask, output, num_layers: int) -> AIMStats:
    batch, length = layout.visual.shape
    valid = attention_mask[:, -length:].bool() if attention_mask is not None else torch.ones(batch, length, dtype=torch.bool)
    visual = (layout.visual.to(valid.device) & valid).sum(1).tolist()
    tokens = valid.sum(1).tolist()
    return _stats(tokens, visual, visual, [(tokens, visual, length)] * num_layers, compat.output_cache(output), "off")


def _stats(input_tokens, visual_before, visual_after, rows, cache, mode, kept=None, groups=None, encoded=None) -> AIMStats:
    """The stats of one prefill; `rows` are ``(tokens, visual tokens, sequence length)`` per layer."""
    return AIMStats(
        input_tokens=input_tokens,
        visual_tokens_before_merge=visual_before,
        visual_tokens_after_merge=visual_after,
        tokens_per_layer=[row[0] for row in rows],
        visual_tokens_per_layer=[row[1] for row in rows],
        sequence_length_per_layer=[row[2] for row in rows],
        kv_cache_entries_per_layer=_cache_entries(cache) if cache is not None else None,
        mode=mode,
        kept_visual_positions=kept,
        visual_groups=groups,
        visual_tokens_encoded=encoded if encoded is not None else list(visual_before),
    )
