"""Tiny random-weight vision-language models, built entirely in code (no hub access).

The models are instances of the real ``transformers`` ForConditionalGeneration classes, with
configs shrunk so that a forward pass on CPU takes milliseconds; each family's own file
(``aim/families/<model_type>.py``) says how to build its config and pixel inputs.
:func:`make_inputs` builds matching inputs (placeholder tokens, pixel values and the family's
extra tensors) that can be passed straight to ``model(**inputs)`` or ``model.generate(**inputs)``.

Token layout shared by every family (vocab of :data:`VOCAB_SIZE` ids):
``pad=0, bos=1, eos=2, image=3, video=4, vision_start=5, vision_end=6``; random text tokens are
drawn from ``[FIRST_TEXT_ID, VOCAB_SIZE)``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from .families import Family, all_families, family_for_model_type
from .families.base import BOS_ID, EOS_ID, FIRST_TEXT_ID, IMAGE_ID, PAD_ID, VIDEO_ID, VISION_END_ID, VISION_START_ID

logger = logging.getLogger(__name__)

__all__ = ["VOCAB_SIZE", "PAD_ID", "BOS_ID", "EOS_ID", "IMAGE_ID", "VIDEO_ID", "VISION_START_ID", "VISION_END_ID",
           "FIRST_TEXT_ID", "families", "build_config", "build_tiny_model", "make_inputs"]

VOCAB_SIZE = 320
TOKEN_IDS = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)


def families() -> tuple[str, ...]:
    """The ``model_type`` of every family a tiny model can be built of."""
    return tuple(f.model_type for f in all_families())


def _family(model_type: str) -> Family:
    family = family_for_model_type(model_type)
    if family is None:
        raise ValueError(f"unknown family {model_type!r}; expected one of {families()}")
    return family


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
        **TOKEN_IDS,
    )


def build_config(family: str, num_layers: int = 4, hidden_size: int = 64, image_size: int | None = None):
    """The tiny config of `family` (a ``model_type``), token ids set."""
    fam = _family(family)
    if image_size is not None and image_size % 16:
        raise ValueError("image_size must be a multiple of 16 (patch size 8, then 2x2 pooling)")
    config = fam.tiny_config(_text_kwargs(num_layers, hidden_size), image_size)
    for name, value in TOKEN_IDS.items():
        setattr(config, name, value)
    return config


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
        family: a ``model_type`` of :func:`families`.
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
    config = build_config(family, num_layers, hidden_size, image_size)
    torch.manual_seed(seed)
    cls = _family(family).model_class()
    model = cls._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    model.generation_config.update(**TOKEN_IDS)
    model.eval()
    logger.debug("built tiny %s (%d params, attn=%s)", family, sum(p.numel() for p in model.parameters()),
                 attn_implementation)
    return model


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
    (bos and the vision markers where the family uses them), where
    ``len(text_a) + len(text_b) == text_lengths[i]``. Sequences are padded with ``pad_token_id`` on
    ``padding_side`` and ``attention_mask`` is 0 there.

    Args:
        model: a tiny model (any family of :func:`families`).
        kind: ``"image"`` (all families) or ``"video"`` (families that take video).
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
    family = _family(model.config.model_type)
    if kind not in ("image", "video"):
        raise ValueError(f"kind must be 'image' or 'video', got {kind!r}")
    if kind == "video" and not family.supports_video:
        video = tuple(f.model_type for f in all_families() if f.supports_video)
        raise ValueError(f"{family.model_type} does not accept videos (video families: {video})")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if image_sizes is not None and (kind != "image" or not family.tiny_anyres):
        raise ValueError("image_sizes is only meaningful for images of the anyres families")
    text_lengths = tuple(text_lengths) if text_lengths is not None else (8,) * batch_size
    if len(text_lengths) != batch_size:
        raise ValueError(f"got {len(text_lengths)} text_lengths for batch_size {batch_size}")

    # One generator per sample: sample i is identical whatever the batch size / padding side.
    gens = [torch.Generator().manual_seed(seed * 1_000_003 + first_sample + i) for i in range(batch_size)]

    def rand(i: int, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gens[i]).to(device=model.device, dtype=model.dtype)

    visual = family.tiny_visual_inputs(model, kind, num_frames, image_sizes, rand, batch_size)
    counts = _feature_counts(model, kind, visual, batch_size)
    placeholder = IMAGE_ID if kind == "image" else VIDEO_ID

    sequences, type_ids = [], []
    for sample, (n_text, n_vis, gen) in enumerate(zip(text_lengths, counts, gens)):
        text = torch.randint(FIRST_TEXT_ID, VOCAB_SIZE, (n_text,), generator=gen).tolist()
        before, after = text[: n_text // 2], text[n_text // 2 :]
        prefix = [BOS_ID] if family.tiny_bos else []
        seq = prefix + before + family.tiny_visual_span(visual, sample, kind, n_vis) + after
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
    if family.tiny_token_types:
        inputs["mm_token_type_ids"] = mm_token_type_ids
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    inputs.update(visual)
    logger.debug("%s %s inputs: shape %s, visual tokens per sample %s", family.model_type, kind,
                 tuple(input_ids.shape), counts)
    return inputs
