"""Visual additions to the first LLM layers (Qwen3-VL's DeepStack): the vision tower's features of
intermediate depths are added to the hidden states of the visual tokens after the first decoder
layers. The engine carries them beside each token (`TokenSet.extras`), so merging merges them with
the same groups and pruning keeps them aligned.
"""

from __future__ import annotations

import torch

from .layout import VisualLayout
from .tokens import TokenSet


def scatter_additions(additions: list, layout: VisualLayout | None, like: torch.Tensor) -> torch.Tensor:
    """The per-layer visual additions (rows in the order of the chunk's visual positions) laid on
    the chunk as one ``(batch, seq, layers * hidden)`` tensor, zero off the visual positions."""
    if layout is None:
        raise ValueError("visual additions (DeepStack features) came without visual features in this call")
    visual = layout.visual.to(like.device)
    count = int(visual.sum())
    for i, rows in enumerate(additions):
        if rows.shape != (count, like.shape[-1]):
            raise ValueError(
                f"image-token count mismatch: layer {i}'s visual additions have shape {tuple(rows.shape)}, "
                f"but the chunk holds {count} visual placeholder tokens of width {like.shape[-1]}"
            )
    extras = like.new_zeros(*visual.shape, len(additions) * like.shape[-1])
    extras[visual] = torch.cat([rows.to(like.dtype) for rows in additions], dim=-1)
    return extras


def add_visual(tokens: TokenSet, layer_idx: int) -> None:
    """Add layer `layer_idx`'s visual additions to the visual tokens present, as the decoder does
    after that layer (its DeepStack step)."""
    dim = tokens.hidden.shape[-1]
    add = tokens.extras[..., layer_idx * dim : (layer_idx + 1) * dim]
    where = (tokens.visual & tokens.valid).unsqueeze(-1)
    tokens.hidden = torch.where(where, tokens.hidden + add.to(tokens.hidden.dtype), tokens.hidden)
