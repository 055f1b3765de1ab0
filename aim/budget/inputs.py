"""A prompt's token counts as the FLOPs and latency models see them (`InputSpec`): from the
prompt's placeholders before the vision tower runs, or from its visual layout after."""

from __future__ import annotations

from ..flops import InputSpec


def input_spec(text_tokens: int, groups: list[int], markers: int, video_groups: list[int]) -> InputSpec:
    """An `InputSpec` from one prompt's counts: `groups` are its frame / crop sizes, of which the
    runs in `video_groups` (groups per video) are videos (their groups must come first)."""
    return InputSpec(text_tokens=text_tokens, visual_groups=tuple(groups), marker_tokens=markers, videos=tuple(video_groups))


FRAME_KEEPS = (1.0, 0.5, 0.25)  # the fractions of each video's frames a latency budget may encode


def video_prompt_specs(input_ids, attention_mask, image_token: int | None, video_token: int, videos: int, frames: int,
                       markers: int, keeps: tuple[float, ...] = FRAME_KEEPS) -> dict[float, list[InputSpec]] | None:
    """Before the vision tower runs: for each frame fraction of `keeps`, one `InputSpec` per prompt
    of ``(batch, seq)`` `input_ids` as the LLM would see it with that many frames of each of the
    `videos` videos of `frames` frames (`markers` placeholders per video outside its frames).
    A prompt's image placeholders count as one merge group (their crops are not known here): the
    estimate errs on the cheap side, so frames are dropped only when even that does not fit.
    Fractions that keep as many frames as a larger one are left out. None when the placeholders
    do not split into equal videos (the model's own placeholder check then reports the mismatch)."""
    import torch

    from ..counts import kept_frames

    valid = torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask is not None and attention_mask.ndim == 2 and attention_mask.shape == input_ids.shape:
        valid = attention_mask.to(input_ids.device).bool()
    is_video = (input_ids == video_token) & valid
    is_image = (input_ids == image_token) & valid if image_token is not None else torch.zeros_like(valid)
    total = int(is_video.sum())
    if videos < 1 or frames < 1 or total % videos or total // videos <= markers or (total // videos - markers) % frames:
        return None
    per_video = total // videos
    per_frame = (per_video - markers) // frames
    counts = [(int(is_video[row].sum()), int(is_image[row].sum()), int(valid[row].sum())) for row in range(input_ids.shape[0])]
    if any(n_video % per_video for n_video, _, _ in counts):
        return None
    out, seen = {}, set()
    for keep in sorted(keeps, reverse=True):
        kept = len(kept_frames(frames, keep))
        if kept in seen:
            continue
        seen.add(kept)
        out[keep] = [
            input_spec(n_valid - n_video - n_image,
                       [per_frame] * (kept * (n_video // per_video)) + ([n_image] if n_image else []),
                       markers * (n_video // per_video), [kept] * (n_video // per_video))
            for n_video, n_image, n_valid in counts
        ]
    return out


def layout_specs(layout, valid) -> list[InputSpec]:
    """One `InputSpec` per prompt of a chunk, from its visual layout (`aim.layout.VisualLayout`)
    and ``(batch, seq)`` padding mask: text tokens, frame / crop sizes (videos first), markers."""
    placeholders = layout.visual.to(valid.device) & valid
    # frames the vision tower did not encode (frame_keep) never reach the LLM: neither text nor visual
    visual = placeholders & ~layout.dropped.to(valid.device) if layout.dropped is not None else placeholders
    specs = []
    for sample in range(valid.shape[0]):
        groups = layout.groups[sample] if sample < len(layout.groups) else []
        videos = layout.videos[sample] if sample < len(layout.videos) else []
        in_video = [i for video in videos for i in video]
        video_set = set(in_video)
        rest = [i for i in range(len(groups)) if i not in video_set]
        sizes = [int(groups[i].numel()) for i in in_video + rest]
        n_visual = int(visual[sample].sum())
        text = int(valid[sample].sum()) - int(placeholders[sample].sum())
        specs.append(input_spec(text, sizes, n_visual - sum(sizes), [len(v) for v in videos]))
    return specs
