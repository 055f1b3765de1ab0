"""``aim_llava_hf``: lmms-eval's ``llava_hf`` (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision through
transformers) with AIM applied after loading. Model arguments: those of ``llava_hf`` plus the AIM
ones (see ``aim.integrations.lmms_eval.args``)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from lmms_eval.models.chat.llava_hf import LlavaHf as _LlavaHfChat
from lmms_eval.models.simple.llava_hf import LlavaHf as _LlavaHfSimple

from ..base import AIMModelMixin


def _single_process_device_map(kwargs: dict) -> dict:
    """Upstream's default ``device_map=""`` means "data parallel" with several processes, but on
    one process it reaches ``from_pretrained``, which transformers 5 refuses: use the device."""
    if not kwargs.get("device_map") and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        kwargs["device_map"] = str(kwargs.get("device") or "cuda")
    return kwargs


class AimLlavaHf(AIMModelMixin, _LlavaHfSimple):
    """lmms-eval's simple ``llava_hf`` + AIM (``--force_simple``; videos: decord, ``max_frames_num``
    frames sampled uniformly). Without ``device_map`` on a single process, the model loads on
    ``device`` (upstream's empty default fails in transformers 5)."""

    AIM_MODEL_ID = "aim_llava_hf"
    is_simple = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **_single_process_device_map(kwargs))


class AimLlavaHfChat(AIMModelMixin, _LlavaHfChat):
    """lmms-eval's chat ``llava_hf`` + AIM (the default resolution of ``aim_llava_hf``).

    Fixes over the upstream chat model, the same with and without AIM (and the simple model's
    ``device_map`` default):

    - video files are decoded as the simple model does: decord, ``max_frames_num`` frames (default
      32) sampled uniformly (upstream hands the path to the processor, which decodes every frame
      and needs torchcodec); a processor set to sample frames itself keeps its own rule;
    - a prompt with a video and no image passes ``images=None`` (upstream passes ``images=[]``,
      which transformers 5's image processors reject with an IndexError).
    """

    AIM_MODEL_ID = "aim_llava_hf"
    is_simple = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **_single_process_device_map(kwargs))
        video_processor = getattr(self._image_processor, "video_processor", None)
        if video_processor is not None:
            video_processor.fetch_videos = _decord_fetcher(int(self.max_frames_num or 32))
        self._image_processor = _NoEmptyMedia(self._image_processor)


class _NoEmptyMedia:
    """Processor proxy: empty ``images`` / ``videos`` lists become None; all else is the processor's."""

    def __init__(self, processor: Any) -> None:
        object.__setattr__(self, "_processor", processor)

    def __call__(self, *args: Any, **kwargs: Any):
        for key in ("images", "videos"):
            if kwargs.get(key) is not None and len(kwargs[key]) == 0:
                kwargs[key] = None
        return self._processor(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._processor, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._processor, name, value)


def _decord_fetcher(num_frames: int):
    from transformers.video_utils import load_video

    def uniform(metadata: Any, **_: Any) -> np.ndarray:
        return np.linspace(0, metadata.total_num_frames - 1, num_frames, dtype=int)

    def fetch_videos(video_url_or_urls: Any, sample_indices_fn: Any = None):
        if isinstance(video_url_or_urls, list):
            return list(zip(*[fetch_videos(x, sample_indices_fn) for x in video_url_or_urls]))
        return load_video(video_url_or_urls, backend="decord", sample_indices_fn=sample_indices_fn or uniform)

    return fetch_videos
