"""The study model: a small LLaVA-OneVision-class video LLM, its offline processor, and batching.

The model is transformers' own ``LlavaOnevisionForConditionalGeneration`` (SigLIP vision tower,
2-layer GELU projector, Qwen2 decoder), configured through :mod:`aim.tiny`'s builders with a wider
vision tower (:data:`STUDY_MODEL`: 12 decoder layers of width 128, a 3-layer vision tower of width
96; the first shipped default model had 8 layers and width 64 there): 96 px frames, patch 8, so
12x12 patches per frame, pooled 2x2 by the model to 6x6 = 36 tokens per frame; an 8-frame clip is
8 x 36 + 1 (newline) = 289 visual tokens (16 frames: 577), a 96 px image 144 (base view) + 144 + 12
(one anyres tile with its row newlines) = 300.
(128 px frames, 64 tokens per frame, were tried first: a step costs about twice as much, and
after 400 steps (14 min on 2 CPU cores) only the colour questions were above chance; the longer
visual sequence also lengthens the plateau before attention finds the objects.)

The tokenizer is :func:`aim.integrations.lmms_eval.checkpoint.build_tokenizer` (a `tokenizers`
WordLevel vocabulary in a ``PreTrainedTokenizerFast``, ids laid out as in :mod:`aim.tiny`) with
filler words renamed to the study's words that it lacks. The processor is transformers'
``LlavaOnevisionProcessor``; its video processor needs torchvision, so where torchvision is missing
:func:`load_default_model` returns the tokenizer in its place. :func:`to_inputs` does not need the
processor's image/video classes: it builds exactly what the processor would (same chat template,
same placeholder counts, same CLIP normalisation; checked against the real processor in the tests
where torchvision is installed) with numpy, fast enough to stream training batches.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import transformers as tf
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from aim import tiny
from aim.integrations.lmms_eval import checkpoint

from . import data

logger = logging.getLogger(__name__)

#: where the trained default model ships (inside the package)
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "default_model"

#: sizes of the study model (LLM layers / width; vision tower width / depth; frame size): 12 LLM
#: layers, so that pruning at half depth resembles pruning the 28-layer models of the AIM paper
#: (the first default model had 8 layers and a 64-wide vision tower; its config.json has its sizes)
STUDY_MODEL = dict(num_layers=12, hidden_size=128, vision_hidden=96, vision_layers=3, image_size=data.FRAME_SIZE)

#: study words the lmms-eval tokenizer lacks; they replace its first filler words ``w0, w1, ...``
EXTRA_WORDS = tuple(dict.fromkeys(
    w for w in (*data.ANSWER_WORDS, *data.QUESTION_WORDS, *data.DESCRIPTION_WORDS) if w not in checkpoint.WORDS))


def build_model(
    seed: int = 0,
    num_layers: int = STUDY_MODEL["num_layers"],
    hidden_size: int = STUDY_MODEL["hidden_size"],
    vision_hidden: int = STUDY_MODEL["vision_hidden"],
    vision_layers: int = STUDY_MODEL["vision_layers"],
    image_size: int = STUDY_MODEL["image_size"],
    attn_implementation: str = "sdpa",
) -> tf.LlavaOnevisionForConditionalGeneration:
    """A randomly initialised study model (deterministic by ``seed``), in eval mode on CPU.

    The config is :mod:`aim.tiny`'s LLaVA-OneVision config (Qwen2 decoder with 4 heads / 2 KV heads,
    MLP 2x hidden, vocabulary of ``aim.tiny.VOCAB_SIZE``) with the SigLIP tower widened to
    ``vision_hidden`` (MLP 2x) and ``vision_layers`` deep.
    """
    config = tiny.build_config("llava_onevision", num_layers, hidden_size, image_size)
    vision = config.vision_config
    vision.hidden_size, vision.intermediate_size = vision_hidden, 2 * vision_hidden
    vision.num_hidden_layers, vision.num_attention_heads = vision_layers, max(1, vision_hidden // 32)
    torch.manual_seed(seed)
    model = tf.LlavaOnevisionForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    model.generation_config.update(**tiny.TOKEN_IDS)
    model.eval()
    logger.info("built study model: %d parameters", sum(p.numel() for p in model.parameters()))
    return model


def build_tokenizer() -> tf.PreTrainedTokenizerFast:
    """The lmms-eval checkpoint tokenizer with the study's missing words in place of filler words."""
    tokenizer = checkpoint.build_tokenizer()
    extend_vocabulary(tokenizer, EXTRA_WORDS)
    return tokenizer


def extend_vocabulary(tokenizer: tf.PreTrainedTokenizerFast, words: Sequence[str]) -> None:
    """Rename the filler words ``w0, w1, ...`` of a checkpoint tokenizer to ``words`` (same ids)."""
    from tokenizers import models

    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)
    renames = {f"w{i}": word for i, word in enumerate(words)}
    missing = [name for name in renames if name not in vocab]
    if missing:
        raise ValueError(f"not enough filler words for {len(words)} new words")
    vocab = {renames.get(token, token): i for token, i in vocab.items()}
    tokenizer.backend_tokenizer.model = models.WordLevel(vocab=vocab, unk_token="<unk>")


def build_processor(model: tf.PreTrainedModel) -> tf.ProcessorMixin:
    """transformers' ``LlavaOnevisionProcessor`` for ``model``, with :func:`build_tokenizer`'s
    vocabulary. Needs torchvision (transformers' video processors do); raises ``ImportError``
    without it."""
    processor = checkpoint.build_processor(model)
    extend_vocabulary(processor.tokenizer, EXTRA_WORDS)
    return processor


def save_model(model: tf.PreTrainedModel, outdir: str | Path) -> Path:
    """Save the model (safetensors) with its processor, or only its tokenizer without torchvision."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(outdir)
    try:
        build_processor(model).save_pretrained(outdir)
    except ImportError as err:
        logger.warning("saving the tokenizer only (the processor needs torchvision): %s", err)
        build_tokenizer().save_pretrained(outdir)
    return outdir


@contextlib.contextmanager
def _no_progress_bar():
    was_enabled = tf.utils.logging.is_progress_bar_enabled()
    tf.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            tf.utils.logging.enable_progress_bar()


def study_model_dir(path: str | Path | None = None) -> Path:
    """The folder of a trained study model: ``path``, or the shipped :data:`DEFAULT_MODEL_DIR`."""
    return Path(path) if path is not None else DEFAULT_MODEL_DIR


def load_default_model(path: str | Path | None = None, attn_implementation: str = "sdpa"):
    """Load the trained study model and its processor from ``path`` (default: the shipped
    :data:`DEFAULT_MODEL_DIR`); offline, in eval mode, on CPU.

    Returns:
        ``(model, processor)``: the processor is the saved ``LlavaOnevisionProcessor`` where it can
        be built (torchvision installed, processor files saved), otherwise the saved tokenizer; both
        work with :func:`to_inputs`.
    """
    path = study_model_dir(path)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no trained study model in {path}; train one with `python -m aim.study.train`")
    with _no_progress_bar():  # a 5 MB model loads in milliseconds: a bar would only clutter reports
        model = tf.LlavaOnevisionForConditionalGeneration.from_pretrained(
            path, attn_implementation=attn_implementation, local_files_only=True,
        )
    model.eval()
    try:
        processor = tf.AutoProcessor.from_pretrained(path, local_files_only=True)
        if not isinstance(processor, tf.ProcessorMixin):
            raise ImportError("no processor saved")
    except (ImportError, OSError, ValueError, AttributeError) as err:
        logger.info("using the tokenizer alone (processor unavailable: %s)", str(err).strip().splitlines()[0])
        processor = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, processor


# ------------------------------------------------------------------------------------------
# Examples -> model inputs
# ------------------------------------------------------------------------------------------


def visual_token_count(config: tf.PretrainedConfig, is_video: bool, frames: int = data.NUM_FRAMES) -> int:
    """Placeholder tokens of one clip / one square image of the model's input size, counted as
    ``LlavaOnevisionProcessor`` counts them: a video is ``frames x ceil(p/2)^2 + 1`` (pooled frames
    and one newline), a square image ``p^2`` (base view) ``+ p^2 + p`` (one tile and a newline per
    row), where ``p`` is the number of patches per side."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    if is_video:
        return frames * math.ceil(side / 2) ** 2 + 1
    return 2 * side * side + side


def prompt_text(question: str, is_video: bool) -> str:
    """The chat-template prompt of one question (the template of :mod:`aim.integrations.lmms_eval.checkpoint`)."""
    placeholder = "<video>" if is_video else "<image>"
    return f"<|im_start|>user\n{placeholder}\n{question}<|im_end|>\n<|im_start|>assistant\n"


def follow_up_text(answer: str, question: str) -> str:
    """Text that closes an answer and asks a further question in the same conversation."""
    return f"{answer}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def normalise(pixels: np.ndarray) -> np.ndarray:
    """uint8 ``(..., H, W, 3)`` -> float32 ``(..., 3, H, W)``, rescaled and CLIP-normalised like the
    LLaVA-OneVision image / video processors (frames already at the model's size: no resize)."""
    mean = np.asarray(OPENAI_CLIP_MEAN, dtype=np.float32)
    std = np.asarray(OPENAI_CLIP_STD, dtype=np.float32)
    x = (pixels.astype(np.float32) / 255.0 - mean) / std
    return np.moveaxis(x, -1, -3)


def to_inputs(
    examples: Sequence[data.Example],
    processor,
    config: tf.PretrainedConfig,
    turns: int = 1,
    complete: bool = False,
) -> dict[str, torch.Tensor]:
    """Batch ``examples`` as the LLaVA-OneVision processor would: chat prompts with the visual
    placeholder expanded to the model's visual token count, left padding, ``pixel_values_videos``
    ``(n_videos, T, 3, H, W)`` and/or ``pixel_values`` ``(n_images, 2, 3, H, W)`` (base view + one
    tile) with ``image_sizes`` and ``batch_num_images``. Videos and images may be mixed.

    Args:
        examples: examples of :mod:`aim.study.data`; frames must be at the model's input size.
        processor: the study processor or its tokenizer.
        config: the model's config (visual token counts, placeholder ids).
        turns: questions per example: ``1`` asks the first question (the prompt ends where its
            answer is due, so ``logits[:, -1]`` predict it); ``k > 1`` makes a conversation of up to
            ``k`` of the example's questions, each followed by its answer except the last.
        complete: also append the last question's answer (training: every answer token is then a
            target).

    Returns:
        the model's inputs plus ``answer_positions`` / ``answer_ids`` ``(B, K)`` (``-1`` / ``-100``
        where an example has fewer): the position whose next-token logits predict each answer
        token (counted in the padded sequence) and that token's id. A one-word answer is one
        target; a several-word answer (a description) is one target per word and one for the
        ``<|im_end|>`` that closes it, so that the model learns where to stop. Targets of the
        last question beyond its first token need ``complete=True`` (without it the prompt ends
        where the answer is due).
    """
    if not examples:
        raise ValueError("no examples")
    tokenizer = getattr(processor, "tokenizer", processor)
    size = config.vision_config.image_size
    sequences, answer_pos, answer_ids = [], [], []
    for example in examples:
        if example.pixels.shape[-3:-1] != (size, size):
            raise ValueError(f"frames must be {size}x{size} (the model's input size), got {example.pixels.shape}")
        qa = example.qa[: max(1, turns)]
        text = prompt_text(qa[0].question, example.is_video)
        for prev, nxt in zip(qa[:-1], qa[1:]):
            text += follow_up_text(prev.answer, nxt.question)
        if complete:
            text += f"{qa[-1].answer}<|im_end|>"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        placeholder = config.video_token_id if example.is_video else config.image_token_id
        at = ids.index(placeholder)
        n = visual_token_count(config, example.is_video, len(example.pixels) if example.is_video else 1)
        ids = ids[:at] + [placeholder] * n + ids[at + 1 :]
        # each "assistant" position is where an answer is due; its words follow it one by one
        ends = [i for i, t in enumerate(ids) if t == _assistant_id(tokenizer)]
        pos, ans = [], []
        for k, (end, q) in enumerate(zip(ends, qa)):
            if k < len(qa) - 1 or complete:
                tokens = answer_tokens(tokenizer, q.answer)
                if ids[end + 1 : end + 1 + len(tokens)] != tokens:  # pragma: no cover - tokenizer guard
                    raise RuntimeError(f"answer {q.answer!r} is not where it was expected in the prompt")
            else:  # the prompt ends where the answer is due: its first word is the target
                tokens = [tokenizer.convert_tokens_to_ids(q.answer.split(" ")[0])]
            pos.extend(range(end, end + len(tokens)))
            ans.extend(tokens)
        sequences.append(ids)
        answer_pos.append(pos)
        answer_ids.append(ans)
    length = max(len(s) for s in sequences)
    width = max(len(p) for p in answer_pos)
    batch = len(examples)
    input_ids = torch.full((batch, length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    positions = torch.full((batch, width), -1, dtype=torch.long)
    targets = torch.full((batch, width), -100, dtype=torch.long)
    for i, (ids, pos, ans) in enumerate(zip(sequences, answer_pos, answer_ids)):
        pad = length - len(ids)
        input_ids[i, pad:] = torch.tensor(ids)
        attention_mask[i, pad:] = 1
        positions[i, : len(pos)] = torch.tensor(pos) + pad
        targets[i, : len(ans)] = torch.tensor(ans)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    videos = [e.pixels for e in examples if e.is_video]
    images = [e.pixels for e in examples if not e.is_video]
    if videos:
        inputs["pixel_values_videos"] = torch.from_numpy(normalise(np.stack(videos)))
    if images:
        view = normalise(np.stack(images))
        inputs["pixel_values"] = torch.from_numpy(np.stack([view, view], axis=1))  # base view + the one tile
        inputs["image_sizes"] = torch.tensor([[size, size]] * len(images), dtype=torch.long)
        inputs["batch_num_images"] = torch.ones(len(images), dtype=torch.long)  # one image per sample
    inputs["answer_positions"] = positions
    inputs["answer_ids"] = targets
    return inputs


def model_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``inputs`` of :func:`to_inputs` without the answer bookkeeping (what the model's forward takes)."""
    return {k: v for k, v in inputs.items() if k not in ("answer_positions", "answer_ids")}


def answer_token_ids(processor, words: Sequence[str] = data.ANSWER_WORDS) -> list[int]:
    """Token ids of answer words (raises if a word is not in the vocabulary)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    ids = tokenizer.convert_tokens_to_ids(list(words))
    unknown = [w for w, i in zip(words, ids) if i == tokenizer.unk_token_id]
    if unknown:
        raise ValueError(f"answer words outside the vocabulary: {unknown}")
    return ids


def answer_tokens(tokenizer, answer: str) -> list[int]:
    """Target token ids of an answer: its word for a one-word answer; each word and the closing
    ``<|im_end|>`` for a several-word answer (raises on words outside the vocabulary)."""
    words = answer.split(" ")
    ids = tokenizer.convert_tokens_to_ids(words)
    if tokenizer.unk_token_id in ids:
        raise ValueError(f"answer words outside the vocabulary: {[w for w, i in zip(words, ids) if i == tokenizer.unk_token_id]}")
    return ids if len(ids) == 1 else [*ids, tokenizer.convert_tokens_to_ids("<|im_end|>")]


def _assistant_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("assistant")
