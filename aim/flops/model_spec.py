"""Model shapes for the FLOPs model, read from a transformers config.

A config can be a built-in name (``aim/model_configs/<name>/config.json``: configs only, no
weights), a path to a ``config.json`` or a model folder, a config object or dict, or a loaded
model. :func:`load_model` turns it into a :class:`ModelSpec`: the LLM decoder shapes the FLOPs
convention needs, the vision tower's shapes for its separate estimate, and the model's default
visual tokens per frame / image.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..families import Family, family_for_model_type

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
# the paper's convention, stated once (the report, the CLI and the lmms-eval cost summary quote it)
CONVENTION = (
    "analytic prefill FLOPs = 2 x multiply-accumulates of the LLM decoder layers (q/k/v/o projections, "
    "gated MLP, QK^T and AV over the full n x n); no vision tower, no LM head"
)



def builtin_models() -> tuple[str, ...]:
    """Names of the shipped model configs (``aim/model_configs/<name>/config.json``)."""
    if not MODEL_CONFIG_DIR.is_dir():
        return ()
    return tuple(sorted(p.parent.name for p in MODEL_CONFIG_DIR.glob("*/config.json")))


# --------------------------------------------------------------------------------------------
# Model shapes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LLMShape:
    """The decoder-layer shapes that the FLOPs convention needs."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LLM {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    def linear_macs_per_token(self) -> int:
        """q, k, v, o projections and the gated MLP (gate, up, down) for one token."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size

    def attention_macs(self, queries: int, keys: int, causal: bool = False) -> int:
        """QK^T and AV of `queries` query tokens over `keys` keys: every pair (the paper's convention),
        or with ``causal=True`` only the pairs a causal kernel computes (the queries are the last
        `queries` of the `keys` positions: ``n (n + 1) / 2`` pairs for a prefill of ``n``)."""
        pairs = queries * keys
        if causal:
            pairs -= queries * (queries - 1) // 2
        return 2 * pairs * self.num_heads * self.head_dim

    def prefill_flops(self, tokens: int, causal: bool = False) -> int:
        """FLOPs (2 x MACs) of one decoder layer's prefill over `tokens` tokens."""
        return 2 * (tokens * self.linear_macs_per_token() + self.attention_macs(tokens, tokens, causal))

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes one token occupies in one layer's KV cache (keys and values)."""
        return 2 * self.num_kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class VisionShape:
    """A vision tower (ViT) plus its projector into the LLM, for an analytic estimate.

    kind: ``"clip"`` (class token), ``"siglip"``, ``"qwen2_vl"`` (non-gated MLP, 3-D patches,
    patch-merger projector) or ``"qwen2_5_vl"`` (gated MLP; window attention is counted as full
    attention over the frame, an upper bound).
    """

    kind: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    patch_size: int
    image_size: int | None = None
    num_channels: int = 3
    temporal_patch_size: int = 1
    spatial_merge_size: int = 1
    projector_hidden: int = 0  # LLM hidden size the projector maps into
    projector_on_patches: bool = True  # llava families: projector before (True) or after pooling

    @property
    def class_token(self) -> bool:
        return self.kind == "clip"

    @property
    def grid(self) -> int | None:
        return self.image_size // self.patch_size if self.image_size else None

    def tower_macs(self, patches: int) -> int:
        """Patch embedding and encoder layers for one image / frame (temporal slice) of `patches` patches."""
        h, i = self.hidden_size, self.intermediate_size
        n = patches + (1 if self.class_token else 0)
        embed = patches * self.num_channels * self.temporal_patch_size * self.patch_size**2 * h
        mlp = (3 if self.kind == "qwen2_5_vl" else 2) * h * i
        per_layer = n * (4 * h * h + mlp) + 2 * n * n * h
        return embed + self.num_layers * per_layer

    def projector_macs(self, patches: int, tokens: int) -> int:
        """Projector into the LLM for one image / frame: LLaVA's 2-layer MLP, Qwen's patch merger."""
        h, out = self.hidden_size, self.projector_hidden
        if self.kind in ("qwen2_vl", "qwen2_5_vl"):
            wide = h * self.spatial_merge_size**2
            return tokens * (wide * wide + wide * out)
        rows = patches if self.projector_on_patches else tokens
        return rows * (h * out + out * out)


@dataclass(frozen=True)
class ModelSpec:
    """What the FLOPs model knows about one multimodal model."""

    name: str
    model_type: str
    llm: LLMShape
    vision: VisionShape | None = None
    pool_stride: int = 2  # LLaVA-NeXT-Video's spatial pooling of video frames

    @property
    def family(self) -> Family | None:
        """The model's family (aim/families), None for a model aim does not patch."""
        return family_for_model_type(self.model_type)

    @property
    def supports_video(self) -> bool:
        return self.family is not None and self.family.supports_video

    @property
    def frames_per_group(self) -> int:
        """Video frames per LLM-side merge group (Qwen-VL encodes frame pairs as one temporal slice)."""
        return self.family.frames_per_group(self.vision) if self.family else 1

    @property
    def video_markers(self) -> int:
        """Visual tokens per video outside every frame (LLaVA-OneVision closes a video with one newline)."""
        return self.family.video_markers if self.family else 0

    def default_tokens_per_frame(self) -> int | None:
        """The model's own visual tokens per video frame, where its config fixes them."""
        return self.family.default_tokens_per_frame(self) if self.family else None

    def default_tokens_per_image(self) -> int | None:
        """Tokens of one image (or one anyres crop) where the config fixes them."""
        return self.family.default_tokens_per_image(self) if self.family else None

    def describe(self) -> str:
        m = self.llm
        return (
            f"{self.name}: LLM {m.num_layers} layers, hidden {m.hidden_size}, MLP {m.intermediate_size}, "
            f"{m.num_heads} heads / {m.num_kv_heads} KV heads, head_dim {m.head_dim}"
        )


def _read(config: Any) -> dict:
    """A plain dict from a config object, a dict, a config.json path / folder, or a built-in name."""
    if isinstance(config, Mapping):
        return _complete(dict(config))
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    if isinstance(config, (str, os.PathLike)):
        text = str(config)
        path = Path(text)
        if text in builtin_models():
            path = MODEL_CONFIG_DIR / text / "config.json"
        elif path.is_dir():
            path = path / "config.json"
        elif not path.is_file():
            raise ValueError(
                f"unknown model {text!r}: not a built-in name nor a config.json path. "
                f"Built-in models: {', '.join(builtin_models())}"
            )
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read model config {path}: {error}") from error
        if not isinstance(data, dict):
            raise ValueError(f"{path} does not hold a JSON object")
        return _complete(data)
    raise ValueError(
        f"cannot read a model config from {type(config).__name__}; give a built-in name "
        f"({', '.join(builtin_models())}), a config.json path, a dict or a transformers config"
    )


_LLM_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")


def _complete(data: dict) -> dict:
    """`data`, with transformers filling the defaults it leaves out only where the FLOPs model needs
    one (LLaVA-1.5's hub config omits Llama's): a complete config, such as every built-in one, is
    read without importing transformers (or torch)."""
    text = data.get("text_config") if isinstance(data.get("text_config"), Mapping) else {}
    vision = data.get("vision_config")
    llm_complete = all(text.get(n) is not None or data.get(n) is not None for n in _LLM_FIELDS)
    needed = (family_for_model_type(str(data.get("model_type", ""))) or Family()).vision_fields
    vision_complete = not isinstance(vision, Mapping) or all(vision.get(n) is not None for n in needed)
    return data if llm_complete and vision_complete else _normalise(data)


def _normalise(data: dict) -> dict:
    """Let transformers fill the defaults a hub config.json leaves out (LLaVA-1.5 omits Llama's)."""
    model_type = data.get("model_type")
    try:
        from transformers import AutoConfig

        return AutoConfig.for_model(model_type, **data).to_dict()
    except Exception:  # unknown to this transformers version, or not installed: take the file as it is
        return data


def _pick(*sources: Mapping | None, names: tuple[str, ...], default: Any = None) -> Any:
    for source in sources:
        if not source:
            continue
        for name in names:
            value = source.get(name)
            if value is not None:
                return value
    return default


def _llm_shape(data: dict) -> LLMShape:
    text = data.get("text_config") if isinstance(data.get("text_config"), Mapping) else None

    def get(*names, default=None):
        return _pick(text, data, names=names, default=default)

    hidden = get("hidden_size", "n_embd", "d_model")
    heads = get("num_attention_heads", "n_head")
    missing = [n for n, v in (("hidden_size", hidden), ("num_attention_heads", heads),
                              ("intermediate_size", get("intermediate_size")),
                              ("num_hidden_layers", get("num_hidden_layers"))) if v is None]
    if missing:
        raise ValueError(f"the model config lacks LLM field(s) {missing} (looked in text_config and the top level)")
    head_dim = get("head_dim") or hidden // heads
    return LLMShape(
        hidden_size=int(hidden),
        intermediate_size=int(get("intermediate_size")),
        num_layers=int(get("num_hidden_layers")),
        num_heads=int(heads),
        num_kv_heads=int(get("num_key_value_heads", default=heads)),
        head_dim=int(head_dim),
    )


def _vision_shape(data: dict, model_type: str, llm: LLMShape) -> VisionShape | None:
    vision = data.get("vision_config")
    if not isinstance(vision, Mapping):
        return None
    return (family_for_model_type(model_type) or Family()).vision_shape(vision, llm)


def load_model(model: Any) -> ModelSpec:
    """A `ModelSpec` from a built-in name, a config.json path or folder, a dict, a transformers
    config, a loaded transformers model, or a `ModelSpec` (returned as is)."""
    if isinstance(model, ModelSpec):
        return model
    name = str(model) if isinstance(model, (str, os.PathLike)) else None
    if not isinstance(model, Mapping) and hasattr(model, "config") and not hasattr(model, "to_dict"):
        model = model.config  # a loaded model
    data = _read(model)
    model_type = str(data.get("model_type", ""))
    llm = _llm_shape(data)
    spec = ModelSpec(
        name=name or data.get("_name_or_path") or model_type or "model",
        model_type=model_type,
        llm=llm,
        vision=_vision_shape(data, model_type, llm),
        pool_stride=int(data.get("spatial_pool_stride") or 2),
    )
    return spec
