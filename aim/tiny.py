"""Tiny random-weight vision-language models, built entirely in code (no hub access).

The models are instances of the real ``transformers`` ForConditionalGeneration classes, with
configs shrunk so that a forward pass on CPU takes milliseconds. :func:`make_inputs` builds
matching inputs (placeholder tokens, pixel values and the family's extra tensors) that can be
passed straight to ``model(**inputs)`` or ``model.generate(**inputs)``.

Token layout shared by every family (vocab of :data:`VOCAB_SIZE` ids):
``pad=0, bos=1, eos=2, image=3, video=4, vision_start=5, vision_end=6``; random text tokens are
drawn from ``[FIRST_TEXT_ID, VOCAB_SIZE)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import transformers as tf
from transformers import PreTrainedModel
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

logger = logging.getLogger(__name__)

FAMILIES = ("llava", "llava_next", "llava_next_video", "llava_onevision", "qwen2_vl", "qwen2_5_vl")
VIDEO_FAMILIES = ("llava_next_video", "llava_onevision", "qwen2_vl", "qwen2_5_vl")
ANYRES_FAMILIES = ("llava_next", "llava_next_video", "llava_onevision")
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")

VOCAB_SIZE = 320
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
IMAGE_ID, VIDEO_ID, VISION_START_ID, VISION_END_ID = 3, 4, 5, 6
FIRST_TEXT_ID = 8

VISION_HIDDEN = 32  # hidden size of every tiny vision tower
# Vision tower input resolution for the llava families (patch size 8): 6x6 or 8x8 patches.
# The video families need an even 8x8 grid: pooling 2x2 then leaves 16 tokens per frame.
LLAVA_IMAGE_SIZE = {"llava": 48, "llava_next": 48, "llava_next_video": 64, "llava_onevision": 64}
LLAVA_PATCH = 8
QWEN_PATCH = 14
QWEN_IMAGE_GRID = (12, 16)  # (h, w) in patches -> 6x8 = 48 merged tokens per image / temporal slice

_TOKEN_IDS = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_next_video": "LlavaNextVideoForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}


def _text_kwargs(num_layers: int, hidden_size: int) -> dict:
    """Shared decoder settings: 4 query heads, 2 KV heads (GQA), MLP 2x hidden."""
    if hidden_size % 8:
        raise ValueError(f"hidden_size must be a multiple of 8 (4 heads, even head_dim), got {hidden_size}")
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        **_TOKEN_IDS,
    )


def _clip(image_size: int) -> tf.CLIPVisionConfig:
    return tf.CLIPVisionConfig(
        hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, projection_dim=VISION_HIDDEN,
        num_hidden_layers=2, num_attention_heads=2, image_size=image_size, patch_size=LLAVA_PATCH,
    )


def _pinpoints(size: int) -> list[list[int]]:
    return [[size, size], [size, 2 * size], [2 * size, size], [2 * size, 2 * size]]


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies into (t, h, w) like Qwen's [16, 24, 24] for head_dim 128."""
    half = head_dim // 2
    t = max(1, half // 4)
    h = (half - t) // 2
    return [t, h, half - t - h]


def _build_config(family: str, num_layers: int, hidden_size: int, image_size: int | None) -> tf.PreTrainedConfig:
    text = _text_kwargs(num_layers, hidden_size)
    size = image_size or LLAVA_IMAGE_SIZE.get(family)
    if family == "llava":
        n_tokens = (size // LLAVA_PATCH) ** 2
        return tf.LlavaConfig(
            vision_config=_clip(size), text_config=tf.LlamaConfig(**text),
            image_token_index=IMAGE_ID, image_seq_length=n_tokens,
        )
    if family == "llava_next":
        return tf.LlavaNextConfig(
            vision_config=_clip(size), text_config=tf.MistralConfig(sliding_window=None, **text),
            image_token_index=IMAGE_ID, image_grid_pinpoints=_pinpoints(size),
            image_seq_length=(size // LLAVA_PATCH) ** 2,
        )
    if family == "llava_next_video":
        grid = size // LLAVA_PATCH
        return tf.LlavaNextVideoConfig(
            vision_config=_clip(size), text_config=tf.Qwen2Config(use_sliding_window=False, **text),
            image_token_index=IMAGE_ID, video_token_index=VIDEO_ID, image_grid_pinpoints=_pinpoints(size),
            spatial_pool_mode="average", spatial_pool_stride=2,
            image_seq_length=grid**2, video_seq_length=(grid // 2) ** 2,
        )
    if family == "llava_onevision":
        vision = tf.SiglipVisionConfig(
            hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, num_hidden_layers=2,
            num_attention_heads=2, image_size=size, patch_size=LLAVA_PATCH, vision_use_head=False,
        )
        return tf.LlavaOnevisionConfig(
            vision_config=vision, text_config=tf.Qwen2Config(use_sliding_window=False, **text),
            image_token_index=IMAGE_ID, video_token_index=VIDEO_ID, image_grid_pinpoints=_pinpoints(size),
            vision_aspect_ratio="anyres_max_9", vision_feature_select_strategy="full", vision_feature_layer=-1,
        )
    if family in QWEN_FAMILIES:
        text["rope_parameters"] = {
            "rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": _mrope_section(hidden_size // 4),
        }
        vision = dict(depth=2, num_heads=2, patch_size=QWEN_PATCH, spatial_merge_size=2, temporal_patch_size=2)
        if family == "qwen2_vl":
            # Qwen2-VL: ``embed_dim`` is the ViT width, ``hidden_size`` the merger output (= text hidden).
            vision.update(embed_dim=VISION_HIDDEN, hidden_size=hidden_size, mlp_ratio=2)
            cls = tf.Qwen2VLConfig
        else:
            # Qwen2.5-VL: ``hidden_size`` is the ViT width, ``out_hidden_size`` the merger output. A window of
            # 112 px = 4 merged units (8x8 patches), so a 12x16-patch image really uses windowed attention;
            # block 1 is a full-attention block.
            vision.update(hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, out_hidden_size=hidden_size,
                          window_size=4 * 2 * QWEN_PATCH, fullatt_block_indexes=[1], tokens_per_second=2)
            cls = tf.Qwen2_5_VLConfig
        return cls(
            text_config=text, vision_config=vision, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
            vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID,
        )
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def build_tiny_model(
    family: str,
    attn_implementation: str = "sdpa",
    num_layers: int = 4,
    seed: int = 0,
    hidden_size: int = 64,
    dtype: torch.dtype = torch.float32,
    image_size: int | None = None,
) -> PreTrainedModel:
    """Build a tiny, randomly initialised ForConditionalGeneration model of ``family``.

    Args:
        family: one of :data:`FAMILIES`.
        attn_implementation: ``"eager"`` or ``"sdpa"`` (applied to text and vision towers).
        num_layers: number of text decoder layers.
        seed: ``torch.manual_seed`` used before initialisation, so the weights are deterministic.
        hidden_size: text hidden size (multiple of 8); the vision towers are fixed at width 32.
        dtype: parameter dtype.
        image_size: vision input resolution of the llava families (patch size 8), e.g. 224 gives
            28x28 patches, pooled to 14x14 = 196 tokens per video frame as in LLaVA-OneVision.

    Returns:
        The model in eval mode, on CPU.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if image_size is not None and (family in QWEN_FAMILIES or image_size % (2 * LLAVA_PATCH)):
        raise ValueError(f"image_size applies to the llava families and must be a multiple of {2 * LLAVA_PATCH}")
    config = _build_config(family, num_layers, hidden_size, image_size)
    for name, value in _TOKEN_IDS.items():
        setattr(config, name, value)
    torch.manual_seed(seed)
    model = getattr(tf, _CLASSES[family])._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    model.generation_config.update(**_TOKEN_IDS)
    model.eval()
    logger.debug("built tiny %s (%d params, attn=%s)", family, sum(p.numel() for p in model.parameters()),
                 attn_implementation)
    return model


def _family(model: PreTrainedModel) -> str:
    family = model.config.model_type
    if family not in FAMILIES:
        raise ValueError(f"unsupported model type {family!r}")
    return family


def _visual_inputs(
    model: PreTrainedModel, family: str, kind: str, num_frames: int,
    image_sizes: Sequence[tuple[int, int]] | None, gens: list[torch.Generator],
) -> dict[str, torch.Tensor]:
    """Random pixel tensors (plus grids / image sizes), one image or video per generator in ``gens``."""
    device, dtype, batch_size = model.device, model.dtype, len(gens)

    def rand(i: int, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gens[i]).to(device=device, dtype=dtype)

    if family in QWEN_FAMILIES:
        vc = model.config.vision_config
        t = 1 if kind == "image" else math.ceil(num_frames / vc.temporal_patch_size)
        grid = torch.tensor([[t, *QWEN_IMAGE_GRID]] * batch_size, dtype=torch.long, device=device)
        row = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        patches = torch.cat([rand(i, int(grid[i].prod()), row) for i in range(batch_size)])
        if kind == "image":
            return {"pixel_values": patches, "image_grid_thw": grid}
        return {"pixel_values_videos": patches, "video_grid_thw": grid}

    size = model.config.vision_config.image_size
    if kind == "video":
        return {"pixel_values_videos": torch.stack([rand(i, num_frames, 3, size, size) for i in range(batch_size)])}
    if family == "llava":
        return {"pixel_values": torch.stack([rand(i, 3, size, size) for i in range(batch_size)])}
    # anyres: one base view + one tile per pinpoint cell, zero-padded to the largest count in the batch
    sizes = list(image_sizes) if image_sizes is not None else [(size, size * 3 // 2)] * batch_size
    if len(sizes) != batch_size:
        raise ValueError(f"got {len(sizes)} image_sizes for batch_size {batch_size}")
    n_patches = [image_size_to_num_patches(list(s), model.config.image_grid_pinpoints, size) for s in sizes]
    pixel_values = torch.zeros(batch_size, max(n_patches), 3, size, size, device=device, dtype=dtype)
    for i, n in enumerate(n_patches):
        pixel_values[i, :n] = rand(i, n, 3, size, size)
    return {"pixel_values": pixel_values, "image_sizes": torch.tensor(sizes, dtype=torch.long, device=device)}


@torch.no_grad()
def _feature_counts(model: PreTrainedModel, kind: str, visual: dict, batch_size: int) -> list[int]:
    """Number of visual embeddings per sample, obtained by running the model's own feature extractor."""
    if kind == "image":
        kwargs = {k: v for k, v in visual.items() if k != "pixel_values"}
        out = model.get_image_features(visual["pixel_values"], **kwargs)
    else:
        kwargs = {k: v for k, v in visual.items() if k != "pixel_values_videos"}
        out = model.get_video_features(visual["pixel_values_videos"], **kwargs)
    feats = getattr(out, "pooler_output", out)
    hidden = model.config.text_config.hidden_size
    if isinstance(feats, torch.Tensor):
        if feats.dim() == 3:
            return [feats.shape[1]] * feats.shape[0]
        return [feats.numel() // hidden // batch_size] * batch_size
    return [t.numel() // hidden for t in feats]


def make_inputs(
    model: PreTrainedModel,
    kind: str = "image",
    batch_size: int = 1,
    text_lengths: tuple[int, ...] | None = None,
    num_frames: int = 4,
    seed: int = 0,
    padding_side: str = "left",
    image_sizes: Sequence[tuple[int, int]] | None = None,
    first_sample: int = 0,
) -> dict[str, torch.Tensor]:
    """Build inputs for a model from :func:`build_tiny_model`: one image (or video) per sample.

    Each sequence is ``[bos] text_a [vision_start] <visual placeholders> [vision_end] text_b``
    (bos only for the Llama/Mistral families, vision_start/end only for Qwen), where
    ``len(text_a) + len(text_b) == text_lengths[i]``. Sequences are padded with ``pad_token_id`` on
    ``padding_side`` and ``attention_mask`` is 0 there.

    Args:
        model: a tiny model (any family in :data:`FAMILIES`).
        kind: ``"image"`` (all families) or ``"video"`` (only :data:`VIDEO_FAMILIES`).
        batch_size: number of samples.
        text_lengths: random text tokens per sample; default 8 each.
        num_frames: frames per video (Qwen merges frame pairs: grid_t = ceil(num_frames / 2)).
        seed: seed of the private per-sample generators used for tokens and pixels (sample ``i``
            does not depend on ``batch_size``, the other samples or the padding side).
        padding_side: ``"left"`` or ``"right"``.
        image_sizes: anyres families only: original (height, width) per sample; default
            ``(S, 1.5 S)`` with ``S`` the vision tower's image size (exercises unpadding).
        first_sample: index of the first sample: ``make_inputs(..., batch_size=1, first_sample=i)``
            is sample ``i`` of a larger batch with the same seed, alone.

    Returns:
        ``input_ids``, ``attention_mask``, pixel tensors and the family's extras (``image_sizes``,
        ``image_grid_thw`` / ``video_grid_thw``, ``mm_token_type_ids`` for Qwen).
    """
    family = _family(model)
    if kind not in ("image", "video"):
        raise ValueError(f"kind must be 'image' or 'video', got {kind!r}")
    if kind == "video" and family not in VIDEO_FAMILIES:
        raise ValueError(f"{family} does not accept videos (video families: {VIDEO_FAMILIES})")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if image_sizes is not None and (kind != "image" or family not in ANYRES_FAMILIES):
        raise ValueError("image_sizes is only meaningful for images of the anyres families")
    text_lengths = tuple(text_lengths) if text_lengths is not None else (8,) * batch_size
    if len(text_lengths) != batch_size:
        raise ValueError(f"got {len(text_lengths)} text_lengths for batch_size {batch_size}")

    # One generator per sample: sample i is identical whatever the batch size / padding side.
    gens = [torch.Generator().manual_seed(seed * 1_000_003 + first_sample + i) for i in range(batch_size)]
    visual = _visual_inputs(model, family, kind, num_frames, image_sizes, gens)
    counts = _feature_counts(model, kind, visual, batch_size)
    placeholder = IMAGE_ID if kind == "image" else VIDEO_ID

    sequences, type_ids = [], []
    for n_text, n_vis, gen in zip(text_lengths, counts, gens):
        text = torch.randint(FIRST_TEXT_ID, VOCAB_SIZE, (n_text,), generator=gen).tolist()
        before, after = text[: n_text // 2], text[n_text // 2 :]
        prefix = [BOS_ID] if family in ("llava", "llava_next") else []
        open_, close = ([VISION_START_ID], [VISION_END_ID]) if family in QWEN_FAMILIES else ([], [])
        seq = prefix + before + open_ + [placeholder] * n_vis + close + after
        sequences.append(seq)
        type_ids.append([(1 if kind == "image" else 2) if t == placeholder else 0 for t in seq])

    length = max(len(s) for s in sequences)
    input_ids = torch.full((batch_size, length), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
    mm_token_type_ids = torch.zeros((batch_size, length), dtype=torch.long)
    for i, (seq, types) in enumerate(zip(sequences, type_ids)):
        span = slice(length - len(seq), length) if padding_side == "left" else slice(0, len(seq))
        input_ids[i, span] = torch.tensor(seq)
        attention_mask[i, span] = 1
        mm_token_type_ids[i, span] = torch.tensor(types)

    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if family in QWEN_FAMILIES:
        inputs["mm_token_type_ids"] = mm_token_type_ids
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    inputs.update(visual)
    logger.debug("%s %s inputs: shape %s, visual tokens per sample %s", family, kind, tuple(input_ids.shape), counts)
    return inputs


def visual_token_counts(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> list[int]:
    """Number of image/video placeholder tokens in each sample of ``inputs``."""
    ids = inputs["input_ids"]
    mask = ids == model.config.image_token_id
    if getattr(model.config, "video_token_id", None) is not None:
        mask |= ids == model.config.video_token_id
    return mask.sum(-1).tolist()


def visual_token_count(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> int:
    """Number of visual placeholder tokens per sample; raises ``ValueError`` if samples differ."""
    counts = set(visual_token_counts(model, inputs))
    if len(counts) != 1:
        raise ValueError(f"samples have different visual token counts: {sorted(counts)}")
    return counts.pop()
