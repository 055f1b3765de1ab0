"""What enters the LLM, described by counts: text tokens, merge groups (frames / crops),
markers, and the vision-tower passes behind them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .model_spec import ModelSpec, load_model


@dataclass(frozen=True)
class InputSpec:
    """What enters the LLM, described by counts.

    Attributes:
        text_tokens: text tokens (system prompt, question, structural tokens); never pruned.
        visual_groups: visual tokens of each merge group (frame / crop / temporal slice) as the
            model's own pooling leaves them, before AIM merging.
        marker_tokens: visual placeholder tokens in no group (LLaVA-OneVision's video newline):
            never merged, but they count as visual tokens for pruning, as in the engine.
        vision_patches: patches of each vision-tower pass (image, frame or temporal slice), for
            the vision estimate; empty: no estimate.
        videos: how many consecutive groups (from the first) form each video, in time order (what
            temporal merging works across); groups after them are images.
        description: a readable summary.
    """

    text_tokens: int
    visual_groups: tuple[int, ...] = ()
    marker_tokens: int = 0
    vision_patches: tuple[int, ...] = ()
    description: str = ""
    videos: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "visual_groups", tuple(int(g) for g in self.visual_groups))
        object.__setattr__(self, "vision_patches", tuple(int(p) for p in self.vision_patches))
        object.__setattr__(self, "videos", tuple(int(v) for v in self.videos))
        if any(v < 1 for v in self.videos) or sum(self.videos) > len(self.visual_groups):
            raise ValueError(f"videos {self.videos} must count >= 1 groups each, at most the {len(self.visual_groups)} groups")
        if not isinstance(self.text_tokens, int) or self.text_tokens < 0:
            raise ValueError(f"text_tokens must be an integer >= 0, got {self.text_tokens!r}")
        if any(g < 0 for g in self.visual_groups):
            raise ValueError(f"visual group sizes must be >= 0, got {self.visual_groups}")
        if self.marker_tokens < 0:
            raise ValueError(f"marker_tokens must be >= 0, got {self.marker_tokens}")
        if self.total_tokens < 1:
            raise ValueError("the input holds no tokens")

    @property
    def visual_tokens(self) -> int:
        return sum(self.visual_groups) + self.marker_tokens

    @property
    def total_tokens(self) -> int:
        return self.text_tokens + self.visual_tokens

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(visual_tokens=self.visual_tokens, total_tokens=self.total_tokens)
        return out


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _text(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"text_tokens must be an integer >= 0, got {value!r}")
    return value


def video_input(model: Any, frames: int, tokens_per_frame: int | None = None, text_tokens: int = 100) -> InputSpec:
    """One video of `frames` frames with `tokens_per_frame` visual tokens each (after the model's
    pooling; default: the model's own count, 196 for LLaVA-OneVision at 384 px), plus text.

    Qwen-VL models encode frame pairs as one temporal slice: `tokens_per_frame` is then per slice,
    and there are ``ceil(frames / 2)`` slices. LLaVA-OneVision adds its one video newline token.
    """
    spec = load_model(model)
    frames = _positive("frames", frames)
    text_tokens = _text(text_tokens)
    if not spec.supports_video:
        raise ValueError(f"{spec.name} ({spec.model_type}) takes images, not video: describe the input as images")
    if tokens_per_frame is None:
        tokens_per_frame = spec.default_tokens_per_frame()
        if tokens_per_frame is None:
            raise ValueError(f"{spec.name}: give tokens_per_frame (it depends on the frame resolution)")
    tokens_per_frame = _positive("tokens_per_frame", tokens_per_frame)
    groups = math.ceil(frames / spec.frames_per_group)
    patches = _patches_per_pass(spec, tokens_per_frame)
    what = "temporal slices" if spec.frames_per_group > 1 else "frames"
    desc = f"{frames} frames" + (f" = {groups} {what}" if groups != frames else "") + f" x {tokens_per_frame} visual tokens"
    if spec.video_markers:
        desc += f" (+{spec.video_markers} newline)"
    return InputSpec(
        text_tokens=text_tokens,
        visual_groups=(tokens_per_frame,) * groups,
        marker_tokens=spec.video_markers,
        vision_patches=(patches,) * groups if patches else (),
        description=desc + f" + {text_tokens} text tokens",
        videos=(groups,),
    )


def image_input(model: Any, images: int, tokens_per_image: int | None = None, text_tokens: int = 100) -> InputSpec:
    """`images` images (or any-resolution crops) of `tokens_per_image` visual tokens each, plus text.
    Each image / crop is one merge group and one vision-tower pass."""
    spec = load_model(model)
    images = _positive("images", images)
    text_tokens = _text(text_tokens)
    if tokens_per_image is None:
        tokens_per_image = spec.default_tokens_per_image()
        if tokens_per_image is None:
            raise ValueError(f"{spec.name}: give tokens_per_image (it depends on the image resolution)")
    tokens_per_image = _positive("tokens_per_image", tokens_per_image)
    patches = _patches_per_pass(spec, tokens_per_image, image=True)
    return InputSpec(
        text_tokens=text_tokens,
        visual_groups=(tokens_per_image,) * images,
        vision_patches=(patches,) * images if patches else (),
        description=f"{images} image(s) x {tokens_per_image} visual tokens + {text_tokens} text tokens",
    )


def _patches_per_pass(spec: ModelSpec, tokens: int, image: bool = False) -> int:
    """Vision-tower patches behind one frame / image of `tokens` LLM tokens."""
    v = spec.vision
    if v is None:
        return 0
    if v.kind in ("qwen2_vl", "qwen2_5_vl"):
        return tokens * v.spatial_merge_size**2
    return v.grid**2 if v.grid else 0


# --------------------------------------------------------------------------------------------
# Costs
