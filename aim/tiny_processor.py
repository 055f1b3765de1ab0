"""A processor for the tiny Qwen models (`aim.tiny`), saved beside them, so that engines that
process raw images / videos themselves (vLLM) can load a tiny model from a folder.

The tokenizer is a word-level vocabulary over the tiny ids: the special tokens at the ids the tiny
configs use, then ``w8`` .. ``w319`` for the text ids.
"""

from __future__ import annotations

from pathlib import Path

from .families.base import BOS_ID, EOS_ID, FIRST_TEXT_ID, IMAGE_ID, PAD_ID, VIDEO_ID, VISION_END_ID, VISION_START_ID

SPECIAL = {
    "<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID, "<|image_pad|>": IMAGE_ID, "<|video_pad|>": VIDEO_ID,
    "<|vision_start|>": VISION_START_ID, "<|vision_end|>": VISION_END_ID, "<unk>": 7,
}
# pixels per image / frame of the tiny Qwen inputs: 12x16 patches of 14 px (aim.families.qwen2_vl)
IMAGE_PIXELS = (12 * 14) * (16 * 14)


def tiny_tokenizer(vocab_size: int):
    """A fast tokenizer whose ids are the tiny models' ids (text ids are the words ``w<id>``)."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = dict(SPECIAL)
    vocab.update({f"w{i}": i for i in range(FIRST_TEXT_ID, vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = tf.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL if t.startswith("<|")]})
    return tokenizer


def save_tiny_qwen(model, path: str | Path) -> Path:
    """Save a tiny Qwen2-VL / Qwen2.5-VL model with a processor that resizes every image and frame
    to the tiny inputs' 168x224 pixels (12x16 patches)."""
    import transformers as tf

    path = Path(path)
    model.save_pretrained(path)
    vision = model.config.vision_config
    size = {"shortest_edge": IMAGE_PIXELS, "longest_edge": IMAGE_PIXELS}
    common = dict(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                  temporal_patch_size=vision.temporal_patch_size, size=size)
    image_processor = tf.Qwen2VLImageProcessor(**common)
    video_processor = tf.Qwen2VLVideoProcessor(**common, do_sample_frames=False)
    processor_class = tf.Qwen2_5_VLProcessor if model.config.model_type == "qwen2_5_vl" else tf.Qwen2VLProcessor
    processor = processor_class(image_processor=image_processor, tokenizer=tiny_tokenizer(model.config.text_config.vocab_size),
                                video_processor=video_processor)
    processor.save_pretrained(path)
    return path
