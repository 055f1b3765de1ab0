"""Qwen3-VL (``model_type`` "qwen3_vl") and Qwen3-VL-MoE ("qwen3_vl_moe"): per-slice groups, DeepStack.

The visual tokens are laid out as in Qwen2-VL (`aim.families.qwen2_vl`): per image or video
``t * (h / m) * (w / m)`` tokens (``m`` the spatial merge size), temporal slice by slice in
row-major order, each temporal slice one merge group. What Qwen3-VL adds:

- DeepStack: the vision tower also returns features of a few of its layers, which the text decoder
  adds to the hidden states at the visual positions after each of its first layers
  (``visual_pos_masks``, ``deepstack_visual_embeds``). `take_visual_additions` hands them to the
  engine, which merges and prunes them with the tokens they belong to.
- Per-head RMSNorm on queries and keys before RoPE: the ranking reads the norms (`qk_modules`).
- Interleaved M-RoPE. The decoder gets 4-row position ids (text row, then t / h / w) from
  generate(), 3-row ones from a plain forward; the rotary embedding takes the t / h / w rows.
- Video: each temporal slice sits between its own vision_start / vision_end, after its timestamp
  written as text (``<1.5 seconds>``). Those are text tokens: in no merge group, never pruned.

The MoE variant differs in the decoder MLP only. Routing is per token (no expert capacity), so
removing a token changes no other token's experts and it shares everything here.
Written for transformers 5.21-5.24 (both classes, with this DeepStack interface, throughout).
"""

from __future__ import annotations

from typing import Any, Mapping

from .base import FIRST_TEXT_ID, IMAGE_ID, VIDEO_ID, VISION_END_ID, VISION_HIDDEN, VISION_START_ID
from .qwen2_vl import PATCH, Qwen2VLFamily

TINY_DEEPSTACK_LAYERS = 2  # DeepStack features added after decoder layers 0 and 1 of the tiny models
TIMESTAMP_TOKENS = 2  # text tokens standing for one "<t seconds>" timestamp in the tiny prompts


def interleaved_mrope_section(head_dim: int) -> list[int]:
    """(t, h, w) frequencies of Qwen3's interleaved M-RoPE, in its proportions: [24, 20, 20] for
    head_dim 128. Interleaved, h takes frequencies 1, 4, 7, ... below ``3 * h``, w 2, 5, 8, ...
    below ``3 * w`` and t the rest, so h and w stay under a third of head_dim / 2 each."""
    half = head_dim // 2
    spatial = max(1, (5 * half) // 16)
    return [half - 2 * spatial, spatial, spatial]


def timestamped_video(slices: int, tokens_per_slice: int, placeholder: int = VIDEO_ID) -> list[int]:
    """A Qwen3-VL video prompt span of the tiny vocabulary: per temporal slice, its timestamp
    (`TIMESTAMP_TOKENS` text tokens), vision_start, its placeholders, vision_end. As the processor
    writes ``<t seconds><|vision_start|><|video_pad|>...<|vision_end|>`` per slice."""
    span: list[int] = []
    for s in range(slices):
        # text ids of their own per slice, within the tiny vocabulary however many slices
        span += [FIRST_TEXT_ID + (TIMESTAMP_TOKENS * s + k) % 64 for k in range(TIMESTAMP_TOKENS)]
        span += [VISION_START_ID] + [placeholder] * tokens_per_slice + [VISION_END_ID]
    return span


class Qwen3VLFamily(Qwen2VLFamily):
    model_type = "qwen3_vl"
    class_names = ("Qwen3VLForConditionalGeneration", "Qwen3VLModel")
    # the FLOPs model's vision estimate cannot count the DeepStack mergers (see `vision_shape`):
    # no vision field is read, so a config is never completed by transformers for it
    vision_fields = ()

    # --- patching --------------------------------------------------------------------------
    # image_groups / video_groups / rope_position_ids: as Qwen2-VL (one group per temporal slice;
    # the t / h / w rows of 4-row ids, other ids as given: Qwen3's rotary embedding broadcasts
    # 2-D ids to the three rows itself)

    def qk_modules(self, attention: Any) -> tuple[Any, Any]:
        # q_norm / k_norm output (batch, seq, heads, head_dim): what RoPE rotates and attention uses
        return attention.q_norm, attention.k_norm

    def take_visual_additions(self, kwargs: dict) -> list | None:
        """Pop Qwen3-VL's DeepStack inputs: ``deepstack_visual_embeds`` (one ``(visual tokens of the
        chunk, hidden)`` tensor per decoder layer from layer 0 on, rows in the row-major order of
        ``visual_pos_masks``, which is the order of the image / video placeholders: the model
        builds both from them). None when the chunk has no visual features (text, decoding)."""
        masks = kwargs.pop("visual_pos_masks", None)
        embeds = kwargs.pop("deepstack_visual_embeds", None)
        if embeds is None:
            return None
        if masks is None:
            raise ValueError("deepstack_visual_embeds came without visual_pos_masks: their positions are unknown")
        # the engine checks the rows against the chunk's placeholders (no second device sync here)
        return list(embeds)

    # --- FLOPs facts ------------------------------------------------------------------------
    def frames_per_group(self, vision: Any) -> int:
        # 2 frames per temporal slice in every released config; without a vision shape there is
        # no field to read it from
        return vision.temporal_patch_size if vision is not None else 2

    def vision_shape(self, vision: Mapping, llm: Any) -> None:
        """None: `aim.flops.model_spec.VisionShape` can express the ViT (non-gated MLP, 3-D patches)
        and its patch merger as kind "qwen2_vl", but not the DeepStack mergers (one more patch
        merger per entry of ``deepstack_visual_indexes``, some 6-7% of the tower for Qwen3-VL-8B); an
        estimate that leaves them out would be reported as the tower's cost."""
        return None

    # --- tiny test models -----------------------------------------------------------------
    def _tiny_classes(self):
        import transformers as tf

        return tf.Qwen3VLConfig, tf.Qwen3VLTextConfig

    def _tiny_text(self, text: dict) -> dict:
        """Decoder settings of the variant on top of the shared ones."""
        return {}

    def tiny_config(self, text, image_size):
        if image_size is not None:
            raise ValueError("image_size applies to the llava families; Qwen inputs set their own grid")
        config_class, text_class = self._tiny_classes()
        head_dim = text["hidden_size"] // text["num_attention_heads"]  # Qwen3 defaults to 128 otherwise
        text = text_class(
            **text, **self._tiny_text(text), head_dim=head_dim,
            rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_interleaved": True,
                             "mrope_section": interleaved_mrope_section(head_dim)},
        )
        vision = dict(
            depth=TINY_DEEPSTACK_LAYERS, hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, num_heads=2,
            patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=text.hidden_size,
            num_position_embeddings=64,  # an 8x8 learned grid, interpolated to each image's grid
            deepstack_visual_indexes=list(range(TINY_DEEPSTACK_LAYERS)),
        )
        return config_class(
            text_config=text, vision_config=vision, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
            vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID,
        )

    # tiny_visual_inputs: as Qwen2-VL (flattened 3-D patches and grid_thw)

    def tiny_visual_span(self, visual, sample, kind, count):
        # a video as the processor writes it (`timestamped_video`): Qwen3-VL's get_rope_index takes
        # each contiguous run of video placeholders for one temporal slice
        if kind != "video":
            return super().tiny_visual_span(visual, sample, kind, count)
        slices = int(visual["video_grid_thw"][sample][0])
        return timestamped_video(slices, count // slices)


class Qwen3VLMoeFamily(Qwen3VLFamily):
    """Qwen3-VL-MoE. The FLOPs model has no notion of experts: it counts each decoder MLP as a dense
    gated MLP of ``intermediate_size``. Qwen's MoE configs set that to the active experts' width,
    ``num_experts_per_tok * moe_intermediate_size`` (transformers' default: 5632 = 4 x 1408), so the
    figures hold, the router (hidden x experts per token) left out; a config that does not is
    mis-counted."""

    model_type = "qwen3_vl_moe"
    class_names = ("Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeModel")

    def _tiny_classes(self):
        import transformers as tf

        return tf.Qwen3VLMoeConfig, tf.Qwen3VLMoeTextConfig

    def _tiny_text(self, text: dict) -> dict:
        # 4 experts, 2 per token, every decoder layer sparse; 2 x hidden active = intermediate_size
        return dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=text["hidden_size"],
                    decoder_sparse_step=1)


FAMILIES = (Qwen3VLFamily(), Qwen3VLMoeFamily())
