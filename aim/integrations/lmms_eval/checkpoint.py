"""A tiny LLaVA-OneVision (or Qwen2-VL, Qwen3-VL) "checkpoint" built offline: random weights, a word-level
tokenizer and a real processor, saved with ``save_pretrained`` so that every loader (``from_pretrained``,
``AutoProcessor``, lmms-eval's ``llava_hf``) takes it like a hub checkpoint.

    python -m aim.integrations.lmms_eval.make_data OUTDIR --checkpoint OUTDIR/tiny-llava-ov

The model comes from :func:`aim.tiny.build_tiny_model` (ids: pad=0, bos=1, eos=2, image=3,
video=4, vocabulary of 320), so the tokenizer maps ``<image>`` / ``<video>`` to those ids. Answers
of a random-weight model are noise: this checkpoint is for cost and plumbing, not accuracy.
"""

from __future__ import annotations

from pathlib import Path

from aim import tiny

FAMILIES = ("llava_onevision", "qwen2_vl", "qwen3_vl")
QWEN_FAMILIES = ("qwen2_vl", "qwen3_vl")  # Qwen's names for the placeholder tokens



def chat_template(image: str, video: str) -> str:
    """A ChatML-like template that takes string content (lmms-eval's simple models) as well as
    lists of {"type": "image" | "video" | "text"} items (its chat models and the processor)."""
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for item in message['content'] %}"
        f"{{% if item['type'] == 'image' %}}{image}"
        f"{{% elif item['type'] == 'video' %}}{video}"
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


CHAT_TEMPLATE = chat_template("<image>\n", "<video>\n")
QWEN_CHAT_TEMPLATE = chat_template(
    "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
)
QWEN_TOKEN_NAMES = {
    "<image>": "<|image_pad|>", "<video>": "<|video_pad|>",
    "<vision_start>": "<|vision_start|>", "<vision_end>": "<|vision_end|>",
}

SPECIAL_TOKENS = {
    "<pad>": tiny.PAD_ID, "<s>": tiny.BOS_ID, "</s>": tiny.EOS_ID, "<image>": tiny.IMAGE_ID,
    "<video>": tiny.VIDEO_ID, "<vision_start>": tiny.VISION_START_ID, "<vision_end>": tiny.VISION_END_ID,
    "<unk>": 7, "<|im_start|>": tiny.FIRST_TEXT_ID, "<|im_end|>": tiny.FIRST_TEXT_ID + 1,
}

# Words of the synthetic QA prompts (the rest of the vocabulary is filler).
WORDS = (
    "user assistant system what which where how many colour color shape is the a an of in on to and "
    "moving moves move square circle triangle direction does it left right up down red green blue yellow "
    "white black purple orange cyan magenta answer with option letter from given choices directly video "
    "image frames frame object objects there are . , ? : ' ( ) A B C D E 0 1 2 3 4 5 6 7 8 9 yes no"
).split()


def _vocab(names: dict[str, str] | None = None) -> dict[str, int]:
    vocab = {(names or {}).get(token, token): i for token, i in SPECIAL_TOKENS.items()}
    next_id = max(vocab.values()) + 1
    for word in WORDS:
        if word not in vocab:
            vocab[word] = next_id
            next_id += 1
    filler = 0
    while next_id < tiny.VOCAB_SIZE:
        vocab[f"w{filler}"] = next_id
        filler += 1
        next_id += 1
    return vocab


def build_tokenizer(family: str = "llava_onevision"):
    """A `PreTrainedTokenizerFast` over a `tokenizers` WordLevel vocabulary (no download), with
    the family's names for the image / video placeholders."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = QWEN_TOKEN_NAMES if family in QWEN_FAMILIES else {}
    backend = Tokenizer(models.WordLevel(vocab=_vocab(names), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=[names.get(t, t) for t in SPECIAL_TOKENS if t not in ("<s>", "</s>", "<pad>", "<unk>")],
        padding_side="left",
        model_max_length=4096,
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE if names else CHAT_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids([names.get("<image>", "<image>"), names.get("<video>", "<video>"), "</s>"])
    if ids != [tiny.IMAGE_ID, tiny.VIDEO_ID, tiny.EOS_ID]:  # pragma: no cover - guards the vocabulary
        raise RuntimeError(f"tokenizer ids {ids} do not match aim.tiny's token layout")
    return tokenizer


def build_processor(model):
    """The model's own processor class, configured to match a tiny model's vision tower."""
    import transformers as tf

    family = model.config.model_type
    if family not in FAMILIES:
        raise ValueError(f"offline processors are built for {FAMILIES}, not {family!r}")
    if family in QWEN_FAMILIES:
        vc = model.config.vision_config
        shape = dict(patch_size=vc.patch_size, merge_size=vc.spatial_merge_size, temporal_patch_size=vc.temporal_patch_size)
        if family == "qwen3_vl":
            return tf.Qwen3VLProcessor(
                image_processor=tf.Qwen2VLImageProcessor(**shape), video_processor=tf.Qwen3VLVideoProcessor(**shape),
                tokenizer=build_tokenizer(family), chat_template=QWEN_CHAT_TEMPLATE,
            )
        return tf.Qwen2VLProcessor(
            image_processor=tf.Qwen2VLImageProcessor(**shape), video_processor=tf.Qwen2VLVideoProcessor(**shape),
            tokenizer=build_tokenizer(family), chat_template=QWEN_CHAT_TEMPLATE,
        )
    size = model.config.vision_config.image_size
    patch = model.config.vision_config.patch_size
    shape = {"height": size, "width": size}
    return tf.LlavaOnevisionProcessor(
        image_processor=tf.LlavaOnevisionImageProcessor(
            size=shape, image_grid_pinpoints=model.config.image_grid_pinpoints,
        ),
        video_processor=tf.LlavaOnevisionVideoProcessor(size=shape),
        tokenizer=build_tokenizer(),
        num_image_tokens=(size // patch) ** 2,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        vision_aspect_ratio=model.config.vision_aspect_ratio,
        chat_template=CHAT_TEMPLATE,
    )


def build_checkpoint(
    outdir: str | Path, family: str = "llava_onevision", num_layers: int = 4, hidden_size: int = 64, seed: int = 0,
) -> Path:
    """Save a tiny random-weight model of ``family`` with its processor into ``outdir``.

    Returns the folder, to be given as ``pretrained=`` to lmms-eval or ``from_pretrained``.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    outdir = Path(outdir)
    if family == "qwen3_vl":
        model = _tiny_qwen3_vl(num_layers, hidden_size, seed)
    else:
        model = tiny.build_tiny_model(family, num_layers=num_layers, hidden_size=hidden_size, seed=seed)
    processor = build_processor(model)
    outdir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(outdir)
    processor.save_pretrained(outdir)
    return outdir


QWEN3_VL_PATCH = 16  # Qwen3-VL's patch size; lmms-eval's qwen3_vl sizes images for it (image_patch_size=16)


def _tiny_qwen3_vl(num_layers: int, hidden_size: int, seed: int):
    """aim.tiny's Qwen3-VL with the released models' 16 px patches (lmms-eval's ``qwen3_vl`` resizes
    images to multiples of 2 x 16 px and tells the processor not to resize them again)."""
    import torch

    from aim.families import family_for_model_type

    config = tiny.build_config("qwen3_vl", num_layers, hidden_size)
    config.vision_config.patch_size = QWEN3_VL_PATCH
    torch.manual_seed(seed)
    model = family_for_model_type("qwen3_vl").model_class()._from_config(config, attn_implementation="sdpa")
    model.generation_config.update(**tiny.TOKEN_IDS)
    return model.eval()
