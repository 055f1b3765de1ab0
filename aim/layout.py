"""Where the visual tokens sit in the LLM input, and how they group into frames / crops.

A model family describes its visual features as *merge groups*: index lists into the
concatenated features of one modality (one group = one frame or one image crop, in
spatial order; structural tokens such as LLaVA's image-newline belong to no group).
The HF models write features into the placeholder positions in row-major order
(``inputs_embeds.masked_scatter``), so feature ``i`` lands on the ``i``-th placeholder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class VisualLayout:
    """Visual tokens of one LLM input chunk, on the host (`build_layout` places them on the CPU).

    visual: ``(batch, seq)`` bool, placeholder positions of images and videos.
    groups: per sample, 1-D tensors of sequence positions merged together (frames / crops).
    videos: per sample, for each video the indices into ``groups[sample]`` of its frames (temporal
        slices) in time order: what temporal merging works across.
    dropped: ``(batch, seq)`` bool, placeholder positions of video frames the vision tower did not
        encode (``AIMConfig.frame_keep``): removed before the first decoder layer; None: none.
    """

    visual: torch.Tensor
    groups: list[list[torch.Tensor]] = field(default_factory=list)
    videos: list[list[list[int]]] = field(default_factory=list)
    dropped: torch.Tensor | None = None


def chunk_groups(length: int, num_chunks: int) -> list[torch.Tensor]:
    """Split ``[0, length)`` into `num_chunks` equal consecutive groups (frames)."""
    if num_chunks < 1 or length % num_chunks:
        raise ValueError(f"cannot split {length} visual features into {num_chunks} equal frames")
    size = length // num_chunks
    return [torch.arange(i * size, (i + 1) * size) for i in range(num_chunks)]


def groups_without_markers(
    features: torch.Tensor, marker: torch.Tensor | None, base_tokens: int | None = None
) -> list[torch.Tensor]:
    """Groups of one image's features ``(n, dim)`` that skip marker tokens (image newlines).

    With `base_tokens`, the first `base_tokens` features (the base view of an any-resolution
    image) form one group and the rest (the high-resolution grid) another.
    """
    n = features.shape[0]
    keep = torch.ones(n, dtype=torch.bool)
    if marker is not None:
        keep = ~(features == marker.to(features.dtype)).all(dim=-1).cpu()
    positions = torch.arange(n)
    if base_tokens is None or base_tokens >= n:
        parts = [positions[keep]]
    else:
        parts = [positions[:base_tokens][keep[:base_tokens]], positions[base_tokens:][keep[base_tokens:]]]
    return [p for p in parts if p.numel()]


def match_item_groups(items, described, item_groups: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """The groups of each of `items` (the features as the model will place them), given the groups
    of the items as they were `described` when encoded. generate() may have repeated the items for
    beams / ``num_return_sequences`` (``[A, B] -> [A, A, B, B]``, per prompt); each placed item is
    matched to the described item it repeats (the same tensor, or equal features)."""
    items, described = list(items), list(described)
    if len(described) != len(item_groups):
        raise ValueError(f"image-token count mismatch: {len(described)} visual feature blocks but {len(item_groups)} described")

    def same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a is b or (a.shape == b.shape and a.stride() == b.stride() and a.data_ptr() == b.data_ptr())

    matched = []
    for item in items:
        index = next((i for i, d in enumerate(described) if same_memory(d, item)), None)
        if index is None:
            index = next((i for i, d in enumerate(described) if d.shape == item.shape and torch.equal(d, item)), None)
        if index is None:
            raise ValueError(
                f"visual features of shape {tuple(item.shape)} match none of the {len(described)} blocks the "
                "model encoded; AIM cannot tell their merge groups"
            )
        matched.append(item_groups[index])
    return matched


def flatten_item_groups(items, item_groups: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Turn per-item groups (relative to each image / video, one entry per item) into indices of
    the concatenated features, still one list per item."""
    items = list(items)
    if len(items) != len(item_groups):
        raise ValueError(f"image-token count mismatch: {len(items)} visual feature blocks but {len(item_groups)} described")
    out, start = [], 0
    for item, relative in zip(items, item_groups):
        if item.ndim != 2 or any(int(g.max()) >= item.shape[0] for g in relative if g.numel()):
            # e.g. transformers < 5.21 returned LLaVA-NeXT-Video features per frame: merging would
            # silently do nothing, so refuse instead
            raise ValueError(
                f"unexpected visual features of shape {tuple(item.shape)} for merge groups up to index "
                f"{max((int(g.max()) for g in relative if g.numel()), default=-1)}: aim expects one "
                "(tokens, dim) block per image / video; this transformers release may lay features out differently"
            )
        out.append([g + start for g in relative])
        start += item.shape[0]
    return out


def build_layout(
    input_ids: torch.Tensor,
    token_groups: list[tuple[int, list[list[torch.Tensor]], bool] | tuple[int, list[list[torch.Tensor]], bool, list]],
) -> VisualLayout:
    """Place recorded feature groups on the sequence.

    Args:
        input_ids: ``(batch, seq)`` token ids of the chunk.
        token_groups: per modality, ``(placeholder_token_id, items, is_video[, dropped])``: for each
            image / video its groups of feature indices as recorded from the model's feature
            functions, and optionally, per item, the feature indices of frames not encoded.
    """
    # host work: the recorded groups live on the host, and on a GPU each of the small per-frame
    # steps below would wait for the device; one copy of the ids instead
    input_ids = input_ids.cpu()
    batch = input_ids.shape[0]
    visual = torch.zeros_like(input_ids, dtype=torch.bool)
    dropped_mask = torch.zeros_like(visual)
    groups: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    videos: list[list[list[int]]] = [[] for _ in range(batch)]
    for token_id, items, is_video, *rest in token_groups:
        is_token = input_ids == token_id
        visual |= is_token
        if not items:
            continue
        placeholders = is_token.nonzero()  # row-major, the order masked_scatter fills
        count = placeholders.shape[0]
        for gone in (rest[0] if rest else ()):
            for indices in gone:
                if indices.numel() and int(indices.max()) >= count:
                    raise ValueError(
                        f"image-token count mismatch: the model produced more visual features than the "
                        f"{count} placeholder tokens (id {token_id}) in input_ids"
                    )
                where = placeholders[indices.to(placeholders.device)]
                dropped_mask[where[:, 0], where[:, 1]] = True
        for item in items:
            chain: list[tuple[int, int]] = []
            for group in item:
                if group.numel() == 0:
                    continue
                if int(group.max()) >= count:
                    raise ValueError(
                        f"image-token count mismatch: the model produced more visual features than the "
                        f"{count} placeholder tokens (id {token_id}) in input_ids"
                    )
                where = placeholders[group.to(placeholders.device)]
                samples = where[:, 0].unique()
                if samples.numel() != 1:
                    raise ValueError(
                        "image-token count mismatch: one image/frame's features span two prompts of the batch; "
                        f"each prompt must hold exactly as many placeholder tokens (id {token_id}) as its images give features"
                    )
                sample = int(samples)
                chain.append((sample, len(groups[sample])))
                groups[sample].append(where[:, 1])
            if is_video and len(chain) > 1 and len({sample for sample, _ in chain}) == 1:
                videos[chain[0][0]].append([index for _, index in chain])
    return VisualLayout(visual=visual, groups=groups, videos=videos, dropped=dropped_mask if dropped_mask.any() else None)
