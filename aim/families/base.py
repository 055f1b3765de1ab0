"""What a model family tells aim. Subclass `Family` in ``aim/families/<model_type>.py``.

No torch import at module level: the FLOPs model reads the family facts without it.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

ItemGroups = list  # per image / video: a list of index tensors (its merge groups)

# ids of the tiny test models' vocabulary (aim.tiny): shared by every family's tiny builder
PAD_ID, BOS_ID, EOS_ID, IMAGE_ID, VIDEO_ID, VISION_START_ID, VISION_END_ID = 0, 1, 2, 3, 4, 5, 6
FIRST_TEXT_ID = 8
VISION_HIDDEN = 32  # width of every tiny vision tower


class Family:
    """One model family. Set the class attributes; override what differs from the defaults.

    Patching (``aim.patch``):
        `image_groups` / `video_groups`: given the multimodal ``*Model``, the ``pooler_output`` of
        its feature function (one item per image / video) and that call's bound arguments, return
        for each item its merge groups as index tensors relative to the item's first feature.
        `rope_position_ids`: the position ids the decoder's rotary embedding takes.
    FLOPs model (``aim.flops``, from config dicts): `supports_video`, `video_markers`,
    `frames_per_group`, `default_tokens_per_frame`, `default_tokens_per_image`, `vision_shape`.
    Tiny test models (``aim.tiny``): `tiny_config`, `tiny_visual_inputs` and the prompt layout.
    """

    model_type: str = ""
    class_names: tuple[str, ...] = ()  # (*ForConditionalGeneration, *Model)
    module: str = ""  # the file that holds it (set when discovered)

    # --- patching --------------------------------------------------------------------------
    def image_groups(self, model: Any, features: Any, call: Any) -> ItemGroups:
        raise NotImplementedError

    def video_groups(self, model: Any, features: Any, call: Any) -> ItemGroups:
        return []  # image-only families

    def rope_position_ids(self, position_ids: Any) -> Any:
        """Position ids for ``rotary_emb(hidden, ids)`` from those the decoder was called with."""
        return position_ids

    def qk_modules(self, attention: Any) -> tuple[Any, Any]:
        """The submodules of a decoder layer's attention whose outputs are its query and key states
        before RoPE, shaped ``(batch, seq, heads * head_dim)`` or ``(batch, seq, heads, head_dim)``:
        PageRank ranks tokens from them. Default ``q_proj`` / ``k_proj``; models with q/k norms
        (Qwen3) return the norms, so the ranking sees the states attention uses."""
        return attention.q_proj, attention.k_proj

    def take_visual_additions(self, kwargs: dict) -> list | None:
        """Features the decoder adds to the hidden states at the visual positions after its first
        layers (Qwen3-VL's DeepStack). Pop them from the text decoder's keyword arguments `kwargs`
        and return one ``(visual tokens of the chunk, hidden)`` tensor per layer from layer 0 on,
        rows in the order of the chunk's visual positions (row-major over the batch); None where
        the family has none. The engine merges and prunes them with the tokens they belong to."""
        return None

    # `AIMConfig.frame_keep`: the video feature function takes pixel_values_videos (videos, frames,
    # ...) and returns pooler_output (videos, frames * tokens + video_markers, dim) (`aim.frames`)
    encodes_fewer_frames: bool = False

    # --- FLOPs facts ------------------------------------------------------------------------
    supports_video: bool = False
    video_markers: int = 0  # visual tokens per video outside every frame
    projector_on_patches: bool = True  # False: frames are pooled before the projector
    # the vision_config fields `vision_shape` reads (a config lacking one is completed by transformers)
    vision_fields: tuple[str, ...] = ("hidden_size", "intermediate_size", "num_hidden_layers", "patch_size", "image_size")

    def frames_per_group(self, vision: Any) -> int:
        """Video frames per LLM-side merge group."""
        return 1

    def default_tokens_per_frame(self, spec: Any) -> int | None:
        return None

    def default_tokens_per_image(self, spec: Any) -> int | None:
        grid = spec.vision.grid if spec.vision else None
        return grid * grid if grid else None

    def vision_shape(self, vision: Mapping, llm: Any):
        """The vision tower's `aim.flops.model_spec.VisionShape` from the config's ``vision_config``
        (default: a CLIP / SigLIP ViT), or None where the config lacks what it needs."""
        from ..flops.model_spec import VisionShape

        needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "patch_size", "image_size")
        if any(vision.get(n) is None for n in needed):
            return None
        return VisionShape(
            kind="clip" if "clip" in str(vision.get("model_type", "")) else "siglip",
            hidden_size=int(vision["hidden_size"]), intermediate_size=int(vision["intermediate_size"]),
            num_layers=int(vision["num_hidden_layers"]), patch_size=int(vision["patch_size"]),
            image_size=int(vision["image_size"]), num_channels=int(vision.get("num_channels", 3)),
            projector_hidden=llm.hidden_size, projector_on_patches=self.projector_on_patches,
        )

    # --- tiny test models -----------------------------------------------------------------
    tiny_image_size: int | None = None  # default input resolution of the tiny vision tower
    tiny_bos: bool = False  # prompts start with bos
    tiny_vision_markers: bool = False  # visual placeholders sit between vision_start / vision_end
    tiny_token_types: bool = False  # the model takes mm_token_type_ids
    tiny_anyres: bool = False  # images take image_sizes (any-resolution tiles)

    def model_class(self):
        """The ``*ForConditionalGeneration`` class (default: transformers' class of that name)."""
        import transformers

        return getattr(transformers, self.class_names[0])

    def tiny_config(self, text: dict, image_size: int | None):
        """A transformers config of this family with the decoder settings `text`."""
        raise NotImplementedError

    def tiny_visual_span(self, visual: dict, sample: int, kind: str, count: int) -> list[int]:
        """The prompt ids of sample `sample`'s image / video (`count` placeholders) in a tiny model's
        prompt: the placeholders, between vision_start / vision_end where the family uses them."""
        placeholder = IMAGE_ID if kind == "image" else VIDEO_ID
        if self.tiny_vision_markers:
            return [VISION_START_ID] + [placeholder] * count + [VISION_END_ID]
        return [placeholder] * count

    def tiny_visual_inputs(self, model: Any, kind: str, num_frames: int, image_sizes, rand: Callable, batch: int) -> dict:
        """Random pixel inputs of one image / video per sample; ``rand(i, *shape)`` draws sample i's."""
        raise NotImplementedError


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies into (t, h, w) like Qwen's [16, 24, 24] for head_dim 128."""
    half = head_dim // 2
    t = max(1, half // 4)
    h = (half - t) // 2
    return [t, h, half - t - h]


def ceil_half(n: int) -> int:
    return math.ceil(n / 2)
